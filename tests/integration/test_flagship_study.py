"""The flagship study's phase 2 and report end to end (experiments/flagship), scaled down to seconds: three
methods, one seed, three rounds of a small Fashion-MNIST, at the committed chosen values."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from experiments.flagship import plan
from experiments.flagship.__main__ import main
from fedgluon.config import schema as configs
from fedgluon.exp.experiment import run
from fedgluon.tasks.data.idx import FASHION_MNIST_DIR

OVERRIDES = ["rounds=3", "eval_every=3", "task.train_limit=1000", "task.test_limit=200"]  # --quick's and these
SMALL = ["--task", "fmnist", "--method", "gluon", "--method", "gluon-ef21 top-10%", "--quick", "--parallel", "0",
         *(a for o in OVERRIDES[2:] for a in ("--set", o))]


def _phase1_trial(out: Path, method: str) -> Path:
    """A finished phase-1 trial of ``method`` at its committed value, where fedgluon tune would put it."""
    chosen, methods = plan.load_chosen(), {m.label: m for m in plan.load_methods()}
    alg = methods[method].algorithm_at(plan.chosen_value(chosen, "fmnist", methods[method]))
    cfg = configs.load(plan.TASKS["fmnist"], [*OVERRIDES, "seed=0"], replace={"algorithm": alg})
    cfg.output.dir, cfg.output.name = str(out / "tune" / "fmnist" / "lr-radius" / method / "runs"), "lr=x"
    return run(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="apt-get install dataset-fashion-mnist")
def test_study_runs_every_member_and_reports_the_table_and_figure(tmp_path, capsys):
    trial = _phase1_trial(tmp_path, "gluon")
    assert main(["study", *SMALL, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "fmnist: 1 seed-0 member(s) copied from phase 1's trials" in printed
    copied = tmp_path / "fmnist" / "seed=0,algorithm=gluon"
    assert str(tmp_path / "fmnist") in (copied / "config.yaml").read_text()
    # the copy is what the sweep would have computed: every draw is seeded
    assert main(["study", *SMALL, "--out", str(tmp_path / "again")]) == 0
    timing = ["wall_time", "server_time"]
    fresh = pd.read_csv(tmp_path / "again" / "fmnist" / copied.name / "metrics.csv")
    pd.testing.assert_frame_equal(pd.read_csv(copied / "metrics.csv").drop(columns=timing, errors="ignore"),
                                  fresh.drop(columns=timing, errors="ignore"))
    assert (trial / "metrics.csv").read_bytes() == (copied / "metrics.csv").read_bytes()
    configs_of = [OmegaConf.load(d / "fmnist" / copied.name / "config.yaml") for d in (tmp_path, tmp_path / "again")]
    for c in configs_of:
        del c["output"]
    assert configs_of[0] == configs_of[1]  # the copy's config is the member's own: its seeds draw as one curve
    table = pd.read_csv(tmp_path / "results" / "fmnist.csv")
    # --method widens to the methods sharing a selected one's algorithm name (their directory names need both)
    assert list(table["method"]) == ["gluon", "gluon-ef21 top-10%", "gluon-ef21 top-2%"]
    assert (table["seeds"] == 1).all()
    # top-k under the int32 convention: values and indices, a fifth (a 25th) of the dense message per round
    assert table.loc[1, "up_total_mean"] == pytest.approx(table.loc[0, "up_total_mean"] / 5, rel=0.01)
    assert table.loc[2, "up_total_mean"] == pytest.approx(table.loc[0, "up_total_mean"] / 25, rel=0.02)
    assert (tmp_path / "results" / "fmnist.png").stat().st_size > 0
    assert "| gluon-ef21 top-10% | lr " in printed
    assert "an evaluation every 3 round(s)" in printed  # the members' eval_every, though each evaluates once
    # a member directory that holds another run (here: fewer rounds) is refused, never counted as the member
    assert main(["study", *SMALL, "--set", "rounds=2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds another run than" in err and "rounds: " in err  # names what differs
    again = tmp_path / "results" / "fmnist.md"
    before = again.read_text()
    assert main(["report", *SMALL, "--out", str(tmp_path)]) == 0  # the report alone, from the runs on disk
    assert again.read_text() == before


def test_a_bad_method_label_is_one_error_line(tmp_path, capsys):
    assert main(["study", "--method", "glon", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --method must be labels of methods.yaml") and err.count("\n") == 1


@pytest.mark.parametrize("argv, says", [
    (["tune", "--quick"], "error: --quick is for study and report"),
    (["report", "--task", "fmnist"], "error: no complete member of the study"),  # nothing ran under --out yet
    (["tune", "--metric", "final_val_loss", "--task", "fmnist", "--method", "gluon", "--set",
      "task.validation_fraction=0", "--chosen", "unused.yaml"], "error: --metric final_val_loss needs a validation"),
])
def test_a_command_that_cannot_work_is_one_error_line(tmp_path, capsys, argv, says):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1
