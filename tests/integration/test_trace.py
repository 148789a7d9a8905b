"""fedgluon.runtime.trace: a round's phases recorded by the strategy and the ClientApp when FEDGLUON_TRACE is set."""

from collections import Counter

import pytest

from fedgluon.flower.engines import run_inprocess
from fedgluon.runtime import trace

SPEC = {"task": {"name": "synthetic", "num_clients": 6, "dim": 10, "classes": 4, "mean_samples": 40, "hidden": [8]},
        "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.1}},
        "rounds": 4, "seed": 1, "block_size": 3}


def test_phases_of_every_round_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(trace.ENV, str(tmp_path / "trace"))
    run_inprocess(SPEC)
    events = trace.load(tmp_path / "trace")
    per_round = Counter((e["round"], e["phase"]) for e in events)
    for k in range(4):  # two blocks of three clients: each block unpacks, computes and packs once
        assert {p: per_round[(k, p)] for p in ("configure", "unpack", "compute", "pack", "aggregate")} == {
            "configure": 1, "unpack": 2, "compute": 2, "pack": 2, "aggregate": 1}
        mine = sorted((e for e in events if e["round"] == k), key=lambda e: e["start"])
        assert mine[0]["phase"] == "configure" and mine[-1]["phase"] == "aggregate"
        assert all(e["start"] <= e["end"] for e in mine)
    rows = {row[0]: row for row in trace.summary(events, skip=1)}
    assert list(rows)[0] == "configure#0" and {"compute#0", "compute#1", "aggregate#0"} <= set(rows)
    assert rows["configure#0"][1] == 0.0 and rows["aggregate#0"][1] >= rows["pack#1"][4]  # ms from configure
    trace.main([str(tmp_path / "trace"), "--skip", "1"])
    assert "compute#1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no rounds"):
        trace.main([str(tmp_path / "trace"), "--skip", "9"])


def test_nothing_is_written_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv(trace.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with trace.phase("compute", 0):
        pass
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_is_logged_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(trace.ENV, str(blocker / "trace"))
    with caplog.at_level("WARNING", logger="fedgluon.runtime.trace"):
        for _ in range(3):
            with trace.phase("compute", 0):
                pass
    assert sum("cannot write the trace" in r.message for r in caplog.records) == 1
