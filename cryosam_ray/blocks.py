"""A label volume held as the blocks that hold something (memory bounded by the particles).

Finding and resolving particles asks "which voxels are taken, and by whom?" over the whole
tomogram. A dense array for that is as large as the tomogram (a 500 x 1024 x 1024 tomogram:
2 GB of int32 per class); the particles cover a small part of it. :class:`BlockLabels` keeps
only the (``block``-sided, ZYX) blocks that some particle touches.
"""

from __future__ import annotations

import numpy as np


class BlockLabels:
    """A (D, H, W) integer volume, 0 where nothing was put, stored in ``block``^3 blocks."""

    def __init__(self, shape: tuple[int, int, int], dtype=np.int32, block: int = 32):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.block = int(block)
        self._blocks: dict[tuple[int, int, int], np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def _spans(self, bbox):
        """For each block the box (z0, y0, x0, z1, y1, x1) touches: its key, the slices into the
        block and the slices into the box."""
        z0, y0, x0, z1, y1, x1 = (int(v) for v in bbox)
        b = self.block
        for bz in range(z0 // b, -(-z1 // b)):
            for by in range(y0 // b, -(-y1 // b)):
                for bx in range(x0 // b, -(-x1 // b)):
                    lo = (max(z0, bz * b), max(y0, by * b), max(x0, bx * b))
                    hi = (min(z1, (bz + 1) * b), min(y1, (by + 1) * b), min(x1, (bx + 1) * b))
                    inner = tuple(slice(l - k * b, h - k * b) for l, h, k in zip(lo, hi, (bz, by, bx)))
                    outer = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, (z0, y0, x0)))
                    yield (bz, by, bx), inner, outer

    def get(self, bbox) -> np.ndarray:
        """A copy of the box ``(z0, y0, x0, z1, y1, x1)``: (z1 - z0, y1 - y0, x1 - x0)."""
        z0, y0, x0, z1, y1, x1 = (int(v) for v in bbox)
        out = np.zeros((z1 - z0, y1 - y0, x1 - x0), self.dtype)
        for key, inner, outer in self._spans(bbox):
            block = self._blocks.get(key)
            if block is not None:
                out[outer] = block[inner]
        return out

    def put(self, bbox, values: np.ndarray) -> None:
        """Write ``values`` over the box; blocks are made only where a value is non-zero."""
        for key, inner, outer in self._spans(bbox):
            part = values[outer]
            block = self._blocks.get(key)
            if block is None:
                if not part.any():
                    continue
                block = self._blocks[key] = np.zeros((self.block,) * 3, self.dtype)
            block[inner] = part

    def at(self, zyx) -> int:
        """The value at one voxel."""
        z, y, x = (int(v) for v in zyx)
        block = self._blocks.get((z // self.block, y // self.block, x // self.block))
        return 0 if block is None else int(block[z % self.block, y % self.block, x % self.block])

    def paste(self, bbox, mask: np.ndarray, value: int) -> None:
        """Set ``value`` where ``mask`` (the box's shape) is True and nothing was put before."""
        region = self.get(bbox)
        region[mask & (region == 0)] = value
        self.put(bbox, region)
