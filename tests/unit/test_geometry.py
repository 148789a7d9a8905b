import math

import pytest
import torch

from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.norms import RMS, RowNorm, Sign, Spectral
from fedgluon.tasks.models import MLP, SmallCNN, TinyGPT


def test_mlp_geometry_scion_rules():
    g = Geometry.from_model(MLP(64, (128, 32), 10))
    p = g.params
    assert p["body.0.weight"].role == "hidden" and isinstance(p["body.0.weight"].norm, Spectral)
    assert p["body.0.weight"].norm.factor == pytest.approx(math.sqrt(64 / 128))
    assert p["body.1.weight"].norm.factor == pytest.approx(math.sqrt(128 / 32))
    assert p["head.weight"].role == "head" and isinstance(p["head.weight"].norm, Sign)
    assert p["head.weight"].norm.factor == 32
    assert isinstance(p["head.bias"].norm, RMS) and p["head.bias"].role == "vector"


def test_cnn_geometry_conv_reshape_factor():
    g = Geometry.from_model(SmallCNN(in_channels=1, widths=(8, 16), image_size=8))
    conv = g.params["features.4.weight"]  # 16 x 8 x 3 x 3
    assert conv.role == "conv" and isinstance(conv.norm, Spectral)
    assert conv.norm.factor == pytest.approx(9 * math.sqrt(8 / 16))  # Scion: lmo * sqrt(Cout/Cin) / k^2
    assert isinstance(g.params["features.1.weight"].norm, RMS)  # BatchNorm gain


def test_transformer_geometry_embeddings_and_head():
    g = Geometry.from_model(TinyGPT(vocab_size=30, context=16, dim=32, layers=1, heads=4))
    assert g.params["tok_emb.weight"].role == "embedding" and isinstance(g.params["tok_emb.weight"].norm, RowNorm)
    assert g.params["pos_emb.weight"].role == "embedding"
    assert g.params["head.weight"].role == "head"
    assert g.params["blocks.0.qkv.weight"].role == "hidden"
    assert isinstance(g.params["blocks.0.ln1.weight"].norm, RMS)


def test_overrides_and_radius_by_role():
    g = Geometry.from_model(MLP(8, (16,), 4), radius={"head": 16.0},
                            overrides=[{"pattern": "body.*.weight", "norm": "col", "factor": 2.0},
                                       {"pattern": "body.0.bias", "radius": 3.0}])
    assert g.params["head.weight"].radius == 16.0
    assert g.params["body.0.weight"].norm.name == "col" and g.params["body.0.weight"].norm.factor == 2.0
    assert g.params["body.0.bias"].radius == 3.0


@pytest.mark.parametrize("kwargs, field", [
    ({"preset": "adam"}, "geometry.preset"),
    ({"overrides": [{"pattern": "*", "norm": "nuclear"}]}, "geometry.overrides\\[0\\].norm"),
    ({"overrides": [{"norm": "sign"}]}, "geometry.overrides\\[0\\]"),
    ({"roles": {"x": "decoder"}}, "geometry.roles"),
    ({"radius": {"output": 2.0}}, "geometry.radius key"),
    ({"spectral_method": "qr"}, "spectral_method"),
    ({"lmo_device": "tpu"}, "geometry.lmo_device must be one of"),
    ({"lmo_device": "cuda:7"} if not torch.cuda.is_available() or torch.cuda.device_count() < 8
     else {"lmo_device": "cuda:99"}, "geometry.lmo_device is 'cuda"),
])
def test_bad_geometry_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Geometry.from_model(MLP(8, (16,), 4), **kwargs)


def test_batched_application_equals_per_parameter():
    model = TinyGPT(vocab_size=20, context=8, dim=16, layers=2, heads=2)
    g = Geometry.from_model(model, spectral_method="svd")
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    batched = g.lmo(grads)
    for name, G in grads.items():
        single = g.params[name].norm.lmo(G.unsqueeze(0))[0]
        torch.testing.assert_close(batched[name], single, rtol=1e-5, atol=1e-6)
    # blocks.0.qkv and blocks.1.qkv share (norm, shape): one group
    groups = [names for (norm, shape), names in g._groups.items() if shape == (48, 16)]
    assert groups and len(groups[0]) == 2


@pytest.mark.parametrize("lmo_device", ["auto", "same", "cpu"])
def test_lmo_device_on_a_cpu_machine_gives_the_cpu_result(lmo_device):
    """Without a GPU every setting computes on the CPU, bitwise as before, and results come back where the
    inputs were; with one (run on a GPU machine) ``cpu`` still does."""
    model = MLP(12, (24, 16), 5)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    reference = Geometry.from_model(model, lmo_device="same")
    got = Geometry.from_model(model, lmo_device=lmo_device)
    lmo, dual = got.lmo_and_dual(grads)
    ref_lmo, ref_dual = reference.lmo_and_dual(grads)
    if lmo_device == "cpu" or not torch.cuda.is_available():
        for name in grads:
            assert torch.equal(lmo[name], ref_lmo[name]) and torch.equal(dual[name], ref_dual[name])
    assert all(t.device == grads[n].device for n, t in lmo.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_spectral_lmo_on_the_gpu_matches_the_cpu():
    """``lmo_device: auto`` runs CPU-held spectral groups on the GPU (fp32 NS asked for, so comparable)."""
    model = MLP(32, (64, 48), 10)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    on_gpu = Geometry.from_model(model, lmo_device="auto", ns_dtype="float32").lmo(grads)
    on_cpu = Geometry.from_model(model, lmo_device="same", ns_dtype="float32").lmo(grads)
    for name in grads:
        assert on_gpu[name].device.type == "cpu"
        torch.testing.assert_close(on_gpu[name], on_cpu[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule, decay", [("scheduled", 0.1), ("adaptive", 0.0), ("adaptive", 0.5)])
def test_an_lmo_step_on_a_blocks_rows_is_each_rows_own_step_bitwise(rule, decay):
    """``LMOStep`` on rows ``(R, *shape)`` (every row's same-shape matrices in one batched LMO) gives each row
    exactly the step it gets alone (float32, bitwise): the LMO, the weight decay, and the radius, which an
    adaptive rule reads from that row's own dual norm (rows of different scale get different radii)."""
    from fedgluon.lmo.radius import GluonAdaptive, make_radius_rule
    from fedgluon.lmo.step import LMOStep

    torch.manual_seed(0)
    model = TinyGPT(vocab_size=20, context=8, dim=16, layers=2, heads=2)
    g = Geometry.from_model(model)
    radius = (make_radius_rule(0.05, "polynomial", total=10) if rule == "scheduled"
              else GluonAdaptive(L0=20.0, L1=1.0, max_radius=0.3))
    step = LMOStep(g, radius, weight_decay=decay)
    R = 5
    X = {n: torch.randn(R, *p.shape) for n, p in model.named_parameters()}
    G = {n: torch.randn(R, *p.shape) * torch.logspace(-2, 1, R).reshape(-1, *[1] * p.ndim)
         for n, p in model.named_parameters()}
    rows, info = step.apply(X, G, 3)
    for i in range(R):
        alone, one = step.apply({n: x[i] for n, x in X.items()}, {n: x[i] for n, x in G.items()}, 3)
        for n in X:
            assert torch.equal(rows[n][i], alone[n]), (n, i)
            assert float(info.radii[n][i]) == one.radii[n]
    if rule == "adaptive":
        assert len(set(info.radii["blocks.0.qkv.weight"].tolist())) > 1
    with pytest.raises(ValueError, match="leading axes"):
        step.apply(X, {**G, "head.weight": G["head.weight"][:2]}, 3)
