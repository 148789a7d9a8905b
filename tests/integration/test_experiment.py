"""Configs, the fedgluon CLI, run directories, sweeps."""

import json
import re

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from fedgluon.exp.cli import main
from fedgluon.exp.experiment import METRIC_COLUMNS
from fedgluon.exp.sweep import value_label
from fedgluon.sim.metrics import TIMING_COLUMNS

FAST = ["engine.name=plain", "rounds=6", "task.num_clients=4", "task.mean_samples=40", "grad_norm_every=3"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_writes_documented_files_and_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = invoke("run", *FAST, "--quiet")
    assert out.exit_code == 0, out.output
    d = tmp_path / "runs" / "gluon-ef21-sarah-synthetic-s0"
    assert {"config.yaml", "metrics.csv", "clients.csv", "summary.json", "model.pt", "plots.png",
            "partition.csv"} <= {p.name for p in d.iterdir()}
    m = pd.read_csv(d / "metrics.csv")
    documented = set()
    for key in METRIC_COLUMNS:
        for part in key.split(" / "):
            documented.add(part.split(" [")[0])
    expected = {"round", "participants", "accepted", "rejected", "failed", "receivers", "train_loss", "grad_evals",
                "samples", "refresh", "test_loss", "test_accuracy", "grad_dual_norm", "up_bits_cum",
                "up_bits_per_client_cum", "down_bits_cum", "sim_round_time", "sim_time", "wall_time",
                "server_time",
                "up_int32_total", "up_int32_mean", "up_int32_max", "up_values_total", "down_bitmask_total"}
    assert expected <= set(m.columns)
    assert len(m) == 6 and m["grad_dual_norm"].notna().sum() == 2 and (m["sim_time"].diff().dropna() > 0).all()
    s = json.loads((d / "summary.json").read_text())
    assert s["complete"] and s["rounds"] == 6 and s["uplink_bits_per_client"] == m["up_int32_mean"].sum()
    # every option as the run used it, those the config did not write included, and what computed it
    assert s["algorithm_options"]["refresh_prob"] == 0.1 and s["algorithm_options"]["error_feedback"] == "ef21"
    assert s["algorithm_options"]["compressor"] == {"name": "topk", "ratio": 0.05, "min_k": 1, "values": "fp32"}
    assert s["versions"]["torch"] == torch.__version__ and set(s["versions"]) == {"fedgluon", "torch", "flwr", "numpy"}
    clients = pd.read_csv(d / "clients.csv")
    assert len(clients) == 6 * 4 and set(clients.status) == {"accepted"}
    # never overwritten without --overwrite
    again = CliRunner().invoke(main, ["run", *FAST, "--quiet"])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert invoke("run", *FAST, "--quiet", "--overwrite").exit_code == 0
    # blocks stepped in two threads: the same run
    out = invoke("run", *FAST, "engine.block_size=2", "engine.workers=2", "output.name=threads", "--quiet")
    assert out.exit_code == 0
    threads = pd.read_csv(tmp_path / "runs" / "threads" / "metrics.csv")
    same = [c for c in m.columns if c not in TIMING_COLUMNS and c != "train_loss"]
    pd.testing.assert_frame_equal(threads[same], m[same], check_exact=True)


def test_summary_wall_time_counts_building_the_task(tmp_path, monkeypatch):
    """summary.json's wall_time is the run's time in its process, the task's data built included (the
    README's promise); it began after the build before."""
    import time

    from fedgluon.config import spec as specs

    build = specs.build_cached

    def slow_build(spec):
        time.sleep(0.5)
        return build(spec)

    monkeypatch.setattr(specs, "build_cached", slow_build)
    monkeypatch.chdir(tmp_path)
    assert invoke("run", *FAST, "rounds=1", "--quiet").exit_code == 0
    s = json.loads((tmp_path / "runs" / "gluon-ef21-sarah-synthetic-s0" / "summary.json").read_text())
    assert s["wall_time"] >= 0.5


@pytest.mark.parametrize("args, words", [
    (["algorithm.name=fedprox"], ["algorithm.name must be one of", "gluon-ef21"]),
    (["algorithm.compressor.ratio=-0.1"], ["ratio must be in (0, 1]"]),
    (["algorithm.name=gluon-ef21", "algorithm.compressor={name: randk, ratio: 0.05}"],
     ["algorithm.compressor is unbiased with omega = 19 >= 1", "feedback (ef21) needs a contractive one"]),
    (["algorithm.downlink={name: randk, ratio: 0.05}"], ["algorithm.downlink is unbiased with omega = 19 >= 1",
                                                        "feedback (EF21-P) needs a contractive one"]),
    (["task.name=fashion_mnist", "task.data_dir=/nonexistent"], ["task:", "apt-get install dataset-fashion-mnist"]),
    (["colour=red"], ["unknown config key 'colour'", "algorithm"]),
    (["engine.name=spark"], ["engine.name must be one of", "inprocess"]),
    (["algorithm.momentum=0.9"], ["unknown option", "allowed"]),
    (["task.partition=shards"], ["task 'synthetic' got unknown option(s) ['partition']", "allowed", "num_clients"]),
    (["task.name=digits", "task.partitoin=iid"], ["task 'digits' got unknown option(s) ['partitoin']", "partition"]),
    (["geometry.present=muon"], ["geometry got unknown option(s) ['present']", "allowed", "preset"]),
    (["task.name=digits", "task.alpha=0.3"], ["task.alpha applies to partition='dirichlet' only", "'iid'"]),
    (["algorithm.error_feedback=ef3"], ["error_feedback must be one of", "ef14"]),
    (["algorithm.name=sgd", "algorithm.adaptive={L0: 1.0, L1: 0.0}"], ["takes a schedule", "adaptive"]),
    (["task.name=digits", "task.loss=hinge"], ["task.loss must be one of", "sigmoid_squared"]),
    (["engine.client_device=tpu"], ["engine.client_device must be one of", "cuda:N"]),
    (["geometry.lmo_device=npu"], ["geometry.lmo_device must be one of", "same"]),
    (["engine.workers=0"], ["engine.workers must be an integer >= 1"]),
    (["engine.name=ray", "engine.workers=2"], ["engine.workers applies to engine.name='plain' only"]),
])
def test_invalid_configs_exit_nonzero_naming_the_field(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    other_task = any(a.startswith("task.name=") for a in args)  # then FAST's synthetic-only option would be refused
    fast = [a for a in FAST if not (other_task and a.startswith("task.mean_samples="))]
    out = CliRunner().invoke(main, ["run", *fast, *args, "--quiet"])
    assert out.exit_code != 0
    for w in words:
        assert w in out.output, out.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("grid, words", [
    ("algorithm.lrr=[0.1,0.2]", ["unknown option(s) ['lrr']"]),
    ("algorithm.compressor.ratio=[0.1,-1]", ["algorithm.compressor.ratio must be in (0, 1]", "got -1"]),
    ("algorithm.name=[gluon,gluon-ef12]", ["algorithm.name must be one of", "gluon-ef21"]),
])
def test_a_sweep_with_a_bad_member_is_one_error_line_and_makes_no_directory(tmp_path, monkeypatch, grid, words):
    """Every member's config is validated before the sweep directory exists: the second member's mistake
    leaves nothing behind, not even an empty sweep directory."""
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", *FAST, grid, "--name", "bad", "--quiet")
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), out.output
    assert not (tmp_path / "runs").exists()


def test_a_run_whose_output_is_not_a_terminal_prints_plain_progress_lines(tmp_path, monkeypatch):
    """CliRunner's output is no terminal: about ten plain lines of progress, not rich's bar cut to 80 columns."""
    monkeypatch.chdir(tmp_path)
    out = invoke("run", *FAST, "output.name=lines")
    assert out.exit_code == 0, out.output
    progress = [line for line in out.output.splitlines() if line.startswith("lines: round ")]
    assert [line.split()[2] for line in progress] == [f"{k}/6" for k in range(1, 7)], out.output


def test_a_parallel_sweep_says_it_does_not_use_a_gpu_share(tmp_path, monkeypatch):
    """--parallel runs members as Ray tasks on the plain engine: a GPU share in the config is not given to
    them, and the sweep says so in one note (the members' run itself is replaced here: it is not the point)."""
    from fedgluon.exp import sweep as sweeps

    ran = []
    monkeypatch.setattr(sweeps, "_run_parallel", lambda todo, workers, *a, **k: ran.append((len(todo), workers)))
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", *FAST, "seed=[0,1]", "engine.num_gpus=0.5", "--parallel", "2", "--name", "p")
    assert ran == [(2, 2)]
    assert out.output.splitlines()[0] == ("note: --parallel runs every member on the plain engine (2 Ray tasks at a "
                                          "time, engine.client_device for the gradients): engine.num_gpus=0.5 is "
                                          "not used"), out.output


def test_sweep_2x2_then_rerun_skips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", *FAST, "algorithm.name=[gluon-ef21,gluon-ef21-sarah]", "algorithm.compressor.ratio=[0.02,0.1]",
            "--name", "s", "--quiet"]
    out = invoke(*args)
    assert out.exit_code == 0, out.output
    assert "final_test_accuracy_mean" not in out.output  # --quiet: no summary table either
    d = tmp_path / "runs" / "s"
    runs = [p for p in d.iterdir() if p.is_dir()]
    assert len(runs) == 4 and all((p / "summary.json").exists() for p in runs)
    assert {"members.csv", "table.csv", "pareto.png", "sweep.json"} <= {p.name for p in d.iterdir()}
    table = pd.read_csv(d / "table.csv")
    assert len(table) == 4 and {"final_test_accuracy_mean", "uplink_bits_per_client_mean", "bits_to_target_mean"} <= \
        set(table.columns)
    stamps = {p.name: (p / "summary.json").stat().st_mtime_ns for p in runs}
    # an interrupted member (no completion marker) is redone; complete ones are skipped
    broken = runs[0]
    (broken / "summary.json").unlink()
    assert invoke(*args).exit_code == 0
    for p in runs:
        if p == broken:
            assert (p / "summary.json").exists()
        else:
            assert (p / "summary.json").stat().st_mtime_ns == stamps[p.name]
    assert invoke("plot", str(d)).exit_code == 0


def test_an_interrupted_sweep_member_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """SIGTERM (as Ctrl-C) in a member's round 2: one stop line, how to continue, exit 130, no traceback; the
    same command again keeps the complete member, resumes the stopped one from its checkpoint (before, it
    started again from round 0) and ends with the files of a sweep never interrupted (wall times aside)."""
    import os
    import signal

    from fedgluon.exp import sweep as sweeps

    monkeypatch.chdir(tmp_path)
    args = ["sweep", *FAST, "output.checkpoint_every=0", "seed=[0,1]", "--quiet"]
    assert invoke(*args, "--name", "whole").exit_code == 0
    real_run, calls = sweeps.run, []

    def run(cfg, **kwargs):
        calls.append((cfg.output.name, kwargs.get("resume", False)))
        if len(calls) == 2:  # the second member, the first time
            kwargs["on_round"] = lambda row: row["round"] == 2 and os.kill(os.getpid(), signal.SIGTERM)
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(sweeps, "run", run)
    out = invoke(*args, "--name", "cut")
    assert out.exit_code == 130 and "Traceback" not in out.output, out.output
    assert "stopped: received SIGTERM" in out.output and "continue with the same sweep command" in out.output
    assert invoke(*args, "--name", "cut").exit_code == 0
    assert calls == [("seed=0", False), ("seed=1", False), ("seed=1", True)]
    for member in ("seed=0", "seed=1"):
        whole, cut = (pd.read_csv(tmp_path / "runs" / d / member / "metrics.csv") for d in ("whole", "cut"))
        same = [c for c in whole.columns if c not in TIMING_COLUMNS]
        pd.testing.assert_frame_equal(cut[same], whole[same], check_exact=True)


def test_a_stopped_member_whose_config_changed_starts_again(tmp_path, monkeypatch):
    """A resume may change the run's environment (faults, timeouts), a sweep member may not: like a complete
    member, a stopped one resumes only under the config it ran, else it starts again."""
    import os
    import signal

    from fedgluon.exp import sweep as sweeps

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text("max_failed_rounds: 10\n")
    args = ["sweep", str(base), *FAST, "output.checkpoint_every=0", "seed=[0]", "--quiet", "--name", "s"]
    real_run, calls = sweeps.run, []

    def run(cfg, **kwargs):
        calls.append(kwargs.get("resume", False))
        if len(calls) == 1:
            kwargs["on_round"] = lambda row: row["round"] == 2 and os.kill(os.getpid(), signal.SIGTERM)
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(sweeps, "run", run)
    assert invoke(*args).exit_code == 130
    base.write_text("max_failed_rounds: 5\n")  # the same file, another environment
    assert invoke(*args).exit_code == 0
    assert calls == [False, False]


def test_a_sweep_target_is_kept_for_its_later_summaries(tmp_path, monkeypatch):
    """--target sets the accuracy bits_to_target counts up to; sweep.json keeps it, so a rerun without it
    and ``fedgluon plot`` (which summarises again) give the same table; a target outside (0, 1] is one line."""
    monkeypatch.chdir(tmp_path)
    args = ["sweep", *FAST, "seed=[0,1]", "--name", "t"]
    out = invoke(*args, "--target", "0.3")
    assert out.exit_code == 0 and "until test accuracy 0.3 (--target)" in out.output, out.output
    table = tmp_path / "runs" / "t" / "table.csv"
    assert (pd.read_csv(table)["target_accuracy"] == 0.3).all()
    assert invoke(*args).exit_code == 0 and (pd.read_csv(table)["target_accuracy"] == 0.3).all()
    assert invoke("plot", str(tmp_path / "runs" / "t")).exit_code == 0
    assert (pd.read_csv(table)["target_accuracy"] == 0.3).all()
    bad = invoke(*args, "--target", "80")
    assert bad.exit_code == 2 and bad.output.startswith("error: --target is a test accuracy in (0, 1]"), bad.output


def test_a_rerun_sweep_never_reports_old_results_as_new(tmp_path, monkeypatch):
    """Complete members are kept only if they ran the config they would run now (engine and output aside); a
    sweep directory holds one sweep's config file and overrides, whose grid may grow."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text("rounds: 4\n")
    args = ["sweep", str(base), *FAST[:1], *FAST[2:], "--name", "s", "--quiet"]
    assert invoke(*args, "seed=[0]").exit_code == 0
    member = tmp_path / "runs" / "s" / "seed=0"
    stamp = (member / "summary.json").stat().st_mtime_ns
    grown = invoke(*args, "seed=[0,1]", "--engine", "inprocess")  # a grown grid, another engine: seed=0 is kept
    assert grown.exit_code == 0, grown.output
    assert (member / "summary.json").stat().st_mtime_ns == stamp
    assert (member.parent / "seed=1" / "summary.json").exists()
    base.write_text("rounds: 5\n")  # the same file and overrides, other contents
    out = invoke(*args, "seed=[0,1]")
    assert out.exit_code == 2 and out.output.startswith("error: sweep member") and "rounds: 4 -> 5" in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output
    other = invoke(*args, "rounds=5", "seed=[0,1]")  # other overrides: another sweep
    assert other.exit_code == 2 and "holds another sweep" in other.output, other.output
    assert (member / "summary.json").stat().st_mtime_ns == stamp


def test_sweep_over_whole_algorithm_sections_and_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", *FAST, "--name", "mixed",
                 "algorithm=[{name: gluon, lr: 0.05},"
                 " {name: gluon-ef21, lr: 0.05, compressor: {name: topk, ratio: 0.1}}]",
                 "seed=[0,1]")
    assert out.exit_code == 0, out.output
    assert "bits_to_target_count" in out.output  # the table says over how many seeds the mean is
    assert "bits_to_target: uplink bits per client until test accuracy" in out.output
    table = pd.read_csv(tmp_path / "runs" / "mixed" / "table.csv")
    assert len(table) == 2 and (table["final_test_accuracy_count"] == 2).all()
    bits = table.set_index("config")["uplink_bits_per_client_mean"]
    dense, ef21 = bits["gluon"], bits["gluon-ef21"]
    assert ef21 < dense
    # a member's config.yaml, run again, reproduces it (a file's algorithm section is merged over the default
    # section, a sweep's replaces it: the saved section spells out every option the default would add)
    member = next(d for d in (tmp_path / "runs" / "mixed").iterdir()
                  if d.is_dir() and d.name.startswith("algorithm=gluon,") and d.name.endswith("seed=0"))
    _reruns_from_its_config(member, tmp_path / "runs")


def _reruns_from_its_config(member, runs) -> None:
    """``fedgluon run member/config.yaml`` (into ``runs/again``) writes the member's metrics, timings aside."""
    again = invoke("run", str(member / "config.yaml"), f"output.dir={runs}", "output.name=again", "--quiet")
    assert again.exit_code == 0, again.output
    got, want = (pd.read_csv(d / "metrics.csv").drop(columns=list(TIMING_COLUMNS)) for d in (runs / "again", member))
    pd.testing.assert_frame_equal(got, want)


def test_a_member_of_a_sweep_over_whole_task_sections_reruns_from_its_config(tmp_path, monkeypatch):
    """A replaced task section of the default task's name omits ``hidden``: the run has the builder's default (no
    hidden layer), and its config.yaml says so, where a file's section would take the default section's [64]."""
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", "engine.name=plain", "rounds=3", "--name", "tasks", "--quiet",
                 "task=[{name: synthetic, num_clients: 3, mean_samples: 30}]")
    assert out.exit_code == 0, out.output
    (member,) = [d for d in (tmp_path / "runs" / "tasks").iterdir() if d.is_dir()]
    _reruns_from_its_config(member, tmp_path / "runs")


def test_python_api_loads_runs_and_sweeps(tmp_path, monkeypatch):
    from fedgluon.exp.sweep import load_members, load_run

    monkeypatch.chdir(tmp_path)
    invoke("sweep", *FAST, "seed=[0,1]", "--name", "seeds", "--quiet")
    members = load_members(tmp_path / "runs" / "seeds")
    assert len(members) == 2 and set(members["seed"].astype(int)) == {0, 1}
    run = load_run(tmp_path / "runs" / "seeds" / "seed=0")
    assert isinstance(run["metrics"], pd.DataFrame) and run["summary"]["complete"] and run["config"]["seed"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fedgluon_run_without_arguments_on_ray(tmp_path, monkeypatch):
    """The README's first command: the default config (10 clients, 30 rounds) on Flower's Ray engine. The
    process's SIGTERM handler is its own again after the run: ray.init installs one (sys.exit) that
    ray.shutdown leaves behind."""
    import signal

    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    out = invoke("run", "--quiet")
    assert out.exit_code == 0, out.output
    assert signal.getsignal(signal.SIGTERM) is before
    d = tmp_path / "runs" / "gluon-ef21-sarah-synthetic-s0"
    m = pd.read_csv(d / "metrics.csv")
    assert len(m) == 30 and (d / "plots.png").stat().st_size > 10_000
    assert m["test_accuracy"].iloc[-1] > m["test_accuracy"].iloc[0]




def test_switching_task_or_algorithm_drops_the_defaults_of_the_other(tmp_path):
    from fedgluon.config.schema import load

    cfg = load(None, ["task.name=digits", "algorithm.name=gluon"])
    assert dict(cfg.task) == {"name": "digits"}  # no synthetic alpha/beta leak into digits
    assert cfg.algorithm.name == "gluon" and "compressor" not in cfg.algorithm and cfg.algorithm.lr == 0.05
    assert load(None, ["algorithm.name=gluon-ef21"]).algorithm.compressor.name == "topk"  # shared options stay
    cfg = load(None, ["task.num_clients=4"])  # same task: the defaults stay and the override applies
    assert cfg.task.name == "synthetic" and cfg.task.num_clients == 4 and cfg.task.hidden == [64]
    f = tmp_path / "c.yaml"
    f.write_text("task: {name: digits, partition: dirichlet}")
    assert dict(load(f).task) == {"name": "digits", "partition": "dirichlet"}
    # a compressor of another name replaces the default one: no top-k ratio leaks into PowerSGD
    cfg = load(None, ["algorithm.compressor={name: powersgd, rank: 2}"])
    assert dict(cfg.algorithm.compressor) == {"name": "powersgd", "rank": 2}
    assert load(None, ["algorithm.compressor.ratio=0.1"]).algorithm.compressor == {"name": "topk", "ratio": 0.1}


def test_an_override_renaming_a_part_of_the_file_takes_nothing_of_it_that_does_not_apply(tmp_path):
    """The rules between the defaults and the user's settings hold between a file and its overrides too,
    keeping what the user wrote that still applies: a compressor, algorithm or task of another name keeps
    none of the file's options that do not apply
    (before, the README's quickstart.yaml with ``algorithm.compressor={name: svd, rank: 1}`` was refused for
    top-k's ``ratio``, and ``algorithm={name: gluon}`` for SARAH's ``refresh_prob`` and the compressor)."""
    from fedgluon.config.schema import load

    f = tmp_path / "c.yaml"
    f.write_text("task: {name: synthetic, num_clients: 6, alpha: 0.5}\n"
                 "algorithm: {name: gluon-ef21-sarah, lr: 0.1, schedule: constant, refresh_prob: 0.2, "
                 "compressor: {name: topk, ratio: 0.1}}\n")
    assert dict(load(f, ["algorithm.compressor={name: svd, rank: 1}"]).algorithm.compressor) == \
        {"name": "svd", "rank": 1}
    gluon = load(f, ["algorithm={name: gluon}"]).algorithm
    assert gluon.name == "gluon" and "refresh_prob" not in gluon and "compressor" not in gluon
    assert (gluon.lr, gluon.schedule) == (0.1, "constant")  # what the file wrote and still applies is kept
    assert dict(load(f, ["task.name=digits"]).task) == {"name": "digits", "num_clients": 6}  # alpha: LEAF's
    renamed = load(f, ["algorithm.compressor.name=randk_seeded", "algorithm.error_feedback=none"]).algorithm
    assert dict(renamed.compressor) == {"name": "randk_seeded", "ratio": 0.1}  # the file's ratio applies to rand-k
    q = tmp_path / "q.yaml"  # QSGD's levels go where the codec stays qsgd, and nowhere else
    q.write_text("algorithm: {name: gluon-ef21, compressor: {name: qsgd, levels: 7}}\n")
    topk = load(q, ["algorithm.compressor.name=topk"]).algorithm.compressor
    assert topk.name == "topk" and "levels" not in topk and "values" not in topk
    topk = load(q, ["algorithm.compressor={name: topk, values: qsgd}"]).algorithm.compressor
    assert (topk.name, topk["values"], topk.levels) == ("topk", "qsgd", 7)
    kept = load(f, ["algorithm.compressor.ratio=0.2", "task.num_clients=4"])  # same names: a plain merge
    assert kept.algorithm.compressor == {"name": "topk", "ratio": 0.2} and kept.task.alpha == 0.5


def test_another_algorithm_gets_its_own_defaults_and_keeps_what_the_user_wrote(tmp_path):
    """Naming another algorithm than the default one: an option its class declares a default for (DiLoCo's
    lr, an AdamW rate; FedAvg's identity compressor; MARINA's Rand-K) takes that default, not the default
    section's (Gluon-EF21-SARAH's radius 0.05, top-k); the shared options (the schedule, Gluon's radius
    for gluon) keep the default section's; what the user writes, in a file or an override, is kept."""
    from fedgluon.algorithms.loco import DiLoCo
    from fedgluon.config.schema import load

    cfg = load(None, ["algorithm.name=diloco"])
    assert cfg.algorithm.lr == DiLoCo.OPTIONS["lr"] == 4e-4 and cfg.algorithm.compressor == {"name": "identity"}
    assert cfg.algorithm.schedule == "polynomial" and cfg.algorithm.power == 0.5  # shared: the default section's
    assert load(None, ["algorithm.name=diloco", "algorithm.lr=0.01"]).algorithm.lr == 0.01
    assert load(None, ["algorithm.name=fedavg"]).algorithm.compressor == {"name": "identity"}
    assert load(None, ["algorithm.name=gluon-marina"]).algorithm.compressor.name == "randk"
    assert load(None, ["algorithm.name=gluon-marina", "algorithm.compressor.ratio=0.1"]).algorithm.compressor == \
        {"name": "randk", "ratio": 0.1}
    f = tmp_path / "g.yaml"
    f.write_text("algorithm: {name: gluon, lr: 0.1, schedule: constant}")
    assert dict(load(f, ["algorithm.name=diloco"]).algorithm) == \
        {"name": "diloco", "lr": 0.1, "schedule": "constant", "power": 0.5, "compressor": {"name": "identity"}}
    f.write_text("algorithm: {name: gluon, schedule: constant}")
    assert load(f, ["algorithm.name=diloco"]).algorithm.lr == 4e-4


def test_sweep_members_with_the_same_algorithm_name_stay_apart(tmp_path, monkeypatch):
    """Two sections of one algorithm (different compressors) are two members and two table rows."""
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", *FAST, "--name", "same", "--quiet",
                 "algorithm=[{name: gluon-ef21, lr: 0.05, compressor: {name: topk, ratio: 0.1}}, "
                 "{name: gluon-ef21, lr: 0.05, compressor: {name: topk, ratio: 0.5}}]")
    assert out.exit_code == 0, out.output
    members = pd.read_csv(tmp_path / "runs" / "same" / "members.csv")
    table = pd.read_csv(tmp_path / "runs" / "same" / "table.csv")
    assert members["member"].nunique() == 2 and len(table) == 2
    assert sorted(table["config"]) == ["gluon-ef21 (compressor.ratio=0.1)", "gluon-ef21 (compressor.ratio=0.5)"]
    bits = table.set_index("config")["uplink_bits_per_client_mean"]
    assert bits["gluon-ef21 (compressor.ratio=0.5)"] > 3 * bits["gluon-ef21 (compressor.ratio=0.1)"]
    assert all(m.startswith("algorithm=gluon-ef21-") for m in members["member"])  # directories: name and hash
    many = {"name": "a", "b": 1, "c": 1, "d": 1, "e": 1}  # more than three options differ: name and hash
    grid = {"algorithm": [many, {"name": "a", "b": 2, "c": 2, "d": 2, "e": 2}]}
    assert re.fullmatch(r"a-[0-9a-f]{6}", value_label("algorithm", many, grid))
