"""A weight-free promptable 2D segmenter: the default backend, runs on any CPU.

Per request, in a window around the prompt: smooth the normalised slice, decide which way the
particle's contrast goes (dense may be dark or bright), set a threshold halfway between the
particle's density and the local background, and keep the connected region that holds the
prompt (or overlaps the previous slice's mask most). The confidence map is a sigmoid of the
distance to the threshold weighted towards the region's interior, and the quality score is a
stability score (IoU of the regions at a slightly higher and lower threshold), like SAM's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit

from cryosam_ray.segmenters.base import SlicePrediction, SliceRequest, area_cap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _FrontState:
    """What a front carries between slices: +1 if the particle is brighter than background, the
    expected particle radius in pixels (None: no size prior) and the slices walked."""

    sign: float
    radius: float | None
    steps: int = 0


_MIN_HALF_WINDOW = 8
_STEPS_PER_RADIUS = 2.5  # a front walks at most this many radii from its seed (the missing wedge
# stretches particles along z, up to ~2x): beyond it the mask is a membrane or a neighbour
_SPLIT_STEPS = (0.15, 0.3)
_REACH_RADII = 2.5  # threshold raised by these fractions to split an oversized region


class ClassicalSegmenter:
    """Threshold-and-connect segmenter with SAM's interface (see ``segmenters/base.py``).

    Args:
        sigma: Gaussian smoothing in pixels before thresholding (noise suppression).
        window: half-size in pixels of the window examined around a seed prompt.
        window_margin: pixels added around the previous mask's box on propagation steps.
        threshold_fraction: where between background (0) and particle (1) density to cut.
        min_contrast: minimal particle-background difference (in noise-normalised units of
            the smoothed slice) for a seed; below it the prompt is on empty background.
        min_area: smallest accepted mask, pixels.
        max_area_fraction: largest accepted mask as a fraction of the window (larger means
            the region leaked into background or a membrane).
        min_pred_iou: smallest accepted stability score.
        polarity: "auto" (decided per prompt from the data), "dark" or "bright".
        cache_slices: smoothed slices kept in memory (propagation revisits neighbours).
    """

    name = "classical"

    def __init__(self, *, sigma: float = 1.5, window: int = 48, window_margin: int = 12,
                 threshold_fraction: float = 0.5, min_contrast: float = 0.8, min_area: int = 6,
                 max_area_fraction: float = 0.6, min_pred_iou: float = 0.5, polarity: str = "auto",
                 cache_slices: int = 192):
        if polarity not in ("auto", "dark", "bright"):
            raise ValueError(f"polarity must be 'auto', 'dark' or 'bright', got {polarity!r}")
        self.sigma, self.window, self.window_margin = sigma, window, window_margin
        self.threshold_fraction, self.min_contrast = threshold_fraction, min_contrast
        self.min_area, self.max_area_fraction, self.min_pred_iou = min_area, max_area_fraction, min_pred_iou
        self.polarity, self.cache_slices = polarity, cache_slices
        self._tomogram = None
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._noise = 1.0

    def set_tomogram(self, tomogram) -> None:
        self._tomogram = tomogram
        self._cache.clear()
        # Noise level of a smoothed slice, to express contrast in comparable units.
        self._noise = float(np.std(self._smoothed(0, tomogram.shape[0] // 2))) or 1.0

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction | None]:
        if self._tomogram is None:
            raise RuntimeError("call set_tomogram() before predict()")
        return [self._predict_one(r) for r in requests]

    def _smoothed(self, axis: int, index: int) -> np.ndarray:
        key = (axis, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tomo = self._tomogram
        image = ndimage.gaussian_filter(tomo.normalize(tomo.slice(axis, index)), self.sigma)
        self._cache[key] = image
        if len(self._cache) > self.cache_slices:
            self._cache.popitem(last=False)
        return image

    def _window_bounds(self, req: SliceRequest, shape: tuple[int, int],
                       radius: float | None) -> tuple[int, int, int, int]:
        if req.prev_mask is None:
            r, c = req.point
            half = self.window if radius is None else max(_MIN_HALF_WINDOW, int(np.ceil(3 * radius)))
            r0, c0, r1, c1 = r - half, c - half, r + half + 1, c + half + 1
        else:
            rows, cols = np.nonzero(req.prev_mask)
            m = self.window_margin + max(rows.max() - rows.min(), cols.max() - cols.min()) // 2
            r0 = req.prev_offset[0] + rows.min() - m
            c0 = req.prev_offset[1] + cols.min() - m
            r1 = req.prev_offset[0] + rows.max() + m + 1
            c1 = req.prev_offset[1] + cols.max() + m + 1
        return max(0, r0), max(0, c0), min(shape[0], r1), min(shape[1], c1)

    def _predict_one(self, req: SliceRequest) -> SlicePrediction | None:
        state = req.state if isinstance(req.state, _FrontState) else None
        # The size prior (the prompts' radius, propagation.size_prior) sizes the window, caps the
        # area, limits the reach and the front's length; without one (the prompts themselves)
        # the plain threshold-and-connect rules apply, which segment elongated particles whole.
        radius = state.radius if state is not None else req.radius
        if radius is not None and state is not None and state.steps >= _STEPS_PER_RADIUS * radius:
            return None
        image = self._smoothed(req.axis, req.index)
        r0, c0, r1, c1 = self._window_bounds(req, image.shape, radius)
        win = image[r0:r1, c0:c1]
        pr, pc = req.point[0] - r0, req.point[1] - c0
        if not (0 <= pr < win.shape[0] and 0 <= pc < win.shape[1]):
            return None
        prev = None
        if req.prev_mask is not None:
            prev = _place(req.prev_mask, req.prev_offset, (r0, c0), win.shape)
        sign = self._sign(req, win, pr, pc, prev)
        if sign is None:
            return None
        signed = win * sign
        fg, bg = self._levels(signed, pr, pc, prev)
        if (fg - bg) < self.min_contrast * self._noise * (0.5 if prev is not None else 1.0):
            return None
        cap = min(self.max_area_fraction * win.size, area_cap(radius))
        reach = True if radius is None else _reach(win.shape, (pr, pc) if prev is None else
                                                    ndimage.center_of_mass(prev), radius)
        splits = _SPLIT_STEPS if radius is not None else ()
        for fraction in (self.threshold_fraction, *(self.threshold_fraction + d for d in splits)):
            # Too big: touching neighbours or a membrane joined at this level; a higher cut splits them.
            threshold = bg + fraction * (fg - bg)
            mask = self._region((signed > threshold) & reach, pr, pc, prev)
            if mask is None or mask.sum() <= cap:
                break
        if mask is None:
            return None
        area = int(mask.sum())
        if area < self.min_area or area > cap:
            return None
        delta = 0.1 * (fg - bg)
        stability = _iou(self._region(signed > threshold + delta, pr, pc, prev, fallback=mask),
                         self._region(signed > threshold - delta, pr, pc, prev, fallback=mask))
        if stability < self.min_pred_iou:
            return None
        interior = ndimage.distance_transform_edt(mask)
        contrast = expit((signed - threshold) / max(delta, 1e-6))
        confidence = (contrast * (0.5 + 0.5 * interior / max(float(interior.max()), 1.0))).astype(np.float32)
        steps = state.steps + 1 if state is not None else 0
        return SlicePrediction(mask=mask, offset=(r0, c0), confidence=confidence, pred_iou=float(stability),
                               state=_FrontState(sign, radius, steps))

    def _sign(self, req, win, pr, pc, prev) -> float | None:
        if self.polarity != "auto":
            return 1.0 if self.polarity == "bright" else -1.0
        if isinstance(req.state, _FrontState):
            return req.state.sign
        centre = _disk_mean(win, pr, pc, 2)
        diff = centre - float(np.median(win))
        return None if diff == 0 else float(np.sign(diff))

    def _levels(self, signed, pr, pc, prev) -> tuple[float, float]:
        """(particle level, background level) of the signed window."""
        if prev is not None and prev.any():
            core = ndimage.binary_erosion(prev, iterations=1)
            fg = float(signed[core if core.any() else prev].mean())
            near = ndimage.binary_dilation(prev, iterations=4) & ~ndimage.binary_dilation(prev, iterations=1)
            outside = signed[near] if near.any() else signed[~prev]
            bg = float(np.median(outside)) if outside.size else float(np.median(signed))
            return fg, bg
        return _disk_mean(signed, pr, pc, 2), float(np.median(signed))

    def _region(self, binary, pr, pc, prev, fallback=None) -> np.ndarray | None:
        """The connected component holding the prompt (or overlapping ``prev`` most), holes filled."""
        binary = ndimage.binary_opening(binary, structure=_CROSS)
        labels, n = ndimage.label(binary)
        if n == 0:
            return fallback
        chosen = labels[pr, pc]
        if chosen == 0 and prev is not None:
            overlap = np.bincount(labels[prev], minlength=n + 1)
            overlap[0] = 0
            chosen = int(overlap.argmax()) if overlap.max() > 0 else 0
        if chosen == 0:
            return fallback
        return _fill_holes(labels == chosen)


_CROSS = ndimage.generate_binary_structure(2, 1)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the window's edge filled.

    One labelling pass; scipy's binary_fill_holes iterates a dilation to convergence instead.
    """
    background, n = ndimage.label(~mask)
    if n <= 1:
        return mask if n == 1 else np.ones_like(mask)
    edge = np.zeros(n + 1, bool)
    for border in (background[0], background[-1], background[:, 0], background[:, -1]):
        edge[border] = True
    return mask | ~edge[background]


def _reach(shape: tuple[int, int], centre, radius: float) -> np.ndarray:
    """Pixels within ``_REACH_RADII`` radii of ``centre``: a mask running along a membrane or
    into the next particle is cut there (elongated particles reach ~2.4 equivalent radii)."""
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= (_REACH_RADII * radius) ** 2


def _disk_mean(image: np.ndarray, r: int, c: int, radius: int) -> float:
    rr, cc = np.ogrid[:image.shape[0], :image.shape[1]]
    disk = (rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2
    return float(image[disk].mean())


def _place(mask: np.ndarray, offset: tuple[int, int], origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """``mask`` (at ``offset`` in the slice) cut or padded into a window at ``origin`` of ``shape``."""
    out = np.zeros(shape, dtype=bool)
    r0, c0 = offset[0] - origin[0], offset[1] - origin[1]
    sr0, sc0 = max(0, -r0), max(0, -c0)
    dr0, dc0 = max(0, r0), max(0, c0)
    h = min(mask.shape[0] - sr0, shape[0] - dr0)
    w = min(mask.shape[1] - sc0, shape[1] - dc0)
    if h > 0 and w > 0:
        out[dr0:dr0 + h, dc0:dc0 + w] = mask[sr0:sr0 + h, sc0:sc0 + w]
    return out


def _iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
