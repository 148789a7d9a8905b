"""Golden trajectories: every algorithm configuration's results, to check a refactor bit for bit.

Each configuration of :data:`CONFIGS` runs on a small synthetic task (:data:`TASK`: 6 clients, one
hidden layer, :data:`ROUNDS` rounds, seed :data:`SEED`; partial participation in some configurations,
refresh rounds for SARAH / MARINA) at client block sizes B = 1 and B = 4 on the plain driver
(``fedgluon.sim.driver.run_plain``), and the configurations of :data:`INPROCESS` also on the in-process
Flower engine (``fedgluon.flower.engines.run_inprocess``). A run's artefacts are

- ``metrics``: its metrics frame, every column but the timing ones (``fedgluon.sim.metrics.TIMING_COLUMNS``);
- ``clients``: its per-client rows (``clients.csv``: ``RunResult.client_log``);
- ``model``: the final model tensors (the server state's ``X``).

Floats are written as CSV with the shortest text that reads back to the same float64 (and read back
exactly: :func:`read_csv`), so a saved trajectory compares bit for bit with a fresh one.
Torch runs with one thread (``--threads``): the same float32 results on this machine, run after run.

    python -m benchmarks.golden                      # run this tree; print whether B = 1 equals B = 4
    python -m benchmarks.golden --save DIR           # ... and write its artefacts to DIR (others there are kept)
    python -m benchmarks.golden --against main       # this tree against revision main, on this machine
    python -m benchmarks.golden --against main --tolerance 1e-6 --only ef21   # a regular expression

``--against REV`` checks REV out into a temporary ``git worktree`` (``benchmarks.against.checkout``)
and runs *this* file in a subprocess once with REV's packages and once with this tree's (uncommitted
changes included), each saving to a temporary directory; then prints per configuration × B × engine
whether each artefact is bitwise equal or its largest absolute and relative difference, and exits
with status 1 when any difference exceeds ``--tolerance`` (default 0: bitwise). Integer-valued
columns (counts, bits, rounds, clients) and text columns must always be equal. It also prints, for
this tree, each configuration's B = 4 run against its B = 1 run and each in-process run against the
plain driver's at the same B: a row's results must not depend on its block (issue 28); where they do
today, the table says so (``--strict-blocks`` makes that an error too).

Only the public API is used (``fedgluon.config.spec``, ``run_plain``, ``run_inprocess``), and this file is
run as a script against the other revision's packages, so it must keep working on both sides of a
change it checks.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

TASK: dict[str, Any] = {"name": "synthetic", "num_clients": 6, "dim": 10, "classes": 4, "hidden": [16],
                        "mean_samples": 20, "batch_size": 24}
ROUNDS = 5
SEED = 3
BLOCKS = (1, 4)
HALF = {"participation": 0.5}  # 3 of the 6 clients a round: states kept across skipped rounds

# name -> spec fields over {"task": TASK, "rounds": ROUNDS, "seed": SEED}; the algorithm's lr is 0.05 unless set.
# At least one per registered algorithm (tests/integration/test_golden.py checks), some with refresh periods and
# partial participation; tests/integration/test_state_schema.py runs their algorithm sections too.
CONFIGS: dict[str, dict[str, Any]] = {
    "gluon": {"algorithm": {"name": "gluon"}},
    "gluon-nesterov-bf16": {"algorithm": {"name": "gluon", "nesterov": True, "state_dtype": "bfloat16"}, **HALF},
    "gluon-mvr": {"algorithm": {"name": "gluon-mvr"}, **HALF},
    "gluon-mvr-muon_mvr1": {"algorithm": {"name": "gluon-mvr", "variant": "muon_mvr1"}},
    "gluon-mvr-muon_mvr2": {"algorithm": {"name": "gluon-mvr", "variant": "muon_mvr2"}, **HALF},
    "gluon-sarah": {"algorithm": {"name": "gluon-sarah", "refresh_prob": 0.5}, **HALF},
    "limuon-r1": {"algorithm": {"name": "limuon", "rank": 1}},
    "gluon-marina": {"algorithm": {"name": "gluon-marina", "refresh_period": 3}, **HALF},
    "gluon-dasha-mvr": {"algorithm": {"name": "gluon-dasha-mvr"}, **HALF},
    "gluon-ef21": {"algorithm": {"name": "gluon-ef21"}, **HALF},
    "gluon-ef21-fixed16": {"algorithm": {"name": "gluon-ef21", "tracker": "fixed16"}},
    "gluon-ef21-ef14-powersgd": {"algorithm": {"name": "gluon-ef21", "error_feedback": "ef14",
                                               "compressor": {"name": "powersgd", "rank": 1}}, **HALF},
    "gluon-ef21-sarah-randk_seeded": {"algorithm": {"name": "gluon-ef21-sarah", "refresh_period": 3,
                                                    "compressor": {"name": "randk_seeded", "ratio": 0.6}}, **HALF},
    "gluon-ef21-mvr": {"algorithm": {"name": "gluon-ef21-mvr"}},
    "ef21-muon-bidir": {"algorithm": {"name": "ef21-muon-bidir"}, **HALF},
    "fedavg-topk-ef14": {"algorithm": {"name": "fedavg", "compressor": {"name": "topk", "ratio": 0.3},
                                       "error_feedback": "ef14"}, **HALF},
    "local-gluon-2": {"algorithm": {"name": "local-gluon", "local_steps": 2}},
    "sgd": {"algorithm": {"name": "sgd"}, **HALF},
    "adamw": {"algorithm": {"name": "adamw"}},
    "fedmuon-2": {"algorithm": {"name": "fedmuon", "local_steps": 2}, **HALF},
    "fedmuon-bc-2": {"algorithm": {"name": "fedmuon-bc", "local_steps": 2}},
    "diloco-2": {"algorithm": {"name": "diloco", "local_steps": 2}, **HALF},
    "muloco-2": {"algorithm": {"name": "muloco", "local_steps": 2}},
    "dion-r2": {"algorithm": {"name": "dion", "rank": 2}, **HALF},
    "orth-dion-r2": {"algorithm": {"name": "orth-dion", "rank": 2}},
}
# also run on the in-process Flower engine (it builds the same task and algorithm from the spec)
INPROCESS = ("gluon-ef21", "gluon-ef21-sarah-randk_seeded", "gluon-dasha-mvr", "ef21-muon-bidir", "local-gluon-2",
             "fedmuon-2", "dion-r2")
ENGINES = ("plain", "inprocess")
ARTEFACTS = ("metrics", "clients", "model")
# integer-valued columns: equal or wrong, whatever the tolerance (float columns of counts and bits included)
EXACT = re.compile(r"^(round|client|participants|accepted|rejected|failed|grad_evals|samples|refresh|receivers"
                   r"|up_.*|down_.*)$")

Artefacts = dict[str, Any]  # "metrics" / "clients": DataFrame, "model": {name: Tensor}


def spec_of(config: str, block_size: int) -> dict[str, Any]:
    """The run spec of configuration ``config`` at client block size ``block_size``."""
    fields = CONFIGS[config]
    return {"task": dict(TASK), "rounds": ROUNDS, "seed": SEED, "block_size": block_size,
            **{k: v for k, v in fields.items() if k != "algorithm"}, "algorithm": {"lr": 0.05, **fields["algorithm"]}}


def run_key(config: str, block_size: int, engine: str) -> str:
    return f"{config}.B{block_size}.{engine}"


def runs(only: str | None = None) -> list[tuple[str, int, str]]:
    """(configuration, B, engine) of every golden run; when ``only`` is given, those whose key
    (``CONFIG.B<b>.ENGINE``) the regular expression ``only`` matches a part of."""
    out = [(c, b, e) for c in CONFIGS for b in BLOCKS for e in ENGINES if e == "plain" or c in INPROCESS]
    return [r for r in out if only is None or re.search(only, run_key(*r))]


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as it reads back from CSV (:func:`to_csv`): the form saved and fresh runs compare in."""
    return read_csv(io.StringIO(to_csv(frame)))


def read_csv(source: Any) -> pd.DataFrame:
    """A frame :func:`to_csv` wrote, every float read back exactly (pandas >= 3 does so by default)."""
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(source, keep_default_na=False, na_values=["nan"], **exact)


def to_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, na_rep="nan")


def _module(name: str, flat_name: str) -> Any:
    """Module ``name``, or ``flat_name`` in a revision from before fedgluon's sub-packages (this file also runs
    against older trees). The flat name is tried first: an editable install of this tree would otherwise
    serve an old tree the new sub-packages."""
    from importlib import import_module

    try:
        return import_module(flat_name)
    except ModuleNotFoundError:
        return import_module(name)


def run_one(config: str, block_size: int, engine: str) -> Artefacts:
    """One golden run's artefacts (module doc)."""
    specs = _module("fedgluon.config.spec", "fedgluon.spec")
    TIMING_COLUMNS = _module("fedgluon.sim.metrics", "fedgluon.metrics").TIMING_COLUMNS

    s = specs.normalise(spec_of(config, block_size))
    if engine == "plain":
        run_plain = _module("fedgluon.sim.driver", "fedgluon.driver").run_plain
        task, algo = specs.build(s)
        res = run_plain(algo, task.objectives, task.initial_params(), s["rounds"], seed=s["seed"],
                        participation=s["participation"], evaluate=lambda X, k: task.evaluate(X),
                        block_size=block_size)
    elif engine == "inprocess":
        run_inprocess = _module("fedgluon.flower.engines", "fedgluon.engines").run_inprocess
        res = run_inprocess(s)  # its server evaluates like the plain driver above
    else:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    metrics = pd.DataFrame(res.history)
    metrics = metrics[[c for c in metrics.columns if c not in TIMING_COLUMNS]]
    model = {n: t.detach().to("cpu", copy=True) for n, t in res.server_state["X"].items()}
    return {"metrics": canonical(metrics), "clients": canonical(pd.DataFrame(res.client_log)), "model": model}


def run_all(only: str | None = None, threads: int = 1, echo: Callable[[str], None] | None = None
            ) -> dict[str, Artefacts]:
    """Every golden run's artefacts by :func:`run_key`, with torch on ``threads`` threads (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for r in runs(only):
            if echo:
                echo(f"# running {run_key(*r)}")
            out[run_key(*r)] = run_one(*r)
        return out
    finally:
        torch.set_num_threads(before)


MADE = ("torch", "python", "machine", "cpu_capability")  # where a golden run was made (about.json)


def save(goldens: Mapping[str, Artefacts], directory: Path) -> None:
    """``directory/<key>.metrics.csv``, ``<key>.clients.csv``, one ``models.pt`` ({key: {name: tensor}})
    and ``about.json`` (the task, and where each run was made). Goldens already in ``directory`` that
    ``goldens`` lacks are kept, so ``--save DIR --only CONFIG`` adds or re-records one configuration;
    goldens of another task, round count or seed are refused."""
    directory.mkdir(parents=True, exist_ok=True)
    about = {"rounds": ROUNDS, "seed": SEED, "task": TASK, "runs": {}}
    models = {}
    if (directory / "about.json").is_file():
        old = json.loads((directory / "about.json").read_text())
        if {k: old.get(k) for k in ("rounds", "seed", "task")} != {k: about[k] for k in ("rounds", "seed", "task")}:
            raise SystemExit(f"error: {directory} holds goldens of another task, round count or seed: save to an "
                             "empty directory")
        runs = old["runs"]  # before per-run provenance: a list of keys, one provenance at the top level
        about["runs"] = runs if isinstance(runs, dict) else {k: {f: old.get(f) for f in MADE} for k in runs}
        models = torch.load(directory / "models.pt", weights_only=True)
    made = dict(zip(MADE, (torch.__version__, platform.python_version(), platform.machine(),
                           torch.backends.cpu.get_cpu_capability())))
    for k, a in goldens.items():
        for what in ARTEFACTS[:2]:
            (directory / f"{k}.{what}.csv").write_text(to_csv(a[what]))
        models[k], about["runs"][k] = a["model"], made
    torch.save(dict(sorted(models.items())), directory / "models.pt")
    about["runs"] = dict(sorted(about["runs"].items()))
    (directory / "about.json").write_text(json.dumps(about, indent=1) + "\n")


def load(directory: Path) -> dict[str, Artefacts]:
    """The goldens :func:`save` wrote to ``directory``."""
    models = torch.load(directory / "models.pt", weights_only=True)
    return {k: {**{a: read_csv(directory / f"{k}.{a}.csv") for a in ARTEFACTS[:2]}, "model": m}
            for k, m in models.items()}


@dataclass
class Diff:
    """How one artefact differs from its reference: zero differences and no note when bitwise equal."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    within: bool = True  # every float within the tolerance, every exact column equal, the same layout
    note: str = ""  # a layout or exact-column difference, named
    where: list[str] = field(default_factory=list)  # the float columns or tensors that differ

    @property
    def equal(self) -> bool:
        return self.within and not self.note and self.max_abs == 0.0

    def text(self) -> str:
        if self.equal:
            return "bitwise equal"
        if self.note:
            return self.note
        where = ",".join(self.where[:2]) + ("..." if len(self.where) > 2 else "")
        return f"abs {self.max_abs:.2g} rel {self.max_rel:.2g} {where}" + ("" if self.within else " (!)")


def _numbers(name: str, new: np.ndarray, ref: np.ndarray, tolerance: float, into: Diff) -> None:
    """Fold float arrays into ``into``: NaN equals NaN; within when ``|new - ref| <= tolerance *
    (|ref| + max|ref|)`` elementwise (relative, with an absolute floor at the array's scale)."""
    new, ref = np.asarray(new, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    same_nan = np.isnan(new) == np.isnan(ref)
    if not same_nan.all():
        into.note, into.within = f"NaN in other places in {name}", False
        return
    ok = ~np.isnan(ref)
    new, ref = new[ok], ref[ok]
    if not ref.size:
        return
    gap = np.abs(new - ref)
    inf = ~np.isfinite(gap)  # an Inf on either side: equal or noted, no gap
    if (new[inf] != ref[inf]).any():
        into.note, into.within = f"Inf in other places in {name}", False
    gap[inf] = 0.0
    scale = np.abs(ref).max()
    if gap.max() > 0:
        into.where.append(name)
    into.max_abs = max(into.max_abs, float(gap.max()))
    rel = gap / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    into.max_rel = max(into.max_rel, float(rel.max()))
    if (gap > tolerance * (np.abs(ref) + scale)).any():
        into.within = False


def diff_frames(new: pd.DataFrame, ref: pd.DataFrame, tolerance: float = 0.0) -> Diff:
    """``new`` against ``ref``: the same columns (in any order) and rows, exact columns (:data:`EXACT`,
    text) equal, float columns within ``tolerance`` (:func:`_numbers`)."""
    out = Diff()
    extra, missing = sorted(set(new.columns) - set(ref.columns)), sorted(set(ref.columns) - set(new.columns))
    if extra or missing:
        return Diff(within=False, note=f"columns differ: +{extra} -{missing}")
    if len(new) != len(ref):
        return Diff(within=False, note=f"{len(new)} rows, expected {len(ref)}")
    unequal = []
    for c in ref.columns:
        a, b = new[c].to_numpy(), ref[c].to_numpy()
        numeric = pd.api.types.is_numeric_dtype(ref[c]) and pd.api.types.is_numeric_dtype(new[c])
        floats = pd.api.types.is_float_dtype(ref[c]) or pd.api.types.is_float_dtype(new[c])
        if numeric and floats and not EXACT.match(c):
            _numbers(c, a, b, tolerance, out)
        elif numeric:
            if not np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True):
                unequal.append(c)
        elif not (a.astype(str) == b.astype(str)).all():
            unequal.append(c)
    if unequal:
        out.within, out.note = False, f"differs in {', '.join(unequal[:3])}" + (" ..." if len(unequal) > 3 else "")
    return out


def diff_models(new: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], tolerance: float = 0.0) -> Diff:
    """``new`` against ``ref``: the same names, shapes and dtypes, values within ``tolerance``."""
    if sorted(new) != sorted(ref):
        return Diff(within=False, note=f"tensors differ: {sorted(set(new) ^ set(ref))}")
    out = Diff()
    for n in ref:
        if new[n].shape != ref[n].shape or new[n].dtype != ref[n].dtype:
            return Diff(within=False, note=f"{n}: {new[n].dtype} {tuple(new[n].shape)}, "
                                         f"expected {ref[n].dtype} {tuple(ref[n].shape)}")
        _numbers(n, new[n].double().numpy(), ref[n].double().numpy(), tolerance, out)
    return out


def diff(new: Artefacts, ref: Artefacts, tolerance: float = 0.0) -> dict[str, Diff]:
    """Each artefact of ``new`` against ``ref``."""
    return {a: (diff_models if a == "model" else diff_frames)(new[a], ref[a], tolerance) for a in ARTEFACTS}


def table(rows: Iterable[tuple[str, dict[str, Diff]]], first: str) -> list[str]:
    """Lines of a table: one row per (label, artefact diffs)."""
    width = 56
    lines = [f"{first:<{width}} " + " ".join(f"{a:<34}" for a in ARTEFACTS)]
    for label, d in rows:
        lines.append(f"{label:<{width}} " + " ".join(f"{d[a].text():<34}" for a in ARTEFACTS).rstrip())
    return lines


def compare_trees(new: Mapping[str, Artefacts], old: Mapping[str, Artefacts], tolerance: float = 0.0
                  ) -> tuple[list[str], bool]:
    """The table of every run of ``new`` against the same run of ``old``, and whether all are within
    ``tolerance`` (a run only one side has is a failure)."""
    rows, ok = [], True
    for k in sorted(set(new) | set(old), key=_order):
        if k in new and k in old:
            d = diff(new[k], old[k], tolerance)
        else:
            d = dict.fromkeys(ARTEFACTS, Diff(within=False, note="missing in " + ("the other" if k in new else
                                                                                  "this tree")))
        ok &= all(x.within and not x.note for x in d.values())
        rows.append(("  ".join(k.rsplit(".", 2)), d))  # CONFIG  B<b>  ENGINE
    return table(rows, "configuration  B  engine"), ok


def compare_blocks(goldens: Mapping[str, Artefacts]) -> tuple[list[str], bool]:
    """Within one tree: each configuration's runs at B > 1 against B = 1, and in-process against plain
    at the same B; bitwise. Returns the table and whether everything is bitwise equal."""
    rows, ok = [], True
    for k in sorted(goldens, key=_order):
        config, b, engine = _parts(k)
        refs = []
        if b != BLOCKS[0]:
            refs.append((run_key(config, BLOCKS[0], engine), f"{config}  B{b} vs B{BLOCKS[0]}  {engine}"))
        if engine != "plain":
            refs.append((run_key(config, b, "plain"), f"{config}  B{b}  {engine} vs plain"))
        for ref, label in refs:
            if ref in goldens:
                d = diff(goldens[k], goldens[ref])
                ok &= all(x.equal for x in d.values())
                rows.append((label, d))
    return table(rows, "configuration  comparison"), ok


def _parts(key: str) -> tuple[str, int, str]:
    config, b, engine = key.rsplit(".", 2)
    return config, int(b[1:]), engine


def _order(key: str) -> tuple[int, int, int]:
    config, b, engine = _parts(key)
    names = list(CONFIGS)
    return names.index(config) if config in names else len(names), b, ENGINES.index(engine) if engine in ENGINES else 9


def against(rev: str, only: str | None, threads: int, tolerance: float, echo: Callable[[str], None] = print
            ) -> tuple[list[str], bool, dict[str, Artefacts]]:
    """Save this tree's goldens and revision ``rev``'s, each from this file run in a subprocess on that
    tree's packages (``rev`` in a temporary git worktree), on this machine; compare them."""
    from benchmarks.against import REPO, checkout, run_once

    args = ["--threads", str(threads), *(["--only", only] if only else [])]
    with tempfile.TemporaryDirectory(prefix="fedgluon-golden-") as tmp:
        with checkout(rev) as (other, cwd):
            for tree, name, label in ((other, "old", rev), (REPO, "new", "this tree")):
                echo(f"# goldens of {label}")
                run_once(tree, str(Path(__file__).resolve()), [*args, "--save", str(Path(tmp) / name), "--quiet"], cwd)
        new, old = load(Path(tmp) / "new"), load(Path(tmp) / "old")
    lines, ok = compare_trees(new, old, tolerance)
    return lines, ok, new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", type=Path, help="write this tree's goldens to this directory")
    ap.add_argument("--against", metavar="REV", help="compare this tree with git revision REV, on this machine")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="largest relative difference of floats allowed with --against (default 0: bitwise)")
    ap.add_argument("--only", help="only the runs whose key (CONFIG.B<b>.ENGINE) this regular expression matches "
                    "a part of, e.g. '^gluon-ef21\\.' or 'B4.inprocess'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--strict-blocks", action="store_true", help="also fail when B = 4 differs from B = 1")
    ap.add_argument("--quiet", action="store_true", help="print nothing but errors (with --save)")
    args = ap.parse_args(argv)
    if args.tolerance < 0 or not math.isfinite(args.tolerance):
        ap.error(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    try:
        matched = args.only is None or runs(args.only)
    except re.error as e:
        ap.error(f"--only must be a regular expression: {e}")
    if not matched:
        ap.error(f"--only {args.only!r} matches no run; a run is CONFIG.B<b>.ENGINE, CONFIG one of {list(CONFIGS)}")
    echo = (lambda line: None) if args.quiet else print
    ok = True
    if args.against:
        try:
            lines, ok, goldens = against(args.against, args.only, args.threads, args.tolerance, echo)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        what = "bitwise" if args.tolerance == 0 else f"tolerance {args.tolerance:g}"
        echo(f"# this tree against {args.against} ({what}), {torch.backends.cpu.get_cpu_capability()}, "
             f"{args.threads} torch thread(s)")
        echo("\n".join(lines))
        echo(f"# {'all within' if ok else 'DIFFERENCES beyond'} {what}")
    else:
        goldens = run_all(args.only, args.threads, echo)
    if args.save:
        save(goldens, args.save)
    lines, blocks_ok = compare_blocks(goldens)
    echo("# within this tree: B = 4 against B = 1, in-process against plain (bitwise; issue 28 wants all equal)")
    echo("\n".join(lines))
    if len(lines) == 1:
        echo("# (no run at B = 4 or in-process among these)")
    echo(f"# {'all bitwise equal' if blocks_ok else 'some runs depend on the block size or engine'}")
    if args.strict_blocks and not blocks_ok:
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
