"""A weight-free slice encoder: multi-scale Gaussian derivative and Hessian responses.

The default feature backend (runs on any CPU, nothing to download). Per scale sigma it gives
the smoothed density, the gradient magnitude and the two Hessian eigenvalues (blob / ridge /
sheet structure at that scale), each scale-normalised. Responses are pooled onto a token grid
(``stride`` pixels per token, like a ViT's patches) and standardised per channel with
statistics fitted once per tomogram, so cosine similarity weighs every channel alike.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

_FIT_SLICES_PER_AXIS = 6


class StandardisedFilterEncoder:
    """What the weight-free encoders share: responses of fixed filters pooled onto a token grid
    (``stride`` pixels per token) and standardised per channel with statistics fitted once per
    tomogram. A subclass sets ``stride`` and ``feature_dim`` and implements ``_responses``:
    (N, A, B) slices -> (N, h, w, C) raw token responses."""

    stride: int
    feature_dim: int

    def _reset_statistics(self) -> None:
        self._mean = np.zeros(self.feature_dim, np.float32)
        self._std = np.ones(self.feature_dim, np.float32)

    def token_grid(self, slice_shape: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(slice_shape[0] / self.stride), math.ceil(slice_shape[1] / self.stride)

    def fit(self, tomogram) -> None:
        """Per-channel mean / std from a few evenly spaced slices along each axis."""
        self._reset_statistics()
        samples = []
        for axis in range(3):
            n = tomogram.shape[axis]
            for index in np.linspace(0, n - 1, min(n, _FIT_SLICES_PER_AXIS)).round().astype(int):
                image = tomogram.normalize(tomogram.slice(axis, int(index)))
                samples.append(self._responses(image[None]).reshape(-1, self.feature_dim))
        stacked = np.concatenate(samples)
        self._mean = stacked.mean(axis=0).astype(np.float32)
        self._std = np.maximum(stacked.std(axis=0), 1e-6).astype(np.float32)

    def encode(self, slices: np.ndarray) -> np.ndarray:
        """(N, A, B) float32 normalised slices -> (N, h, w, C) float32 standardised token features."""
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 3:
            raise ValueError(f"expected (N, A, B) slices, got shape {slices.shape}")
        return (self._responses(slices) - self._mean) / self._std

    def _responses(self, slices: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class FilterBankEncoder(StandardisedFilterEncoder):
    """Multi-scale Gaussian filter-bank features with the slice-encoder interface.

    Args:
        sigmas: Gaussian scales in pixels.
        stride: pixels per token along each slice axis (token grid = ceil(A / stride) x ceil(B / stride)).
    """

    name = "filterbank"

    def __init__(self, *, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0), stride: int = 4):
        if not sigmas or min(sigmas) <= 0:
            raise ValueError(f"sigmas must be positive scales in pixels, got {sigmas!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1 pixel, got {stride}")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.stride = int(stride)
        self.feature_dim = 4 * len(self.sigmas)
        self._reset_statistics()

    def signature(self) -> dict:
        return {"encoder": self.name, "sigmas": list(self.sigmas), "stride": self.stride, "version": 1}

    def _responses(self, slices: np.ndarray) -> np.ndarray:
        channels = []
        for s in self.sigmas:
            sig = (0.0, s, s)  # smooth within each slice only
            d = {order: ndimage.gaussian_filter(slices, sig, order=(0, *order), mode="reflect")
                 for order in ((0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (1, 1))}
            grad = s * np.hypot(d[(1, 0)], d[(0, 1)])
            # Hessian eigenvalues, scale-normalised by sigma^2 so scales are comparable.
            half_trace = 0.5 * (d[(2, 0)] + d[(0, 2)])
            root = np.sqrt(0.25 * (d[(2, 0)] - d[(0, 2)]) ** 2 + d[(1, 1)] ** 2)
            channels += [d[(0, 0)], grad, s * s * (half_trace - root), s * s * (half_trace + root)]
        return pool_tokens(np.stack(channels, axis=-1), self.stride)


def pool_tokens(maps: np.ndarray, stride: int) -> np.ndarray:
    """(N, A, B, C) -> (N, ceil(A/stride), ceil(B/stride), C) block means (edge-padded)."""
    if stride == 1:
        return maps.astype(np.float32)
    n, a, b, c = maps.shape
    pa, pb = (-a) % stride, (-b) % stride
    if pa or pb:
        maps = np.pad(maps, ((0, 0), (0, pa), (0, pb), (0, 0)), mode="edge")
    h, w = maps.shape[1] // stride, maps.shape[2] // stride
    return maps.reshape(n, h, stride, w, stride, c).mean(axis=(2, 4)).astype(np.float32)
