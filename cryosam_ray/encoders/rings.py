"""A weight-free slice encoder: rotation-invariant ring profiles and blob responses.

A feature backend that runs on any CPU with nothing to download (``encoder.backend: rings``),
made for small particles in real tomograms: with ``matching.similarity: projection`` it finds
more of the annotated ribosomes of the real EMPIAR-11658 tomogram than the default filter bank
(``benchmarks/bench_quality.py``), while the filter bank with cosine similarity separates
particle classes of similar size better on the synthetic set. Every channel is invariant
to rotations within the slice, so a particle seen at another in-plane angle gives the same
token, and the channels span a range of scales, so one encoding serves particles of any size
(the query, built from the prompts, decides which scales matter):

- ring means: the smoothed density averaged on a thin ring of radius r around each pixel, for
  r in ``ring_radii`` (a radial profile: a rotationally averaged template of the neighbourhood);
- blobs: the scale-normalised Laplacian of Gaussian at each sigma in ``sigmas`` (how strongly
  a disc of radius ~sigma * sqrt(2) stands out from its surround).

Responses are averaged onto a token grid (``stride`` pixels per token, like a ViT's patches)
and standardised per channel with statistics fitted once per tomogram, so every channel weighs
alike and features of different tomograms are comparable.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
from scipy import ndimage

from cryosam_ray.encoders.filterbank import StandardisedFilterEncoder, pool_tokens

DEFAULT_RING_RADII = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)
DEFAULT_SIGMAS = (1.5, 2.5, 4.0, 6.0)


class RingEncoder(StandardisedFilterEncoder):
    """Ring-profile and blob features with the slice-encoder interface.

    Args:
        sigmas: Laplacian-of-Gaussian scales in pixels (blobs of radius ~sigma * sqrt(2)).
        ring_radii: radii in pixels of the ring means (0: the smoothed pixel itself).
        smoothing: Gaussian sigma in pixels applied before the ring means (noise).
        stride: pixels per token along each slice axis (token grid = ceil(A / stride) x ceil(B / stride)).
    """

    name = "rings"

    def __init__(self, *, sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
                 ring_radii: tuple[float, ...] = DEFAULT_RING_RADII, smoothing: float = 1.0, stride: int = 2):
        if (not sigmas and not ring_radii) or (sigmas and min(sigmas) <= 0):
            raise ValueError(f"sigmas must be positive scales in pixels, got {sigmas!r}")
        if ring_radii and min(ring_radii) < 0:
            raise ValueError(f"ring_radii must be >= 0 pixels, got {ring_radii!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1 pixel, got {stride}")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.ring_radii = tuple(float(r) for r in ring_radii)
        self.smoothing = float(smoothing)
        self.stride = int(stride)
        self.feature_dim = len(self.ring_radii) + len(self.sigmas)
        self._rings = np.stack(_ring_kernels(self.ring_radii)) if self.ring_radii else None
        self._reset_statistics()

    def signature(self) -> dict:
        return {"encoder": self.name, "sigmas": list(self.sigmas), "ring_radii": list(self.ring_radii),
                "smoothing": self.smoothing, "stride": self.stride, "version": 1}

    def _responses(self, slices: np.ndarray) -> np.ndarray:
        """(N, A, B) -> (N, h, w, C) raw responses: ring means, then blobs, pooled to tokens."""
        channels = []
        if self._rings is not None:
            smooth = ndimage.gaussian_filter(slices, (0, self.smoothing, self.smoothing), mode="reflect")
            channels += _convolve_same(smooth, self._rings)
        for s in self.sigmas:
            sig = (0.0, s, s)  # within each slice only
            lap = (ndimage.gaussian_filter(slices, sig, order=(0, 2, 0), mode="reflect")
                   + ndimage.gaussian_filter(slices, sig, order=(0, 0, 2), mode="reflect"))
            channels.append(-s * s * lap)  # positive on a bright blob; a dark one gives the mirror profile
        return pool_tokens(np.stack(channels, axis=-1), self.stride)


def _ring_kernels(radii: tuple[float, ...]) -> list[np.ndarray]:
    """Unit-sum kernels, all of one size: a one-pixel-wide ring (linear falloff) per radius."""
    half = int(math.ceil(max(radii) + 1.5))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    dist = np.hypot(yy, xx)
    kernels = []
    for r in radii:
        k = np.clip(1.0 - np.abs(dist - r), 0, None) if r > 0 else (dist <= 0.5).astype(np.float64)
        kernels.append((k / k.sum()).astype(np.float32))
    return kernels


def _convolve_same(slices: np.ndarray, kernels: np.ndarray) -> list[np.ndarray]:
    """Each (K, k, k) kernel convolved with every (N, A, B) slice (reflected edges), by FFT."""
    half = kernels.shape[-1] // 2
    padded = np.pad(slices, ((0, 0), (half, half), (half, half)), mode="reflect")
    size = [scipy.fft.next_fast_len(s + 2 * half, real=True) for s in padded.shape[1:]]
    spectrum = scipy.fft.rfft2(padded, s=size, workers=-1)
    k_spectrum = scipy.fft.rfft2(kernels, s=size, workers=-1)
    a, b = slices.shape[1:]
    out = []
    for ks in k_spectrum:
        full = scipy.fft.irfft2(spectrum * ks[None], s=size, workers=-1)
        out.append(full[:, 2 * half:2 * half + a, 2 * half:2 * half + b].astype(np.float32))
    return out
