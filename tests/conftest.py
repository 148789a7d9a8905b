import os

# Before anything imports Ray: test clusters bind to loopback only (read once, at Ray's import).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
