"""What moving a client block's states through Ray costs: the record's bytes pickled in band (Flower's
``Array``), as an out-of-band NumPy buffer (fedgluon's ``RawArray``), or written to a file in host
shared memory that the message names (strategies/shared.py).

Flower's simulation engine sends each node's message to a Ray actor and gets the reply back, both
pickled (protocol 5). A block's message carries the committed states of its clients, so for the
synthetic task's MLP (≈4.6k parameters, EMA momentum and EF21 tracker: ≈37 kB per client) a block of
100 clients is ≈3.7 MB each way. This benchmark builds that record (:func:`strategies.records.
states_to_record`) and sends it inside a Flower ``Message`` to an actor that does what a node does
with it (reads it into a writable copy) and replies with as many bytes of the same kind; the driver
then reads the reply as the server does (no copy; a file is mapped). It prints the median
milliseconds of that round trip for each kind and their ratios.

Run: ``python -m benchmarks.bench_transport [--clients 25 100 500] [--repeat 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine


def block_record(clients: int, params: int = 4_634, plain: bool = False, files=None):
    """A states record of ``clients`` clients with two fp32 tensors of ``params`` each (as Flower
    ``Array``s with ``plain``, else fedgluon's ``RawArray``s, or a file of ``files``)."""
    from flwr.app import Array, ArrayRecord

    from strategies.records import states_to_record

    gen = torch.Generator().manual_seed(0)
    states = {j: {"est": {"m": torch.randn(params, generator=gen)}, "ef": {"g": torch.randn(params, generator=gen)}}
              for j in range(clients)}
    record = states_to_record(states, files)
    if plain:
        record = ArrayRecord({k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
                              for k, a in record.items()})
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[25, 100, 500], help="clients per block")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="100 clients, 7 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.repeat = [100], 7
    import ray
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.records import Unpacker
    from strategies.shared import SharedFiles

    print(f"machine: {machine()}")
    # Flower's Message constructor reads the process's task identity; its runtimes set it like this
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Node:
        """Does with a block's states what a node does: reads them into a writable copy and replies
        with a record of as many bytes (inline, or as a file of the run's shared directory)."""

        def run(self, message, shm: str | None):
            from strategies.records import Unpacker, file_record, packed_record
            from strategies.shared import SharedFiles

            files = SharedFiles.attach(shm) if shm else None
            unpacker = Unpacker(message.content.array_records["states"], copy=True, files=files)
            size = unpacker.buffer.size
            name = files.write([unpacker.buffer], size) if files is not None else None
            if name is not None:
                return file_record(unpacker.layout, name, size)
            return packed_record(unpacker.layout, unpacker.buffer.tobytes())

    node = Node.remote()
    ray.get(node.run.remote(Message(RecordDict({"states": block_record(1)}), dst_node_id=1, message_type="train"),
                            None))
    files = SharedFiles.create()
    print(f"{'clients':>7s} {'MB':>6s} {'Array ms':>9s} {'RawArray ms':>12s} {'shared ms':>10s} "
          f"{'Array / RawArray':>17s} {'RawArray / shared':>18s}")
    try:
        for n in args.clients:
            times = {}
            for kind in ("Array", "RawArray", "shared"):
                record = block_record(n, plain=kind == "Array", files=files if kind == "shared" else None)
                message = Message(RecordDict({"states": record}), dst_node_id=1, message_type="train")
                shm = str(files.path) if kind == "shared" and files is not None else None
                trips = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    reply = Unpacker(ray.get(node.run.remote(message, shm)), copy=False, files=files)
                    trips.append(time.perf_counter() - t0)
                    assert reply.buffer.size == Unpacker(block_record(n)).buffer.size
                times[kind] = statistics.median(trips)
            mb = len(block_record(n)["data"].data) / 1e6
            a, r, f = times["Array"], times["RawArray"], times["shared"]
            print(f"{n:7d} {mb:6.1f} {1e3 * a:9.1f} {1e3 * r:12.1f} {1e3 * f:10.1f} {a / r:16.2f}x {r / f:17.2f}x",
                  flush=True)
    finally:
        if files is not None:
            files.close()
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
