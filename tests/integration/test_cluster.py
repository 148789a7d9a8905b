"""Ray clusters through the CLI (fedgluon/exp/cluster.py, fedgluon/exp/sweep.py): a real two-node cluster on
loopback started with ``ray start`` as the README says, sweeps whose members come back to the driver,
where runs ran, and shares the cluster cannot hold."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from fedgluon.exp.cli import main
from fedgluon.sim.metrics import TIMING_COLUMNS

TINY = ["rounds=2", "task.num_clients=2", "task.mean_samples=30", "grad_norm_every=0", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """``ray start --block ...`` in a session of its own (so its raylet, GCS and workers can be stopped
    by that session's process group, and only them), without this checkout on its PYTHONPATH: the code
    reaches the workers through the driver's runtime_env."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"})
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray, "start", "--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                             "--disable-usage-stats", *args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop one ``ray start --block`` and everything in its process group (SIGTERM, then SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what the group may still hold once ray start has exited
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node on loopback, one CPU each, started in their own directory; yields the
    head's ``HOST:PORT`` and that directory."""
    root = tmp_path_factory.mktemp("nodes")
    temp = Path(f"/tmp/fg-ray-{os.getpid()}")  # short: Ray's socket paths live under it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [_ray_start(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"], root,
                        root / "head.log")]
    try:
        _wait_for_nodes(address, 1, procs)
        procs.append(_ray_start([f"--address={address}", f"--temp-dir={temp}"], root, root / "worker.log"))
        _wait_for_nodes(address, 2, procs)
        yield address, root
    finally:
        for p in reversed(procs):
            _stop(p)


def _wait_for_nodes(address: str, n: int, procs: list[subprocess.Popen], tries: int = 120) -> None:
    """Until the cluster at ``address`` has ``n`` alive nodes (checked from a fresh driver process)."""
    code = (f"import ray; ray.init(address={address!r}, include_dashboard=False, log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    for _ in range(tries):
        assert all(p.poll() is None for p in procs), "a ray start process exited"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} never had {n} nodes")


def _cluster_nodes(address: str) -> set[str]:
    code = (f"import ray; ray.init(address={address!r}, include_dashboard=False, log_to_driver=False); "
            "print(' '.join(x['NodeID'] for x in ray.nodes() if x['Alive']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_and_run_on_a_two_node_cluster_come_back_to_the_driver(two_nodes, tmp_path, monkeypatch):
    """``fedgluon sweep --parallel 2 engine.address=...`` from a directory of its own, with the default
    relative ``output.dir``: every member directory and the table are in the driver's directory (not in
    the nodes' working directory), their metrics equal a sequential plain sweep's, and each summary
    names the cluster node that ran it. ``fedgluon run engine.name=ray engine.address=...`` (MuLoCo) runs its
    client actors on both nodes, records them, and equals the plain driver."""
    address, nodes_cwd = two_nodes
    nodes = _cluster_nodes(address)
    assert len(nodes) == 2
    driver = tmp_path / "driver"
    driver.mkdir()
    monkeypatch.chdir(driver)
    out = invoke("sweep", "engine.name=plain", *TINY, "seed=[0,1]", "algorithm.lr=[0.05,0.1]", "--name", "par",
                 "--parallel", "2", f"engine.address={address}")
    assert out.exit_code == 0, out.output
    seq = invoke("sweep", "engine.name=plain", *TINY, "seed=[0,1]", "algorithm.lr=[0.05,0.1]", "--name", "seq")
    assert seq.exit_code == 0, seq.output
    par_dir, seq_dir = driver / "runs" / "par", driver / "runs" / "seq"
    assert (par_dir / "table.csv").exists() and len(pd.read_csv(par_dir / "members.csv")) == 4
    used = set()
    for member in ("seed=0,lr=0.05", "seed=0,lr=0.1", "seed=1,lr=0.05", "seed=1,lr=0.1"):
        a = pd.read_csv(par_dir / member / "metrics.csv").drop(columns=list(TIMING_COLUMNS))
        b = pd.read_csv(seq_dir / member / "metrics.csv").drop(columns=list(TIMING_COLUMNS))
        pd.testing.assert_frame_equal(a, b)
        summary = json.loads((par_dir / member / "summary.json").read_text())
        assert summary["complete"] and summary["devices"] == [{"device": "cpu"}]
        (node,) = summary["nodes"]
        assert node["node_id"] in nodes and node["hostname"] == socket.gethostname() and node["ip"], node
        used.add(node["node_id"])
        assert json.loads((seq_dir / member / "summary.json").read_text())["nodes"][0]["node_id"] is None
    assert used == nodes  # two tasks at a time on two one-CPU nodes
    pd.testing.assert_frame_equal(pd.read_csv(par_dir / "table.csv").drop(columns=["sim_time_mean", "sim_time_std"]),
                                  pd.read_csv(seq_dir / "table.csv").drop(columns=["sim_time_mean", "sim_time_std"]))
    assert not (nodes_cwd / "runs").exists()

    out = invoke("run", "engine.name=ray", *TINY, "algorithm.name=muloco", "engine.block_size=1",
                 f"engine.address={address}", "output.name=on-ray")
    assert out.exit_code == 0, out.output
    summary = json.loads((driver / "runs" / "on-ray" / "summary.json").read_text())
    assert {n["node_id"] for n in summary["nodes"]} == nodes
    assert {n["hostname"] for n in summary["nodes"]} == {socket.gethostname()}
    assert summary["devices"] == [{"device": "cpu", "ray_gpus": ""}]
    assert invoke("run", "engine.name=plain", *TINY, "algorithm.name=muloco", "output.name=plain").exit_code == 0
    for csv in ("metrics.csv", "clients.csv"):  # MuLoCo: local Muon steps, int2 codes, an error-feedback column
        a, b = (pd.read_csv(driver / "runs" / name / csv) for name in ("on-ray", "plain"))
        timing = [c for c in TIMING_COLUMNS if c in a]
        pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["fedmuon"]  # MuLoCo: the test above; Dion: test_dion_engines (a private Ray)
                         + (["diloco", "fedmuon-bc", "dion", "orth-dion"] if os.environ.get("FEDGLUON_EVERY_METHOD")
                            else []))
def test_other_groups_methods_on_the_cluster_equal_the_plain_driver(two_nodes, tmp_path, monkeypatch, name):
    """FedMuon (local Muon steps, a momentum aggregate and the last global direction broadcast besides the
    model) on the Ray engine over the two nodes, one client per node: the metrics and the client log equal the
    plain driver's. ``FEDGLUON_EVERY_METHOD=1`` adds DiLoCo, FedMuon-BC, Dion and Orth-Dion (~12 s each)."""
    address, _ = two_nodes
    monkeypatch.chdir(tmp_path)
    args = (*TINY, f"algorithm.name={name}", "engine.block_size=1")
    for engine, extra in (("ray", [f"engine.address={address}"]), ("plain", [])):
        out = invoke("run", f"engine.name={engine}", *args, *extra, f"output.name={engine}")
        assert out.exit_code == 0, out.output
    for csv in ("metrics.csv", "clients.csv"):
        a, b = (pd.read_csv(tmp_path / "runs" / engine / csv) for engine in ("ray", "plain"))
        timing = [c for c in TIMING_COLUMNS if c in a]
        pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))


def test_a_gpu_share_the_cluster_lacks_fails_before_any_run_directory(tmp_path, monkeypatch):
    """``engine.num_gpus=0.5`` on a Ray without GPUs: one ``error:`` line naming the field and what the
    cluster has, exit code 2, and no run directory."""
    monkeypatch.chdir(tmp_path)
    out = invoke("run", "engine.name=ray", "engine.num_gpus=0.5", *TINY)
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: engine.num_gpus=0.5 "), out.output
    assert "0 in all" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_an_address_that_answers_but_is_no_ray_gcs_is_one_error_line(tmp_path, monkeypatch):
    """A gRPC server without the GCS's methods (as Ray's client-server port, 10001, is): refused by the
    address check with one line, before Ray prints its GCS errors for ~20 s, and no run directory."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.chdir(tmp_path)
    try:
        out = invoke("run", "engine.name=ray", f"engine.address=127.0.0.1:{port}", *TINY)
    finally:
        server.stop(0)
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and "answers, but not as a Ray head's GCS" in lines[0], out.output
    assert not (tmp_path / "runs").exists()


def test_a_sweep_refused_before_any_member_ran_leaves_no_sweep_directory(tmp_path, monkeypatch):
    """The first member's GPU share is refused (one error line); the sweep directory this call made goes
    with it, so a corrected rerun under the same --name is not told it holds another sweep."""
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", "engine.name=ray", "engine.num_gpus=0.5", *TINY, "seed=[0,1]", "--name", "g", "--quiet")
    assert out.exit_code == 2 and out.output.strip().splitlines()[-1].startswith("error: engine.num_gpus=0.5 ")
    assert not (tmp_path / "runs" / "g").exists()


def test_shares_are_checked_against_every_node_of_a_ray_with_a_faked_gpu():
    """The check reads Ray's own resources: a Ray told it has one GPU (on this CPU machine) holds a
    0.5 and a 1.0 share, not 1.5; nor 2 CPUs per task on one-CPU nodes. The per-node probe runs on
    that node and names a data file it lacks."""
    import ray

    from fedgluon.config.schema import ConfigError
    from fedgluon.exp.cluster import check_shares, probe_nodes, ray_nodes

    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False)
    try:
        nodes = ray_nodes()
        probe_nodes(nodes, [__file__])  # this Ray's node imports fedgluon at our versions and sees this file
        with pytest.raises(ConfigError, match=r"Ray node .* cannot run this run: no /nonexistent/train.svm"):
            probe_nodes(nodes, ["/nonexistent/train.svm"])
    finally:
        ray.shutdown()
    assert len(nodes) == 1 and nodes[0]["gpus"] == 1.0 and nodes[0]["cpus"] == 1.0
    check_shares(nodes, {"engine.num_cpus": 1.0, "engine.num_gpus": 0.5})
    check_shares(nodes, {"engine.num_gpus": 1.0})
    with pytest.raises(ConfigError, match=r"engine.num_gpus=1.5 .* it has 1 in all"):
        check_shares(nodes, {"engine.num_gpus": 1.5})
    with pytest.raises(ConfigError, match=r"engine.num_cpus=2 .* it has 1 in all"):
        check_shares(nodes, {"engine.num_cpus": 2.0})
    check_shares(nodes, {"threads": 1.0})  # a parallel sweep member holds one CPU per torch thread
    with pytest.raises(ConfigError, match=r"threads=2 asks each task for 2 CPU.* it has 1 in all"):
        check_shares(nodes, {"threads": 2.0})


@pytest.mark.parametrize("command", [["run", "engine.name=ray"], ["sweep", "seed=[0,1]", "--parallel", "2"]])
def test_an_address_where_no_ray_head_answers_is_one_line_before_any_directory(tmp_path, monkeypatch, command):
    """Ray retries an unreachable GCS address for minutes; fedgluon refuses it at once."""
    monkeypatch.chdir(tmp_path)
    out = invoke(*command, *TINY, f"engine.address=127.0.0.1:{_free_port()}")
    assert out.exit_code == 2, out.output
    assert out.output.startswith("error: engine.address='127.0.0.1:") and "no Ray head answers there" in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_parallel_member_is_written_and_reported_in_one_line(tmp_path, monkeypatch):
    """A member that stops on its node (a client that dies in round 1, ``faults.die``) comes back as far
    as it got, with its ``"complete": false`` summary, and is one ``error:`` line; the other member is
    complete and in the table."""
    monkeypatch.chdir(tmp_path)
    out = invoke("sweep", "engine.name=plain", *TINY, "faults.die=[[],[[1,0]]]", "--name", "bad", "--parallel", "2")
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 1 sweep member(s) failed"), out.output
    d = tmp_path / "runs" / "bad"
    assert "die=[[1, 0]]: ActorDeathError: round 1:" in lines[0] and "fedgluon-member-" not in lines[0], lines[0]
    good, bad = (json.loads((d / m / "summary.json").read_text()) for m in ("die=[]", "die=[[1, 0]]"))
    assert good["complete"] and not bad["complete"] and bad["stopped"], bad
    assert "in runs/bad/die=[[1, 0]]/checkpoint.pt" in bad["stopped"] and "fedgluon-member-" not in json.dumps(bad), bad
    assert pd.read_csv(d / "die=[[1, 0]]" / "metrics.csv")["round"].tolist() == [0]
    assert len(pd.read_csv(d / "members.csv")) == 1


def test_a_member_run_elsewhere_comes_back_as_files_the_driver_writes(tmp_path):
    """What a parallel member's Ray task does, without Ray: the run in a scratch directory (removed
    afterwards) returned as bytes, written by the driver into a complete run directory with its marker;
    a file name that would leave the member's directory is refused before anything is written."""
    from fedgluon.config.run_dir import MARKER, is_complete
    from fedgluon.config.schema import load
    from fedgluon.exp.sweep import run_member, write_member

    cfg = load(None, ["engine.name=plain", *TINY[:-1], "output.name=m"])
    result = run_member(cfg)
    assert result["error"] is None and not Path(result["scratch"]).exists()
    assert {"config.yaml", "metrics.csv", "clients.csv", "summary.json", "model.pt"} <= set(result["files"])
    assert MARKER not in result["files"]
    write_member(tmp_path / "m", result["files"], result["scratch"])
    assert is_complete(tmp_path / "m") and (tmp_path / "m" / MARKER).exists()
    assert len(pd.read_csv(tmp_path / "m" / "metrics.csv")) == 2
    with pytest.raises(ValueError, match="files named"):
        write_member(tmp_path / "evil", {"../outside.txt": b"x", "summary.json": b"{}"})
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "evil").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_gpu_share_on_a_ray_that_fakes_a_gpu_runs_and_records_the_gpu_ids(tmp_path):
    """On a Ray told it has one GPU (this machine has none), ``engine.num_gpus=0.5`` passes the check,
    the client actors get shares of GPU 0 and compute on the CPU (``client_device: auto``), and
    ``summary.json`` records that; the metrics equal the plain engine's."""
    import ray

    from fedgluon.config.schema import load
    from fedgluon.exp.experiment import run

    args = [*TINY[:-1], f"output.dir={tmp_path}", "engine.client_device=auto", "engine.block_size=1"]
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        out = run(load(None, ["engine.name=ray", "engine.num_gpus=0.5", "output.name=ray", *args]), progress=False)
    finally:
        ray.shutdown()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == [{"device": "cpu", "ray_gpus": "0"}] and len(summary["nodes"]) == 1
    plain = run(load(None, ["engine.name=plain", "output.name=plain", *args]), progress=False)
    a, b = (pd.read_csv(d / "metrics.csv").drop(columns=list(TIMING_COLUMNS)) for d in (out, plain))
    pd.testing.assert_frame_equal(a, b)


def test_the_readme_cluster_commands_name_real_config_fields():
    """README's "Ray cluster" block: the ``ray start`` lines name one head and its port, and its ``fedgluon
    run`` line's file and overrides load as a valid config pointed at that head (a renamed field fails)."""
    import re
    import shlex

    from fedgluon.config.schema import load

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = re.search(r"### Ray cluster\n.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    head = next(args for args in lines if args[:3] == ["ray", "start", "--head"])
    port = next(a.split("=")[1] for a in head if a.startswith("--port="))
    (run,) = [args for args in lines if args[:2] == ["fedgluon", "run"]]
    cfg = load(root / run[2], [a.replace("HEAD_IP", "127.0.0.1") for a in run[3:]])
    assert cfg.engine.address == f"127.0.0.1:{port}"
    assert any(args[:3] == ["ray", "start", f"--address=HEAD_IP:{port}"] for args in lines)


def test_relative_data_paths_reach_ray_tasks_absolute(tmp_path, monkeypatch):
    """A relative ``task.path`` means the user's directory: Ray tasks (client actors, parallel sweep members)
    get it made absolute, since they run elsewhere; the original config is left as it was."""
    from fedgluon.config.schema import load
    from fedgluon.exp.cluster import with_absolute_data_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.svm").write_text("".join(f"{i % 2} 1:{i / 40} 2:{i % 3}\n" for i in range(40)))
    cfg = load(None, ["task.name=libsvm", "task.path=data/train.svm"])
    out = with_absolute_data_paths(cfg)
    assert out.task.path == str(tmp_path / "data" / "train.svm") and cfg.task.path == "data/train.svm"
    assert with_absolute_data_paths(load(None, [])).task == load(None, []).task  # no data file: unchanged
