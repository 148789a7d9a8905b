"""Problems and assertions shared by tests/unit and tests/integration (importable as ``helpers``: pyproject's pytest
``pythonpath`` puts tests/ on the path). A helper used by one module stays in that module."""

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedgluon.clients.objective import SupervisedObjective
from fedgluon.lmo.geometry import Geometry
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.models import MLP


def same_table(a, b) -> None:
    """Two client-state tables hold bitwise the same rows, commit counters, rounds seen and models."""
    assert a.columns.keys() == b.columns.keys() and all(torch.equal(a.columns[p], b.columns[p]) for p in a.columns)
    assert torch.equal(a.commits, b.commits) and torch.equal(a.seen, b.seen)
    assert a.models.keys() == b.models.keys()
    assert all(a.models[r].keys() == b.models[r].keys() and all(torch.equal(a.models[r][n], b.models[r][n])
                                                               for n in a.models[r]) for r in a.models)


def synthetic_federation():
    """10 LEAF-synthetic clients, an MLP, its start point and geometry, and the loss on all clients' data."""
    data = leaf_synthetic(10, 1.0, 1.0, dim=20, classes=5, mean_samples=60, seed=3)
    torch.manual_seed(0)
    model = MLP(20, (24,), 5)
    objs = [SupervisedObjective(model, x, y, batch_size=16) for x, y in data]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    allx, ally = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])

    def loss(X):
        with torch.no_grad():
            return F.cross_entropy(functional_call(model, X, (allx,)), ally).item()
    return model, objs, X0, Geometry.from_model(model), loss
