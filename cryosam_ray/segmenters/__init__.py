"""Promptable 2D segmenter backends, built by name from config.

``classical``: weight-free, the default (runs anywhere). ``sam``: segment-anything with a
checkpoint the user names (local path, s3:// or http(s):// URL).
"""

from __future__ import annotations

from cryosam_ray.segmenters.base import PromptableSegmenter, SlicePrediction, SliceRequest

__all__ = ["PromptableSegmenter", "SlicePrediction", "SliceRequest", "build_segmenter", "SEGMENTERS"]


def _build_classical(cfg):
    from cryosam_ray.segmenters.classical import ClassicalSegmenter

    return ClassicalSegmenter(**cfg.classical.model_dump())


def _build_sam(cfg):
    from cryosam_ray.segmenters.sam import SamSegmenter

    return SamSegmenter(**cfg.sam.model_dump())


SEGMENTERS = {"classical": _build_classical, "sam": _build_sam}


def build_segmenter(cfg) -> PromptableSegmenter:
    """The backend named by ``cfg.backend`` (a :class:`~cryosam_ray.config.SegmenterConfig`)."""
    return SEGMENTERS[cfg.backend](cfg)
