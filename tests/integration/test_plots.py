"""Plots that compare runs and sweeps (fedgluon/exp/plots.py): bands over seeds, grouping by configuration,
incomplete members, refusals, readable log ticks. Run and sweep directories are written here the way
fedgluon.exp.experiment and fedgluon.exp.sweep write them, without training."""

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from omegaconf import OmegaConf

from fedgluon.config.schema import load
from fedgluon.exp import plots
from fedgluon.exp.cli import main
from fedgluon.exp.experiment import add_derived_columns
from fedgluon.exp.experiment import summarise as run_summary
from fedgluon.exp.sweep import member_name, members

ROUNDS = 4


def loss_of(seed: int, lr: float, k: int) -> float:
    """A distinct test loss for every seed, lr and round, skewed over seeds (so neither mean ± std nor one
    seed's curve equals the min or max), and a different seed the lowest from round to round."""
    return 2.0 / (1 + k * lr * 10) + 0.1 * ((seed + k) % 3) ** 2


def write_run(d, overrides=(), *, rows: int = ROUNDS, complete: bool = True, up_bits: float = 1000.0,
              task: str | None = None):
    """A run directory as fedgluon.exp.experiment writes it: config.yaml, metrics.csv (with the derived
    cumulative bits and simulated time) and summary.json (``complete`` false for a stopped run). ``task``
    renames the synthetic task (validating another task's config would load its data)."""
    cfg = load(None, [f"rounds={ROUNDS}", *overrides])
    if task is not None:
        cfg.task.name = task
    seed, lr = int(cfg.seed), float(cfg.algorithm["lr"])
    c = cfg.network.bits
    frame = pd.DataFrame([{"round": k, "receivers": 2, f"up_{c}_total": 2 * up_bits * (1 + seed),
                           f"up_{c}_mean": up_bits * (1 + seed), f"up_{c}_max": up_bits * (1 + seed),
                           f"down_{c}_total": 4000.0, "rejected": 0, "failed": 0,
                           "test_loss": loss_of(seed, lr, k), "test_accuracy": 0.5 + 0.1 * k - 0.01 * seed}
                          for k in range(rows)])
    frame = add_derived_columns(frame, cfg)
    d.mkdir(parents=True)
    OmegaConf.save(cfg, d / "config.yaml")
    frame.to_csv(d / "metrics.csv", index=False)
    summary = run_summary(frame, cfg, 1.0)
    if not complete:
        summary.update({"complete": False, "stopped": "interrupted"})
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def write_sweep(d, grid, overrides=(), *, skip=(), stopped=None):
    """A sweep directory: sweep.json and one member directory per grid point (``skip``: members never
    started; ``stopped``: {member name: rows} of members stopped after that many rounds)."""
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"config": None, "overrides": list(overrides), "grid": grid}))
    stopped = stopped or {}
    for values in members(grid):
        name = member_name(values, grid)
        if name in skip:
            continue
        dotted = [f"{k}={v}" for k, v in values.items()]
        write_run(d / name, [*overrides, *dotted], rows=stopped.get(name, ROUNDS), complete=name not in stopped)
    return d


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_band_is_min_max_over_seeds_and_configs_group_by_everything_but_the_seed(tmp_path):
    d = write_sweep(tmp_path / "s", {"algorithm.lr": [0.05, 0.1], "seed": [0, 1, 2]})
    curves, notes = plots.compare([d], tmp_path / "c.png")
    assert notes == [] and (tmp_path / "c.png").stat().st_size > 10_000
    assert [c.label for c in curves] == ["0.05", "0.1"]
    for c, lr in zip(curves, (0.05, 0.1)):
        assert [r.seed for r in c.runs] == [0, 1, 2]
        per_seed = np.array([[loss_of(s, lr, k) for k in range(ROUNDS)] for s in (0, 1, 2)])
        f = c.frame
        assert list(f["round"]) == list(range(ROUNDS)) and (f["seeds"] == 3).all()
        np.testing.assert_allclose(f["test_loss_min"], per_seed.min(0))
        np.testing.assert_allclose(f["test_loss_max"], per_seed.max(0))
        np.testing.assert_allclose(f["test_loss_mean"], per_seed.mean(0))
        assert (f["test_loss_max"] > f["test_loss_min"]).any()
        bits = np.array([[1000.0 * (1 + s) * (k + 1) for k in range(ROUNDS)] for s in (0, 1, 2)])
        np.testing.assert_allclose(f[plots.BITS], bits.mean(0))  # x: the seeds' mean cumulative bits
        assert "sim_time" in f and (f["sim_time"].diff().dropna() > 0).all()


def test_run_directories_group_by_config_and_a_single_run_has_no_band(tmp_path):
    a0 = write_run(tmp_path / "gluon-ef21-sarah-synthetic-s0", ["seed=0"])
    a1 = write_run(tmp_path / "gluon-ef21-sarah-synthetic-s1", ["seed=1", "engine.name=plain", "threads=2"])
    b = write_run(tmp_path / "other" / "gluon-ef21-sarah-synthetic-s0", ["seed=0", "algorithm.lr=0.2"])
    copy = shutil.copytree(a0, tmp_path / "copy")
    curves = plots.group(plots.collect([a0, a1, b, copy, a0])[0])
    assert [len(c.runs) for c in curves] == [2, 1]  # engine and threads do not make another configuration
    assert [r.path for r in curves[0].runs] == [a0, a1]  # a seed given twice counts once, and says so
    assert len(curves[0].notes) == 1 and "seed 0 is in" in curves[0].notes[0]
    assert curves[0].label == "gluon-ef21-sarah-synthetic [algorithm.lr=0.05]"
    assert curves[1].label == "gluon-ef21-sarah-synthetic [algorithm.lr=0.2]"
    fig = plots.draw_curves(curves)
    bands = [len(ax.collections) for ax in fig.axes]  # one fill per curve with 2+ seeds
    assert bands and all(n == 1 for n in bands)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"{c.label} — {n}" for c, n in
                                                                  zip(curves, ("2 seeds", "1 seed"))]
    assert "int32 convention" in fig.axes[0].get_xlabel()


def test_incomplete_members_are_drawn_as_far_as_they_got_and_noted(tmp_path):
    grid = {"algorithm.lr": [0.05, 0.1], "seed": [0, 1]}
    d = write_sweep(tmp_path / "s", grid, skip=["lr=0.1,seed=1"], stopped={"lr=0.05,seed=1": 2})
    runs, notes = plots.collect([d])
    curves = plots.group(runs)
    notes += [n for c in curves for n in c.notes]
    first = curves[0]
    assert list(first.frame["seeds"]) == [2, 2, 1, 1] and len(first.incomplete) == 1
    np.testing.assert_allclose(first.frame["test_loss_max"][2:], [loss_of(0, 0.05, k) for k in (2, 3)])
    assert first.legend() == "0.05 — 2 seeds, 1 incomplete"
    assert any("without metrics yet: lr=0.1,seed=1" in n for n in notes)
    assert any("seed 1 has 2 of 4 rounds (stopped: interrupted)" in n for n in notes)
    out = invoke("plot", d)
    assert out.exit_code == 0, out.output
    assert "note: " in out.output and {"curves.png", "pareto.png", "table.csv"} <= {p.name for p in d.iterdir()}


@pytest.mark.parametrize("second, task, words", [
    (["network.bits=values"], None, ["bit conventions", "int32 in", "values in"]),
    ([], "digits", ["different tasks", "digits in", "synthetic in"]),
])
def test_different_tasks_or_bit_conventions_are_one_error_line(tmp_path, second, task, words):
    a = write_sweep(tmp_path / "a", {"seed": [0, 1]})
    b = write_run(tmp_path / "b", second, task=task)
    out = invoke("plot", a, b, "--out", tmp_path / "c.png")
    assert out.exit_code == 2 and not (tmp_path / "c.png").exists()
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines


def test_a_tune_directory_draws_its_trials_one_curve_per_config(tmp_path):
    """``fedgluon plot TUNE_DIR`` (before: "neither a run nor a sweep directory") takes the trials that have
    metrics from tuned.csv, one curve per algorithm and config over seeds, labelled without the seed;
    a trial without metrics is noted. Run directories named ``...,seed=N`` drop the seed from the label too."""
    tune = tmp_path / "tune"
    rows = []
    for lr in (0.05, 0.2):
        for seed in (0, 1):
            run_dir = f"gluon-ef21-1/runs/lr={lr},seed={seed}"
            write_run(tune / run_dir, [f"seed={seed}", f"algorithm.lr={lr}"])
            rows.append({"algorithm": "gluon-ef21-1", "config": f"lr={lr}", "seed": seed, "run_dir": run_dir})
    rows.append({"algorithm": "gluon-ef21-1", "config": "lr=0.9", "seed": 0,
                 "run_dir": "gluon-ef21-1/runs/lr=0.9,seed=0"})  # stopped before its first evaluation
    pd.DataFrame(rows).to_csv(tune / "tuned.csv", index=False)
    runs, notes = plots.collect([tune])
    curves = plots.group(runs)
    assert [(c.label, len(c.runs)) for c in curves] == [("gluon-ef21-1 lr=0.05", 2), ("gluon-ef21-1 lr=0.2", 2)]
    assert len(notes) == 1 and "lr=0.9,seed=0" in notes[0]
    trials = sorted((tune / "gluon-ef21-1" / "runs").iterdir())
    assert [c.label for c in plots.group(plots.collect(trials)[0])] == ["lr=0.05", "lr=0.2"]
    out = invoke("plot", str(tune), "--out", str(tmp_path / "t.png"))
    assert out.exit_code == 0 and (tmp_path / "t.png").stat().st_size > 10_000, out.output
    (tune / "tuned.csv").write_bytes(bytes(range(256)) * 4)  # not a table, not even text: one error line
    out = invoke("plot", str(tune), "--out", str(tmp_path / "t.png"))
    assert out.exit_code == 2 and out.output.startswith("error: ") and "not a tune's table" in out.output, out.output


def test_a_directory_that_is_neither_run_nor_sweep_is_one_error_line(tmp_path):
    run = write_run(tmp_path / "r")
    (tmp_path / "empty").mkdir()
    for args in ([tmp_path / "empty"], [run, tmp_path / "empty"]):
        out = invoke("plot", *args)
        lines = out.output.strip().splitlines()
        assert out.exit_code == 2 and len(lines) == 1 and "neither a run (metrics.csv)" in lines[0], lines


def test_an_out_that_cannot_be_written_is_one_error_line_naming_it(tmp_path):
    run = write_run(tmp_path / "r")
    target = tmp_path / "missing" / "c.png"
    out = invoke("plot", run, run, "--out", target)
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2 and lines == [f"error: --out {target} cannot be written: No such file or directory"]


def test_several_directories_draw_one_figure_and_one_run_keeps_plots_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = write_sweep(tmp_path / "a", {"algorithm.lr": [0.05, 0.1], "seed": [0, 1]})
    b = write_run(tmp_path / "b", ["algorithm.lr=0.3"])
    out = invoke("plot", a, b)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert [c.label for c in plots.group(plots.collect([a, b])[0])] == ["a: 0.05", "a: 0.1", "b"]
    assert invoke("plot", b).exit_code == 0 and (b / "plots.png").stat().st_size > 10_000


@pytest.mark.parametrize("lo, hi", [(1.5e5, 1.8e5), (1.2e5, 4e5), (1.4e5, 2.9e6), (6e3, 3e6), (200, 1e12)])
def test_log_axis_ticks_are_few_and_do_not_overlap(lo, hi):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 2))
    ax.plot([lo, hi], [0, 1])
    plots.log_axis(ax)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert 2 <= len(labels) <= 5, [t.get_text() for t in labels]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))
    plt.close(fig)


@pytest.mark.parametrize("figure", ["run", "curves", "pareto"])
def test_a_run_without_bits_draws_its_bits_axis_linear_without_a_warning(tmp_path, figure):
    """No client was ever accepted: zero bits throughout, which a log axis cannot show (matplotlib warned)."""
    run = write_run(tmp_path / "r", up_bits=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if figure == "run":
            plots.plot_run(pd.read_csv(run / "metrics.csv"), tmp_path / "out.png")
        elif figure == "curves":
            plots.draw_curves(plots.group(plots.collect([run])[0])).savefig(tmp_path / "out.png")
        else:
            table = pd.DataFrame({"config": ["a", "b"], "uplink_bits_per_client_mean": [0.0, 0.0],
                                  "final_test_accuracy_mean": [0.5, 0.6]})
            plots.plot_pareto(table, tmp_path / "out.png", "no bits", "uplink bits per client")
    assert (tmp_path / "out.png").stat().st_size > 10_000


def test_the_round_axis_counts_rounds_completed(tmp_path):
    """metrics.csv's ``round`` is the 0-based index of the round just done: an evaluation after the first round
    is drawn at 1, the last of 4 rounds at 4."""
    fig = plots.draw_curves(plots.group(plots.collect([write_run(tmp_path / "r")])[0]))
    ax = next(a for a in fig.axes if a.get_xlabel() == "rounds completed")
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3, 4]


def test_a_curve_with_nothing_to_draw_leaves_the_others_in_the_legend(tmp_path):
    run = write_run(tmp_path / "r")
    real = plots.group(plots.collect([run])[0])[0]
    empty = plots.Curve(label="nothing yet", runs=[], frame=plots.aggregate([]))
    fig = plots.draw_curves([empty, real])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [real.legend()]


def test_a_legend_of_thirty_long_labels_sits_below_the_axes(tmp_path):
    """A sweep of 30 configurations with long labels (one legend column): the figure grows by the legend's
    rows, so the legend lies below every axes and matplotlib's layout applies (it gave up before, and the
    legend covered the curves)."""
    import warnings

    real = plots.group(plots.collect([write_run(tmp_path / "r")])[0])[0]
    curves = [plots.Curve(label=f"config-{i} (compressor.name=topk, compressor.ratio=0.{i:02d}, lr=0.0{i}, "
                                f"error_feedback=ef14, values=int4)",
                          runs=real.runs, frame=real.frame) for i in range(30)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" is a UserWarning
        fig = plots.draw_curves(curves)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert all(legend.y1 <= ax.get_tightbbox().y0 for ax in fig.axes)
