"""A benchmark run side by side on this working tree and on another revision, alternating.

On a machine whose speed drifts by tens of percent within an hour (this project's development VMs:
the same plain loop took 3.9 s and 5.7 s an hour apart), a speed-up is only measured by running the
old and the new code alternately under the same conditions. This runs ``python -m MODULE ARGS`` from
each tree ``pairs`` times, alternating which goes first, and for every line the two trees print alike
(the same words, numbers aside, at the same occurrence) prints this tree's median of each number and,
for the numbers that moved, the ratio of the medians, this tree's over the other's.

Each run gets ``PYTHONPATH`` set to its tree and starts in an empty directory: Ray starts its workers
with the driver's working directory at the front of ``sys.path``, so a run started inside a checkout
has its Ray workers import that checkout's code whatever ``PYTHONPATH`` says (seen with Ray 2.55.1: run
from a checkout with ``PYTHONPATH`` on another tree, the driver imported the other tree's modules and
the Ray workers the checkout's, the checkout first on their ``sys.path``). The other
revision is checked out with ``git worktree`` into a temporary directory and removed afterwards; this
tree is used as it is, uncommitted changes included.

Run: ``python -m benchmarks.against REV [--pairs N] -- MODULE|SCRIPT.py [ARGS ...]`` (a script runs
from the path given, against each tree's packages), e.g.
``python -m benchmarks.against HEAD~3 --pairs 3 -- benchmarks.bench_engines --sizes 200 --rounds 8``,
or ``fedgluon bench engines --against HEAD~3 --pairs 3 -- --sizes 200 --rounds 8``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a number standing alone or before a unit letter ("1.77x"), not part of a word or a version ("AVX2", "2.13.0");
# thousands separated by commas ("109,066") are one number
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\.?\d)")

Key = tuple[str, int]  # a line's words with its numbers blanked, and its occurrence among such lines
Run = dict[Key, tuple[str, list[float]]]  # per line: its layout (numbers as "{}" with their format) and its numbers


def parse(output: str) -> Run:
    """The numbers of each line of a run's output (none for a header), keyed by the line's words
    (numbers replaced by ``#``, runs of spaces by one: padding moves with a number's width) and
    occurrence; blank lines are left out."""
    seen: Counter[str] = Counter()
    out: Run = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        numbers = [float(m.replace(",", "")) for m in NUMBER.findall(line)]
        layout = NUMBER.sub(_slot, line.rstrip().replace("{", "{{").replace("}", "}}"))
        words = " ".join(NUMBER.sub("#", line).split())
        out[(words, seen[words])] = (layout, numbers)
        seen[words] += 1
    return out


def _slot(number: re.Match) -> str:
    """A format slot printing a number as the line printed it: as many decimals, or 4 significant digits."""
    text = number.group(0)
    if "e" in text.lower():
        return "{:.4g}"
    comma = "," if "," in text else ""
    return f"{{:{comma}.{len(text.split('.')[1])}f}}" if "." in text else f"{{:{comma}.0f}}"


def _medians(runs: list[Run], key: Key) -> list[float]:
    return [statistics.median(run[key][1][i] for run in runs) for i in range(len(runs[0][key][1]))]


def report(new: list[Run], old: list[Run]) -> list[str]:
    """Per line both trees printed in every run: this tree's medians in the line's own layout (a line
    without numbers, a table's header say, as it is), then the ratio of medians (new / old) of each
    number that differed between runs."""
    runs = new + old
    keys = [k for k in new[0] if all(k in r and len(r[k][1]) == len(new[0][k][1]) for r in runs)]
    lines = []
    for key in keys:
        med_new, med_old = _medians(new, key), _medians(old, key)
        moved = [i for i in range(len(med_new)) if len({r[key][1][i] for r in runs}) > 1]
        ratios = " ".join(f"{med_new[i] / med_old[i]:.2f}" if med_old[i] else "-" for i in moved)
        lines.append(new[0][key][0].format(*med_new) + (f"   | new/old {ratios}" if moved else ""))
    return lines


def run_once(tree: Path, module: str, args: Sequence[str], cwd: Path) -> str:
    """One run of ``module`` (or of a script, given as a path ending in .py) with ``tree`` on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    target = [str(Path(module).resolve())] if module.endswith(".py") else ["-m", module]
    done = subprocess.run([sys.executable, *target, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed in {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


@contextmanager
def checkout(rev: str, repo: Path = REPO) -> Iterator[tuple[Path, Path]]:
    """Revision ``rev`` of ``repo`` checked out (``git worktree``, detached) into a temporary directory,
    and an empty directory to run from (module doc); both removed, and the worktree pruned, on exit.
    Raises ``RuntimeError`` naming ``rev`` when git cannot check it out."""
    with tempfile.TemporaryDirectory(prefix="fedgluon-against-") as tmp:
        other, cwd = Path(tmp) / "tree", Path(tmp) / "cwd"
        cwd.mkdir()
        added = subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(other), rev],
                               capture_output=True, text=True)
        if added.returncode != 0:
            raise RuntimeError(f"cannot check out {rev!r} from {repo}: {added.stderr.strip()}")
        try:
            yield other, cwd
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(other)], capture_output=True)
            subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)


def compare(rev: str, module: str, args: Sequence[str] = (), pairs: int = 3, repo: Path = REPO,
            echo=print) -> list[str]:
    """Run ``module`` ``pairs`` times from ``repo``'s working tree and from revision ``rev``, alternating;
    returns (and echoes) the report (module doc)."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    new: list[Run] = []
    old: list[Run] = []
    with checkout(rev, repo) as (other, cwd):
        for i in range(pairs):
            order = [(repo, new, "this tree"), (other, old, rev)]
            for tree, into, label in order if i % 2 == 0 else order[::-1]:
                echo(f"# pair {i + 1}/{pairs}: {label}")
                into.append(parse(run_once(tree, module, args, cwd)))
    lines = report(new, old)
    echo(f"# {module} {' '.join(args)}: medians of {pairs} runs of this tree; new/old against {rev}")
    for line in lines:
        echo(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="python -m benchmarks.against REV [--pairs N] -- MODULE|SCRIPT.py [ARGS ...]")
    ap.add_argument("rev", help="the revision to compare with (anything git understands)")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each tree (default 3)")
    args, command = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if not command:
        ap.error("name the benchmark module after --, e.g. -- benchmarks.bench_engines --sizes 200")
    compare(args.rev, command[0], command[1:], args.pairs)


if __name__ == "__main__":
    main()
