"""Reliability: checkpoints and exact resume (SIGTERM and SIGKILL), injected client faults, actor death,
a non-finite server step. Hostile payloads through the strategy are in test_strategy_fuzz.py."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import journal_path, same_table, stop_and_resume

from compressors import BitCount
from fedgluon.config import schema as config
from fedgluon.config import spec as specs
from fedgluon.exp import experiment
from fedgluon.flower.engines import run_inprocess
from fedgluon.sim import checkpoint
from fedgluon.sim.checkpoint import ActorDeathError, Checkpointer, NonFiniteStateError, RunInterrupted
from fedgluon.sim.driver import run_plain
from fedgluon.sim.faults import FaultPlan
from fedgluon.sim.federation import NoProgressError
from fedgluon.sim.metrics import TIMING_COLUMNS

SMALL = ["task.num_clients=6", "task.dim=12", "task.classes=4", "task.hidden=[16]", "task.mean_samples=60",
         "algorithm.refresh_prob=0.3", "grad_norm_every=3"]


def load_cfg(tmp_path, *extra):
    return config.load(None, [*SMALL, f"output.dir={tmp_path}", *extra])


def same_run(a: Path, b: Path) -> None:
    """metrics.csv identical in every column but wall time; clients.csv and the final model identical."""
    fa, fb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    cols = [c for c in fa.columns if c not in TIMING_COLUMNS]
    assert len(fa) == len(fb) and cols == [c for c in fb.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(fa[cols], fb[cols], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(a / "clients.csv"), pd.read_csv(b / "clients.csv"), check_exact=True)
    ma, mb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_checkpoint_files_are_atomic_and_load_without_unpickling(tmp_path):
    snap = checkpoint.Snapshot(1, {"X": {"w": torch.randn(3, 2)}, "downlink_bits": BitCount(value_bits=32, n_values=6),
                                   "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [
                                       {"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}},
                               {"format": 1, "columns": {"est/w": torch.ones(2, 2)}, "commits": torch.tensor([0, 4]),
                                "seen": torch.tensor([-1, 0]), "models": {0: {"w": torch.full((3, 2), 2.0)}}},
                               [{"round": 0, "train_loss": 1.5}], [{"round": 0, "client": 1, "reason": ""}], "key")
    path = checkpoint.save(snap, tmp_path / "c.pt")
    journal = journal_path(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", journal.name]  # no temporary file left
    back = checkpoint.load(path)
    assert back.next_round == 1 and back.run_key == "key" and back.history == snap.history
    assert back.server_state["downlink_bits"] == snap.server_state["downlink_bits"]
    table = back.client_states
    assert torch.equal(table["columns"]["est/w"], torch.ones(2, 2)) and table["commits"].tolist() == [0, 4]
    assert table["seen"].tolist() == [-1, 0] and torch.equal(table["models"][0]["w"], torch.full((3, 2), 2.0))
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": checkpoint.FORMAT, "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refused without unpickling") as err:
        checkpoint.load(tmp_path / "evil.pt")
    assert isinstance(err.value.__context__, pickle.UnpicklingError) and not (tmp_path / "pwned").exists()


def test_rows_journal_is_appended_and_reads_exactly_the_counted_rows(tmp_path):
    """Rows are appended, not re-pickled, per save; bytes written after the last snapshot (a crash between
    journal and snapshot) are ignored on load and cut by the next save, which appends after the committed
    length; the resumed process appends to the journal it loaded."""
    path = tmp_path / "c.pt"
    ckpt = Checkpointer(path, every=1)
    history = [{"round": k, "train_loss": float(k), "note": "x"} for k in range(3)]
    clients = [{"round": k, "client": j, "status": "accepted"} for k in range(3) for j in range(2)]
    for k in range(3):
        ckpt.after_round(k, lambda k=k: checkpoint.Snapshot(k + 1, {"X": {}}, {}, history[:k + 1], clients[:2 * k + 2]))
    journal = journal_path(path)
    assert len(journal.read_text().splitlines()) == 3 + 6  # each row written once
    back = checkpoint.load(path)
    assert back.history == history and back.client_log == clients and back.next_round == 3
    with open(journal, "a") as fh:  # a crash after the journal append, before the snapshot rename
        fh.write('{"h": {"round": 3, "train_loss": 9.0}}\n')
    back = checkpoint.load(path)
    assert back.history == history
    fresh = Checkpointer(path, every=1, resumed=back)  # the resumed process
    fresh.after_round(3, lambda: checkpoint.Snapshot(4, {"X": {}}, {}, [*history, {"round": 3, "train_loss": 3.0}],
                                                     clients))
    assert checkpoint.load(path).history[-1] == {"round": 3, "train_loss": 3.0}
    assert journal_path(path) == journal and len(journal.read_text().splitlines()) == 4 + 6
    journal.write_text(journal.read_text().splitlines()[0] + "\n")
    with pytest.raises(checkpoint.CheckpointError, match="fewer than"):
        checkpoint.load(path)
    checkpoint.remove(path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("engine", ["plain", "inprocess"])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, engine):
    """SIGTERM during round 4 stops the run after that round with a checkpoint and an incomplete summary;
    --resume finishes it; every file matches an uninterrupted run (wall times aside)."""
    base = [f"engine.name={engine}", "rounds=9", "output.checkpoint_every=0"]
    full = experiment.run(load_cfg(tmp_path, *base, "output.name=full"), progress=False)

    def stop_in_round_4(row):
        if row["round"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = load_cfg(tmp_path, *base, "output.name=cut")
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        experiment.run(cfg, progress=False, on_round=stop_in_round_4)
    cut = tmp_path / "cut"
    assert not experiment.is_complete(cut) and (cut / "checkpoint.pt").exists()
    assert len(pd.read_csv(cut / "metrics.csv")) == 5
    experiment.run(cfg, progress=False, out_dir=cut, resume=True)
    assert experiment.is_complete(cut) and not (cut / "checkpoint.pt").exists()
    same_run(full, cut)


def test_a_ctrl_c_while_the_results_are_written_lets_them_be_written(tmp_path, monkeypatch):
    """SIGINT after the last round, while the files are written (plots take a moment): before, click's bare
    "Aborted!" and an incomplete run directory; now the run is written in full, then stops as asked (a
    sweep does not go on to its next member)."""
    write = experiment._write_results

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return write(*args, **kwargs)

    monkeypatch.setattr(experiment, "_write_results", interrupted)
    with pytest.raises(RunInterrupted, match="SIGINT while the results were written") as stop:
        experiment.run(load_cfg(tmp_path, "engine.name=plain", "rounds=3", "output.name=r"), progress=False)
    out = tmp_path / "r"
    assert experiment.is_complete(out) and not (out / "checkpoint.pt").exists() and stop.value.checkpoint is None


@pytest.mark.parametrize("name", ["gluon-ef21-mvr", "fedmuon", "fedmuon-bc"])
def test_sigterm_under_partial_participation_with_x_prev_then_resume_on_flower(tmp_path, name):
    """2 of 6 clients a round, blocks of 2 on the in-process Flower engine, the resumed run's files equal an
    uninterrupted plain run's. gluon-ef21-mvr (clients need X_prev): the X_prev models the server sends
    are those of the rounds the clients last computed at, from the resumed table's model history.
    fedmuon / fedmuon-bc: terms sent besides the model both ways, and client momenta in the table."""
    base = [*(o for o in SMALL if not o.startswith("algorithm.refresh_prob")), f"output.dir={tmp_path}", "rounds=9",
            "output.checkpoint_every=0", f"algorithm.name={name}", "participation=2", "engine.block_size=2",
            "algorithm.compressor={name: topk, ratio: 0.05}"]  # compressed uplinks for fedmuon too (its default: none)
    full = experiment.run(config.load(None, [*base, "engine.name=plain", "output.name=full"]), progress=False)

    def stop_in_round_5(row):
        if row["round"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = config.load(None, [*base, "engine.name=inprocess", "output.name=cut"])
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        experiment.run(cfg, progress=False, on_round=stop_in_round_5)
    cut = tmp_path / "cut"
    snap = checkpoint.load(cut / "checkpoint.pt")
    assert snap.next_round == 6
    assert len(snap.client_states["models"]) >= 2 or name != "gluon-ef21-mvr"  # clients at several older models
    experiment.run(cfg, progress=False, out_dir=cut, resume=True)
    same_run(full, cut)


def test_resume_refuses_another_config_and_complete_runs(tmp_path):
    cfg = load_cfg(tmp_path, "engine.name=plain", "rounds=4", "output.name=r")
    experiment.run(cfg, progress=False)
    with pytest.raises(config.ConfigError, match="complete run"):
        experiment.run(cfg, progress=False, out_dir=tmp_path / "r", resume=True)
    out = tmp_path / "r"
    snap = checkpoint.Snapshot(0, {}, {}, run_key="another")
    checkpoint.save(snap, out / "checkpoint.pt")
    (out / "summary.json").unlink()
    with pytest.raises(config.ConfigError, match="another config"):
        experiment.run(cfg, progress=False, out_dir=out, resume=True)
    other = load_cfg(tmp_path, "engine.name=plain", "rounds=4", "algorithm.lr=0.5", "seed=3")
    checkpoint.save(checkpoint.Snapshot(0, {}, {}, run_key=experiment.run_key(config.spec_of(other))),
                    out / "checkpoint.pt")
    with pytest.raises(config.ConfigError) as refused:  # names what differs
        experiment.run(cfg, progress=False, out_dir=out, resume=True)
    assert f"algorithm.lr: 0.5 -> {cfg.algorithm.lr!r}; seed: 3 -> 0" in str(refused.value)
    (out / "checkpoint.pt").unlink()
    with pytest.raises(config.ConfigError, match="no checkpoint.pt"):
        experiment.run(cfg, progress=False, out_dir=out, resume=True)


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _kill_at_round(args: list[str], ckpt: Path, at_round: int, timeout: float) -> None:
    """Start the CLI, SIGKILL it (and every process it started, by PID) once its checkpoint reaches ``at_round``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, "the run did not reach the kill round in time"
            if proc.poll() is not None:
                pytest.fail(f"the run ended before round {at_round}: {proc.stderr.read().decode()[-2000:]}")
            try:
                if ckpt.exists() and checkpoint.load(ckpt).next_round >= at_round:
                    break
            except (OSError, RuntimeError, ValueError, EOFError):
                pass
            time.sleep(0.01)
    finally:
        family = _descendants(proc.pid)
        for pid in [proc.pid, *family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        proc.stderr.close()


def _sigkill_resume(tmp_path, engine: str, rounds: int, at_round: int, timeout: float):
    cli = [sys.executable, "-m", "fedgluon.exp.cli"]
    args = [*SMALL, f"output.dir={tmp_path}", f"rounds={rounds}", "output.checkpoint_every=2", "task.hidden=[64]",
            "grad_norm_every=1", f"engine.name={engine}", "engine.num_cpus=1", "round_timeout=60"]
    _kill_at_round([*cli, "run", *args, "output.name=killed", "--quiet"], tmp_path / "killed" / "checkpoint.pt",
                   at_round, timeout)
    killed = tmp_path / "killed"
    assert not experiment.is_complete(killed)
    done = subprocess.run([*cli, "run", "--resume", str(killed), "--quiet"], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    full = experiment.run(config.load(None, [*args, "engine.name=inprocess", "output.name=full"]), progress=False)
    same_run(full, killed)
    assert checkpoint.load is not None and not (killed / "checkpoint.pt").exists()


@pytest.mark.timeout(240)
def test_sigkill_at_a_random_round_then_resume_inprocess(tmp_path):
    at_round = random.Random().randrange(4, 14)
    _sigkill_resume(tmp_path, "inprocess", 40, at_round, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_at_a_random_round_then_resume_on_ray(tmp_path):
    at_round = random.Random().randrange(2, 8)
    _sigkill_resume(tmp_path, "ray", 16, at_round, timeout=180)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_whole_process_group_stops_a_ray_run_after_its_round(tmp_path):
    """``timeout`` and ``kill -TERM -- -PGID`` signal the whole group. Ray's processes (GCS, raylet, the
    workers running clients) are out of it (fedgluon/runtime/ray_session.py), so the round in flight
    finishes: exit 130, a checkpoint, an incomplete summary naming SIGTERM, and nothing of the group left.
    (With Ray's processes in the group, the workers died mid-round: exit 1, "the worker running client …
    died", in 3 of 3 tries with these sizes.)"""
    out = tmp_path / "t"
    args = [sys.executable, "-m", "fedgluon.exp.cli", "run", "engine.name=ray", "rounds=300", "task.hidden=[1024,1024]",
            "task.mean_samples=400", "output.checkpoint_every=1", f"output.dir={tmp_path}", "output.name=t", "--quiet"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach round 2"
            try:
                if checkpoint.load(out / "checkpoint.pt").next_round >= 2:
                    break
            except (OSError, RuntimeError, ValueError, EOFError, checkpoint.CheckpointError):
                pass
            time.sleep(0.02)
        family = _descendants(proc.pid)  # Ray's processes among them
        assert len(family) >= 3, family
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test made: its leader's PID is its id
        _, err = proc.communicate(timeout=120)
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["stopped"].startswith("received SIGTERM"), summary["stopped"]
    # the round in flight when the signal came finished: the checkpoint and metrics hold every round run (the
    # signal may land just after round 1's save, before its stop check: then round 1 is the last)
    done = checkpoint.load(out / "checkpoint.pt").next_round
    assert done >= 2 and len(pd.read_csv(out / "metrics.csv")) == done
    time.sleep(1)
    assert not [pid for pid in family if _running(pid)]  # fedgluon shut its Ray down


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def planned(plan: FaultPlan, seed: int, rounds: int, participants) -> dict[tuple[int, int], str]:
    """Every injected fault of a run, ``{(round, client): kind}``, given each round's participants: the
    clients' own draws (``FaultPlan.draw``), which are independent of scheduling."""
    out = {}
    for k in range(rounds):
        for j in participants[k]:
            kind = plan.draw(seed, j, k, plan.phase)
            if kind is not None:
                out[(k, j)] = kind
    return out


def test_injected_faults_are_failures_and_states_follow_accepted_rounds(tmp_path):
    """20% of client tasks raise or miss the deadline (a real sleep past round_timeout on the in-process
    Flower grid): the run completes, failure counts equal the planned injection, and metrics and every
    client's state equal the plain driver's, which simply drops the planned tasks."""
    faults = {"raise_prob": 0.15, "delay_prob": 0.05, "delay_s": 1.2}
    spec = specs.normalise({"task": {"name": "synthetic", "num_clients": 8, "dim": 10, "classes": 4, "hidden": [8],
                                     "mean_samples": 40},
                            "algorithm": {"name": "gluon-ef21-sarah", "lr": 0.05, "refresh_prob": 0.2,
                                          "compressor": {"name": "topk", "ratio": 0.1}},
                            "rounds": 20, "seed": 5, "participation": 0.75, "round_timeout": 1.0, "faults": faults})
    strategy = run_inprocess(spec)
    frame = pd.DataFrame(strategy.history)
    assert len(frame) == 20
    from fedgluon.sim.federation import sample_clients

    plan = planned(FaultPlan.from_spec(faults), 5, 20, {k: sample_clients(8, k, 5, 0.75) for k in range(20)})
    per_round = pd.Series([k for k, _ in plan], dtype=int).value_counts().reindex(range(20), fill_value=0)
    assert frame["failed"].tolist() == per_round.tolist()
    assert 0.1 < len(plan) / frame["participants"].sum() < 0.3 and {"raise", "delay"} <= set(plan.values())
    log = pd.DataFrame(strategy.client_log)
    failed = log[log.status == "failed"]
    assert set(zip(failed["round"], failed["client"], strict=True)) == set(plan)

    task, algo = specs.build(spec)
    ref = run_plain(algo, task.objectives, task.initial_params(), 20, seed=5, participation=0.75,
                    evaluate=lambda X, k: task.evaluate(X), faults=FaultPlan.from_spec(faults))
    cols = [c for c in frame.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(frame[cols], ref.frame()[cols], check_exact=True)
    accepted = log[log.status == "accepted"].groupby("client").size()
    assert strategy.federation.table.commits.tolist() == [int(accepted.get(j, 0)) for j in range(8)]
    same_table(strategy.federation.table, ref.table)


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21-mvr", "compressor": {"name": "topk", "ratio": 0.2}},
    {"name": "gluon-mvr"},
])
def test_resume_under_partial_participation_reproduces_x_prev_bitwise(tmp_path, algorithm):
    """An algorithm whose clients need X_prev (the model they last computed at), 3 of 8 clients a round:
    the run stops after round 5 with clients pointing at broadcast models of several older rounds (the
    table's model history, saved in the checkpoint); the resumed run equals the uninterrupted one
    bitwise: metrics, client rows, final model, and the whole client-state table."""
    spec = specs.normalise({"task": {"name": "synthetic", "num_clients": 8, "dim": 10, "classes": 4, "hidden": [8],
                                     "mean_samples": 40},
                            "algorithm": {**algorithm, "lr": 0.05}, "rounds": 12, "seed": 7, "participation": 3})
    task, algo = specs.build(spec)
    assert algo.needs_previous

    def clients_at_older_models(snap):
        seen = snap.client_states["seen"]
        assert len(set(seen.tolist()) - {-1}) >= 3  # clients last computed in 3+ rounds
        assert sorted(snap.client_states["models"]) == sorted(set(seen.tolist()) - {-1})  # exactly those models kept

    stop_and_resume(algo, task.objectives, task.initial_params(), 12, 5, tmp_path / "c.pt",
                    at_stop=clients_at_older_models, seed=7, participation=3, evaluate=lambda X, k: task.evaluate(X))


def test_injected_actor_death_inprocess_stops_with_a_usable_checkpoint(tmp_path):
    cfg = load_cfg(tmp_path, "engine.name=inprocess", "rounds=6", "faults.die=[[3,2]]", "output.name=dead",
                   "output.checkpoint_every=0")
    with pytest.raises(ActorDeathError, match="client 2 died") as err:
        experiment.run(cfg, progress=False)
    assert err.value.next_round == 3
    dead = tmp_path / "dead"
    assert checkpoint.load(dead / "checkpoint.pt").next_round == 3
    assert len(pd.read_csv(dead / "metrics.csv")) == 3 and not experiment.is_complete(dead)
    experiment.run(load_cfg(tmp_path, "engine.name=inprocess", "rounds=6", "output.name=dead"), progress=False,
                   out_dir=dead, resume=True)
    same_run(experiment.run(load_cfg(tmp_path, "engine.name=plain", "rounds=6", "output.name=ok"), progress=False),
             dead)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_injected_ray_actor_death_stops_promptly_and_resumes(tmp_path):
    cfg = load_cfg(tmp_path, "engine.name=ray", "rounds=6", "faults.die=[[2,1]]", "output.name=dead",
                   "engine.num_cpus=1", "round_timeout=60")
    t0 = time.monotonic()
    with pytest.raises(ActorDeathError, match="ActorDiedError"):
        experiment.run(cfg, progress=False)
    assert time.monotonic() - t0 < 120  # not the round timeout of a hung pool
    dead = tmp_path / "dead"
    assert checkpoint.load(dead / "checkpoint.pt").next_round == 2
    experiment.run(load_cfg(tmp_path, "engine.name=inprocess", "rounds=6", "output.name=dead"), progress=False,
                   out_dir=dead, resume=True)
    same_run(experiment.run(load_cfg(tmp_path, "engine.name=plain", "rounds=6", "output.name=ok"), progress=False),
             dead)


def test_non_finite_server_step_stops_with_the_last_finite_state(tmp_path):
    spec = specs.normalise({"task": {"name": "synthetic", "num_clients": 3, "dim": 8, "classes": 3, "hidden": [8]},
                            "algorithm": {"name": "gluon", "lr": 1e39}, "rounds": 10})  # t·lmo(G) overflows fp32
    task, algo = specs.build(spec)
    ck = Checkpointer(tmp_path / "c.pt")
    with pytest.raises(NonFiniteStateError, match="NaN/Inf") as err:
        run_plain(algo, task.objectives, task.initial_params(), 10, checkpointer=ck)
    snap = checkpoint.load(tmp_path / "c.pt")
    assert snap.next_round == err.value.next_round == 0 and snap.history == []
    assert all(bool(torch.isfinite(t).all()) for t in snap.server_state["X"].values())


def test_fault_config_errors_name_the_field(tmp_path):
    with pytest.raises(config.ConfigError, match="faults.raise_prob"):
        load_cfg(tmp_path, "faults.raise_prob=0.8", "faults.delay_prob=0.5")
    with pytest.raises(config.ConfigError, match="faults.die"):
        load_cfg(tmp_path, "faults.die=[3]")
    with pytest.raises(config.ConfigError, match="checkpoint_every"):
        load_cfg(tmp_path, "output.checkpoint_every=-1")


def test_diverging_run_stops_cleanly_naming_round_and_quantity(tmp_path):
    """algorithm.lr=1e30: the model stays finite but the central evaluation does not; the run stops at the
    first NaN/Inf with its round and quantity, writes metrics, summary and a finite checkpoint, and says
    to start a new run (a resume would replay the same round)."""
    cfg = load_cfg(tmp_path, "engine.name=plain", "rounds=12", "algorithm.lr=1e30", "output.name=big")
    with pytest.raises(NonFiniteStateError, match=r"round 0: NaN/Inf in the central evaluation's test_loss.*"
                                                  r"smaller radius") as err:
        experiment.run(cfg, progress=False)
    out = tmp_path / "big"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and "smaller radius" in summary["stopped"] and "resume" not in summary
    assert (out / "metrics.csv").exists() and (out / "clients.csv").exists()
    snap = checkpoint.load(out / "checkpoint.pt")
    assert snap.next_round == err.value.next_round == 0
    assert all(bool(torch.isfinite(t).all()) for t in snap.server_state["X"].values())


def test_gradient_norm_of_a_diverged_model_is_nan_not_a_linalg_error():
    """The true gradient's dual norm at a model whose gradient overflows is NaN (which stops the run), not
    a raw LinAlgError from the SVD."""
    from fedgluon.exp.experiment import _grad_dual_norm

    spec = specs.normalise({"task": {"name": "synthetic", "num_clients": 3, "dim": 8, "classes": 3, "hidden": [8]},
                            "algorithm": {"name": "gluon"}})
    task, algo = specs.build(spec)
    X = {n: torch.full_like(t, 1e30) for n, t in task.initial_params().items()}
    assert math.isnan(_grad_dual_norm(task, algo.geometry, X, {j: 1 / 3 for j in range(3)}))


def test_rounds_without_an_accepted_client_stop_the_run(tmp_path):
    """faults.raise_prob=1: every client fails every round. After max_failed_rounds such rounds the run
    stops, non-zero exit, "complete": false with the reason; a run shorter than that which never
    accepted a client is not complete either."""
    cfg = load_cfg(tmp_path, "engine.name=plain", "rounds=8", "faults.raise_prob=1", "max_failed_rounds=3",
                   "output.name=none")
    with pytest.raises(NoProgressError, match=r"no client was accepted in the last 3 rounds \(max_failed_rounds=3\)"):
        experiment.run(cfg, progress=False)
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert summary["complete"] is False and "max_failed_rounds" in summary["stopped"]
    assert len(pd.read_csv(tmp_path / "none" / "metrics.csv")) == 3
    cfg = load_cfg(tmp_path, "engine.name=inprocess", "rounds=2", "faults.raise_prob=1", "output.name=short")
    with pytest.raises(NoProgressError, match="no client was accepted in any of the run's 2 rounds"):
        experiment.run(cfg, progress=False)
    assert not experiment.is_complete(tmp_path / "short")
    with pytest.raises(NoProgressError, match="nothing to resume"):  # the checkpoint is at the end
        experiment.run(load_cfg(tmp_path, "engine.name=plain", "rounds=2", "output.name=short"), progress=False,
                       out_dir=tmp_path / "short", resume=True)
    assert not experiment.is_complete(tmp_path / "short")


def test_cli_exits_non_zero_when_no_client_is_ever_accepted(tmp_path):
    from click.testing import CliRunner

    from fedgluon.exp.cli import main

    out = CliRunner().invoke(main, ["run", *SMALL, f"output.dir={tmp_path}", "output.name=cli", "rounds=2",
                                    "--engine", "plain", "faults.raise_prob=1", "--quiet"])
    assert out.exit_code == 1 and "no client was accepted" in out.output
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["complete"] is False


def test_a_client_that_says_its_actor_died_fails_only_itself(monkeypatch):
    """A ClientApp whose exception text says its actor died is an exception of the ClientApp (Flower's
    CLIENT_APP_RAISED_EXCEPTION), not a dead worker: its clients fail, the run goes on and completes."""
    from fedgluon.flower import engines

    lie = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task. actor died"

    class LyingGrid(engines.InProcessGrid):
        def __init__(self, client_app, *args, **kwargs):
            def app(msg, context):
                if msg.metadata.message_type == "train" and msg.metadata.group_id == "1" \
                        and context.node_config["partition-id"] == 2:
                    raise RuntimeError(lie)
                return client_app(msg, context)
            super().__init__(app, *args, **kwargs)

    monkeypatch.setattr(engines, "InProcessGrid", LyingGrid)
    strategy = run_inprocess(specs.normalise({"task": {"name": "synthetic", "num_clients": 4, "dim": 6,
                                                       "classes": 3, "hidden": [4]}, "rounds": 3}))
    assert [row["failed"] for row in strategy.history] == [0, 1, 0]
    failed = [r for r in strategy.client_log if r["status"] == "failed"]
    assert [(r["round"], r["client"]) for r in failed] == [(1, 2)] and "ActorDiedError" in failed[0]["reason"]
