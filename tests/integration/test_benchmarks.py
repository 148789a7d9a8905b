"""The benchmarks that read the client-state table and the wire (benchmarks/bench_state_checks.py,
benchmarks/bench_memory.py) measure what they say, at tiny sizes."""

import re

import torch

from fedgluon.algorithms import make_algorithm
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.lmo.geometry import Geometry
from fedgluon.sim.driver import run_plain
from fedgluon.tasks.models import MLP


def test_state_check_benchmark_reads_a_whole_block_and_prices_its_checks(capsys):
    from benchmarks import bench_state_checks

    bench_state_checks.main(["--clients", "8", "--block", "4", "--hidden", "8", "--pairs", "1"])
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    # the block's reply was accepted whole by read_replies (the benchmark exits otherwise), state of 8 columns
    assert re.search(r"^4 clients of a [\d,]+-parameter model in 1 run\(s\); returned state [\d.]+ MB per client in "
                     r"4 column\(s\) \(the server derives the rest\)", out, re.MULTILINE), out
    per_round = re.search(r"per round of 8 clients: checks ([\d.]+) ms \(headers ([\d.]+), scan ([\d.]+)\)", out)
    assert per_round is not None, out
    checks, headers, scan = map(float, per_round.groups())
    assert abs(checks - headers - scan) <= 0.11  # rounded as printed; the checks are the header check and the scan
    assert re.search(r"checks / client step: [\d.]+%", out)


def test_memory_benchmark_counts_shared_models_once_and_a_row_per_client():
    from benchmarks.bench_memory import alone_and_marginal

    gen = torch.Generator().manual_seed(0)
    model = MLP(20, (16,), 4)
    objectives = [SupervisedObjective(model, torch.randn(8, 20, generator=gen),
                                      torch.randint(0, 4, (8,), generator=gen), batch_size=8) for _ in range(3)]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    P = sum(t.numel() for t in X0.values())
    algo = make_algorithm("gluon-ef21-sarah", Geometry.from_model(model), lr=0.01,
                          compressor={"name": "topk", "ratio": 0.1})
    table = run_plain(algo, objectives, X0, 2, seed=0, evaluate=lambda X, k: {}).table
    alone, marginal = alone_and_marginal(table)
    # a row: SARAH's estimate and the EF21 tracker (fp32), commits and seen (int64); alone also the kept X_prev
    assert marginal == 8 * P + 16
    assert alone == 12 * P + 16
