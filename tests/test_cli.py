from click.testing import CliRunner

from fedgluon.cli import main


def test_list_shows_registries():
    out = CliRunner().invoke(main, ["list"])
    assert out.exit_code == 0, out.output
    assert "optimizer methods: muon, scion" in out.output
    assert "norms: spectral" in out.output


def test_demo_trains_and_rejects_bad_method():
    out = CliRunner().invoke(main, ["demo", "--epochs", "2", "--method", "muon"])
    assert out.exit_code == 0, out.output
    acc = float(out.output.strip().splitlines()[-1].split()[-1])
    assert acc > 0.85
    bad = CliRunner().invoke(main, ["demo", "--method", "adam"])
    assert bad.exit_code != 0 and "--method" in bad.output and "must be one of" in bad.output


def test_bench_offers_every_benchmark():
    out = CliRunner().invoke(main, ["bench", "--help"])
    assert out.exit_code == 0 and all(n in out.output for n in ("lmo", "compressors", "engines", "transport", "memory", "all"))
    bad = CliRunner().invoke(main, ["bench", "gpu"])
    assert bad.exit_code != 0 and "lmo" in bad.output


def test_benchmark_machine_line_names_the_cpu_features_that_decide_bf16_comparisons():
    import torch

    from benchmarks.common import machine

    line = machine()
    assert torch.backends.cpu.get_cpu_capability() in line and "bf16" in line and "threads" in line
