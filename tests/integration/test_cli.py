import pytest
from click.testing import CliRunner

from fedgluon.exp.cli import main


def test_list_shows_registries():
    out = CliRunner().invoke(main, ["list"])
    assert out.exit_code == 0, out.output
    assert "optimizer methods: muon, scion" in out.output
    assert "norms: spectral" in out.output
    assert ", diloco, " in out.output and ", muloco, " in out.output and ", int2, " in out.output


def test_demo_trains_and_rejects_bad_method():
    out = CliRunner().invoke(main, ["demo", "--epochs", "2", "--method", "muon"])
    assert out.exit_code == 0, out.output
    acc = float(out.output.strip().splitlines()[-1].split()[-1])
    assert acc > 0.85
    bad = CliRunner().invoke(main, ["demo", "--method", "adam"])
    assert bad.exit_code != 0 and "--method" in bad.output and "must be one of" in bad.output


def test_bench_offers_every_benchmark():
    out = CliRunner().invoke(main, ["bench", "--help"])
    names = ("lmo", "compressors", "engines", "transport", "memory", "all")
    assert out.exit_code == 0 and all(n in out.output for n in names)
    bad = CliRunner().invoke(main, ["bench", "gpu"])
    assert bad.exit_code != 0 and "lmo" in bad.output


def test_benchmark_machine_line_names_the_cpu_features_that_decide_bf16_comparisons():
    import torch

    from benchmarks.common import machine

    line = machine()
    assert torch.backends.cpu.get_cpu_capability() in line and "bf16" in line and "threads" in line


def test_engine_benchmark_repeats_interleave_and_summarise_each_ratio(capsys):
    import re

    import pytest

    from benchmarks import bench_engines

    bench_engines.main(["--sizes", "4", "--rounds", "2", "--repeats", "2", "--no-ray", "--workers", "2"])
    out = capsys.readouterr().out
    assert out.count("plain, blocks of 2, 2 workers") == 2
    each = [float(x) for x in re.findall(r"in-process blocks / vmapped\s+([\d.]+)x per client task", out)]
    assert len(each) == 2 and out.count("plain loop") == 2  # every row ran once per repeat
    summary = re.search(r"in-process blocks / vmapped median\s+([\d.]+)x over 2 repeats \(each: ([\d., ]+)\)", out)
    assert summary is not None, out
    assert [float(x) for x in summary.group(2).split(", ")] == pytest.approx(each, abs=0.005)
    assert float(summary.group(1)) == pytest.approx(sum(each) / 2, abs=0.01)
    for bad in (["--repeats", "0"], ["--workers", "0"], ["--client-device", "tpu"]):
        with pytest.raises(SystemExit):
            bench_engines.main(bad)
    assert "--client-device must be one of" in capsys.readouterr().err


def test_lmo_benchmark_times_the_widths_asked_for(capsys):
    import pytest
    import torch

    from benchmarks import bench_lmo

    bench_lmo.main(["--quick", "--dim", "32", "48"])
    out = capsys.readouterr().out
    for d in (32, 48):
        assert f"d={d}: 4x{d}x{d} + {4 * d}x{d} + {d}x{4 * d}, device=cpu" in out
    blocks = 2 * (1 + torch.cuda.is_available())  # each width on the CPU, and on CUDA with a compiled row
    assert out.count("15 matmuls (bound)") == blocks and "torch.optim.Muon" in out
    assert out.count("bound/time") == 3 * 2 + 4 * (blocks - 2)
    with pytest.raises(SystemExit):
        bench_lmo.main(["--dim", "0"])


@pytest.mark.parametrize("args, words", [
    (["run", "--engine", "foo"], ["'--engine'", "'foo' is not one of 'ray', 'inprocess', 'plain'",
                                  "see fedgluon run --help"]),
    (["nosuch"], ["No such command 'nosuch'", "see fedgluon --help"]),
    (["plot", "nothere"], ["'nothere' does not exist", "see fedgluon plot --help"]),
    (["run", "--resume", "nothere"], ["'--resume'", "does not exist"]),
    (["run", "."], ["is a directory"]),
    (["bench", "gpu"], ["'gpu' is not one of", "'lmo'", "see fedgluon bench --help"]),
    (["plot", "--nope", "x"], ["No such option '--nope'", "see fedgluon plot --help"]),
])
def test_usage_errors_are_one_error_line_naming_the_allowed_values(tmp_path, monkeypatch, args, words):
    """click's own refusals read as fedgluon's: one ``error:`` line, exit code 2, no usage block."""
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, args, prog_name="fedgluon")
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.output
    assert all(w in lines[0] for w in words), lines[0]


def test_fedgluon_alone_still_prints_the_help():
    out = CliRunner().invoke(main, [], prog_name="fedgluon")
    assert "Usage: fedgluon" in out.output and "Commands:" in out.output
