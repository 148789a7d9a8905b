"""Where a round's time goes: timestamps of its phases in the driver and in every Ray actor.

Set ``FEDGLUON_TRACE`` to a directory and each process of a run (the driver, and Ray's workers, which
inherit its environment) appends one JSON line per phase to ``DIR/trace-<pid>.jsonl``:
``{"phase", "round", "start", "end", "pid"}``, wall-clock seconds (comparable across the processes
of one machine). Workers of a Ray cluster that ``run_ray`` joins (``address=...``) have the
cluster's environment, not the driver's: set the variable where they start. The strategy records
``configure``, ``read`` (a reply read as it arrives, Ray only) and ``aggregate``; the ClientApp
records ``node`` (its whole train call: what lies outside it is Flower's and Ray's hand-off),
``unpack`` (the block's states), ``compute`` (the client steps) and ``pack`` (the reply).
Unset, a phase costs one environment lookup.

``python -m fedgluon.runtime.trace DIR`` prints, per phase and occurrence within a round (``read#1`` is the
round's second read), its start and end in ms from the start of the round's ``configure``: the
median over rounds and the range, rounds after ``--skip`` (default 2, the warm-up).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "FEDGLUON_TRACE"
log = logging.getLogger("fedgluon.runtime.trace")


@contextmanager
def phase(name: str, round: int) -> Iterator[None]:
    """Record the enclosed block as phase ``name`` of round ``round`` when ``FEDGLUON_TRACE`` is set."""
    where = os.environ.get(ENV)
    if not where:
        yield
        return
    start = time.time()
    try:
        yield
    finally:
        _write(Path(where), {"phase": name, "round": int(round), "start": start, "end": time.time(),
                             "pid": os.getpid()})


_failed: set[str] = set()


def _write(where: Path, event: dict) -> None:
    """Append one event; a directory that cannot be written is logged once and never stops a run."""
    try:
        where.mkdir(parents=True, exist_ok=True)
        with open(where / f"trace-{event['pid']}.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
    except OSError as err:
        if str(where) not in _failed:
            _failed.add(str(where))
            log.warning("%s=%s: cannot write the trace (%s); the run goes on without it", ENV, where, err)


def load(where: str | Path) -> list[dict]:
    """Every event of a trace directory."""
    events = []
    for path in sorted(Path(where).glob("trace-*.jsonl")):
        with open(path) as f:
            events += [json.loads(line) for line in f if line.strip()]
    return events


def summary(events: list[dict], skip: int = 2) -> list[tuple[str, float, float, float, float, float, float]]:
    """Per phase occurrence: (label, median start, min start, max start, median end, min end, max end) in
    ms from its round's ``configure`` start, over the rounds after the first ``skip`` that have one."""
    rounds: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        rounds[e["round"]].append(e)
    spans: dict[str, list[tuple[float, float]]] = {}  # labels in order of first appearance
    for k in sorted(rounds)[skip:]:
        configure = [e for e in rounds[k] if e["phase"] == "configure"]
        if not configure:
            continue
        t0 = configure[0]["start"]
        seen: dict[str, int] = defaultdict(int)
        for e in sorted(rounds[k], key=lambda e: e["start"]):
            label = f"{e['phase']}#{seen[e['phase']]}"
            seen[e["phase"]] += 1
            spans.setdefault(label, []).append((1e3 * (e["start"] - t0), 1e3 * (e["end"] - t0)))

    def stats(values: list[float]) -> tuple[float, float, float]:
        return statistics.median(values), min(values), max(values)

    rows = [(label, *stats([s for s, _ in se]), *stats([e for _, e in se])) for label, se in spans.items()]
    return sorted(rows, key=lambda row: row[1])  # by median start; ties in order of first appearance


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Summarise a FEDGLUON_TRACE directory: phases in ms from each "
                                             "round's configure start (median [min, max] over rounds)")
    ap.add_argument("where", help="the directory FEDGLUON_TRACE named")
    ap.add_argument("--skip", type=int, default=2, help="warm-up rounds left out (default 2)")
    args = ap.parse_args(argv)
    rows = summary(load(args.where), args.skip)
    if not rows:
        raise SystemExit(f"no rounds with a configure phase in {args.where} after skipping {args.skip}")
    print(f"{'phase':>12s} {'start ms':>10s} {'(range)':>17s} {'end ms':>10s} {'(range)':>17s}")
    for label, s, s0, s1, e, e0, e1 in rows:
        print(f"{label:>12s} {s:10.1f} {f'[{s0:.1f}, {s1:.1f}]':>17s} {e:10.1f} {f'[{e0:.1f}, {e1:.1f}]':>17s}")


if __name__ == "__main__":
    main()
