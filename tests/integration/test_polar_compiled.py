"""The compiled Newton–Schulz path (``ns_compile``: torch.compile, TorchInductor): seconds of compilation per
shape, so it sits here rather than with the polar factor's unit tests (tests/unit/test_polar.py)."""

import torch

from fedgluon.lmo.polar import NewtonSchulz


def test_compiled_newton_schulz_equals_eager():
    """``ns_compile: true`` (torch.compile of the iterations, meant for CUDA) gives the eager result on CPU to
    fp32 rounding, batched and through a geometry built from config values. Compiling takes ≈ 20 s here."""
    from fedgluon.lmo.geometry import Geometry

    G = torch.randn(3, 20, 12)
    eager, compiled = NewtonSchulz(), NewtonSchulz(compile=True)
    torch.testing.assert_close(compiled(G), eager(G), rtol=1e-5, atol=1e-6)
    geometry = Geometry.from_shapes({"w": (20, 12), "b": (20,)}, ns_compile=True, lmo_device="cpu")
    reference = Geometry.from_shapes({"w": (20, 12), "b": (20,)}, lmo_device="cpu")  # on a GPU machine too
    tensors = {"w": G[0], "b": G[0, :, 0]}
    for name, value in geometry.lmo(tensors).items():
        torch.testing.assert_close(value, reference.lmo(tensors)[name], rtol=1e-5, atol=1e-6)
