import os

# Before anything imports Ray: test clusters bind to loopback only (read once, at Ray's import).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Before torch loads OpenMP: threads waiting at a barrier sleep instead of spinning. On a loaded 2-core
# machine a spinning thread takes the core its partner needs: tests/unit took 385 s with spinning and 69 s
# without at the same load (load average 3.5-4.9); results are the same either way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test that installs a SIGINT/SIGTERM handler (a run's stop signals) must leave the previous one.
    Ray's own SIGTERM handler, which ``ray.init`` sets in a driver's main thread and keeps after
    ``ray.shutdown`` (``sys.exit``: the process's exit handlers run), is Ray's to keep."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {s: signal.getsignal(s) for s in before}
    changed = [s.name for s, h in before.items()
               if after[s] is not h and not (getattr(after[s], "__module__", None) or "").startswith("ray.")]
    assert not changed, f"the test left its own handler for {changed}"
