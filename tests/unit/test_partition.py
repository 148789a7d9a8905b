import numpy as np
import pandas as pd
import pytest

from fedgluon.tasks.data.partition import partition, summary_rows

LABELS = np.random.default_rng(0).integers(0, 10, 3000)


def label_skew(parts, labels=LABELS):
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum() for p in parts]))


@pytest.mark.parametrize("scheme, kw", [("iid", {}), ("dirichlet", {"alpha": 0.3}),
                                        ("shards", {"shards_per_client": 2})])
def test_cover_every_sample_once_and_reproducible(scheme, kw):
    parts = partition(LABELS, 20, scheme, seed=1, **kw)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS) and np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    again = partition(LABELS, 20, scheme, seed=1, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 20, scheme, seed=2, **kw)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_measured():
    """Mean TV distance to the global label mix, measured here (3000 labels, 20 clients, seed 0):
    iid 0.090, dirichlet α = 100: 0.039, α = 0.1: 0.704."""
    iid = label_skew(partition(LABELS, 20, "iid", seed=0))
    big = label_skew(partition(LABELS, 20, "dirichlet", alpha=100.0, seed=0))
    small = label_skew(partition(LABELS, 20, "dirichlet", alpha=0.1, seed=0, min_size=1))
    assert big < 2 * iid + 0.02 and small > 0.5 and small > 5 * big, (iid, big, small)


def test_shards_give_few_labels_and_summary():
    parts = partition(LABELS, 20, "shards", shards_per_client=2, seed=0)
    distinct = [len(np.unique(LABELS[p])) for p in parts]
    assert max(distinct) <= 4 and np.mean(distinct) <= 3
    table = pd.DataFrame(summary_rows(parts, LABELS))  # as Task.partition_summary shows it
    assert table["size"].sum() == len(LABELS) and list(table.columns[:2]) == ["client", "size"]
    assert (table.filter(like="label_").sum(axis=1) == table["size"]).all()


def test_partition_errors():
    with pytest.raises(ValueError, match="partition must be one of"):
        partition(LABELS, 5, "by-writer")
    with pytest.raises(ValueError, match="num_clients"):
        partition(LABELS, 0, "iid")
    with pytest.raises(ValueError, match="partition must be one of"):
        partition(LABELS, 5, "natural")  # the synthetic and shakespeare tasks split themselves
    with pytest.raises(ValueError, match="fewer than"):
        partition(LABELS[:30], 20, "dirichlet", alpha=0.01, min_size=5, max_tries=3)


def test_an_option_of_another_scheme_is_refused():
    """``alpha`` is Dirichlet's and ``shards_per_client`` the shards'; with another scheme they would do nothing."""
    for scheme, kw in (("iid", {"alpha": 0.3}), ("shards", {"alpha": 0.3}),
                       ("iid", {"shards_per_client": 2}), ("dirichlet", {"shards_per_client": 2})):
        key = next(iter(kw))
        with pytest.raises(ValueError, match=f"{key} applies to partition='.*' only, got partition='{scheme}'"):
            partition(LABELS, 20, scheme, seed=0, **kw)
    with pytest.raises(ValueError, match="partition must be one of"):
        partition(LABELS, 20, "iid2", alpha=0.3)
