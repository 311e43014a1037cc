"""Filters computed by z slab equal the whole-volume result, bit for bit."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cryosam_ray.slab_filter import SlabFiltered, reflect_index


def _log(block: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_laplace(block, 1.7)


HALO = int(4 * 1.7 + 0.5) + 1  # scipy's Gaussian reach at sigma 1.7 (truncate 4)


def _sliced(volume: np.ndarray, **kw) -> SlabFiltered:
    """Slabs of 2 * HALO = 16 planes (the least), at most 2 kept: queries cross slabs and evict some."""
    plane = volume.shape[1] * volume.shape[2] * 4
    return SlabFiltered(volume, _log, halo=HALO, slab_bytes=plane, budget_bytes=32 * plane, **kw)


def test_slabs_equal_the_whole_volume_filter():
    volume = np.random.default_rng(0).normal(size=(53, 20, 23)).astype(np.float32)
    whole = _log(volume)
    sliced = _sliced(volume)
    assert np.array_equal(sliced.region((0, 0, 0), volume.shape), whole)
    assert np.array_equal(sliced.region((4, 3, 2), (40, 9, 20)), whole[4:40, 3:9, 2:20])
    index = np.array([[0, 0, 0], [52, 19, 22], [5, 7, 9], [36, 1, 2], [17, 4, 4]])
    assert np.array_equal(sliced.values(index), whole[tuple(index.T)])


def test_interpolation_matches_map_coordinates_inside_and_beyond_the_edges():
    volume = np.random.default_rng(1).normal(size=(40, 12, 13)).astype(np.float32)
    points = np.array([[0.3, 4.5, 7.2], [39.0, 11.0, 12.0], [-2.0, 5.5, 13.7], [15.5, -0.5, 6.0], [31.9, 3.1, 0.0],
                       [45.0, 2.0, 2.0]])
    expected = ndimage.map_coordinates(_log(volume), points.T, order=1, mode="nearest")
    assert np.allclose(_sliced(volume).interpolate(points), expected, atol=1e-6)


def test_local_maxima_match_a_whole_volume_maximum_filter():
    volume = ndimage.gaussian_filter(np.random.default_rng(2).normal(size=(50, 24, 24)), 1.0).astype(np.float32)
    whole = _log(volume)
    mask = (whole == ndimage.maximum_filter(whole, size=5)) & (whole > 0)
    points, values = _sliced(volume).local_maxima(5)
    order = np.lexsort(points.T[::-1])
    assert np.array_equal(points[order], np.argwhere(mask))
    assert np.array_equal(values[order], whole[mask])


def test_reflect_index_folds_like_np_pad_reflect():
    for size in (1, 2, 5):
        pad = 13
        padded = np.pad(np.arange(size), pad, mode="reflect")
        assert np.array_equal(reflect_index(np.arange(-pad, size + pad), size), padded)


def test_each_slab_is_filtered_once_and_a_large_volume_goes_to_a_scratch_file(tmp_path):
    volume = np.random.default_rng(3).normal(size=(70, 10, 10)).astype(np.float32)
    calls = []

    def counted(block):
        calls.append(len(block))
        return _log(block)

    plane = volume.shape[1] * volume.shape[2] * 4
    sliced = SlabFiltered(volume, counted, halo=HALO, slab_bytes=plane, budget_bytes=32 * plane,
                          scratch_dir=str(tmp_path))
    points = np.stack([np.linspace(0, 69, 40), np.full(40, 4.5), np.full(40, 5.5)], axis=1)
    first = sliced.interpolate(points)
    assert sliced.depth == 2 * HALO and not sliced.in_memory
    assert isinstance(sliced._store, np.memmap) and not list(tmp_path.iterdir())  # unlinked at once
    assert len(calls) == 5 == sliced.filtered  # 70 planes in slabs of 16
    assert np.array_equal(sliced.interpolate(points), first)
    assert np.array_equal(sliced.region((0, 0, 0), volume.shape), _log(volume))
    assert len(calls) == 5  # never filtered twice


def test_a_small_volume_is_kept_in_memory():
    volume = np.random.default_rng(4).normal(size=(20, 8, 8)).astype(np.float32)
    sliced = SlabFiltered(volume, _log, halo=HALO)
    assert np.array_equal(sliced.region((0, 0, 0), volume.shape), _log(volume))
    assert sliced.in_memory and not isinstance(sliced._store, np.memmap)
