"""Ray clusters: connecting the driver, checking that the cluster can run what the config asks before
anything is written, and recording where a run ran (``summary.json``'s ``nodes`` and ``devices``). The README
("Ray cluster") gives the rules: this project's packages are shipped to the nodes, one probe task per node
checks imports, versions and data files, and a CPU or GPU share no node holds is refused in seconds (Ray would
otherwise wait for it forever), each failure one :class:`~fedgluon.config.schema.ConfigError` line.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedgluon.config.schema import ConfigError
from fedgluon.core.text import first_line
from fedgluon.runtime.ray_session import ray_daemons_in_own_session

PACKAGES = ("fedgluon", "compressors", "strategies")
"""The top-level packages of this project, shipped to the nodes of a cluster."""

VERSIONED = ("fedgluon", "flwr", "torch", "numpy")
"""The packages whose versions every node must share with the driver (Ray checks its own)."""

DATA_KEYS = ("path", "data_dir")
"""Task options that name local data files, checked on every node of a cluster."""


def runtime_env(address: str | None) -> dict[str, Any]:
    """The ``runtime_env`` of the driver's Ray job: on a cluster, this project's packages as ``py_modules``
    (so the nodes run the driver's code, wherever it lives); locally, the driver's ``sys.path`` as the
    workers' ``PYTHONPATH`` (as Flower's Ray backend sets it when it starts Ray itself)."""
    from fedgluon.flower.engines import QUIET_ENV

    if not address:
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}
    import importlib

    # regular packages: their __file__ is set
    modules = [str(Path(importlib.import_module(n).__file__).parent) for n in PACKAGES]  # type: ignore[arg-type]
    return {"py_modules": modules, "excludes": ["__pycache__", "*.pyc"], "env_vars": dict(QUIET_ENV)}


def connect(address: str | None, *, num_cpus: float | None = None, task_share: Mapping[str, float] | None = None,
            data_paths: Sequence[str] = (), log_to_driver: bool = True) -> list[dict[str, Any]]:
    """Start (``address`` None: a private local Ray with ``num_cpus`` CPUs) or join a Ray cluster, unless Ray is
    already initialised in this process (then used as it is); returns its nodes (:func:`ray_nodes`). A
    ``task_share`` (``{"engine.num_cpus": 1}``) no node holds is a :class:`ConfigError`; on a cluster each node is
    probed (:func:`probe_nodes`). Ray is shut down again on any error here; otherwise the caller (or Flower)
    shuts it down."""
    import logging

    from fedgluon.flower.engines import _engine_notices_filtered, _quiet

    _quiet()
    import ray

    if not ray.is_initialized():
        if address:
            reachable(address)
        kwargs: dict[str, Any] = {"num_cpus": num_cpus} if not address else {}
        try:  # no "Started a local Ray instance" line, nor Ray's GPU tip; a private Ray in its own session
            with _engine_notices_filtered(), ray_daemons_in_own_session(address):
                ray.init(address=address or "local", include_dashboard=False, runtime_env=runtime_env(address),
                         logging_level=logging.WARNING, log_to_driver=log_to_driver, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ConfigError(f"engine.address={address!r}: cannot connect to a Ray cluster there: "
                              f"{first_line(err)}") from None
    try:
        nodes = ray_nodes()
        check_shares(nodes, task_share or {})
        if address:
            probe_nodes(nodes, data_paths)
    except BaseException:
        ray.shutdown()
        raise
    return nodes


def reachable(address: str, timeout: float = 5.0) -> None:
    """:class:`ConfigError` unless ``address`` is ``auto`` or a ``HOST:PORT`` that accepts a TCP connection
    within ``timeout`` seconds (Ray itself retries an unreachable address for minutes)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [IPv6]:PORT
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"engine.address must be 'auto' or HOST:PORT (the head's `ray start --head --port`), "
                          f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"engine.address={address!r}: no Ray head answers there ({err.strerror or err}); start "
                          f"one with `ray start --head --port={port}` or fix the address") from None
    if _answers_as_gcs(host, int(port), timeout) is False:  # Ray would print its GCS errors for ~20 s first
        raise ConfigError(f"engine.address={address!r} answers, but not as a Ray head's GCS (Ray's client-server "
                          f"port, 10001, say): give the head's `ray start --head --port` (6379 by default)")


def _answers_as_gcs(host: str, port: int, timeout: float) -> bool | None:
    """Whether ``host:port`` answers the GCS's ``GetClusterId`` (True), answers gRPC without that method
    (False: another service, such as Ray's client server), or cannot tell (None: no gRPC answer in time, or
    grpc or Ray's generated stubs missing; Ray's own connection then decides)."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                              timeout=timeout)
            return True
        except grpc.RpcError as err:
            return False if err.code() == grpc.StatusCode.UNIMPLEMENTED else None


def ray_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the Ray instance this process is connected to: ``node_id``, ``hostname``,
    ``ip``, ``cpus`` and ``gpus`` (Ray's logical resources)."""
    import ray

    return [{"node_id": n["NodeID"], "hostname": n.get("NodeManagerHostname", ""),
             "ip": n.get("NodeManagerAddress", ""), "cpus": float(n.get("Resources", {}).get("CPU", 0)),
             "gpus": float(n.get("Resources", {}).get("GPU", 0))} for n in ray.nodes() if n.get("Alive")]


# The Ray resource each config field asks a task for (a sweep member holds one CPU per torch thread).
RESOURCE_OF = {"engine.num_cpus": "cpus", "engine.num_gpus": "gpus", "threads": "cpus"}


def check_shares(nodes: Sequence[Mapping[str, Any]], share: Mapping[str, float]) -> None:
    """:class:`ConfigError` when a task's share of a resource (``{"engine.num_gpus": 0.5}``, a field of
    :data:`RESOURCE_OF`) is more than every node holds: Ray would never schedule the task."""
    for field, amount in share.items():
        resource = RESOURCE_OF[field]
        if amount <= 0:
            continue
        held = [float(n[resource]) for n in nodes]
        if max(held, default=0.0) < amount:
            per_node = ", ".join(f"{n['hostname'] or n['ip']}: {n[resource]:g}" for n in nodes) or "no nodes"
            raise ConfigError(f"{field}={amount:g} asks each task for {amount:g} {resource.upper()[:-1]}, "
                              f"but no node of the Ray cluster has that many: it has {sum(held):g} in all "
                              f"({per_node}); lower {field} or add nodes that have them")


def _probe(paths: Sequence[str]) -> dict[str, Any]:
    """Run on one node: the versions of :data:`VERSIONED` it imports and which ``paths`` it lacks."""
    import importlib

    out: dict[str, Any] = {"hostname": socket.gethostname()}
    for name in (*PACKAGES, *VERSIONED):
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - reported to the driver as one line
            out.setdefault("errors", []).append(f"cannot import {name}: {type(err).__name__}: {first_line(err)}")
            continue
        if name in VERSIONED:
            out[name] = getattr(module, "__version__", "?")
    out["missing"] = [p for p in paths if not os.path.exists(p)]
    return out


def probe_nodes(nodes: Sequence[Mapping[str, Any]], data_paths: Sequence[str] = (), timeout: float = 300.0) -> None:
    """Run :func:`_probe` once on every node (a task pinned to it, taking no CPU) and raise a
    :class:`ConfigError` naming the first node that cannot import this project's packages, imports another
    version of one of :data:`VERSIONED` than the driver, or lacks one of ``data_paths``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False)).remote(
        list(data_paths)): n for n in nodes}
    mine = _probe(())  # the driver's own versions
    for ref, node in refs.items():
        where = f"Ray node {node['hostname'] or '?'} ({node['ip']})"
        try:
            got = ray.get(ref, timeout=timeout)
        except Exception as err:  # noqa: BLE001 - a runtime_env that fails to set up, a node that died...
            raise ConfigError(f"{where} cannot run fedgluon: {type(err).__name__}: {first_line(err)}") from None
        problems = list(got.get("errors", []))
        problems += [f"{name} {got[name]} where the driver has {mine[name]}" for name in VERSIONED
                     if name in got and got[name] != mine.get(name)]
        problems += [f"no {p} (task data must exist at the same path on every node)" for p in got["missing"]]
        if problems:
            raise ConfigError(f"{where} cannot run this run: {'; '.join(problems)}; install the same packages "
                              f"on every node (README, 'Ray cluster')")


def with_absolute_data_paths(cfg: Any) -> Any:
    """A copy of ``cfg`` whose task data files (:data:`DATA_KEYS`) are absolute against this directory: a
    Ray task on another node, or in a scratch directory, would otherwise resolve a relative path
    against its own working directory, not the one the user ran the command in."""
    import copy

    out = copy.deepcopy(cfg)
    for key in DATA_KEYS:
        if out.task.get(key):
            out.task[key] = os.path.abspath(str(out.task[key]))
    return out


def this_host() -> dict[str, Any]:
    """Where this process runs: ``hostname``, ``ip`` and, inside a Ray task or driver, the Ray ``node_id``
    (and the IP the cluster knows the node by)."""
    out: dict[str, Any] = {"hostname": socket.gethostname(), "ip": _ip(), "node_id": None}
    ray = sys.modules.get("ray")  # imported by whoever started or joined Ray; never imported here
    if ray is not None and ray.is_initialized():
        out["node_id"] = ray.get_runtime_context().get_node_id()
        out["ip"] = next((n["ip"] for n in ray_nodes() if n["node_id"] == out["node_id"]), out["ip"])
    return out


def _ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def for_run(cfg: Any) -> list[dict[str, Any]] | None:
    """For the Ray engine, Ray started or joined (fedgluon.exp.cluster.connect) before the run directory exists,
    so a cluster that cannot run the config (a GPU share no node has, a node without fedgluon or the
    task's data) is refused first; returns the cluster's nodes. None for the other engines."""
    if cfg.engine.name != "ray":
        return None
    share = {"engine.num_cpus": float(cfg.engine.num_cpus), "engine.num_gpus": float(cfg.engine.num_gpus)}
    paths = [os.path.abspath(str(cfg.task[k])) for k in DATA_KEYS if cfg.task.get(k)]  # as a node must find them
    return connect(cfg.engine.address, task_share=share, data_paths=paths)


def placement(algorithm: Any, strategy: Any = None, nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Where the clients of a run computed, for ``summary.json``: ``nodes`` (``hostname``, ``ip`` and Ray
    ``node_id``) and ``devices`` (``device``, a GPU's ``name``, and on Ray the GPU ids it was given).
    Without Ray's engine (``strategy`` None) that is this process's host (a Ray node when a parallel
    sweep runs it as a Ray task) and the client device; on Ray, the nodes whose client actors replied,
    as the cluster listed them when the run started."""
    if strategy is None:
        import torch

        device = {"device": str(algorithm.client_device)}
        if device["device"].startswith("cuda") and torch.cuda.is_available():
            device["name"] = torch.cuda.get_device_name(torch.device(device["device"]))
        return {"nodes": [this_host()], "devices": [device]}
    ran = [n for n in nodes or [] if n["node_id"] in strategy.ray_nodes]
    known = {n["node_id"] for n in ran}
    ran += [{"node_id": i, "hostname": None, "ip": None} for i in sorted(strategy.ray_nodes - known)]
    devices = [{"device": d, "ray_gpus": g} for d, g in sorted(strategy.node_devices)]
    return {"nodes": [{k: n[k] for k in ("hostname", "ip", "node_id")} for n in ran], "devices": devices}
