"""The flagship study's plan (experiments/flagship): its methods, the committed chosen values, how phase 1
chooses a value and how the report counts bits to a target."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from experiments.flagship import plan, report
from experiments.flagship import tune as flagship_tune
from fedgluon.algorithms import ALGORITHMS, make_algorithm
from fedgluon.config import schema as configs
from fedgluon.config.spec import check_option_types
from fedgluon.lmo.geometry import Geometry
from fedgluon.tasks.registry import make_task

ISSUE_METHODS = ("gluon", "gluon-ef21", "gluon-ef21-sarah", "gluon-ef21-mvr", "gluon-marina", "gluon-dasha-mvr",
                 "ef21-muon-bidir", "limuon", "fedavg", "local-gluon", "adamw", "diloco", "muloco", "fedmuon",
                 "fedmuon-bc", "dion", "orth-dion")


def test_every_method_of_the_study_is_planned_and_its_config_is_valid():
    methods = plan.load_methods()
    assert set(ISSUE_METHODS) <= {m.name for m in methods}
    assert {m.name for m in methods} <= set(ALGORITHMS)
    compressed = [m for m in methods if "compressor" in m.algorithm or "rank_fraction" in m.algorithm]
    for name in ("gluon-ef21", "gluon-marina", "muloco", "dion", "orth-dion"):  # two compression levels each
        assert sum(m.name == name for m in compressed) >= 2, name
    for path in plan.TASKS.values():  # every option is one the algorithm takes, of the right type
        spec = configs.spec_of(configs.load(path))
        geometry = Geometry.from_model(make_task({"seed": 0, **spec["task"]}).model, **spec["geometry"])
        for m in methods:
            alg = m.algorithm_at(m.grid[-1])
            check_option_types({"seed": 0, **spec["task"]}, alg)
            make_algorithm(alg.pop("name"), geometry, **alg)


def test_the_committed_chosen_values_cover_every_method_and_say_where_they_lie():
    chosen = plan.load_chosen()
    methods = plan.load_methods()
    assert set(chosen) == set(plan.TASKS)
    for task in plan.TASKS:
        for m in methods:
            entry = chosen[task][m.label]
            value = plan.chosen_value(chosen, task, m)
            grid = tuple(entry["grid"])
            assert set(m.grid) <= set(grid) and value in grid, (task, m.label)
            assert grid[entry["index"]] == value
            assert entry["edge"] == (plan.edge_of(grid, value) or "none"), (task, m.label)
            scored = {float(v): x for v, x in entry["trials"].items()}
            assert min(scored, key=lambda v: (scored[v], v)) == value  # the best of the trials that ran


def test_edges_and_their_extension():
    grid = (0.03, 0.1, 0.3, 1.0)
    assert plan.edge_of(grid, 0.03) == "low" and plan.edge_of(grid, 1.0) == "high"
    assert plan.edge_of(grid, 0.3) == "" and plan.edge_of(grid, 3.0) == "beyond"
    assert plan.extend(grid, "low") == pytest.approx(0.009)
    assert plan.extend(grid, "high") == pytest.approx(1.0 / 0.3)


def test_methods_file_errors_name_the_entry(tmp_path):
    path = tmp_path / "methods.yaml"
    path.write_text("grids: {g: [0.1, 1.0]}\nmethods:\n  - {label: a, algorithm: {name: gluon, lr: 0.1}, "
                    "tune: {key: lr, grid: g}}\n")
    with pytest.raises(plan.PlanError, match=r"methods\[0\] \(a\): the tuned key 'lr'"):
        plan.load_methods(path)
    path.write_text("grids: {g: [1.0, 0.1]}\nmethods:\n  - {label: a, algorithm: {name: gluon}, "
                    "tune: {key: lr, grid: g}}\n")
    with pytest.raises(plan.PlanError, match="increasing"):
        plan.load_methods(path)


def _tune_dir(tmp_path, labels, algorithms, rows, metric="final_test_loss", name="lr-radius"):
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "tune.json").write_text(json.dumps({"labels": labels, "algorithms": algorithms, "metric": metric,
                                             "overrides": [f"output.dir={tmp_path}"]}))
    pd.DataFrame(rows).to_csv(d / "tuned.csv", index=False)
    return tmp_path


def test_choose_takes_the_best_complete_trial_and_flags_an_edge(tmp_path):
    a = plan.Method("a", {"name": "gluon"}, "lr", "radius", (0.03, 0.1, 0.3, 1.0))
    b = plan.Method("b", {"name": "gluon-ef21"}, "lr", "radius", (0.03, 0.1, 0.3, 1.0))
    rows = [{"algorithm": "gluon", "algorithm.lr": v, "complete": c, "final_test_loss": x}
            for v, c, x in ((0.03, True, 2.0), (0.1, True, 1.5), (0.3, False, 0.1), (1.0, True, 1.7))]
    rows += [{"algorithm": "gluon-ef21", "algorithm.lr": v, "complete": True, "final_test_loss": x}
             for v, x in ((0.03, 1.0), (0.1, 1.1), (0.3, 1.2), (1.0, math.nan))]
    out = _tune_dir(tmp_path / "fmnist", ["gluon", "gluon-ef21"], [a.algorithm, b.algorithm], rows).parent
    chosen = flagship_tune.choose("fmnist", [a, b], out, extend_edges=False)
    assert chosen["a"]["value"] == 0.1 and chosen["a"]["edge"] == "none"  # 0.3 stopped early: never competes
    assert chosen["a"]["trials"] == {"0.03": 2.0, "0.1": 1.5, "1.0": 1.7}
    assert chosen["b"]["value"] == 0.03 and chosen["b"]["edge"] == "low" and chosen["b"]["index"] == 0
    smoke = flagship_tune.choose("fmnist", [a], out, overrides=["rounds=2"], extend_edges=False)
    assert smoke["a"]["value"] is None  # a tune made with other overrides is never read


def test_a_tune_on_the_validation_split_chooses_by_it_alone(tmp_path):
    """``--metric final_val_loss``: the value with the best validation loss wins although another has the
    better test loss; the entry records the metric it was chosen by, and a tune ranked by the test loss (whose
    early stops were decided by it) is not read."""
    a = plan.Method("a", {"name": "gluon"}, "lr", "radius", (0.03, 0.1, 0.3, 1.0))
    rows = [{"algorithm": "gluon", "algorithm.lr": v, "complete": True, "final_test_loss": t, "final_val_loss": x}
            for v, t, x in ((0.03, 2.0, 2.1), (0.1, 1.2, 1.6), (0.3, 1.4, 1.5), (1.0, 1.9, 2.0))]
    _tune_dir(tmp_path / "fmnist", ["gluon"], [a.algorithm], rows, metric="final_val_loss")
    _tune_dir(tmp_path / "fmnist", ["gluon"], [a.algorithm], [{**r, "final_val_loss": 0.0} for r in rows],
              name="ranked-by-test")
    chosen = flagship_tune.choose("fmnist", [a], tmp_path, extend_edges=False, metric="final_val_loss")["a"]
    assert chosen["value"] == 0.3 and chosen["final_val_loss"] == 1.5 and "final_test_loss" not in chosen
    assert plan.tuned_by([chosen, {"value": None}]) == "final_val_loss"  # an entry without a value names none
    with pytest.raises(plan.PlanError, match="ranked by different metrics"):
        plan.tuned_by([chosen, {"value": 0.1, "final_test_loss": 1.0}])
    assert flagship_tune.choose("fmnist", [a], tmp_path, extend_edges=False)["a"]["value"] == 0.1  # by test loss


def _run(label, seed, up, down, loss):
    m = pd.DataFrame({"round": range(len(up)), "up_bits_per_client_cum": up, "down_bits_per_client_cum": down,
                      "test_loss": loss, "test_accuracy": [1 - x for x in loss]})
    return report.SeedRun(label, seed, m)


def test_bits_to_target_budget_and_saving_are_counted_per_seed():
    gluon = plan.Method("gluon", {"name": "gluon"}, "lr", "radius", (0.1, 1.0))
    fast = plan.Method("fast", {"name": "gluon-ef21"}, "lr", "radius", (0.1, 1.0))
    four = [10, 20, 30, 40]
    runs = {"gluon": [_run("gluon", s, four, four, [3.0, 2.0 + s / 10, 1.5, 1.0]) for s in range(2)],
            "fast": [_run("fast", 0, [1, 2, 3, 4], four, [2.5, 2.0, 1.9, 1.8]),
                     _run("fast", 1, [1, 2, 3, 4], four, [2.5, 2.2, 2.06, 2.0]),
                     _run("fast", 2, [1, 2, 3, 4], four, [3.0, 2.9, 2.8, 2.7])]}
    chosen = {"shakespeare": {"gluon": {"value": 1.0}, "fast": {"value": 0.1}}}
    frame, target, budget = report.table(runs, "shakespeare", [gluon, fast], chosen)
    assert target == pytest.approx(2.05)  # dense Gluon halfway (round 1 of 4), mean of its seeds
    assert budget == pytest.approx(22.0)  # the median of the methods' mean whole-run uplink (40 and 4)
    row = frame.set_index("method")
    assert row.loc["fast", "reached"] == 2 and row.loc["gluon", "reached"] == 2  # fast's seed 2 never does
    assert row.loc["fast", "up_to_target_mean"] == pytest.approx(3.0)  # seed 0 at its 2nd, seed 1 at its 4th
    assert row.loc["fast", "down_to_target_mean"] == pytest.approx(30.0)
    assert row.loc["gluon", "up_to_target_mean"] == pytest.approx(25.0)  # seed 0 at round 1, seed 1 at round 2
    assert row.loc["fast", "up_saving_vs_gluon"] == pytest.approx(25 / 3)
    assert row.loc["gluon", "test_loss_at_budget_mean"] == pytest.approx(2.05)  # the last evaluation within 22
    assert row.loc["fast", "test_loss_at_budget_mean"] == pytest.approx((1.8 + 2.0 + 2.7) / 3)  # whole runs
    text = report.markdown(frame, "shakespeare", target, budget, every=1)
    assert "| fast | lr 0.1 | 2/3 | 3e-06 ± 1.4e-06 | 3e-05 ± 1.4e-05 | 8.3×* |" in text  # 2 of 3 seeds: marked
    assert "| gluon | lr 1 | 2/2 | 2.5e-05 ± 7.1e-06 | 2.5e-05 ± 7.1e-06 | 1× | 2.05 ± 0.071 |" in text
    over = report.markdown(frame.assign(test_loss_at_budget_mean=math.nan), "shakespeare", target, budget, every=3)
    assert "| 1× | over budget |" in over and "steps of 3 round(s)' bits" in over
    some = report.markdown(frame.assign(within_budget=[2, 1]), "shakespeare", target, budget, every=1)
    assert "| 8.3×* | 2.17 ± 0.47* |" in some  # fast: 1 of its 3 seeds within the budget: marked
    none = report.markdown(frame.assign(seeds=0, reached=0, test_loss_at_budget_mean=math.nan), "shakespeare",
                           target, budget, every=1)
    assert "over budget" not in none.split("\n\n")[1]  # no seed ran: nothing is over any budget
    assert "by its final test loss, on the same test data as this table" in text and "that trial" in text
    clean = report.markdown(frame, "shakespeare", target, budget, every=1, tuned_metric="final_val_loss",
                            seeds=(1, 2, 3))
    assert "validation split the clients held back from training (not on the test data); none of the seeds" in clean


def test_a_method_subset_names_its_members_as_the_whole_study_does(capsys):
    """A sweep member's name tells methods of one algorithm name apart by a hash only when they run side by
    side: ``--method`` widens a subset to the methods sharing a selected one's name, so its directories are
    the whole study's (alone, 'gluon-ef21 top-10%' would be named plain ``algorithm=gluon-ef21``)."""
    from experiments.flagship.__main__ import selected
    from experiments.flagship.study import grid_of, member_labels

    methods = plan.load_methods()
    chosen = plan.load_chosen()
    whole = member_labels(methods, grid_of("fmnist", methods, plan.SEEDS, chosen))
    ef21 = [m.label for m in methods if m.name == "gluon-ef21"]
    assert len(ef21) == 2
    alone = [m for m in methods if m.label == ef21[0]]
    assert not set(member_labels(alone, grid_of("fmnist", alone, plan.SEEDS, chosen)).items()) <= set(whole.items())
    subset = selected(methods, [ef21[0], "gluon"], widen=True)
    assert [m.label for m in subset] == ["gluon", *ef21] and ef21[1] in capsys.readouterr().out
    names = member_labels(subset, grid_of("fmnist", subset, plan.SEEDS, chosen))
    assert set(names.items()) <= set(whole.items()) and len(names) == 3 * len(plan.SEEDS)
    assert [m.label for m in selected(methods, [ef21[0]], widen=False)] == ef21[:1]  # tune: exactly as asked


def test_a_report_takes_the_seeds_its_study_ran(tmp_path):
    """``report`` without ``--seeds`` reads them from the task's sweep (a study run with ``--seeds 1 2 3``)."""
    assert plan.study_seeds(tmp_path) is None
    (tmp_path / "sweep.json").write_text(json.dumps({"config": "x", "overrides": [], "grid": {"seed": [1, 2, 3]}}))
    assert plan.study_seeds(tmp_path) == [1, 2, 3]
