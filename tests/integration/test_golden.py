"""Golden trajectories (benchmarks/golden.py): every algorithm configuration, at client blocks of 1 and
4, on the plain driver (and some on the in-process Flower engine), gives the metrics, per-client rows
and final model stored under tests/data/golden/ (made from main's code before issue 28's refactor,
with ``python -m benchmarks.golden --save tests/data/golden``).

The stored goldens were computed on another machine than the one that may run this test: float32
kernels differ in their last bits between CPUs (AVX2 and AVX-512 sum in other orders), and five
rounds of LMO steps carry such differences on. So floats compare to a relative tolerance of 1e-5
(with an absolute floor at 1e-5 of the column's or tensor's largest value), while every integer-valued
column (rounds, clients, counts, bits up and down, refresh flags) and every text column (a client's
status, a rejection's reason) must be exactly equal. On one machine, ``python -m benchmarks.golden
--against REV`` checks bit for bit. One configuration was re-recorded since: error feedback refuses an
unbiased compressor of omega >= 1 (``compressors.check_contractive``), so gluon-ef21-sarah-randk_seeded now
keeps 60 % of each layer instead of 30 %, recorded on an AVX-512 VM and bitwise equal to 152a05d's code
there (``python -m benchmarks.golden --against 152a05d --only gluon-ef21-sarah-randk``). The configurations
of the methods added after the refactor (FedMuon, FedMuon-BC, DiLoCo, MuLoCo, Dion, Orth-Dion) were recorded
later on an AVX-512 VM (Orth-Dion's plain runs again once the plain driver handed clients the broadcast in
the layout the wire gives: ``Broadcast.as_sent``); ``about.json`` says where each run was made.
"""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks import golden

STORED = Path(__file__).parents[1] / "data" / "golden"
RTOL = 1e-5


@pytest.fixture(scope="module")
def stored():
    return golden.load(STORED)


def test_the_stored_goldens_cover_every_run_and_stay_small(stored):
    assert sorted(stored) == sorted(golden.run_key(*r) for r in golden.runs())
    assert sum(p.stat().st_size for p in STORED.iterdir()) < 500_000


def test_every_registered_algorithm_has_a_golden_configuration():
    """A new algorithm gets a configuration in ``benchmarks/golden.py`` (``CONFIGS``), recorded with
    ``python -m benchmarks.golden --save tests/data/golden --only '^<configuration>\\.'`` (the others are kept)."""
    from fedgluon.algorithms import ALGORITHMS

    missing = sorted(set(ALGORITHMS) - {c["algorithm"]["name"] for c in golden.CONFIGS.values()})
    assert not missing, f"algorithms without a golden configuration: {missing}"


def test_saving_some_configurations_keeps_the_others_and_refuses_another_task(tmp_path, stored):
    keys = sorted(stored)
    golden.save({k: stored[k] for k in keys[:3]}, tmp_path)
    golden.save({k: stored[k] for k in keys[2:5]}, tmp_path)
    again = golden.load(tmp_path)
    assert sorted(again) == keys[:5]
    assert all(d.equal for k in keys[:5] for d in golden.diff(again[k], stored[k]).values())
    about = (tmp_path / "about.json").read_text()
    assert all(k in about for k in keys[:5]) and '"cpu_capability"' in about
    (tmp_path / "about.json").write_text(about.replace('"rounds": 5', '"rounds": 6'))
    with pytest.raises(SystemExit, match="another task"):
        golden.save({keys[0]: stored[keys[0]]}, tmp_path)
    # a store from before per-run provenance: its one provenance goes to each of its runs
    older = {**json.loads(about), "runs": keys[:5], "torch": "0.old", "cpu_capability": "AVX2"}
    (tmp_path / "about.json").write_text(json.dumps(older))
    golden.save({keys[5]: stored[keys[5]]}, tmp_path)
    runs = json.loads((tmp_path / "about.json").read_text())["runs"]
    assert sorted(runs) == keys[:6] and runs[keys[0]]["torch"] == "0.old"
    assert runs[keys[5]]["torch"] == torch.__version__


@pytest.mark.parametrize("config", list(golden.CONFIGS))
def test_every_configuration_follows_its_golden_trajectory(config, stored):
    """Each run of ``config`` against its stored golden; and its model and every column but the
    losses are bitwise equal at B = 4 and B = 1 (per-client losses are reduced in another order in a
    block: today within 3e-7 relative, reported by ``python -m benchmarks.golden``)."""
    fresh = golden.run_all(f"^{re.escape(config)}\\.")
    assert sorted(fresh) == sorted(k for k in stored if k.startswith(f"{config}."))
    for key, artefacts in fresh.items():
        diffs = golden.diff(artefacts, stored[key], RTOL)
        said = {a: d.text() for a, d in diffs.items()}
        assert all(d.within and not d.note for d in diffs.values()), f"{key}: {said}"
    for engine in golden.ENGINES:
        one, four = fresh.get(golden.run_key(config, 1, engine)), fresh.get(golden.run_key(config, 4, engine))
        if one is None:
            continue
        assert golden.diff_models(four["model"], one["model"]).equal
        for what, losses in (("metrics", ["train_loss"]), ("clients", ["loss"])):
            assert golden.diff_frames(four[what].drop(columns=losses), one[what].drop(columns=losses)).equal


def test_the_comparison_sees_one_ulp_and_any_change_of_a_count():
    frame = pd.DataFrame({"round": [0, 1], "train_loss": [1.0, 0.5], "up_int32_total": [64.0, 64.0],
                          "status": ["accepted", "rejected"]})
    assert golden.diff_frames(frame, frame.copy()).equal
    assert golden.diff_frames(frame[frame.columns[::-1]], frame).equal  # a column's place is no result
    ulp = frame.assign(train_loss=[1.0, float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))])
    assert not golden.diff_frames(ulp, frame).within  # bitwise by default
    assert golden.diff_frames(ulp, frame, RTOL).within and not golden.diff_frames(ulp, frame, RTOL).equal
    assert "train_loss" in golden.diff_frames(ulp, frame).text()
    for changed in (frame.assign(up_int32_total=[64.0, 64.000001]), frame.assign(status=["accepted", "failed"])):
        d = golden.diff_frames(changed, frame, 1.0)
        assert not d.within and "differs in" in d.note  # exact columns: no tolerance
    assert "columns differ" in golden.diff_frames(frame.drop(columns="round"), frame, 1.0).note
    assert "rows" in golden.diff_frames(frame.iloc[:1], frame, 1.0).note
    nan = frame.assign(train_loss=[1.0, float("nan")])
    assert golden.diff_frames(nan, nan.copy()).equal and not golden.diff_frames(nan, frame, 1.0).within
    model = {"w": torch.ones(2, 2)}
    assert golden.diff_models({"w": torch.ones(2, 2) * (1 + 1e-6)}, model, RTOL).within
    assert not golden.diff_models({"w": torch.ones(2, 2) * (1 + 1e-6)}, model).within
    assert "expected" in golden.diff_models({"w": torch.ones(2, 3)}, model, 1.0).note


def test_against_a_revision_runs_both_trees_and_reports_bitwise_equal(capsys):
    """``--against HEAD``: the tree's library code is HEAD's in a clean checkout (this test changes none)."""
    assert golden.main(["--against", "HEAD", "--only", r"^sgd\.B1\."]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("sgd  B1  plain"))
    assert row.count("bitwise equal") == 3 and "all within bitwise" in out
