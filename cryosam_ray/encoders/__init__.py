"""Slice encoder backends, built by name from config.

``filterbank``: weight-free, the default. ``rings``: weight-free ring profiles and blobs for
small particles (see :mod:`cryosam_ray.encoders.rings`). ``dinov2``: DINOv2 through transformers, from a local
folder, an s3:// URL or a hub id the user names.
"""

from __future__ import annotations

from cryosam_ray.encoders.base import SliceEncoder

__all__ = ["SliceEncoder", "build_encoder", "check_encoder", "ENCODERS"]


def _build_filterbank(cfg):
    from cryosam_ray.encoders.filterbank import FilterBankEncoder

    return FilterBankEncoder(**cfg.filterbank.model_dump())


def _build_rings(cfg):
    from cryosam_ray.encoders.rings import RingEncoder

    return RingEncoder(**cfg.rings.model_dump())


def _build_dinov2(cfg):
    from cryosam_ray.encoders.dinov2 import Dinov2Encoder

    return Dinov2Encoder(**cfg.dinov2.model_dump())


ENCODERS = {"filterbank": _build_filterbank, "rings": _build_rings, "dinov2": _build_dinov2}


def check_encoder(cfg, storage_options: dict | None = None) -> None:
    """What can be checked before any work: DINOv2 weights named by a path or URL exist (a hub id
    is left to the loader)."""
    if cfg.backend == "dinov2":
        from cryosam_ray.weights import check_source

        model = str(cfg.dinov2.model)
        if "://" in model or model.startswith(("/", "./", "../", "~")):
            check_source(model, storage_options)


def build_encoder(cfg) -> SliceEncoder:
    """The backend named by ``cfg.backend`` (an :class:`~cryosam_ray.config.EncoderConfig`)."""
    return ENCODERS[cfg.backend](cfg)
