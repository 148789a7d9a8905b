"""``fedgluon tune`` on Ray Tune (fedgluon/exp/tuning.py): ASHA over rounds, the tune directory, resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from fedgluon.exp.cli import main
from fedgluon.exp.tuning import METRICS, best_configs

FAST = ["engine.name=plain", "rounds=3", "task.num_clients=4", "task.mean_samples=40", "grad_norm_every=3"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_asha_stops_trials_behind_the_median_and_the_best_config_reproduces(tmp_path, monkeypatch):
    """Trials one at a time: at round 1 each trial is compared with the median of the earlier ones
    (reduction factor 2), so 0.2 (better than 0.05) goes on, the two small radii stop there, and the best
    config reruns bitwise."""
    monkeypatch.chdir(tmp_path)
    out = invoke("tune", *FAST, "algorithm.name=gluon", "algorithm.lr=[0.05,0.2,0.01,0.001]", "--parallel", "1",
                 "--grace-period", "1", "--reduction-factor", "2")
    assert out.exit_code == 0, out.output
    lines = [ln for ln in out.output.splitlines() if ln.startswith("[")]
    assert len(lines) == 4 and lines[-1].startswith("[4/4] gluon lr=0.001: 1 rounds")  # no Ray Tune tables
    assert "Trial" not in out.output and "╭" not in out.output
    d = tmp_path / "runs" / "tune"
    tuned = pd.read_csv(d / "tuned.csv")
    assert list(tuned["algorithm.lr"]) == [0.05, 0.2, 0.01, 0.001]
    assert list(tuned["rounds"]) == [3, 3, 1, 1] and list(tuned["complete"]) == [True, True, False, False]
    assert list(tuned["client_rounds"]) == [12, 12, 4, 4]
    assert set(METRICS) <= set(tuned.columns) and list(tuned["best"]) == [False, True, False, False]
    best = json.loads((d / "best.json").read_text())["algorithms"]["gluon"]
    assert best["config"] == "lr=0.2" and best["final_test_loss"] == tuned["final_test_loss"].iloc[1]
    # the best config, run again by `fedgluon run`, gives the metric the trial reported, bitwise
    rerun = invoke("run", str(d / "gluon" / "best.yaml"), "output.name=again", "--quiet")
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads((tmp_path / "runs" / "again" / "summary.json").read_text())
    assert summary["final_test_loss"] == best["final_test_loss"]
    assert summary["final_test_accuracy"] == tuned["final_test_accuracy"].iloc[1]
    # every trial's run directory: complete for the trials that ran every round
    for run_dir, complete in zip(tuned["run_dir"], tuned["complete"]):
        assert (d / run_dir / "summary.json").exists() == complete


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_algorithm_is_tuned_apart_and_a_diverging_radius_is_no_failure(tmp_path, monkeypatch):
    """Two algorithms of one name are labelled apart and tuned apart; lr=1e38 stops its run with a NaN at
    round 0, which ends that trial incomplete (never best) instead of failing the tune."""
    monkeypatch.chdir(tmp_path)
    out = invoke("tune", *FAST, "algorithm.lr=[0.05,1e38]", "--name", "dup", "--quiet", "--scheduler", "fifo",
                 "--algorithm", "{name: gluon-ef21, compressor: {name: topk, ratio: 0.1}}",
                 "--algorithm", "{name: gluon-ef21, compressor: {name: topk, ratio: 0.5}}")
    assert out.exit_code == 0, out.output
    d = tmp_path / "runs" / "dup"
    tuned = pd.read_csv(d / "tuned.csv")
    assert list(tuned["algorithm"]) == ["gluon-ef21-1", "gluon-ef21-1", "gluon-ef21-2", "gluon-ef21-2"]
    assert list(tuned["status"]) == ["TERMINATED"] * 4 and list(tuned["best"]) == [True, False, True, False]
    assert list(tuned["complete"]) == [True, False, True, False]
    stopped = tuned["stopped"].fillna("")
    assert all("NaN/Inf" in s for s in stopped[1::2]) and not any(stopped[::2])
    bits = tuned[tuned["best"]].set_index("algorithm")["uplink_bits_per_client"]
    assert bits["gluon-ef21-1"] < bits["gluon-ef21-2"]
    assert set(json.loads((d / "best.json").read_text())["algorithms"]) == {"gluon-ef21-1", "gluon-ef21-2"}
    assert (d / "gluon-ef21-2" / "best.yaml").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_random_search_draws_points_of_the_grid_each_in_its_own_run(tmp_path, monkeypatch):
    """Three draws from two values: a point is drawn twice, runs in two directories, and measures the same."""
    monkeypatch.chdir(tmp_path)
    out = invoke("tune", *FAST, "algorithm.name=gluon", "algorithm.lr=[0.05,0.2]", "--search", "random",
                 "--samples", "3", "--scheduler", "fifo", "--quiet")
    assert out.exit_code == 0, out.output
    tuned = pd.read_csv(tmp_path / "runs" / "tune" / "tuned.csv")
    assert len(tuned) == 3 and tuned["run_dir"].nunique() == 3 and tuned["complete"].all()
    assert set(tuned["algorithm.lr"]) <= {0.05, 0.2}
    twice = tuned[tuned.duplicated("algorithm.lr", keep=False)]
    assert len(twice) >= 2 and twice["final_test_loss"].nunique() == 1
    assert tuned.loc[tuned["best"], "algorithm.lr"].unique().tolist() == [
        tuned.loc[tuned["final_test_loss"].idxmin(), "algorithm.lr"]]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_interrupted_tune_resumes_without_rerunning_finished_trials(tmp_path):
    """Ctrl-C after the first finished trial: Ray Tune saves its state, the second algorithm does not start,
    and the CLI exits 1 naming --resume; --resume runs the unfinished trials only (the finished trials' run
    directories are not written again), then the second algorithm."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-m", "fedgluon.exp.cli", "tune", *FAST, "algorithm.lr=[0.2,0.05,0.01]", "--name", "res",
            "--scheduler", "fifo", "--parallel", "1", "--algorithm", "gluon", "--algorithm", "gluon-ef21"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[1/3]"):
                proc.send_signal(signal.SIGINT)
                break
        output = "".join(seen) + proc.stdout.read()
        assert proc.wait(timeout=120) == 1, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    d = tmp_path / "runs" / "res"
    assert f"fedgluon tune --resume {d}" in output and not (d / "gluon-ef21").exists()
    assert "Tuner.restore" not in output  # Ray Tune's own instruction would contradict fedgluon's
    tuned = pd.read_csv(d / "tuned.csv")
    finished = tuned[tuned["status"] == "TERMINATED"]
    assert 1 <= len(finished) < 3 and set(tuned["status"]) <= {"TERMINATED", "UNFINISHED"}
    stamps = {r: (d / r / "summary.json").stat().st_mtime_ns for r in finished["run_dir"]}
    again = subprocess.run([sys.executable, "-m", "fedgluon.exp.cli", "tune", "--resume", str(d)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Could not fetch metrics" not in again.stdout + again.stderr
    lines = [ln.split(" lr=")[0] for ln in again.stdout.splitlines() if ln.startswith("[")]
    assert lines == [f"[{i}/3] gluon" for i in range(len(finished) + 1, 4)] + [
        f"[{i}/3] gluon-ef21" for i in range(1, 4)], again.stdout
    tuned = pd.read_csv(d / "tuned.csv")
    assert list(tuned["status"]) == ["TERMINATED"] * 6 and tuned["complete"].all()
    assert {r: (d / r / "summary.json").stat().st_mtime_ns for r in stamps} == stamps
    assert json.loads((d / "best.json").read_text())["algorithms"]["gluon"]["config"] == "lr=0.2"


@pytest.mark.parametrize("option, words", [
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be >= 0"),
    (["--samples", "3"], "--samples is for --search random"),
    (["--metric", "accuracy"], "--metric must be one of"),
    (["--metric", "final_val_loss"], "--metric final_val_loss needs a validation split: set task.validation_fraction"),
    (["--metric", "best_val_accuracy", "task.validation_fraction=0"], "needs a validation split"),
    (["--grace-period", "9"], "--grace-period must be in [1, rounds=3]"),
    (["algorithm.lr=[0.1,-1]"], "lr must be a positive"),
])
def test_bad_options_are_one_error_line_before_ray_starts(tmp_path, monkeypatch, option, words):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["tune", *FAST, "algorithm.lr=[0.1]", *option])
    assert out.exit_code == 2 and out.output.startswith("error:") and words in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gpus_the_cluster_lacks_are_one_error_line(tmp_path, monkeypatch):
    """Also: with no engine.address, tune starts a private Ray, as run and sweep do; it never joins the cluster
    that Ray itself would find (RAY_ADDRESS here names a dead one: joining it would hang in retries)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    out = CliRunner().invoke(main, ["tune", *FAST, "algorithm.lr=[0.1]", "--gpus-per-trial", "1"])
    assert out.exit_code == 2 and out.output.startswith("error: --gpus-per-trial 1 cannot be met"), out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_best_config_is_the_best_mean_over_seeds_of_complete_trials():
    rows = [("a", "lr=1", 0, True, 0.5), ("a", "lr=1", 1, True, 1.5),   # mean 1.0
            ("a", "lr=2", 0, True, 0.8), ("a", "lr=2", 1, True, 0.9),   # mean 0.85: best
            ("a", "lr=3", 0, False, 0.1),                               # stopped early: never best
            ("b", "lr=1", 0, False, 0.3)]                               # no complete trial: no best
    table = pd.DataFrame(rows, columns=["algorithm", "config", "seed", "complete", "final_test_loss"])
    best = best_configs(table, "final_test_loss", "min")
    assert list(best["best"]) == [False, False, True, True, False, False]
    assert list(best_configs(table, "final_test_loss", "max")["best"]) == [True, True, False, False, False, False]


def test_running_summary_equals_the_summary_of_the_rounds_so_far(tmp_path):
    """What a trial reports after each round is what summary.json would hold had the run stopped there, the
    validation split's metrics (which a tune may rank by: ``--metric final_val_loss``) included."""
    import math

    from fedgluon.config.schema import load
    from fedgluon.exp.experiment import add_derived_columns, run, summarise
    from fedgluon.exp.tuning import RunningSummary

    cfg = load(None, [*FAST, "rounds=5", "eval_every=2", "grad_norm_every=2", "network.bits=values",
                      "task.validation_fraction=0.25", f"output.dir={tmp_path}"])
    rows, reports = [], []
    running = RunningSummary(cfg)

    def on_round(row):
        rows.append(dict(row))
        reports.append(running.add(row))

    run(cfg, progress=False, on_round=on_round)
    for k, report in enumerate(reports):
        summary = summarise(add_derived_columns(pd.DataFrame(rows[:k + 1]), cfg), cfg, 0.0)
        assert report["round"] == k + 1 and report["client_rounds"] == 4 * (k + 1)
        for m in METRICS:
            want = math.nan if summary[m] is None else summary[m]
            assert report[m] == want or (math.isnan(report[m]) and math.isnan(want)), (k, m, report[m], want)
    assert math.isnan(reports[0]["final_test_loss"]) and not math.isnan(reports[1]["final_test_loss"])
    assert {"final_val_loss", "best_val_accuracy"} <= set(METRICS) and not math.isnan(reports[-1]["final_val_loss"])
