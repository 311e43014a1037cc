"""Cross-Plane Self-Prompting: 3D instance masks from point prompts with any 2D segmenter.

For each prompt (paper, section 2.1): segment the orthogonal slices through it (the z slice
only in ``directions="z"`` mode, as the public code does), then walk slice by slice away from
each seed in both directions along its axis, prompting each next slice with the previous
slice's mask and its point of highest confidence. A front stops when consecutive masks' IoU
falls under ``iou_threshold``, at the volume's edge, or when no candidate passes the
segmenter's filters. The union of all accepted slice masks is the instance.

All fronts of all prompts advance together, one slice per step, so a batched backend answers
every front in one call per step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cryosam_ray.segmenters.base import PromptableSegmenter, SlicePrediction, SliceRequest, window_iou

log = logging.getLogger(__name__)

Directions = Literal["six", "z"]


@dataclass
class Instance:
    """One prompt's 3D instance, as a bounding box plus the cropped mask.

    Attributes:
        prompt: (z, y, x) voxel coordinates of the prompt.
        bbox: (z0, y0, x0, z1, y1, x1), end-exclusive, in voxels; all zero when empty.
        mask: (z1 - z0, y1 - y0, x1 - x0) bool mask inside ``bbox``.
        pred_iou: mean of the segmenter's quality score over the accepted slices (NaN if empty).
        n_slices: accepted slice masks (seeds included).
        message: why the instance is empty ("" when it is not).
    """

    prompt: tuple[float, float, float]
    bbox: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=bool))
    pred_iou: float = float("nan")
    n_slices: int = 0
    message: str = ""

    @property
    def empty(self) -> bool:
        return not self.mask.any()

    @property
    def voxel_count(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> tuple[float, float, float]:
        """(z, y, x) centre of mass in voxels; the prompt when empty."""
        if self.empty:
            return tuple(float(v) for v in self.prompt)
        coords = np.argwhere(self.mask).mean(axis=0) + np.asarray(self.bbox[:3])
        return tuple(float(v) for v in coords)

    def paste(self, volume: np.ndarray, value) -> None:
        """Write ``value`` into ``volume`` (ZYX, full size) wherever this instance's mask is set."""
        z0, y0, x0, z1, y1, x1 = self.bbox
        view = volume[z0:z1, y0:y1, x0:x1]
        view[self.mask] = value


@dataclass
class _Front:
    prompt: int
    axis: int
    step: int  # +1 or -1 along axis
    index: int  # the slice of ``pred``
    pred: SlicePrediction


def _seed_point(prompt: np.ndarray, axis: int) -> tuple[int, tuple[int, int]]:
    """(slice index, (row, col)) of a ZYX voxel point on the slice through it along ``axis``."""
    zyx = [int(round(v)) for v in prompt]
    others = [zyx[a] for a in range(3) if a != axis]
    return zyx[axis], (others[0], others[1])


def propagate(segmenter: PromptableSegmenter, tomogram, prompts: np.ndarray, *,
              directions: Directions = "six", iou_threshold: float = 0.5,
              max_steps: int | None = None, radius: float | None = None,
              max_voxels: float | None = None) -> list[Instance]:
    """3D instance masks for point prompts on one tomogram.

    Args:
        segmenter: a backend implementing :class:`PromptableSegmenter`.
        tomogram: the :class:`~cryosam_ray.tomo_io.Tomogram` the prompts lie in.
        prompts: (N, 3) float voxel coordinates, ZYX.
        directions: "six" (seed on z, y and x slices; walk +-z, +-y, +-x: the paper) or
            "z" (seed on the z slice, walk +-z: the public code).
        iou_threshold: a front stops when consecutive masks' IoU is below this (tau_IoU).
        max_steps: at most this many slices per front beyond its seed (None: no limit).
        radius: expected particle radius in voxels (from the prompt instances; None: unknown),
            passed to the segmenter, which sizes its windows and caps mask areas from it.
        max_voxels: instances larger than this are of no use to the caller (None: no limit). A
            prompt's fronts stop once its slice masks add up to more than this many voxels per
            walking axis (each voxel lies on one slice per axis, so its instance is then surely
            larger) and it comes back empty, its ``message`` saying so: a mask leaking along a
            membrane costs neither the time nor the memory of walking the whole volume.

    Returns:
        One :class:`Instance` per prompt, in order. A prompt outside the volume or on empty
        background gives an empty instance whose ``message`` says why; it does not raise.
    """
    if directions not in ("six", "z"):
        raise ValueError(f"directions must be 'six' or 'z', got {directions!r}")
    prompts = np.asarray(prompts, dtype=np.float64).reshape(-1, 3)
    shape = tomogram.shape
    segmenter.set_tomogram(tomogram)
    axes = (0, 1, 2) if directions == "six" else (0,)
    accepted: list[list[tuple[int, int, SlicePrediction]]] = [[] for _ in prompts]
    messages = [""] * len(prompts)
    area_cap = math.inf if max_voxels is None else len(axes) * float(max_voxels)
    areas = np.zeros(len(prompts))

    def accept(i: int, axis: int, index: int, pred: SlicePrediction) -> bool:
        """Keep a slice mask of prompt ``i``; False once the prompt is over the cap (then dropped)."""
        if messages[i]:
            return False
        areas[i] += int(pred.mask.sum())
        if areas[i] > area_cap:
            accepted[i].clear()
            messages[i] = f"larger than {max_voxels:.0f} voxels (a leak): stopped"
            return False
        accepted[i].append((axis, index, pred))
        return True

    seeds: list[tuple[int, int, int, SliceRequest]] = []
    for i, p in enumerate(prompts):
        if not all(-0.5 <= v < s - 0.5 for v, s in zip(p, shape)):
            messages[i] = f"prompt (z={p[0]:g}, y={p[1]:g}, x={p[2]:g}) is outside the volume of shape {shape}"
            log.info("%s: %s", tomogram.name, messages[i])
            continue
        for axis in axes:
            index, point = _seed_point(p, axis)
            seeds.append((i, axis, index, SliceRequest(axis=axis, index=index, point=point, radius=radius)))

    fronts: list[_Front] = []
    for (i, axis, index, _), pred in zip(seeds, segmenter.predict([s[3] for s in seeds])):
        if pred is not None and accept(i, axis, index, pred):
            fronts += [_Front(i, axis, +1, index, pred), _Front(i, axis, -1, index, pred)]
    fronts = [f for f in fronts if not messages[f.prompt]]

    steps = 0
    while fronts and (max_steps is None or steps < max_steps):
        steps += 1
        # Stop at the volume's edge and when the prompt went over the cap.
        fronts = [f for f in fronts if 0 <= f.index + f.step < shape[f.axis] and not messages[f.prompt]]
        requests = [SliceRequest(axis=f.axis, index=f.index + f.step, point=f.pred.best_point(),
                                 prev_mask=f.pred.mask, prev_offset=f.pred.offset, state=f.pred.state,
                                 radius=radius)
                    for f in fronts]
        survivors = []
        for front, pred in zip(fronts, segmenter.predict(requests) if requests else []):
            if pred is None or window_iou(pred.mask, pred.offset, front.pred.mask, front.pred.offset) < iou_threshold:
                continue
            front.index += front.step
            front.pred = pred
            if accept(front.prompt, front.axis, front.index, pred):
                survivors.append(front)
        fronts = survivors

    instances = []
    for i, p in enumerate(prompts):
        if not accepted[i] and not messages[i]:
            messages[i] = (f"no particle found at prompt (z={p[0]:g}, y={p[1]:g}, x={p[2]:g}): "
                           "empty background or too little contrast")
            log.info("%s: %s", tomogram.name, messages[i])
        instances.append(_assemble(tuple(float(v) for v in p), accepted[i], messages[i]))
    return instances


def _slice_box(axis: int, index: int, pred: SlicePrediction) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) ZYX corners, end-exclusive, of a slice mask window placed in the volume."""
    r0, c0 = pred.offset
    h, w = pred.mask.shape
    lo = [r0, c0]
    hi = [r0 + h, c0 + w]
    lo.insert(axis, index)
    hi.insert(axis, index + 1)
    return np.array(lo), np.array(hi)


def _assemble(prompt, slices: list[tuple[int, int, SlicePrediction]], message: str) -> Instance:
    if not slices:
        return Instance(prompt=prompt, message=message)
    boxes = [_slice_box(axis, index, pred) for axis, index, pred in slices]
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    mask = np.zeros(tuple(hi - lo), dtype=bool)
    for (axis, index, pred), (blo, bhi) in zip(slices, boxes):
        region = tuple(slice(a, b) for a, b in zip(blo - lo, bhi - lo))
        mask[region] |= np.expand_dims(pred.mask, axis)
    nonzero = np.argwhere(mask)  # windows carry margins: crop the box to the mask itself
    first, last = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    mask = mask[tuple(slice(a, b) for a, b in zip(first, last))]
    bbox = tuple(int(v) for v in (*(lo + first), *(lo + last)))
    pred_iou = float(np.mean([pred.pred_iou for _, _, pred in slices]))
    return Instance(prompt=prompt, bbox=bbox, mask=mask, pred_iou=pred_iou, n_slices=len(slices))
