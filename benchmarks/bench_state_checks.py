"""What the server's checks of a block's returned client state cost per round (fedgluon/flower/wire.py).

One real block reply: ``--block`` clients of the ``bench_engines`` model (gluon-ef21, top-5%) stepped
by ``Algorithm.step_block`` over their table rows and packed by ``results_to_records``, as a node sends
it. The server's ``read_replies`` checks each state column's header (dtype, shape, byte size) against
the schema before it copies anything, then scans the columns for NaN/Inf row by row. After an A/A pair
of whole reads, this times in ``--pairs`` interleaved rounds: the whole read; the header checks alone;
the scan alone; the block's client step (gradients, estimator, compression). It prints the machine,
the medians per block, and per round of ``--clients`` clients the checks' cost in ms and as a fraction
of the round's client step.

    python -m benchmarks.bench_state_checks                     # 1,000 clients x 107k parameters, blocks of 500
    python -m benchmarks.bench_state_checks --clients 100 --block 50 --hidden 64 --pairs 3   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedgluon.clients.table import ClientStateTable
from fedgluon.config import spec as specs
from fedgluon.flower import wire

from .common import machine, spec_for, timings


def _headers(arrays: ArrayRecord, meta: ConfigRecord, table: ClientStateTable,
             derived: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """Every run's travelling state columns, each header checked against the schema as ``read_replies`` does."""
    return [{p: wire._tensor(arrays[f"{r}/s/{p}"], wire._dtype_name(c.dtype), (len(meta[f"{r}/clients"]), *c.shape[1:]))
             for p, c in table.travelling(derived).items()} for r in range(meta["runs"])]


def _scan(runs: list[dict[str, torch.Tensor]], meta: ConfigRecord) -> list[list[int]]:
    """Every run's rows holding a NaN/Inf, as ``read_replies`` finds them."""
    return [wire._non_finite_rows(columns, len(meta[f"{r}/clients"])) for r, columns in enumerate(runs)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000, help="clients per round (default 1000)")
    ap.add_argument("--block", type=int, default=500, help="clients per block reply (default 500)")
    ap.add_argument("--hidden", type=int, default=1536, help="hidden width of the MLP (1536: ≈107k parameters)")
    ap.add_argument("--pairs", type=int, default=7, help="interleaved timings of each part (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    if min(args.clients, args.block, args.pairs, args.threads) < 1:
        ap.error("--clients, --block, --pairs and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    task, algo = specs.build(specs.normalise(spec_for(args.block, 1, args.block, args.hidden)))
    X0 = task.initial_params()
    table = ClientStateTable(algo.state_schema(task.objectives[0], X0, 0), args.block, algo.needs_previous)
    clients = list(range(args.block))
    bc = algo.broadcast(algo.init_server(X0), 0, 0, args.block)
    arrays, meta = wire.results_to_records(algo.step_block(table.rows(clients), bc, task.objectives), algo.derived)
    got = wire.read_replies(arrays, meta, clients, 0, table, algo.shapes, algo.derived)
    if got.rejected or got.failed or len(got.replies) != args.block:
        raise SystemExit(f"the block's reply was not accepted whole: {dict(list(got.rejected.items())[:3])}")
    params = sum(t.numel() for t in X0.values())
    travelling = table.travelling(algo.derived)
    scanned = sum(c.element_size() * c[0].numel() for c in travelling.values() if c.is_floating_point())
    print(f"{args.block} clients of a {params:,}-parameter model in {meta['runs']} run(s); returned state "
          f"{scanned / 1e6:.2f} MB per client in {len(travelling)} column(s) (the server derives the rest), "
          f"{scanned * args.block / 1e6:.1f} MB scanned per block; {args.threads} torch thread(s)")

    def read() -> object:
        return wire.read_replies(arrays, meta, clients, 0, table, algo.shapes, algo.derived)

    aa = timings(read, 2)
    runs = _headers(arrays, meta, table, algo.derived)
    parts: dict[str, Callable[[], object]] = {
        "read": read, "headers": lambda: _headers(arrays, meta, table, algo.derived), "scan": lambda: _scan(runs, meta),
        "step": lambda: algo.step_block(table.rows(clients), bc, task.objectives)}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(args.pairs):
        for name in list(parts) if i % 2 == 0 else list(parts)[::-1]:
            times[name] += timings(parts[name], 1)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    blocks = args.clients / args.block
    checks = ms["headers"] + ms["scan"]
    print(f"A/A whole read of the block: {1e3 * aa[0]:.2f} / {1e3 * aa[1]:.2f} ms")
    print(f"per block of {args.block} (medians of {args.pairs}): read {ms['read']:.2f} ms, headers "
          f"{ms['headers']:.3f} ms, scan {ms['scan']:.2f} ms, client step {ms['step']:.1f} ms")
    print(f"per round of {args.clients} clients: checks {checks * blocks:.1f} ms (headers "
          f"{ms['headers'] * blocks:.2f}, scan {ms['scan'] * blocks:.1f}), whole read {ms['read'] * blocks:.1f} ms, "
          f"client step {ms['step'] * blocks:.0f} ms")
    print(f"checks / client step: {checks / ms['step']:.2%}; whole read / client step: {ms['read'] / ms['step']:.2%}")


if __name__ == "__main__":
    main()
