"""Saving: a failure at any step of any checkpoint save leaves the run resumable from the last complete
save, and the resumed run equals the uninterrupted one; resume refuses a checkpoint whose snapshot,
journal and round counter disagree with one ``error:`` line.

Failures are injected at the I/O steps of a save: opening a file for writing, each write that reaches
the file (under Python's 8 KiB buffer, as write(2) sees it), truncating, fsync and rename. An injected
``OSError`` is an I/O error (a full disk); an injected :class:`Killed` is a kill (nothing after it
succeeds). Real kills (SIGKILL of the CLI at a save step) and a real file-size limit (``ulimit -f``)
run in subprocesses.
"""

import errno
import io
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import journal_path
from test_reliability import same_run

from compressors import BitCount
from fedgluon.config import schema as config
from fedgluon.config import spec as specs
from fedgluon.exp import experiment
from fedgluon.exp.cli import main
from fedgluon.sim import checkpoint
from fedgluon.sim.checkpoint import Checkpointer, RunStopped, SaveFailed
from fedgluon.sim.driver import run_plain
from fedgluon.sim.metrics import TIMING_COLUMNS

ROUNDS = 3
TINY = ["task.num_clients=3", "task.dim=6", "task.classes=3", "task.hidden=[4]", "task.mean_samples=20",
        "engine.name=plain", f"rounds={ROUNDS}", "output.checkpoint_every=1", "grad_norm_every=1",
        "algorithm.refresh_prob=0.5"]


@pytest.fixture(autouse=True)
def _one_thread(_fixed_threads):
    """Tiny models: one thread is many times faster than two on a loaded machine, and results match."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


class Killed(BaseException):
    """An in-process kill: raised at an I/O step, caught by nothing in fedgluon."""


class _CountingRaw(io.RawIOBase):
    """The raw file under Python's buffer; every write is a step of ``faults``."""

    def __init__(self, raw: io.FileIO, faults: "Faults"):
        self.raw, self.faults = raw, faults

    def write(self, b) -> int:
        data = bytes(b)
        if self.faults.step("write", fail_after=lambda: self.raw.write(data[:len(data) // 2])):
            return self.raw.write(data)
        return 0  # not reached

    def truncate(self, size=None):
        self.faults.step("truncate")
        return self.raw.truncate(size)

    def readinto(self, b):
        return self.raw.readinto(b)

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def fileno(self):
        return self.raw.fileno()

    def readable(self):
        return self.raw.readable()

    def writable(self):
        return self.raw.writable()

    def seekable(self):
        return True

    def close(self):
        self.raw.close()
        super().close()


class Faults:
    """Counts the I/O steps of checkpoint saves, per save (a save starts where it opens its journal),
    and fails at ``at = (save, step)`` with ``error``: a failing write first writes half its bytes, and
    every step after the failure fails the same way (a killed process does nothing more; a full disk
    stays full). ``steps[s]`` lists save s's steps."""

    def __init__(self, monkeypatch, at: tuple[int, int] | None = None, error: type[BaseException] = Killed):
        self.at, self.error, self.fired = at, error, False
        self.steps: list[list[str]] = []
        real_open, real_fsync, real_replace = open, os.fsync, os.replace

        def opener(file, mode="r", *args, **kwargs):
            if "r" in mode and "+" not in mode:
                return real_open(file, mode, *args, **kwargs)
            if str(file).endswith(".jsonl"):
                self.steps.append([])
            self.step("open")
            raw = _CountingRaw(real_open(file, mode, buffering=0), self)
            return io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)

        def fsync(fd):
            self.step("fsync")
            return real_fsync(fd)

        def replace(src, dst):
            self.step("rename")
            return real_replace(src, dst)

        monkeypatch.setattr(checkpoint, "open", opener, raising=False)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def step(self, name: str, fail_after=None) -> bool:
        if not self.steps:
            self.steps.append([])
        here = (len(self.steps) - 1, len(self.steps[-1]))
        self.steps[-1].append(name)
        if self.fired or here == self.at:
            if fail_after is not None and not self.fired:
                fail_after()
            self.fired = True
            raise self.error(errno.ENOSPC, "No space left on device (injected)") if self.error is OSError \
                else self.error(f"killed at save {here[0]}, step {here[1]} ({name})")
        return True


# ---------------------------------------------------------------------- the federation, without the run directory
SPEC = config.spec_of(config.load(None, TINY))


def _plain(path: Path, resume: checkpoint.Snapshot | None = None, adopt: bool = True):
    """Run (or resume) the tiny task on the plain driver, checkpointing every round to ``path``; ``adopt``:
    the checkpointer continues the journal of the checkpoint it resumes from (False: starts a new one)."""
    task, algo = specs.build(SPEC)
    ckpt = Checkpointer(path, every=1, run_key="tiny", resumed=resume if adopt else None)
    return run_plain(algo, task.objectives, task.initial_params(), ROUNDS, seed=SPEC["seed"],
                     participation=SPEC["participation"], evaluate=lambda X, k: task.evaluate(X),
                     checkpointer=ckpt, resume=resume)


def _same_result(a, b) -> None:
    fa, fb = a.frame(), b.frame()
    cols = [c for c in fa.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(fa[cols], fb[cols], check_exact=True)
    assert a.client_log == b.client_log
    assert all(torch.equal(a.server_state["X"][n], b.server_state["X"][n]) for n in a.server_state["X"])


def _finish(path: Path):
    """What a user does after a failure: resume from the checkpoint, or start again when there is none."""
    if not path.exists():
        return _plain(path)
    snap = checkpoint.load(path)
    checkpoint.sweep(path, snap)
    return _plain(path, snap)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted plain-driver run, and the I/O steps of each of its saves."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("reference") / "c.pt"
    with pytest.MonkeyPatch.context() as mp:
        faults = Faults(mp)
        result = _plain(path)
    return result, faults.steps


def test_every_save_writes_fsyncs_and_renames(reference):
    _, steps = reference
    assert len(steps) == ROUNDS
    for s in steps:
        assert s.count("rename") == 1 and s.count("fsync") >= 3 and s.count("write") >= 2 and "truncate" in s
    assert steps[0].count("fsync") == steps[1].count("fsync") + 1  # the new journal's directory entry


SCENARIOS = {  # the failing save in its process, the reference save with its steps, the checkpoint it starts from
    "first save": (0, 0, None), "later save": (1, 1, None), "first save after a resume": (0, 1, (2, 0)),
    "new journal over a checkpoint": (0, 0, (2, 0))}


@pytest.mark.parametrize("error", [OSError, Killed])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_failure_at_every_step_of_a_save_leaves_the_run_resumable(tmp_path, reference, scenario, error):
    """For every I/O step of the chosen save: fail there, then resume from what is on disk (or start again
    when no save was complete); the result equals the uninterrupted run, and a failed save leaves no
    temporary file. An I/O error raises SaveFailed, which names the last complete save. "new journal over
    a checkpoint": a process that resumes without the journal state writes every row to a new journal."""
    full, steps = reference
    save, layout, prefix = SCENARIOS[scenario]
    start, base = tmp_path / "start", 0
    start.mkdir()
    if prefix is not None:  # a run killed at the start of its third save: the checkpoint of round 2
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
            Faults(mp, prefix)
            _plain(start / "c.pt")
        base = 2
    for i in range(len(steps[layout])):
        path = shutil.copytree(start, tmp_path / f"step{i}") / "c.pt"
        resume = checkpoint.load(path) if prefix is not None else None
        with pytest.MonkeyPatch.context() as mp:
            faults = Faults(mp, (save, i), error)
            with pytest.raises((error, SaveFailed)) as err:
                _plain(path, resume, adopt=scenario != "new journal over a checkpoint")
        assert faults.fired and faults.steps[save][:i + 1] == steps[layout][:i + 1], (scenario, i)
        if error is OSError:
            assert err.type is SaveFailed
            if not path.exists():
                assert "no complete checkpoint" in str(err.value)
            elif checkpoint.load(path).next_round == base + save + 1 or scenario != "new journal over a checkpoint":
                assert f"the checkpoint of round {checkpoint.load(path).next_round} is intact" in str(err.value)
            else:
                assert "was not changed" in str(err.value)
            assert _leftovers(path.parent) == []
        if path.exists():
            assert checkpoint.load(path).next_round in (base + save, base + save + 1)
        _same_result(full, _finish(path))
        assert [p.name for p in path.parent.iterdir() if ".rows." in p.name] == [journal_path(path).name]


# ---------------------------------------------------------------------- whole runs: experiment.run and the CLI
def _cfg(out: Path, name: str, *extra: str):
    return config.load(None, [*TINY, f"output.dir={out}", f"output.name={name}", *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    return experiment.run(_cfg(out, "full"), progress=False)


def _stopped_run(tmp_path: Path, name: str = "run") -> Path:
    """A run stopped by SIGTERM in round 1: the checkpoint of round 2 (2 of 3 metrics rows)."""
    def stop(row):
        if row["round"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunStopped):
        experiment.run(_cfg(tmp_path, name), progress=False, on_round=stop)
    return tmp_path / name


def test_a_failed_first_save_after_resume_leaves_the_run_resumable(tmp_path, full_run):
    """The audit's failure: the first save after a --resume rewrote the journal, then failed before its
    snapshot was renamed; every later resume died with "holds fewer rows than ... counts"."""
    cut = _stopped_run(tmp_path)
    real = os.replace

    def full_disk_at_the_snapshot(src, dst):
        if Path(dst).name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(src, dst)

    with pytest.MonkeyPatch.context() as mp, pytest.raises((OSError, RunStopped)):
        mp.setattr(os, "replace", full_disk_at_the_snapshot)
        experiment.run(_cfg(tmp_path, "run"), progress=False, out_dir=cut, resume=True)
    experiment.run(_cfg(tmp_path, "run"), progress=False, out_dir=cut, resume=True)
    same_run(full_run, cut)


def test_a_failed_save_leaves_no_temporary_file_and_resume_sweeps_stale_ones(tmp_path, full_run):
    """A save that fails removes its own temporary file; a killed one leaves it, and the resume removes it
    and journals no checkpoint names, inside the run directory only."""
    run_dir = _stopped_run(tmp_path)
    real = os.fsync

    def full_disk_at_a_temporary_file(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(fd)

    with pytest.MonkeyPatch.context() as mp, pytest.raises((OSError, RunStopped)):
        mp.setattr(os, "fsync", full_disk_at_a_temporary_file)
        experiment.run(_cfg(tmp_path, "run"), progress=False, out_dir=run_dir, resume=True)
    assert _leftovers(run_dir) == []
    stale = [run_dir / ".checkpoint.pt.99999.tmp", run_dir / "checkpoint.pt.rows.0123456789ab.jsonl"]
    outside = [tmp_path / ".checkpoint.pt.99999.tmp", tmp_path / "checkpoint.pt.rows.0123456789ab.jsonl"]
    for p in stale + outside:
        p.write_bytes(b"partial")
    experiment.run(_cfg(tmp_path, "run"), progress=False, out_dir=run_dir, resume=True)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in outside)
    assert not [p for p in run_dir.iterdir() if "checkpoint" in p.name]
    same_run(full_run, run_dir)


@pytest.mark.slow
def test_fuzz_twenty_kill_points_across_ten_resumed_runs(tmp_path, reference):
    """10 runs of 5 rounds, each killed at a random step of its second to fourth save, then resumed and
    killed at a random step of a save (half the time the first after the resume), then resumed to the
    end: every run's files equal the uninterrupted run's."""
    _, steps = reference
    shortest = min(len(s) for s in steps[1:])
    full = experiment.run(_cfg(tmp_path, "full", "rounds=5"), progress=False)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for case in range(10):
        cfg = _cfg(tmp_path, f"r{case}", "rounds=5")
        out = tmp_path / f"r{case}"
        first = (rng.randrange(1, 4), rng.randrange(len(steps[1])))
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
            Faults(mp, first)
            experiment.run(cfg, progress=False)
        left = 5 - checkpoint.load(out / "checkpoint.pt").next_round
        second = (0 if rng.random() < 0.5 else rng.randrange(left), rng.randrange(shortest))
        with pytest.MonkeyPatch.context() as mp:
            faults = Faults(mp, second)
            with pytest.raises(Killed):
                experiment.run(cfg, progress=False, out_dir=out, resume=True)
        assert faults.fired, f"seed {seed}, case {case}: {first}, {second}"
        experiment.run(cfg, progress=False, out_dir=out, resume=True)
        try:
            same_run(full, out)
        except AssertionError as err:
            raise AssertionError(f"seed {seed}, case {case}: kills at {first}, {second}") from err


# ---------------------------------------------------------------------- real kills and a real file-size limit
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

KILL_AT_SAVE_STEP = """
import os, signal, sys
n, calls = int(sys.argv.pop(1)), [0]
def killing(fn):
    def at(*args):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args)
    return at
os.fsync, os.replace = killing(os.fsync), killing(os.replace)
from fedgluon.exp.cli import main
sys.argv[0] = "fedgluon"
main()
"""


def _cli(*args: str, kill_at: int | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes past the limit raise EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    python = [sys.executable, "-c", KILL_AT_SAVE_STEP, str(kill_at)] if kill_at else [sys.executable, "-m"]
    head = python if kill_at else [*python, "fedgluon.exp.cli"]
    return subprocess.run([*head, "run", *args, "--quiet"], check=False, capture_output=True, text=True, env=ENV,
                          timeout=120,
                          preexec_fn=limit if fsize else None)


@pytest.mark.slow
def test_sigkill_at_a_save_step_then_at_the_first_save_after_resume(tmp_path, full_run):
    """Two real SIGKILLs, each right before an fsync or rename of a save (4 or 5 per save): one in a save
    after the first, one in the first save after the resume (the audit's window); then the run resumes
    to the uninterrupted result."""
    rng = random.Random()
    first, second = rng.randrange(6, 4 * ROUNDS + 1), rng.randrange(1, 5)
    killed = _cli(*TINY, f"output.dir={tmp_path}", "output.name=k", kill_at=first)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "k"
    assert checkpoint.load(run_dir / "checkpoint.pt").next_round >= 1
    killed = _cli("--resume", str(run_dir), kill_at=second)
    assert killed.returncode == -signal.SIGKILL, (first, second, killed.stderr[-2000:])
    experiment.run(_cfg(tmp_path, "k"), progress=False, out_dir=run_dir, resume=True)
    same_run(full_run, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["journal", "snapshot"])
def test_full_disk_in_the_first_save_after_resume(tmp_path, full_run, where):
    """ulimit -f: the resumed run's first save hits the file-size limit in its journal append (a partial
    write) or its snapshot; the run stops with one line naming the intact checkpoint, leaves no temporary
    file, and resumes to the uninterrupted result once there is space."""
    cfg = _cfg(tmp_path, "disk")
    run_dir = _stopped_run(tmp_path, "disk")
    journal = journal_path(run_dir / "checkpoint.pt").stat().st_size
    snapshot = (run_dir / "checkpoint.pt").stat().st_size
    assert journal + 1000 < snapshot
    limit = journal + 10 if where == "journal" else snapshot - 200
    stopped = _cli("--resume", str(run_dir), fsize=limit)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert "could not save the checkpoint of round 3" in stopped.stderr and "round 2 is intact" in stopped.stderr
    assert _leftovers(run_dir) == []
    if where == "journal":
        assert journal_path(run_dir / "checkpoint.pt").stat().st_size == limit  # a partial append
    experiment.run(cfg, progress=False, out_dir=run_dir, resume=True)
    same_run(full_run, run_dir)


# ---------------------------------------------------------------------- resume refuses an inconsistent set
def _resume_error(run_dir: Path) -> str:
    out = CliRunner().invoke(main, ["run", "--resume", str(run_dir), "--quiet"])
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.output
    assert not experiment.is_complete(run_dir)
    return lines[0]


def _edit_payload(path: Path, **changes) -> None:
    with torch.serialization.safe_globals([BitCount]):
        data = torch.load(path, weights_only=True)
    data.update(changes)
    torch.save(data, path)


def test_an_empty_or_truncated_checkpoint_is_refused_with_one_line(tmp_path):
    run_dir = _stopped_run(tmp_path)
    ckpt = run_dir / "checkpoint.pt"
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[:len(whole) // 2])
    assert "checkpoint.pt cannot be resumed: it is truncated or damaged" in _resume_error(run_dir)
    ckpt.write_bytes(b"")
    assert "checkpoint.pt cannot be resumed: it is empty" in _resume_error(run_dir)


def test_an_edited_next_round_is_refused_not_marked_complete(tmp_path):
    """The audit set next_round to the last round: the run was marked complete with 7 of 40 rows."""
    run_dir = _stopped_run(tmp_path)
    _edit_payload(run_dir / "checkpoint.pt", next_round=ROUNDS)
    line = _resume_error(run_dir)
    assert f"at round {ROUNDS} but holds 2 metrics rows" in line


def test_a_changed_or_missing_journal_is_refused(tmp_path):
    run_dir = _stopped_run(tmp_path)
    journal = journal_path(run_dir / "checkpoint.pt")
    text = journal.read_text()
    journal.write_text(text.replace('"round": 1', '"round": 7', 1))
    assert "differs from the one the checkpoint was saved with" in _resume_error(run_dir)
    journal.write_text(text[:len(text) // 2])
    assert "fewer than" in _resume_error(run_dir)
    journal.unlink()
    assert "is missing" in _resume_error(run_dir)


def _table_of(run_dir: Path) -> dict:
    with torch.serialization.safe_globals([BitCount]):
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["client_states"]


def test_client_states_of_another_federation_are_refused(tmp_path):
    """A client-state table of 4 clients (the run has 3) is refused before any round runs."""
    run_dir = _stopped_run(tmp_path)
    table = _table_of(run_dir)
    grown = {**table, "columns": {p: torch.cat([c, c[:1]]) for p, c in table["columns"].items()},
             "commits": torch.cat([table["commits"], table["commits"][:1]]),
             "seen": torch.cat([table["seen"], table["seen"][:1]])}
    _edit_payload(run_dir / "checkpoint.pt", client_states=grown)
    assert "holds the states of 4 clients, the run has 3" in _resume_error(run_dir)


@pytest.mark.parametrize("edit", ["extra column", "missing column", "dtype", "shape", "commits"])
def test_a_table_that_does_not_fit_the_runs_schema_is_refused_with_one_line(tmp_path, edit):
    """A checkpoint's client-state table whose columns differ from the schema of the run it resumes (a
    column more or less, another dtype or row shape, commit counters of another dtype) is refused with
    one ``error:`` line naming what does not fit; the checkpoint is left as it was."""
    run_dir = _stopped_run(tmp_path)
    table = _table_of(run_dir)
    columns = dict(table["columns"])
    path = min(columns)
    expected = {"extra column": "unexpected ['extra/w']", "missing column": f"missing [{path!r}]",
                "dtype": f"state column {path!r} is torch.float64", "shape": f"state column {path!r} is",
                "commits": "'commits' must be int64"}[edit]
    if edit == "extra column":
        columns["extra/w"] = torch.zeros(3, 2)
    elif edit == "missing column":
        del columns[path]
    elif edit == "dtype":
        columns[path] = columns[path].double()
    elif edit == "shape":
        columns[path] = columns[path].reshape(3, -1)[:, :1].clone()
    table = {**table, "columns": columns}
    if edit == "commits":
        table["commits"] = table["commits"].float()
    _edit_payload(run_dir / "checkpoint.pt", client_states=table)
    before = (run_dir / "checkpoint.pt").read_bytes()
    line = _resume_error(run_dir)
    assert expected in line, line
    assert (run_dir / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("fmt", [3, 2, 5, "4"])
def test_an_old_format_checkpoint_is_refused_with_one_line(tmp_path, fmt):
    """A checkpoint of another format (3: one state tree per client, before the client-state table) is
    refused by checkpoint.load with one CheckpointError line naming the format, and by the CLI with one
    ``error:`` line."""
    run_dir = _stopped_run(tmp_path)
    _edit_payload(run_dir / "checkpoint.pt", format=fmt)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(run_dir / "checkpoint.pt")
    assert len(str(err.value).splitlines()) == 1
    said = f"has checkpoint format {fmt!r}, this fedgluon reads format {checkpoint.FORMAT} only"
    assert said in str(err.value) and said in _resume_error(run_dir)


def test_a_table_of_another_table_format_is_refused(tmp_path):
    run_dir = _stopped_run(tmp_path)
    _edit_payload(run_dir / "checkpoint.pt", client_states={**_table_of(run_dir), "format": 0})
    assert "client-state table format 0, expected 1" in _resume_error(run_dir)
