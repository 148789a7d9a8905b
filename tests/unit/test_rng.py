"""Seeds: the vectorised derive_seeds equals derive_seed (NumPy's SeedSequence) row by row."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgluon.core.rng import derive_seed, derive_seeds

shared = st.one_of(st.integers(0, 2 ** 64), st.sampled_from(["sample", "compress", "an unlisted purpose"]))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), kinds=st.lists(st.sampled_from(["shared", "small", "wide"]),
                                                            min_size=1, max_size=7))
def test_derive_seeds_equals_derive_seed(data, n, kinds):
    """Parts shared or per row, of one or more 32-bit words (wide per-row values take the fallback),
    entropy shorter and longer than the pool of 4 words."""
    parts = []
    for kind in kinds:
        if kind == "shared":
            parts.append(data.draw(shared))
        else:
            top = 2 ** 32 - 1 if kind == "small" else 2 ** 62
            parts.append(np.array(data.draw(st.lists(st.integers(0, top), min_size=n, max_size=n)), dtype=np.int64))
    rows = n if any(isinstance(p, np.ndarray) for p in parts) else 1
    want = [derive_seed(*[p[i] if isinstance(p, np.ndarray) else p for p in parts]) for i in range(rows)]
    got = derive_seeds(*parts)
    assert got.dtype == np.int64 and got.tolist() == want


def test_derive_seeds_checks_its_parts():
    with pytest.raises(ValueError, match="non-negative"):
        derive_seeds(1, np.array([3, -1]))
    with pytest.raises(ValueError, match="non-negative"):
        derive_seeds(-1, np.array([3]))
    with pytest.raises(ValueError, match="one length"):
        derive_seeds(np.array([1, 2]), np.array([1, 2, 3]))
