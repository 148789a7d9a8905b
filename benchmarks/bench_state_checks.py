"""What the server's client-state checks cost per round (fedgluon/state_schema.py).

One real block reply (``Algorithm.client_block`` of ``--block`` clients of the ``bench_engines``
model, packed by ``replies_to_record``) is read by the server as the Flower engines read it
(``BlockReplies(views=True)`` and ``parse`` of every client), with and without the schema (layout
check before any byte is read, one NaN/Inf scan per state column), in interleaved pairs after an A/A
pair; then the Federation's per-client check (``StateSchema.mismatch`` and
``Algorithm.derived_mismatch``) over the parsed states. Prints the machine, the medians, and the
added cost per round of ``--clients`` clients.

    python -m benchmarks.bench_state_checks                     # 1,000 clients x 107k parameters, blocks of 500
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedgluon import spec as specs
from fedgluon.algorithms import Broadcast
from strategies.records import BlockReplies, replies_to_record

from .bench_engines import spec_for
from .common import machine


def _read(record, clients, schema) -> float:
    started = time.perf_counter()
    replies = BlockReplies(record, views=True, schema=schema)
    for j in clients:
        replies.parse(j)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    spec = specs.normalise(spec_for(args.block, 1, args.block, args.hidden))
    task, algo = specs.build(spec)
    X0 = task.initial_params()
    schema = algo.state_schema(task.objectives[0], X0, 0)
    clients = list(range(args.block))
    bc = algo.broadcast(algo.init_server(X0), 0, 0, args.block)
    results = algo.client_block({j: None for j in clients}, bc, task.objectives, clients)
    record = replies_to_record(results)
    params = sum(t.numel() for t in X0.values())
    print(f"{args.block} clients of a {params:,}-parameter model, state {schema.nbytes / 1e6:.2f} MB per client, "
          f"{len(schema.leaves)} leaves; {args.threads} torch thread(s)")

    aa = [_read(record, clients, None) for _ in range(2)]
    off, on = [], []
    for _ in range(args.pairs):
        off.append(_read(record, clients, None))
        on.append(_read(record, clients, schema))
    parsed = BlockReplies(record, views=True, schema=schema)
    states = {j: parsed.parse(j)[1] for j in clients}
    fed_times = []
    for _ in range(args.pairs):
        started, seen = time.perf_counter(), set()
        for j in clients:
            assert schema.mismatch(states[j]) is None
            assert algo.derived_mismatch(None, states[j], bc, seen) is None
        fed_times.append(time.perf_counter() - started)
    blocks = args.clients / args.block
    wire = statistics.median(b - a for a, b in zip(off, on))
    fed = statistics.median(fed_times)
    print(f"A/A read of the block without checks: {aa[0] * 1e3:.1f} / {aa[1] * 1e3:.1f} ms")
    print(f"read without / with the schema (medians of {args.pairs} interleaved pairs): "
          f"{statistics.median(off) * 1e3:.1f} / {statistics.median(on) * 1e3:.1f} ms; "
          f"median added {wire * 1e3:.1f} ms per block")
    print(f"Federation's per-client check: {fed * 1e3:.1f} ms per block")
    print(f"added per round of {args.clients} clients: {(wire + fed) * blocks * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
