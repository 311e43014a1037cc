"""Slice features of a tomogram: encoding into the feature store, and voxel features by sampling.

Per axis a (z, y, x) the store holds the token maps of every slice: (n_a, h_a, w_a, C) float16
in zarr, chunked in shards of slices, under a signature of data, encoder and settings, so a later
run reuses them. The D x H x W x 3C volume is never built: the feature of voxel (z, y, x) is the
concatenation of the three axis maps sampled at it, each at its own slice (the voxel's index
along that axis) and bilinearly within the slice's token grid (align-corners-false geometry:
pixel r of an A-pixel side sits at token coordinate (r + 0.5) * h / A - 0.5).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SHARD_SLICES = 16
SLICE_BATCH = 32  # store slices read at once when sampling voxel features


def slice_shape(shape: tuple[int, int, int], axis: int) -> tuple[int, int]:
    """(A, B) of a slice perpendicular to ``axis`` of a (D, H, W) volume."""
    return tuple(s for a, s in enumerate(shape) if a != axis)


def feature_key(tomogram, encoder_signature: dict) -> str:
    """Deterministic store key: ``<tomogram name>-<16 hex digits of data + encoder signature>``."""
    from cryosam_ray.tomo_io import data_fingerprint

    payload = json.dumps({"data": data_fingerprint(tomogram), "encoder": encoder_signature}, sort_keys=True)
    return f"{tomogram.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


@dataclass
class AxisMaps:
    """Token maps of every slice along one axis: ``maps`` (n, h, w, C), float (numpy or zarr)."""

    axis: int
    maps: object
    slice_shape: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.maps.shape[1:3])


class FeatureVolume:
    """The three axis map stacks of one tomogram, with voxel-feature sampling.

    Args:
        shape: (D, H, W) of the tomogram.
        axes: the :class:`AxisMaps` of axis 0, 1 and 2, in that order.
    """

    def __init__(self, shape: tuple[int, int, int], axes: list[AxisMaps]):
        self.shape = tuple(int(s) for s in shape)
        self.axes = axes
        self.channels = int(axes[0].maps.shape[-1])
        self._mean: np.ndarray | None = None

    def mean_feature(self, *, samples: int = 32768) -> np.ndarray:
        """(3C,) float64 mean voxel feature of the tomogram, from a regular grid of about
        ``samples`` voxels: deterministic, so every worker computes the same; computed once."""
        if self._mean is None:
            step = max(1.0, (float(np.prod(self.shape)) / samples) ** (1 / 3))
            axes = [np.arange(step / 2, s, step) for s in self.shape]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
            total = np.zeros(3 * self.channels, np.float64)
            for chunk in np.array_split(grid, len(grid) // 65536 + 1):
                total += self.sample(chunk).sum(axis=0, dtype=np.float64)
            self._mean = total / len(grid)
        return self._mean

    def load(self) -> "FeatureVolume":
        """A copy with every map stack in memory as float32 (token resolution: small)."""
        return FeatureVolume(self.shape, [AxisMaps(a.axis, np.asarray(a.maps[:], dtype=np.float32), a.slice_shape)
                                          for a in self.axes])

    def sample(self, zyx: np.ndarray) -> np.ndarray:
        """Voxel features at (N, 3) ZYX coordinates -> (N, 3C) float32 ([z map, y map, x map])."""
        zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
        parts = []
        for ax in self.axes:
            index, corners, weights = bilinear_corners(zyx, ax.axis, ax.slice_shape, ax.grid, self.shape)
            if isinstance(ax.maps, np.ndarray):
                parts.append(_bilinear(ax.maps, index, corners, weights))
                continue
            # A store array: read only the slices touched, SLICE_BATCH at a time, so a mask that
            # spans the whole volume along one axis (a streak) costs no more than a compact one.
            feats = np.empty((len(zyx), self.channels), np.float32)
            wanted = np.unique(index)
            for start in range(0, len(wanted), SLICE_BATCH):
                group = wanted[start:start + SLICE_BATCH]
                rows = np.flatnonzero((index >= group[0]) & (index <= group[-1]))
                maps = np.asarray(ax.maps.oindex[group], dtype=np.float32)
                feats[rows] = _bilinear(maps, np.searchsorted(group, index[rows]),
                                        [(r[rows], c[rows]) for r, c in corners], [w[rows] for w in weights])
            parts.append(feats)
        return np.concatenate(parts, axis=1)


def _bilinear(maps: np.ndarray, index: np.ndarray, corners, weights) -> np.ndarray:
    """(N, C) float32 features from (n, h, w, C) maps at slice ``index`` and four token corners."""
    return sum(w[:, None] * maps[index, r, c] for (r, c), w in zip(corners, weights)).astype(np.float32)


def bilinear_corners(zyx: np.ndarray, axis: int, slice_hw: tuple[int, int], grid: tuple[int, int],
                     shape: tuple[int, int, int]):
    """Where voxels fall on one axis' token maps.

    Returns:
        index: (N,) slice index along ``axis`` (nearest, clipped to the volume).
        corners: four ((N,) row, (N,) col) token index pairs: (r0,c0), (r0,c1), (r1,c0), (r1,c1).
        weights: four (N,) bilinear weights in the same order, summing to 1.
    """
    index = np.clip(np.rint(zyx[:, axis]), 0, shape[axis] - 1).astype(np.int64)
    others = [a for a in range(3) if a != axis]
    coords = []
    for k, a in enumerate(others):
        u = (zyx[:, a] + 0.5) * grid[k] / slice_hw[k] - 0.5
        u = np.clip(u, 0, grid[k] - 1)
        lo = np.minimum(np.floor(u).astype(np.int64), max(grid[k] - 2, 0))
        hi = np.minimum(lo + 1, grid[k] - 1)
        coords.append((lo, hi, u - lo))
    (r0, r1, fr), (c0, c1, fc) = coords
    corners = [(r0, c0), (r0, c1), (r1, c0), (r1, c1)]
    weights = [(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]
    return index, corners, weights


def compute_features(tomogram, encoder, *, store_url: str | None = None, shard_slices: int = SHARD_SLICES,
                     progress=None) -> FeatureVolume:
    """Encode every slice along z, y and x; stream shards to the feature store when one is given.

    Shards already in the store under the same key are not recomputed (resume). With no store
    the maps stay in memory.
    """
    encoder.fit(tomogram)
    if store_url:
        store = create_store(store_url, tomogram, encoder, shard_slices)
        for axis in range(3):
            for start, stop in store.missing_shards(axis):
                store.write_shard(axis, start, encode_shard(tomogram, encoder, axis, start, stop))
                if progress:
                    progress(stop - start)
        return store.volume()
    axes = []
    for axis in range(3):
        hw = slice_shape(tomogram.shape, axis)
        maps = np.zeros((tomogram.shape[axis], *encoder.token_grid(hw), encoder.feature_dim), np.float32)
        for start in range(0, tomogram.shape[axis], shard_slices):
            stop = min(tomogram.shape[axis], start + shard_slices)
            maps[start:stop] = encode_shard(tomogram, encoder, axis, start, stop)
            if progress:
                progress(stop - start)
        axes.append(AxisMaps(axis, maps, hw))
    return FeatureVolume(tomogram.shape, axes)


def create_store(store_url: str, tomogram, encoder, shard_slices: int = SHARD_SLICES):
    """The tomogram's :class:`~cryosam_ray.feature_store.FeatureStore` group for this encoder."""
    from cryosam_ray.feature_store import FeatureStore

    signature = encoder.signature()
    return FeatureStore.create(
        FeatureStore.group_url(store_url, feature_key(tomogram, signature)), shape=tomogram.shape,
        tomogram_url=tomogram.url, encoder_signature=signature,
        grids=[encoder.token_grid(slice_shape(tomogram.shape, a)) for a in range(3)],
        channels=encoder.feature_dim, shard_slices=shard_slices)


def encode_shard(tomogram, encoder, axis: int, start: int, stop: int) -> np.ndarray:
    """Token maps of slices ``start:stop`` along ``axis``: (stop - start, h, w, C) float32."""
    slab = tomogram.normalize(tomogram.slab(axis, start, stop))
    return encoder.encode(slab)
