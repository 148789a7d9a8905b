"""What moving a client block's state rows through Ray costs: the wire's arrays pickled in band (Flower's
``Array``) or as out-of-band NumPy buffers (fedgluon's ``RawArray``, fedgluon/flower/wire.py).

Flower's simulation engine pickles (protocol 5) each node's message to a Ray actor and the reply back. A
block's message carries its clients' rows of the client-state table: for the synthetic task's MLP
(≈4.6k parameters; gluon-ef21's EMA momentum and EF21 tracker, ≈37 kB a client) ≈3.7 MB per 100
clients. This packs a block's rows (random values) as the server does (``rows_to_record``: one array
per state column) into a Flower ``Message`` to an actor that reads them as a node does
(``record_to_rows``: tensors over the received bytes) and replies with the same columns packed again;
the driver reads the reply as rows. It prints the megabytes each way, the median round trip with each
kind of array and their ratio, and the median of the server's pack and read of the rows in process.

Run: ``python -m benchmarks.bench_transport [--clients 25 100 500] [--repeat 15] [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import machine, spec_for, timings


def block_rows(clients: int, hidden: int = 64):
    """A block's rows (clients 0..``clients``−1) of the ``bench_engines`` model's client-state table,
    filled with random values (seed 0)."""
    from fedgluon.clients.table import ClientStateTable
    from fedgluon.config import spec as specs

    task, algo = specs.build(specs.normalise(spec_for(clients, 1, clients, hidden)))
    table = ClientStateTable(algo.state_schema(task.objectives[0], task.initial_params(), 0), clients,
                             algo.needs_previous)
    gen = torch.Generator().manual_seed(0)
    for column in table.columns.values():
        if column.is_floating_point():
            column.copy_(torch.randn(column.shape, generator=gen, dtype=column.dtype))
    return table.rows(range(clients))


def in_band(record):
    """The record with each array as a plain Flower ``Array`` (its bytes pickled in band)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
                        for k, a in record.items()})


def _round_trip_ms(node, rows, plain: bool, repeat: int) -> float:
    """Median milliseconds of ``rows`` sent to ``node`` inside a Flower ``Message`` and read back as rows."""
    from flwr.app import Message, RecordDict

    from fedgluon.flower.wire import record_to_rows, rows_to_record

    states, prev = rows_to_record(rows)  # fedgluon's RawArrays (out-of-band buffers), or with plain Flower Arrays
    if plain:
        states, prev = in_band(states), in_band(prev)
    message = Message(RecordDict({"states": states, "prev": prev}), dst_node_id=1, message_type="train")

    def trip() -> None:
        import ray

        back = record_to_rows(rows.clients, ray.get(node.run.remote(message, plain)), prev)
        assert torch.equal(back.commits, rows.commits)

    return 1e3 * statistics.median(timings(trip, repeat))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[25, 100, 500], help="clients per block")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="100 clients, 7 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.repeat = [100], 7
    import ray
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedgluon.flower.wire import record_to_rows, rows_to_record

    print(f"machine: {machine()}")
    # Flower's Message constructor reads the process's task identity; its runtimes set it like this
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Node:
        """Does with a block's rows what a node does: reads them as tensors over the received bytes, and
        replies with the same columns packed again (in Flower ``Array``s when they came so)."""

        def run(self, message, plain: bool):
            from fedgluon.flower.wire import record_to_rows, rows_to_record

            content = message.content.array_records
            states = content["states"]
            rows = record_to_rows(range(states["@commits"].shape[0]), states, content["prev"])
            reply, _ = rows_to_record(rows)
            return in_band(reply) if plain else reply

    node = Node.remote()
    _round_trip_ms(node, block_rows(1), False, 1)  # the actor's imports
    print(f"{'clients':>7s} {'MB':>6s} {'Array ms':>9s} {'RawArray ms':>12s} {'Array / RawArray':>17s} "
          f"{'pack ms':>8s} {'read ms':>8s}")
    try:
        for n in args.clients:
            rows = block_rows(n)
            a, r = (_round_trip_ms(node, rows, plain, args.repeat) for plain in (True, False))
            packed, prev = rows_to_record(rows)
            pack, read = (1e3 * statistics.median(timings(fn, args.repeat)) for fn in (
                lambda: rows_to_record(rows), lambda: record_to_rows(rows.clients, packed, prev)))  # noqa: B023
            mb = sum(len(a.data) for a in packed.values()) / 1e6
            print(f"{n:7d} {mb:6.1f} {a:9.1f} {r:12.1f} {a / r:16.2f}x {pack:8.2f} {read:8.2f}", flush=True)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
