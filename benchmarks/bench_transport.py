"""What moving a client block's record through Ray costs, with the record's bytes pickled in band (Flower's
``Array``) or as an out-of-band NumPy buffer (fedgluon's ``RawArray``, strategies/records.py).

Flower's simulation engine sends each node's message to a Ray actor and gets the reply back, both
pickled (protocol 5). A block's message carries the committed states of its clients, so for the
synthetic task's MLP (≈4.6k parameters, EMA momentum and EF21 tracker: ≈37 kB per client) a block of
100 clients is ≈3.7 MB each way. This benchmark builds that record (:func:`strategies.records.
states_to_record`), sends it inside a Flower ``Message`` to an actor that sends it straight back,
and prints the median milliseconds from the call to the actor's start ("there") and from the actor's
return to the driver holding the reply ("back"), for both kinds of Array, and their ratio.

Run: ``python -m benchmarks.bench_transport [--clients 25 100 500] [--repeat 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine


def block_record(clients: int, params: int = 4_634, plain: bool = False):
    """A states record of ``clients`` clients with two fp32 tensors of ``params`` each (as Flower
    ``Array``s with ``plain``, else fedgluon's ``RawArray``s)."""
    from flwr.app import Array, ArrayRecord

    from strategies.records import states_to_record

    gen = torch.Generator().manual_seed(0)
    states = {j: {"est": {"m": torch.randn(params, generator=gen)}, "ef": {"g": torch.randn(params, generator=gen)}}
              for j in range(clients)}
    record = states_to_record(states)
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

    print(f"machine: {machine()}")
    # Flower's Message constructor reads the process's task identity; its runtimes set it like this
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Echo:
        def run(self, message):
            return time.time(), message

    echo = Echo.remote()
    ray.get(echo.run.remote(None))
    print(f"{'clients':>7s} {'MB':>6s} {'Array there':>12s} {'back':>7s} {'RawArray there':>15s} {'back':>7s} "
          f"{'Array / RawArray':>17s}")
    try:
        for n in args.clients:
            times = {}
            for plain in (True, False):
                record = block_record(n, plain=plain)
                message = Message(RecordDict({"states": record}), dst_node_id=1, message_type="train")
                there, back = [], []
                for _ in range(args.repeat):
                    t0 = time.time()
                    started, reply = ray.get(echo.run.remote(message))
                    t1 = time.time()
                    there.append(started - t0)
                    back.append(t1 - started)
                    assert reply.content.array_records["states"]["data"].data == record["data"].data
                times[plain] = (statistics.median(there), statistics.median(back))
            mb = len(block_record(n)["data"].data) / 1e6
            a, r = times[True], times[False]
            print(f"{n:7d} {mb:6.1f} {1e3 * a[0]:12.1f} {1e3 * a[1]:7.1f} {1e3 * r[0]:15.1f} {1e3 * r[1]:7.1f} "
                  f"{sum(a) / sum(r):16.2f}x", flush=True)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
