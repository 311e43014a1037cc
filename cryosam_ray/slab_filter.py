"""A filtered volume computed slab by slab on demand, so that a tomogram of any size costs one
copy of its density plus a bounded cache, never a whole-volume array per filter.

:class:`SlabFiltered` applies a separable filter (a Gaussian derivative, say) to z slabs of a
(D, H, W) array, each read with a margin of ``halo`` planes: along z the filter then sees the
same inputs as on the whole volume, and the in-plane passes never mix planes, so every value
equals the whole-volume result bit for bit. Each slab is filtered once, when first asked for,
and kept: in memory while the filtered volume fits in ``budget_bytes``, otherwise in an unlinked
scratch file (a memory map whose pages the kernel writes back and reclaims), so a 2 GiB tomogram
costs no anonymous memory per filter and no slab is ever filtered twice.
"""

from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np
from scipy import ndimage

SLAB_BYTES = 32 * 2**20  # one slab: large enough that the margins cost little
BUDGET_BYTES = 256 * 2**20  # a filtered volume up to this size is kept in memory


class SlabFiltered:
    """``fn(data)`` for a (D, H, W) float32 array, computed by z slab when first asked for.

    Args:
        data: (D, H, W) float32, ZYX.
        fn: the filter, (d, H, W) -> (d, H, W) float32; any scipy.ndimage filter whose reach
            along z is at most ``halo`` planes and whose edge mode is ``reflect`` or ``nearest``.
        halo: the filter's reach along z, in planes.
        budget_bytes: the largest filtered volume kept in memory; a larger one goes to a scratch
            file in ``scratch_dir`` (default: the system's temporary folder).
        slab_bytes: the size of one slab (at least ``2 * halo`` planes).
    """

    def __init__(self, data: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], halo: int, *,
                 budget_bytes: int = BUDGET_BYTES, slab_bytes: int = SLAB_BYTES, scratch_dir: str | None = None):
        self.data, self.fn, self.halo = data, fn, int(halo)
        self.shape = data.shape
        plane = max(1, data.shape[1] * data.shape[2] * 4)
        # At least twice the halo deep: the margins then cost at most the slab itself (a 1024 x 1024
        # plane would otherwise give 8-plane slabs that each filter 50 planes).
        self.depth = max(1, min(data.shape[0], max(slab_bytes // plane, 2 * self.halo)))
        self.in_memory = data.shape[0] * plane <= budget_bytes
        self.scratch_dir = scratch_dir
        self._store: np.ndarray | None = None
        self._done = np.zeros(-(-data.shape[0] // self.depth), bool)

    @property
    def filtered(self) -> int:
        """Slabs filtered so far (each once)."""
        return int(self._done.sum())

    def _storage(self) -> np.ndarray:
        if self._store is None:
            if self.in_memory:
                self._store = np.empty(self.shape, np.float32)
            else:  # unlinked at once: nothing is left behind, however the process ends
                self._store = np.memmap(tempfile.TemporaryFile(dir=self.scratch_dir), np.float32, "w+", shape=self.shape)
        return self._store

    def _slab(self, k: int) -> np.ndarray:
        z0, z1 = k * self.depth, min((k + 1) * self.depth, self.shape[0])
        store = self._storage()
        if not self._done[k]:
            lo, hi = max(0, z0 - self.halo), min(self.shape[0], z1 + self.halo)
            store[z0:z1] = self.fn(self.data[lo:hi])[z0 - lo:z1 - lo]
            self._done[k] = True
        return store[z0:z1]

    def region(self, lo, hi) -> np.ndarray:
        """The filtered box [lo, hi) (ZYX, end-exclusive, inside the volume), as a new array."""
        (z0, y0, x0), (z1, y1, x1) = lo, hi
        parts = []
        for k in range(z0 // self.depth, (z1 - 1) // self.depth + 1):
            a = max(z0, k * self.depth) - k * self.depth
            b = min(z1, (k + 1) * self.depth) - k * self.depth
            parts.append(self._slab(k)[a:b, y0:y1, x0:x1])
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def values(self, index: np.ndarray) -> np.ndarray:
        """(N,) filtered values at (N, 3) integer ZYX indices inside the volume."""
        index = np.asarray(index, np.int64).reshape(-1, 3)
        out = np.empty(len(index), np.float32)
        slab_of = index[:, 0] // self.depth
        for k in np.unique(slab_of):
            rows = np.flatnonzero(slab_of == k)
            z, y, x = index[rows].T
            out[rows] = self._slab(int(k))[z - k * self.depth, y, x]
        return out

    def interpolate(self, zyx: np.ndarray) -> np.ndarray:
        """(N,) trilinear values at (N, 3) float ZYX coordinates, the volume's edge values
        extending beyond it (``scipy.ndimage.map_coordinates(order=1, mode="nearest")``)."""
        zyx = np.clip(np.asarray(zyx, np.float64).reshape(-1, 3), 0, np.asarray(self.shape) - 1)
        base = np.floor(zyx).astype(np.int64)
        frac = zyx - base
        top = np.minimum(base + 1, np.asarray(self.shape) - 1)
        corners = [np.array(corner, bool) for corner in np.ndindex(2, 2, 2)]
        # All eight corners in one call: slabs are visited in order, once each.
        values = self.values(np.concatenate([np.where(c, top, base) for c in corners])).reshape(8, len(zyx))
        total = np.zeros(len(zyx), np.float64)
        for c, corner_values in zip(corners, values):
            total += np.prod(np.where(c, frac, 1 - frac), axis=1) * corner_values
        return total.astype(np.float32)

    def local_maxima(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Positive local maxima over a ``size`` cube (``maximum_filter`` of the whole volume,
        edges reflected): ((K, 3) int ZYX, (K,) values)."""
        reach = size // 2
        points, values = [], []
        for k in range(-(-self.shape[0] // self.depth)):
            z0, z1 = k * self.depth, min((k + 1) * self.depth, self.shape[0])
            lo, hi = max(0, z0 - reach), min(self.shape[0], z1 + reach)
            block = self.region((lo, 0, 0), (hi, *self.shape[1:]))
            peak = (block == ndimage.maximum_filter(block, size=size)) & (block > 0)
            peak[:z0 - lo] = False
            peak[z1 - lo:] = False
            found = np.argwhere(peak)
            values.append(block[tuple(found.T)])
            found[:, 0] += lo
            points.append(found)
        return np.concatenate(points), np.concatenate(values)


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Indices folded into [0, size) by mirroring about the edge voxels (``np.pad`` mode
    ``reflect``: -1 -> 1, size -> size - 2), however far outside they fall."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)
