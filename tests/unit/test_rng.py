"""Seeds: derive_seeds equals derive_seed (NumPy's SeedSequence) row by row, and gives the seeds runs were made with."""

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


@pytest.mark.parametrize("parts, first, digest", [
    ((7, "sample", np.arange(0, 5000, 3), 11), [6822628203770097528, 5456459096760910675],
     "c6c47fc8386367e357f58d16eed28aa35e21f390f849d59be5dc7f744012124f"),
    ((2 ** 40 + 5, "compress", np.arange(1000), np.arange(1000) * 7 + 2 ** 33),
     [1214776737225962709, 6845380592691291213], "94b22201413e115d72ec6ac113fda542d580275fbab0c6626dd8420d0bc65f41"),
    ((0, "an unlisted purpose", np.arange(20), 0, 1, 2, 3, 4), [7536311636776381791, 4959859382195867978],
     "83dca309d7c8450670c04c595ef7be6f080ab5454e81a60acb4a1d131a7ddc87"),
])
def test_derive_seeds_gives_the_seeds_runs_were_made_with(parts, first, digest):
    """Pinned outputs (SHA-256 of the int64 seeds) of the vectorised SeedSequence that derive_seeds was up
    to issue 30: any implementation must give these bitwise, or every run's batches change."""
    import hashlib

    got = derive_seeds(*[np.asarray(p, dtype=np.int64) if isinstance(p, np.ndarray) else p for p in parts])
    assert got.dtype == np.int64 and got[:2].tolist() == first
    assert hashlib.sha256(got.tobytes()).hexdigest() == digest
