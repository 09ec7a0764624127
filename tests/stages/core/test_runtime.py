"""stages.core.runtime: per-epoch seeds and seeded subsets."""
from __future__ import annotations


import numpy as np

from stages.core.runtime import seed_for, seeded_subset


def test_seed_for_differs_across_epochs_and_streams_and_is_reproducible():
    seeds = [seed_for(0, epoch, "cluster") for epoch in range(1, 51)]
    assert len(set(seeds)) == 50  # k-means must start from different centroids every epoch
    assert seeds == [seed_for(0, epoch, "cluster") for epoch in range(1, 51)]
    assert seed_for(0, 3, "cluster") != seed_for(0, 3, "train")
    assert seed_for(0, 3, "cluster") != seed_for(1, 3, "cluster")
    assert all(0 <= s < 2**31 for s in seeds)  # faiss and torch take 31-bit seeds


def test_seeded_subset_is_seeded_sorted_and_complete_without_a_limit():
    a = seeded_subset(1000, 50, seed=3)
    assert len(a) == 50 and len(set(a)) == 50 and list(a) == sorted(a) and a.max() < 1000
    np.testing.assert_array_equal(a, seeded_subset(1000, 50, seed=3))
    assert not np.array_equal(a, seeded_subset(1000, 50, seed=4))
    np.testing.assert_array_equal(seeded_subset(7, None, 0), np.arange(7))
    np.testing.assert_array_equal(seeded_subset(7, 100, 0), np.arange(7))
