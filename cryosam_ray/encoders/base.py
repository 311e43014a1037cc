"""The slice-encoder protocol shared by every feature backend (DINOv2, filter bank).

An encoder turns a batch of normalised 2D slices into token maps: (N, A, B) float32 slices in,
(N, h, w, C) float32 features out, where (h, w) is the encoder's token grid for an (A, B) slice
(for DINOv2 at 518 x 518 input with 14-pixel patches: 37 x 37). A voxel's feature is the
concatenation of the three axis maps bilinearly sampled at it (``cryosam_ray.features``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SliceEncoder(Protocol):
    """What the feature stage needs from an encoder backend."""

    name: str
    feature_dim: int  # C, channels per axis map

    def token_grid(self, slice_shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) token grid for a slice of shape (A, B)."""

    def fit(self, tomogram) -> None:
        """Per-tomogram preparation before :meth:`encode` (statistics for standardisation).

        Must depend only on the tomogram's data, so that shards encoded by different workers
        agree."""

    def encode(self, slices: np.ndarray) -> np.ndarray:
        """(N, A, B) float32 slices normalised with the tomogram's statistics -> (N, h, w, C) float32."""

    def signature(self) -> dict:
        """Everything that changes the output (model, weights, settings), for feature-store keys."""
