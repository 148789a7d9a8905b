"""The Flower deployment (fedgluon/flower/deployment.py, fedgluon/exp/deployed.py).

Fast tests drive the real ServerApp and ClientApp over fedgluon's in-process grid; the slow test starts a
real SuperLink and two SuperNodes on free loopback ports, runs ``flwr run`` and compares the run
directory with the in-process engine's. Every process it starts runs in its own process group, which the
fixture's finaliser ends by that process's id.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from flwr import __version__ as flwr_version
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedgluon.config import schema as configs
from fedgluon.config import spec as specs
from fedgluon.config.schema import ConfigError, load
from fedgluon.exp.deployed import deployed_run
from fedgluon.exp.experiment import run
from fedgluon.flower import deployment
from fedgluon.flower.client_app import make_client_app
from fedgluon.flower.engines import InProcessGrid
from strategies.server_app import serve

ROOT = Path(__file__).resolve().parents[2]
TINY = """\
task: {name: synthetic, num_clients: 4, dim: 20, classes: 4, hidden: [16], batch_size: 16}
algorithm: {name: gluon-ef21-sarah, lr: 0.05, compressor: {name: topk, ratio: 0.1}}
rounds: 3
seed: 0
engine: {block_size: 2}
output: {dir: runs, name: tiny}
"""
TIMING = ("wall_time", "server_time")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test reads its config and builds its task anew (the caches are per process)."""
    deployment._load.cache_clear()
    deployment._spec.cache_clear()
    specs._CACHE.clear()
    yield
    deployment._load.cache_clear()
    deployment._spec.cache_clear()


def _grid(nodes: int, run_config: dict) -> InProcessGrid:
    """The in-process grid over the run-config ClientApp (``flwr run``'s: spec from the run config)."""
    grid = InProcessGrid(make_client_app(), nodes, run_config=run_config)
    # Flower's Message constructor reads the process's task identity; its runtimes set it like this
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    return grid


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_relative_output_dir_needs_an_absolute_root(tiny: Path, tmp_path: Path):
    cfg = load(tiny)
    with pytest.raises(ConfigError, match="output.dir 'runs' is relative.*output-root"):
        deployment.run_dir(cfg, "")
    with pytest.raises(ConfigError, match="output-root 'rel' is not an absolute"):
        deployment.run_dir(cfg, "rel")
    assert deployment.run_dir(cfg, str(tmp_path)) == tmp_path / "runs" / "tiny"
    absolute = load(tiny, [f"output.dir={tmp_path / 'abs'}"])
    assert deployment.run_dir(absolute, "") == tmp_path / "abs" / "tiny"


def test_run_config_takes_fedgluon_run_keys(tiny: Path):
    """The spec file holds a `fedgluon run` config: engine.*, output.*, network.* are accepted."""
    rc = {"spec-file": str(tiny), "overrides": "engine.name=ray engine.num_cpus=2 network.bits=coo64 rounds=2"}
    spec = deployment.spec_of_run_config(rc)
    assert spec["block_size"] == 2 and spec["rounds"] == 2
    with pytest.raises(ConfigError, match="unknown config key 'block_size'"):
        deployment.spec_of_run_config({"spec-file": str(tiny), "overrides": "block_size=2"})


def test_task_and_config_are_built_once_per_process(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    """The ClientApp reads its spec from the run config for every message; the config is read and the task
    built once per process (here the server's and both nodes' handlers share this process)."""
    calls = {"build": 0, "load": 0}
    real_build, real_load = specs.build, configs.load

    def build(spec):
        calls["build"] += 1
        return real_build(spec)

    def counted_load(*args, **kwargs):
        calls["load"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(specs, "build", build)
    monkeypatch.setattr(configs, "load", counted_load)
    rc = {"spec-file": str(tiny)}
    grid = _grid(2, rc)
    strategy = serve(grid, deployment.spec_of_run_config(rc))
    assert len(strategy.history) == 3  # 2 handshakes and 6 train messages
    assert calls == {"build": 1, "load": 1}


def test_failed_serverapp_leaves_complete_false_with_the_reason(tiny: Path, tmp_path: Path):
    """One node for a run of two blocks: the node-count error names both numbers, and the run directory's
    summary says complete: false and why."""
    rc = {"spec-file": str(tiny), "overrides": "node_timeout=0.5", "output-root": str(tmp_path)}
    grid = _grid(1, rc)
    with pytest.raises(deployment.NodeCountError, match=r"needs 2 client nodes .*num_clients=4 / "
                                                        r"engine.block_size=2.*; 1 connected"):
        deployed_run(grid, _context(rc))
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["complete"] is False
    assert "NodeCountError: the run needs 2 client nodes" in summary["stopped"]


def test_more_nodes_than_blocks_is_refused(tiny: Path):
    rc = {"spec-file": str(tiny)}
    grid = _grid(3, rc)
    with pytest.raises(deployment.NodeCountError, match="needs 2 client nodes.*; 3 connected"):
        serve(grid, deployment.spec_of_run_config(rc))


def test_deployed_run_writes_the_run_directory(tiny: Path, tmp_path: Path):
    rc = {"spec-file": str(tiny), "output-root": str(tmp_path / "d")}
    deployed_run(_grid(2, rc), _context(rc))
    out = tmp_path / "d" / "runs" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["engine"] == "flower-deployment"
    assert {"metrics.csv", "clients.csv", "model.pt", "plots.png", "config.yaml"} <= {p.name for p in out.iterdir()}
    ref = run(load(tiny, ["engine.name=inprocess", f"output.dir={tmp_path / 'ip'}"]), progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").drop(columns=list(TIMING)),
                                  pd.read_csv(ref / "metrics.csv").drop(columns=list(TIMING)))


def test_an_existing_run_directory_is_refused_with_the_run_config_key(tiny: Path, tmp_path: Path):
    rc = {"spec-file": str(tiny), "overrides": "rounds=1", "output-root": str(tmp_path)}
    deployed_run(_grid(2, rc), _context(rc))
    with pytest.raises(ConfigError, match=r"holds a complete run; pass --run-config overwrite=true to replace it"):
        deployed_run(_grid(2, rc), _context(rc))
    assert json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())["complete"] is True  # untouched
    (tmp_path / "runs" / "tiny" / "summary.json").unlink()
    with pytest.raises(ConfigError, match=r"incomplete run; pass --run-config resume=true to continue it, or "
                                          r"--run-config overwrite=true"):
        deployed_run(_grid(2, rc), _context(rc))
    rc["overwrite"] = True
    deployed_run(_grid(2, rc), _context(rc))


def test_resume_run_config_continues_a_stopped_run(tiny: Path, tmp_path: Path):
    """A run stopped after round 1 (here: in-process, by an error after its checkpoint) continues under
    the deployment with run config resume=true, to the metrics of an uninterrupted run."""
    rc = {"spec-file": str(tiny), "overrides": "output.checkpoint_every=1", "output-root": str(tmp_path)}
    out = tmp_path / "runs" / "tiny"

    def stop_after_round_1(row):
        if row["round"] == 1:
            raise RuntimeError("stopped for the test")

    with pytest.raises(RuntimeError, match="stopped for the test"):
        run(load(tiny, ["output.checkpoint_every=1", "engine.name=inprocess"]), progress=False, out_dir=out,
            on_round=stop_after_round_1)
    assert (out / "checkpoint.pt").exists()
    deployed_run(_grid(2, {**rc, "resume": True}), _context({**rc, "resume": True}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["resumed_from_round"] >= 1
    ref = run(load(tiny, ["engine.name=inprocess", f"output.dir={tmp_path / 'ip'}"]), progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").drop(columns=list(TIMING)),
                                  pd.read_csv(ref / "metrics.csv").drop(columns=list(TIMING)))


def test_a_node_of_other_versions_stops_the_run_before_its_first_round(tiny: Path):
    rc = {"spec-file": str(tiny)}
    grid = _grid(2, rc)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query", group_id="hello") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs))
    for reply in replies:
        deployment.check_versions(reply, deployment.versions())  # same process: same versions
    other = {**deployment.versions(), "flwr": "0.0.1"}
    with pytest.raises(deployment.VersionMismatch, match=rf"runs fedgluon .*flwr {re.escape(flwr_version)}; "
                                                         r"the ServerApp runs .*flwr 0\.0\.1"):
        deployment.check_versions(replies[0], other)
    checked = deployment.VersionCheckedGrid(grid, other)  # a node of other versions stops the run
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query", group_id="hello") for n in grid.get_node_ids()]
    with pytest.raises(deployment.VersionMismatch, match=r"SuperNode \d+ runs .*; SuperNode \d+ runs "):
        checked.send_and_receive(msgs)


def test_a_deployed_run_with_a_node_of_other_versions_records_why_it_stopped(tiny: Path, tmp_path: Path):
    """One SuperNode answers the handshake with another fedgluon version: the ServerApp fails before round 0
    and the run directory's summary.json says so (the README's "Did it work?" check)."""
    rc = {"spec-file": str(tiny), "output-root": str(tmp_path)}
    app = make_client_app()

    def older(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "query" and context.node_config["partition-id"] == 1:
            reply.content.config_records["versions"]["fedgluon"] = "0.0.9"
        return reply

    grid = InProcessGrid(older, 2, run_config=rc)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    with pytest.raises(deployment.VersionMismatch):
        deployed_run(grid, _context(rc))
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["complete"] is False and "runs fedgluon 0.0.9" in summary["stopped"]


class LostSuperLink(InProcessGrid):
    """Pulls fail from the ``after``-th on, as a SuperLink's do once ``flwr stop`` revoked the run."""

    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pulls, self.after = 0, after

    def pull_messages(self, message_ids, timeout=None):
        self.pulls += 1
        if self.pulls > self.after:
            raise RuntimeError("Client error '401 Unauthorized' for url 'http://127.0.0.1:1/v1/runtime/pull-messages'")
        return super().pull_messages(message_ids, timeout)


def test_a_run_the_superlink_drops_keeps_its_rounds_and_says_why_and_a_refused_resubmission_says_its_own(
        tiny: Path, tmp_path: Path):
    """A SuperLink that stops answering mid-run (``flwr stop``): the rounds of the last checkpoint are written
    (metrics.csv, clients.csv) and ``stopped`` says the SuperLink no longer serves the run; the same config
    submitted again without ``resume`` is refused, and ``stopped`` then says that, the earlier reason kept as
    ``stopped_before``; with ``resume=true`` it completes."""
    rc = {"spec-file": str(tiny), "overrides": "rounds=6 output.checkpoint_every=1", "output-root": str(tmp_path)}
    grid = LostSuperLink(make_client_app(), 2, run_config=rc, after=4)  # the handshake, then 3 rounds
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    with pytest.raises(RuntimeError, match="401"):
        deployed_run(grid, _context(rc))
    out = tmp_path / "runs" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["stopped"].startswith("the SuperLink no longer serves this run")
    assert len(pd.read_csv(out / "metrics.csv")) == 3 and (out / "clients.csv").exists()
    with pytest.raises(ConfigError, match="incomplete run"):
        deployed_run(_grid(2, rc), _context(rc))
    summary = json.loads((out / "summary.json").read_text())
    assert "incomplete run" in summary["stopped"] and summary["stopped_before"].startswith("the SuperLink no longer")
    deployed_run(_grid(2, {**rc, "resume": True}), _context({**rc, "resume": True}))
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_polling_grid_returns_the_replies_of_send_and_receive(tiny: Path):
    grid = _grid(2, {"spec-file": str(tiny)})
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query", group_id="hello") for n in grid.get_node_ids()]
    replies = deployment.PollingGrid(grid, interval=0.001).send_and_receive(msgs, timeout=30)
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(grid.get_node_ids())
    assert all(not r.has_error() and "hello" in r.content.metric_records for r in replies)


# ---------------------------------------------------------------------- a real SuperLink and SuperNodes
def _readme_block(lang: str, first_line: str) -> str:
    """The README's ``lang`` code block whose first line starts with ``first_line`` (in "Flower deployment")."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Flower deployment"):]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README's Flower deployment section has {len(found)} {lang} blocks starting {first_line!r}"
    return found[0]


def _readme_commands(block: str) -> list[list[str]]:
    """Each command of a shell block as its argument list: continuations joined, comments and ``&`` dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        args = shlex.split(line, comments=True)
        out.append([a for a in args if a != "&"])
    return [args for args in out if args]


def _with_value(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option``'s value replaced (the option must be there)."""
    i = args.index(option)
    return [*args[: i + 1], value, *args[i + 2:]]


def test_the_readme_loopback_commands_are_the_ones_the_deployment_test_runs():
    """The slow test below starts what README's loopback block says (ports aside), so the block runs as
    written; this checks the block's shape the test relies on."""
    link, *nodes = _readme_commands(_readme_block("bash", "flower-superlink --insecure"))
    assert link[0] == "flower-superlink" and [n[0] for n in nodes] == ["flower-supernode"] * len(nodes)
    address = f"{link[link.index('--host') + 1]}:{link[link.index('--port') + 1]}"
    assert all(n[n.index("--superlink") + 1] == address for n in nodes)
    assert [n[n.index("--node-config") + 1] for n in nodes] == [f"partition-id={i}" for i in range(len(nodes))]
    toml = _readme_block("toml", "[superlink]")
    name = re.search(r'default = "(.+)"', toml).group(1)
    assert f'[superlink.{name}]\naddress = "{address}"' in toml
    (run_cmd,) = _readme_commands(_readme_block("bash", "flwr run"))
    assert run_cmd[:5] == ["flwr", "run", ".", name, "--stream"] and run_cmd[5] == "--run-config"
    spec_file = re.search(r"spec-file='([^']+)'", run_cmd[6]).group(1)
    assert not Path(spec_file).is_absolute() and deployment.app_path(spec_file).is_file()  # as the ServerApp reads it


def test_relative_paths_resolve_against_the_app_directory():
    """The app directory is the project's (what `flwr run .` bundles): pyproject's default spec-file is there."""
    assert (deployment.APP_DIR / "pyproject.toml").is_file()
    assert deployment.app_path("experiments/quickstart.yaml") == deployment.APP_DIR / "experiments" / "quickstart.yaml"
    assert deployment.app_path("experiments/quickstart.yaml").is_file()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Deployment:
    """A SuperLink and ``nodes`` SuperNodes on loopback, each started in its own process group (so the
    SuperExec and app processes they start end with them); ``stop`` ends each group by its leader's PID."""

    def __init__(self, home: Path, nodes: int):
        self.home, self.procs = home, []
        home.mkdir(parents=True)
        self.env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1"}
        link, health, *node_ports = _free_ports(2 + nodes)
        self.address = f"127.0.0.1:{link}"
        # README's loopback commands as written, on free ports; the health server's port is also freed here
        # (its default could be taken by another run), and the SuperNodes' Runtime API bound to loopback.
        superlink, *supernodes = _readme_commands(_readme_block("bash", "flower-superlink --insecure"))
        assert len(supernodes) >= nodes
        self._start("superlink", _bin(superlink[0]), *_with_value(superlink, "--port", str(link))[1:],
                    "--health-server-address", f"127.0.0.1:{health}")
        for i, (cmd, port) in enumerate(zip(supernodes, node_ports)):
            cmd = _with_value(_with_value(cmd, "--superlink", self.address), "--port", str(port))
            self._start(f"node{i}", _bin(cmd[0]), *cmd[1:], "--host", "127.0.0.1")
        toml = _readme_block("toml", "[superlink]")
        self.name = re.search(r'default = "(.+)"', toml).group(1)
        (home / "config.toml").write_text(re.sub(r'address = ".*"', f'address = "{self.address}"', toml))

    def _start(self, name: str, *cmd: str) -> None:
        log = open(self.home / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        log.close()

    def wait_connected(self, nodes: int, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = sum(b"SuperNode ID" in (self.home / f"node{i}.log").read_bytes() for i in range(nodes))
            if up == nodes:
                return
            time.sleep(1.0)
        raise TimeoutError(f"SuperNodes did not connect within {timeout} s; logs in {self.home}")

    def flwr_run(self, run_config: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
        (cmd,) = _readme_commands(_readme_block("bash", "flwr run"))
        cmd = [_bin(cmd[0]), cmd[1], str(ROOT), *cmd[3:6], run_config]  # README's, from this checkout
        return subprocess.run(cmd,
                              env=self.env, cwd=ROOT, capture_output=True, timeout=timeout, start_new_session=True)

    def stop(self) -> None:
        for proc in self.procs:
            _end_group(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _end_group(proc, signal.SIGKILL)
                proc.wait(timeout=15)


def _end_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this test created for the process: its PID is the group id
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory):
    dep = Deployment(tmp_path_factory.mktemp("loopback") / "flwr-home", nodes=2)
    try:
        dep.wait_connected(2)
        yield dep
    finally:
        dep.stop()


def _deployed_equals_inprocess(loopback: Deployment, spec_file: Path, out_root: Path) -> None:
    """``flwr run`` of ``spec_file`` on the loopback SuperLink: a complete run directory whose metrics.csv and
    clients.csv equal the in-process engine's, bitwise but for the timing columns."""
    done = loopback.flwr_run(f"spec-file='{spec_file}' output-root='{out_root / 'flwr'}'")
    out = out_root / "flwr" / "runs" / "tiny"
    assert done.returncode == 0, done.stdout.decode(errors="replace")[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["engine"] == "flower-deployment", summary
    ref = run(load(spec_file, ["engine.name=inprocess", f"output.dir={out_root / 'ip'}"]), progress=False)
    for name in ("metrics.csv", "clients.csv"):
        got, want = pd.read_csv(out / name), pd.read_csv(ref / name)
        timing = [c for c in TIMING if c in got]
        pd.testing.assert_frame_equal(got.drop(columns=timing), want.drop(columns=timing))  # bitwise


DEPLOYED = {"dion": "{name: dion, rank_fraction: 0.5}"}
"""What the suite deploys: Dion, whose rounds have two client phases (P, then R after the server's
orthonormalised P), so it takes every message path a one-phase method takes, and more. A deployed message
costs Flower ~10 s of polling and process start (BENCHMARKS.md), ~35 s a deployed round of Dion here;
``FEDGLUON_EVERY_METHOD=1`` deploys the rest as well."""
if os.environ.get("FEDGLUON_EVERY_METHOD"):
    DEPLOYED.update({"gluon-ef21-sarah": "{name: gluon-ef21-sarah, lr: 0.05, compressor: {name: topk, ratio: 0.1}}",
                     "orth-dion": "{name: orth-dion, rank_fraction: 0.5}", "diloco": "{name: diloco}",
                     "muloco": "{name: muloco}", "fedmuon": "{name: fedmuon}", "fedmuon-bc": "{name: fedmuon-bc}"})


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(DEPLOYED.values()), ids=list(DEPLOYED))
def test_flwr_run_on_superlink_and_supernodes_equals_inprocess(loopback: Deployment, tmp_path: Path, algorithm: str):
    """Two rounds of README's loopback deployment (4 clients in blocks of 2 on 2 SuperNodes): the run directory
    equals the in-process engine's, bitwise but for timings."""
    spec = re.sub(r"^algorithm: .*$", f"algorithm: {algorithm}", TINY, flags=re.M).replace("rounds: 3", "rounds: 2")
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(spec)
    _deployed_equals_inprocess(loopback, spec_file, tmp_path)


@pytest.mark.slow
def test_flwr_run_with_too_few_supernodes_says_so_in_the_summary(loopback: Deployment, tmp_path: Path):
    """6 clients in blocks of 2 need 3 SuperNodes; 2 are up. flwr run exits 0 (Flower's code), the summary
    says complete: false and names both numbers. The spec file is README's, relative: the ServerApp reads it
    from the app bundle Flower installed."""
    done = loopback.flwr_run(f"spec-file='experiments/quickstart.yaml' output-root='{tmp_path}' "
                             f"overrides='task.num_clients=6 engine.block_size=2 node_timeout=2 output.name=few'")
    assert done.returncode == 0, done.stdout.decode(errors="replace")[-3000:]
    summary = json.loads((tmp_path / "runs" / "few" / "summary.json").read_text())
    assert summary["complete"] is False
    assert "the run needs 3 client nodes (ceil(task.num_clients=6 / engine.block_size=2))" in summary["stopped"]
    assert "; 2 connected within node_timeout=2 s" in summary["stopped"]
