"""Run directories: ``--overwrite`` replaces only directories fedgluon created (its marker), nothing outside
them is deleted, a run locks its directory for its whole life, and a directory that cannot be made is
one ``error:`` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedgluon.config import schema as config
from fedgluon.exp import experiment
from fedgluon.exp.cli import main
from fedgluon.exp.experiment import MARKER

FAST = ["engine.name=plain", "rounds=3", "task.num_clients=3", "task.mean_samples=30", "grad_norm_every=0",
        "output.save_model=false", "--quiet"]


def cli(*args: str):
    return CliRunner().invoke(main, ["run", *FAST, *args], catch_exceptions=False)


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (not following links) with its content or link target."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_overwrite_leaves_a_directory_fedgluon_did_not_create_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    thesis = tmp_path / "runs" / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "one.tex").write_text("\\chapter{One}")
    (thesis / "summary.json").write_text(json.dumps({"complete": False}))  # looks like a run, has no marker
    before = tree(tmp_path)
    out = cli("output.name=thesis", "--overwrite")
    assert out.exit_code != 0
    line = error_line(out.output)
    assert str(Path("runs") / "thesis") in line and MARKER in line and "never replaced" in line
    assert tree(tmp_path) == before


def test_overwrite_replaces_a_run_directory_and_nothing_outside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("output.name=r").exit_code == 0
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / MARKER).is_file() and "fedgluon run directory" in (run_dir / MARKER).read_text()
    # without --overwrite: one line naming both ways out (an incomplete run's: --resume)
    assert error_line(cli("output.name=r").output).endswith("pass --overwrite to replace it, or choose another "
                                                            "output.name")
    (run_dir / "summary.json").unlink()
    assert error_line(cli("output.name=r").output).endswith("holds an incomplete run; pass --resume to continue it, "
                                                            "or --overwrite to replace it")
    assert "pass one of them" in error_line(cli("--overwrite", "--resume", str(run_dir)).output)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "data.txt").write_text("mine")
    (run_dir / "link-to-dir").symlink_to(outside)
    (run_dir / "link-to-file").symlink_to(outside / "data.txt")
    (run_dir / "extra").mkdir()
    before = tree(outside)
    assert cli("output.name=r", "--overwrite").exit_code == 0
    assert tree(outside) == before
    assert {p.name for p in run_dir.iterdir()} >= {MARKER, "config.yaml", "metrics.csv", "summary.json"}
    assert not {"link-to-dir", "link-to-file", "extra"} & {p.name for p in run_dir.iterdir()}
    # the run's own config.yaml never records overwriting, so copying it cannot request it
    assert "overwrite" not in (run_dir / "config.yaml").read_text()


def test_a_second_run_on_a_directory_in_use_is_refused_and_files_are_not_mixed(tmp_path):
    """While a run is in its second round, a second run on its directory (with --overwrite, or
    --resume) is refused; the first run's files are its own."""
    cfg = config.load(None, [*FAST[:-1], f"output.dir={tmp_path}", "output.name=busy", "seed=1"])
    second: list = []

    def start_second(row: dict) -> None:
        if row["round"] == 1:
            second.append(cli(f"output.dir={tmp_path}", "output.name=busy", "seed=2", "rounds=5", "--overwrite"))
            second.append(CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "busy"), "--quiet"],
                                             catch_exceptions=False))

    out = experiment.run(cfg, progress=False, on_round=start_second)
    assert len(second) == 2
    for result in second:
        assert result.exit_code != 0
        assert f"is in use by another fedgluon run (process {os.getpid()})" in error_line(result.output)
    saved = config.load(out / "config.yaml", own_run=True)
    assert saved.seed == 1 and saved.rounds == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rounds"] == 3 and summary["seed"] == 1


def test_the_lock_is_released_when_its_process_is_killed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("output.name=r").exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from fedgluon.exp.experiment import RunDirLock; "
                               "lock = RunDirLock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
         str(tmp_path / "runs" / "r")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = cli("output.name=r", "--overwrite")
        assert refused.exit_code != 0
        assert f"in use by another fedgluon run (process {holder.pid})" in error_line(refused.output)
        assert (tmp_path / "runs" / "r" / "summary.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli("output.name=r", "--overwrite").exit_code == 0


def test_an_output_dir_where_no_directory_can_be_made_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    out = cli(f"output.dir={tmp_path / 'a-file' / 'runs'}")
    assert out.exit_code != 0
    assert "cannot create the run directory" in error_line(out.output)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("a file where the run directory would go")
    out = cli("output.name=r", "--overwrite")
    assert out.exit_code != 0 and "exists and is not a directory" in error_line(out.output)
    assert (tmp_path / "runs" / "r").read_text().startswith("a file")


def test_a_read_only_output_dir_is_one_error_line(tmp_path, monkeypatch):
    """A directory without write permission. Root (CI and this VM run as root) may write into a mode-0o555
    directory, so there the run directory's mkdir is made to fail as the kernel fails it for other users."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() == 0:
        real = Path.mkdir

        def refused(self, *args, **kwargs):
            if self.parent.name == "ro":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refused)
    out = cli("output.dir=ro")
    line = error_line(out.output)
    assert out.exit_code != 0 and "cannot create the run directory" in line and "Permission denied" in line
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_runs_own_config_may_resume_though_it_recorded_overwrite(tmp_path):
    """config.yaml files written before output.overwrite was refused in files hold it; --resume reads
    them with own_run=True, which ignores it (a new run from such a file is refused)."""
    path = tmp_path / "config.yaml"
    path.write_text("rounds: 2\nengine:\n  name: plain\noutput:\n  overwrite: true\n")
    assert config.load(path, own_run=True).output.overwrite is False
    with pytest.raises(config.ConfigError, match="output.overwrite must not be set in config file"):
        config.load(path)
