"""A Flower deployment (``flwr run . <superlink>`` on a SuperLink and SuperNodes): its run config, its
run directory, and the checks that make a wrong deployment fail in one line.

The Flower run config (pyproject ``[tool.flwr.app.config]``, ``flwr run --run-config``) names a
``fedgluon run`` config, the same file and keys as ``fedgluon run CONFIG key=value...``:

| run config key | meaning |
| --- | --- |
| ``spec-file`` | the config file (relative paths: the app directory, shipped in the app bundle) |
| ``overrides`` | ``key=value`` overrides, space-separated (``"rounds=3 engine.block_size=2"``) |
| ``output-root`` | an absolute directory a relative ``output.dir`` is resolved against |
| ``resume`` | true: continue the unfinished run directory of this config from its checkpoint |
| ``overwrite`` | true: replace an existing run directory of fedgluon's (``fedgluon run --overwrite``) |

The ServerApp and every ClientApp read the same config from these keys. ``engine.name``,
``engine.num_cpus``/``num_gpus``/``address`` are accepted and ignored (the deployment is the engine);
``engine.block_size`` sets the number of SuperNodes the run needs: ``ceil(task.num_clients / block_size)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedgluon.config.schema import ConfigError
from fedgluon.core.text import shown

APP_DIR = Path(__file__).resolve().parents[2]  # the Flower app (project) directory: fedgluon/flower/ is two below
PACKAGES = ("fedgluon", "strategies", "compressors")  # the code whose digest the version check compares
KEYS = {"spec-file": "", "overrides": "", "output-root": "", "resume": False, "overwrite": False}


def app_path(value: str) -> Path:
    """A path from the run config, relative paths resolved against the app directory (Flower's
    runtimes do not run apps in it)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else APP_DIR / path


def run_settings(run_config: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str, bool, bool]:
    """``(spec-file, overrides, output-root, resume, overwrite)`` of a Flower run config, with defaults."""
    import shlex

    get = {k: run_config.get(k, default) for k, default in KEYS.items()}
    for key in ("resume", "overwrite"):
        if not isinstance(get[key], bool):
            raise ConfigError(f"run config {key} must be true or false (a TOML boolean), got {get[key]!r}")
    try:
        overrides = tuple(shlex.split(str(get["overrides"])))  # 'task.hidden="[16, 16]"' stays one override
    except ValueError as err:
        raise ConfigError(f"run config overrides: {err}") from None
    return (str(get["spec-file"] or "experiments/quickstart.yaml"), overrides, str(get["output-root"]), get["resume"],
            get["overwrite"])


def load_config(run_config: Mapping[str, Any]) -> Any:
    """The ``fedgluon run`` config (a validated DictConfig) a Flower run config names."""
    spec_file, overrides, _, _, overwrite = run_settings(run_config)
    return _load(spec_file, overrides, overwrite)


@lru_cache(maxsize=4)
def _load(spec_file: str, overrides: tuple[str, ...], overwrite: bool) -> Any:
    from fedgluon.config.schema import load

    return load(app_path(spec_file), list(overrides), overwrite=overwrite)


def spec_of_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The engine-level run spec (fedgluon/config/spec.py) of a Flower run config; read, validated and built
    once per process and config (:func:`_load` is cached, and so is the task, ``spec.build_cached``)."""
    spec_file, overrides, _, _, overwrite = run_settings(run_config)
    return _spec(spec_file, overrides, overwrite)


@lru_cache(maxsize=4)
def _spec(spec_file: str, overrides: tuple[str, ...], overwrite: bool) -> dict[str, Any]:
    from fedgluon.config.schema import spec_of

    return spec_of(_load(spec_file, overrides, overwrite))


def run_dir(cfg: Any, output_root: str) -> Path:
    """The absolute run directory of a deployment run: ``output.dir/<name>``, a relative ``output.dir``
    under ``output_root``. Flower runs the ServerApp in its installed copy of the app, where a
    relative path would land, so a relative ``output.dir`` without an absolute root is refused."""
    from fedgluon.config.schema import run_name

    out = Path(str(cfg.output.dir)).expanduser()
    if not out.is_absolute():
        root = Path(output_root).expanduser() if output_root else None
        if root is None or not root.is_absolute():
            raise ConfigError(f"output.dir {str(cfg.output.dir)!r} is relative and run config output-root "
                              f"{output_root!r} is not an absolute directory: under `flwr run` the ServerApp runs in "
                              f"Flower's copy of the app; pass --run-config \"output-root='/abs/dir'\" or set an "
                              f"absolute output.dir")
        out = root / out
    return out / run_name(cfg)


def record_failure(out: Path, reason: str, *, replace: bool = True) -> None:
    """Leave ``"complete": false`` and ``reason`` in ``out/summary.json`` when ``out`` is a fedgluon run
    directory that holds no complete run (creating it when absent); a directory fedgluon did not
    create, or one holding a complete run, is left alone, and so is one another run holds. A summary
    already there keeps its fields; its ``"stopped"`` becomes ``reason`` (the earlier one kept as
    ``"stopped_before"``: a resubmission refused names its own reason), or, with ``replace=False`` (the run
    wrote its own reason as it stopped), gains it only when it has none."""
    from fedgluon.config.run_dir import MARKER, RunDirLock, is_complete

    if is_complete(out) or (out.exists() and not (out / MARKER).is_file()):
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(out)  # creates the marker; refused while another run holds the directory
    except (OSError, ConfigError):
        return
    try:
        path = out / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {}
        summary["complete"] = False
        earlier = summary.get("stopped")
        if earlier is None or (replace and earlier != reason):
            summary["stopped"] = reason
            if earlier is not None and earlier not in reason:  # not the same failure, retold
                summary["stopped_before"] = earlier
        summary.setdefault("engine", "flower-deployment")
        path.write_text(json.dumps(summary, indent=2))
    except OSError:
        pass  # an unwritable directory: the reason stays in the ServerApp's log only
    finally:
        lock.release()


# ---------------------------------------------------------------------- versions
@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """This process's fedgluon and flwr versions and a digest of fedgluon's source (``fedgluon``,
    ``strategies``, ``compressors`` .py files, as imported, but those ``flwr build`` leaves out of the
    app bundle), so that two checkouts of the same version number with different code are told apart."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for package in PACKAGES:
        root = Path(import_module(package).__file__).parent  # type: ignore[arg-type]  # a regular package
        for path in sorted(root.rglob("*.py")):
            if path.name.startswith("test_") or path.name.endswith("_test.py"):
                continue  # flwr build leaves these out of the app bundle the SuperNodes run
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    try:
        fedgluon_version = version("fedgluon")
    except PackageNotFoundError:
        from fedgluon import __version__ as fedgluon_version
    return {"fedgluon": fedgluon_version, "fedgluon_source": digest.hexdigest()[:16], "flwr": version("flwr")}


class VersionMismatch(RuntimeError):
    """A SuperNode runs another fedgluon or flwr than the ServerApp."""


def check_versions(reply: Any, expected: Mapping[str, str]) -> None:
    """Raise :class:`VersionMismatch` naming the node and both sides' versions when a handshake reply's
    ``versions`` record differs from ``expected`` (or is missing: a fedgluon without the check)."""
    if reply.has_error():
        return  # the handshake itself reports error replies
    record = reply.content.config_records.get("versions")
    theirs = {k: shown(record.get(k), 64, as_repr=False) for k in expected} if record is not None else None
    if theirs != dict(expected):
        said = ", ".join(f"{k} {v}" for k, v in theirs.items()) if theirs else "no versions (an older fedgluon)"
        raise VersionMismatch(f"SuperNode {reply.metadata.src_node_id} runs {said}; the ServerApp runs "
                              f"{', '.join(f'{k} {v}' for k, v in expected.items())}: install the same fedgluon "
                              f"and flwr on the SuperLink's machine and every SuperNode's")


class VersionCheckedGrid:
    """A Grid whose ``send_and_receive`` checks each reply's versions (:func:`check_versions`); used for
    the handshake only. A node that runs other versions stops the run before its first round: a
    :class:`VersionMismatch` names each such node and both sides' versions (under ``flwr run`` it becomes
    ``summary.json``'s ``stopped`` reason), since a run without that node's block would not be the run asked
    for. The check trusts what a node reports: it guards against a forgotten upgrade, not a hostile node,
    which can keep a run from starting anyway (by not connecting: :func:`wait_for_nodes`); once the rounds
    run, nothing a node sends stops the run. Everything else is the wrapped grid's."""

    def __init__(self, grid: Any, expected: Mapping[str, str] | None = None):
        self._grid, self.expected = grid, dict(expected or versions())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        replies, wrong = list(self._grid.send_and_receive(messages, timeout=timeout)), []
        for reply in replies:
            try:
                check_versions(reply, self.expected)
            except VersionMismatch as err:
                wrong.append(shown(err, 500, as_repr=False))
        if wrong:
            more = f"; and {len(wrong) - 3} more node(s)" if len(wrong) > 3 else ""
            raise VersionMismatch("; ".join(wrong[:3]) + more)
        return replies


# ---------------------------------------------------------------------- polling
PULL_INTERVAL = 0.05  # seconds between the ServerApp's pulls for replies under flwr run (Flower's: 3 s)


class PollingGrid:
    """A deployment Grid whose ``send_and_receive`` pulls the replies every ``interval`` seconds. Flower
    1.42's grid of a ``flwr run`` ServerApp sleeps 3 s between pulls, up to 3 s added to every round;
    one pull is one request to the SuperLink. ``remote``: the grid reaches SuperNodes (``flwr run`` on a
    SuperLink; under Flower's simulation runtime it is False), whose error codes fail their block for the
    round but never stop the run (``GluonStrategy``'s ``deaths_stop_run``). Everything else is the wrapped
    grid's."""

    def __init__(self, grid: Any, interval: float = PULL_INTERVAL, *, remote: bool = False):
        self._grid, self.interval = grid, interval
        self.remote = remote  # its nodes are SuperNodes (Flower's HttpGrid), not a simulation's (InMemoryGrid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Push ``messages`` and return their replies that arrive within ``timeout`` seconds (None: wait
        for all), as Flower's ``Grid.send_and_receive``."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies


# ---------------------------------------------------------------------- node count
class NodeCountError(RuntimeError):
    """The federation has another number of client nodes than the run's blocks."""


def wait_for_nodes(grid: Any, num_clients: int, block_size: int, timeout: float, poll: float = 0.1) -> list[int]:
    """The node ids once ``ceil(num_clients / block_size)`` nodes are connected; raises
    :class:`NodeCountError` naming both numbers when fewer connect within ``timeout`` seconds or more
    are connected (every SuperNode holds one block: ``--node-config "partition-id=<block>"``)."""
    needed = math.ceil(num_clients / block_size)
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < needed and time.monotonic() < deadline:
        time.sleep(poll)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) != needed:
        within = f" within node_timeout={timeout:g} s" if len(nodes) < needed else ""
        raise NodeCountError(f"the run needs {needed} client nodes (ceil(task.num_clients={num_clients} / "
                             f"engine.block_size={block_size})), one per block with node-config partition-id "
                             f"0..{needed - 1}; {len(nodes)} connected{within}")
    return nodes
