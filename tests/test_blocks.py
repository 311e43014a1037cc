"""BlockLabels: a sparse label volume equals the dense one it replaces, with memory bounded by the particles."""

from __future__ import annotations

import numpy as np

from cryosam_ray.blocks import BlockLabels


def test_block_labels_equal_a_dense_volume():
    rng = np.random.default_rng(0)
    shape = (70, 90, 65)
    dense = np.zeros(shape, np.int32)
    sparse = BlockLabels(shape, np.int32, block=16)
    for label in range(1, 30):
        lo = rng.integers(0, [60, 80, 55])
        hi = np.minimum(lo + rng.integers(1, 20, 3), shape)
        bbox = (*lo, *hi)
        mask = rng.random(tuple(hi - lo)) < 0.6
        view = dense[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        view[mask & (view == 0)] = label
        sparse.paste(bbox, mask, label)
    np.testing.assert_array_equal(sparse.get((0, 0, 0, *shape)), dense)
    for zyx in rng.integers(0, shape, (200, 3)):
        assert sparse.at(zyx) == dense[tuple(zyx)]


def test_memory_follows_the_particles_not_the_volume():
    sparse = BlockLabels((500, 1024, 1024), np.int32)  # a 2 GB dense int32 volume
    sparse.paste((100, 200, 300, 120, 220, 320), np.ones((20, 20, 20), bool), 7)
    assert sparse.at((110, 210, 310)) == 7 and sparse.at((0, 0, 0)) == 0
    assert sparse.nbytes <= 8 * 32**3 * 4  # the few blocks one particle touches
