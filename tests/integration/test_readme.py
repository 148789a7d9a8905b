"""The README's Python examples run as written, so the docs cannot rot (its shell blocks are run by
tests/integration/test_deployment.py and test_cluster.py)."""

import re
from pathlib import Path

import torch

from fedgluon.lmo.optim import Gluon
from fedgluon.tasks.models import MLP

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_plain_driver_example_runs_as_written():
    """The "Algorithms" section's block: 30 rounds of the plain driver with the task's evaluation."""
    [block] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "run_plain(" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    df = namespace["df"]
    assert len(df) == 30 and df["test_loss"].notna().any()


def test_the_adaptive_radius_example_runs_on_a_model_with_biases():
    """The inline ``Gluon(model, adaptive=...)`` example steps an MLP with biases (every role named)."""
    code = re.search(r"`(Gluon\(model, adaptive=.*?\))`", README).group(1)
    model = MLP(8, hidden=(16,), out_features=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = eval(code, {"Gluon": Gluon, "model": model})
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
