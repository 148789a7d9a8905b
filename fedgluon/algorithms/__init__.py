"""The algorithm catalogue: name → class. Adding an algorithm is one file plus one line here.

    from fedgluon.algorithms import make_algorithm
    algo = make_algorithm("gluon-ef21-sarah", geometry, compressor={"name": "topk", "ratio": 0.05})
"""

from __future__ import annotations

from typing import Any

from fedgluon.algorithms.base import Algorithm, Broadcast, ClientReply, ServerOutcome
from fedgluon.algorithms.dense import Gluon, GluonMVR, GluonSARAH, LiMuonFL
from fedgluon.algorithms.dion import Dion, OrthDion
from fedgluon.algorithms.ef21 import EF21MuonBidir, GluonEF21, GluonEF21MVR, GluonEF21SARAH
from fedgluon.algorithms.fedmuon import FedMuon, FedMuonBC
from fedgluon.algorithms.local import FedAvg, LocalGluon
from fedgluon.algorithms.loco import DiLoCo, MuLoCo
from fedgluon.algorithms.server_opt import ServerAdamW, ServerSGD
from fedgluon.algorithms.unbiased import GluonDASHAMVR, GluonMARINA
from fedgluon.lmo.geometry import Geometry

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (
    Gluon, GluonMVR, GluonSARAH, GluonMARINA, GluonDASHAMVR, GluonEF21, GluonEF21SARAH, GluonEF21MVR,
    EF21MuonBidir, LiMuonFL, FedAvg, LocalGluon, ServerSGD, ServerAdamW, FedMuon, FedMuonBC, Dion, OrthDion,
    DiLoCo, MuLoCo)}


def make_algorithm(name: str, geometry: Geometry, **options: Any) -> Algorithm:
    """Build the named algorithm (see :data:`ALGORITHMS`) with its options."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name](geometry, **options)


__all__ = ["ALGORITHMS", "Algorithm", "Broadcast", "ClientReply", "ServerOutcome", "make_algorithm"]
