"""Promptable 2D segmenter backends, built by name from config.

``classical``: weight-free, the default (runs anywhere). ``sam``: segment-anything with a
checkpoint the user names (local path, s3:// or http(s):// URL).
"""

from __future__ import annotations

from cryosam_ray.segmenters.base import PromptableSegmenter, SlicePrediction, SliceRequest

__all__ = ["PromptableSegmenter", "SlicePrediction", "SliceRequest", "build_segmenter", "check_segmenter", "SEGMENTERS"]


def _build_classical(cfg):
    from cryosam_ray.segmenters.classical import ClassicalSegmenter

    return ClassicalSegmenter(**cfg.classical.model_dump())


def _build_sam(cfg):
    from cryosam_ray.segmenters.sam import SamSegmenter

    return SamSegmenter(**cfg.sam.model_dump())


SEGMENTERS = {"classical": _build_classical, "sam": _build_sam}


def check_segmenter(cfg, storage_options: dict | None = None) -> None:
    """What can be checked before any work (on the driver, so that an actor is not restarted
    over a config error): the SAM checkpoint is named and exists."""
    if cfg.backend == "sam":
        from cryosam_ray.errors import WeightsError
        from cryosam_ray.weights import check_source

        if cfg.sam.checkpoint is None and cfg.sam.model_type != "custom":
            raise WeightsError(cfg.sam.model_type, "no checkpoint given (segmenter.sam.checkpoint, --checkpoint); "
                               "SAM needs weights: a local path, s3:// or http(s):// URL of e.g. sam_vit_h_4b8939.pth")
        if cfg.sam.checkpoint is not None:
            check_source(cfg.sam.checkpoint, storage_options)


def build_segmenter(cfg) -> PromptableSegmenter:
    """The backend named by ``cfg.backend`` (a :class:`~cryosam_ray.config.SegmenterConfig`)."""
    return SEGMENTERS[cfg.backend](cfg)
