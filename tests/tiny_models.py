"""Tiny random-weight models of the real architectures, saved the way users' weights are saved.

Loading them goes through the product's real loading code (``build_sam``, ``Dinov2Encoder``);
nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from cryosam_ray.segmenters.sam_build import build_sam
from cryosam_ray.tomo_io import write_mrc


def write_blob_tomogram(path: Path) -> str:
    """A (12, 40, 48) noise tomogram with one dark ball at (6, 20, 24), 12 A voxels: tiny-model runs."""
    volume = np.random.default_rng(0).normal(size=(12, 40, 48)).astype(np.float32)
    zz, yy, xx = np.indices(volume.shape)
    volume -= 3.0 * (((zz - 6) ** 2 + (yy - 20) ** 2 + (xx - 24) ** 2) < 16)
    return write_mrc(path, volume, 12.0)


# SAM's architecture (real prompt encoder and mask decoder, 1024 input) with a 2-block, 32-wide
# image encoder: ``model_type: custom`` with this ``architecture``.
TINY_SAM = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
TINY_SAM_FLAGS = ["--set", "segmenter.sam.model_type=custom", "--set",
                  "segmenter.sam.architecture={encoder_embed_dim: 32, encoder_depth: 2, encoder_num_heads: 2, "
                  "encoder_global_attn_indexes: [1]}"]


def tiny_sam(checkpoint: str | None = None):
    """The tiny SAM, random (no checkpoint) or loaded through ``build_sam``."""
    return build_sam("custom", checkpoint, architecture=TINY_SAM)


def save_tiny_sam(path: Path, seed: int = 0) -> str:
    """A tiny SAM checkpoint (state dict, as the official .pth files)."""
    torch.manual_seed(seed)
    torch.save(tiny_sam().state_dict(), path)
    return str(path)


def save_tiny_dinov2(folder: Path, seed: int = 0, *, registers: int = 4) -> str:
    """A tiny DINOv2 folder (config.json + weights, as ``save_pretrained`` writes it): with
    ``registers`` > 0 a Dinov2WithRegistersModel (the paper's configuration), else a Dinov2Model."""
    torch.manual_seed(seed)
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
                image_size=98)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(**tiny, num_register_tokens=registers)
        transformers.Dinov2WithRegistersModel(config).save_pretrained(folder)
    else:
        transformers.Dinov2Model(transformers.Dinov2Config(**tiny)).save_pretrained(folder)
    return str(folder)
