"""The promptable 2D segmenter protocol shared by every backend (SAM, classical).

A segmenter answers a batch of :class:`SliceRequest` (one per active propagation front) with
one :class:`SlicePrediction` each, or ``None`` when no candidate mask passes its filters.
Batching is the point: a GPU backend makes one decoder call per propagation step, however
many prompts are being propagated.

Slice geometry follows :meth:`cryosam_ray.tomo_io.Tomogram.slab`: a slice along axis 0 (z)
has (row, col) = (y, x); along axis 1 (y): (z, x); along axis 2 (x): (z, y).
Masks travel as a window: a 2D array plus the (row, col) of its top-left corner in the slice,
so a small particle in a large slice costs little memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class SliceRequest:
    """One prompt on one slice.

    Attributes:
        axis: 0, 1 or 2 (z, y, x): the axis the slice is perpendicular to.
        index: slice index along ``axis``.
        point: (row, col) of the positive point prompt, in slice coordinates.
        prev_mask: the previous slice's mask (bool, window) for propagation steps; None on a seed.
        prev_offset: (row, col) of ``prev_mask``'s top-left corner in the slice.
        state: backend-specific state returned with the previous prediction (for SAM the
            previous low-resolution logits; for the classical backend the particle's polarity).
        radius: expected particle radius in pixels (from the prompt instances), or None when
            unknown (the prompts themselves); backends size windows and cap areas from it.
    """

    axis: int
    index: int
    point: tuple[int, int]
    prev_mask: np.ndarray | None = None
    prev_offset: tuple[int, int] = (0, 0)
    state: Any = None
    radius: float | None = None


def area_cap(radius: float | None) -> float:
    """Largest plausible slice mask, pixels, of a particle of ``radius`` (inf when unknown): a
    disc of twice the radius, room for elongation by the missing wedge and for elongated
    particles, while a mask leaking along a membrane or into a neighbour grows past it."""
    return float("inf") if radius is None else float(np.pi * (2.0 * radius) ** 2)


@dataclass
class SlicePrediction:
    """A segmenter's answer to one :class:`SliceRequest`.

    Attributes:
        mask: (h, w) bool window of the slice.
        offset: (row, col) of the window's top-left corner in the slice.
        confidence: (h, w) float32 confidence map over the same window; its argmax inside the
            mask is the next slice's point prompt.
        pred_iou: the backend's own quality estimate in [0, 1] (SAM's predicted IoU; the
            classical backend's stability score).
        state: passed back in the next request of the same front.
    """

    mask: np.ndarray
    offset: tuple[int, int]
    confidence: np.ndarray
    pred_iou: float
    state: Any = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def best_point(self) -> tuple[int, int]:
        """(row, col) in slice coordinates of the highest confidence inside the mask."""
        scores = np.where(self.mask, self.confidence, -np.inf)
        r, c = np.unravel_index(int(np.argmax(scores)), scores.shape)
        return int(r + self.offset[0]), int(c + self.offset[1])


@runtime_checkable
class PromptableSegmenter(Protocol):
    """What propagation needs from a 2D segmenter backend."""

    name: str

    def set_tomogram(self, tomogram) -> None:
        """Prepare for requests on this :class:`~cryosam_ray.tomo_io.Tomogram` (normalisation,
        cached slice embeddings). Called before any :meth:`predict` on it."""

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction | None]:
        """Answer every request; ``None`` where no candidate passes the backend's filters."""


def window_iou(a: np.ndarray, a_offset: tuple[int, int], b: np.ndarray, b_offset: tuple[int, int]) -> float:
    """IoU of two bool windows placed at their offsets in the same slice plane."""
    inter_r0, inter_c0 = max(a_offset[0], b_offset[0]), max(a_offset[1], b_offset[1])
    inter_r1 = min(a_offset[0] + a.shape[0], b_offset[0] + b.shape[0])
    inter_c1 = min(a_offset[1] + a.shape[1], b_offset[1] + b.shape[1])
    inter = 0
    if inter_r1 > inter_r0 and inter_c1 > inter_c0:
        sa = a[inter_r0 - a_offset[0]:inter_r1 - a_offset[0], inter_c0 - a_offset[1]:inter_c1 - a_offset[1]]
        sb = b[inter_r0 - b_offset[0]:inter_r1 - b_offset[0], inter_c0 - b_offset[1]:inter_c1 - b_offset[1]]
        inter = int(np.logical_and(sa, sb).sum())
    union = int(a.sum()) + int(b.sum()) - inter
    return inter / union if union else 0.0


@dataclass
class SegmenterInfo:
    """What a built segmenter reports about itself (for run manifests and cache signatures)."""

    name: str
    settings: dict = field(default_factory=dict)
