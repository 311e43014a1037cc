"""SAM models from checkpoints: the registry architectures and a loader with readable errors.

A checkpoint is a state dict saved with ``torch.save`` (the official ``sam_vit_*.pth`` files, or
training checkpoints that wrap one under ``model`` / ``state_dict``). It is loaded onto a model
built on the meta device (no random initialisation of weights about to be replaced), and one
that does not fit the architecture is named with what it looks like instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from cryosam_ray.errors import WeightsError
from cryosam_ray.weights import resolve_weights

log = logging.getLogger(__name__)

SAM_ARCHITECTURES: dict[str, dict] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=(2, 5, 8, 11)),
}
# segment_anything's _build_sam registers these as non-persistent buffers (absent from checkpoints).
_PIXEL_MEAN, _PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def build_sam(model_type: str, checkpoint: str | None, *, architecture: dict | None = None,
              device: str | torch.device = "cpu", cache_dir: str | None = None):
    """A ``segment_anything.modeling.Sam`` of ``model_type`` with the weights of ``checkpoint``.

    Args:
        model_type: a key of :data:`SAM_ARCHITECTURES` ("vit_h", "vit_l", "vit_b"), or "custom"
            with ``architecture`` (a smaller or distilled image encoder).
        checkpoint: local path, ``s3://`` or ``http(s)://`` URL of a state dict saved with
            ``torch.save``; None only for "custom" (random weights: small models for tests).
        architecture: with "custom": ``encoder_embed_dim``, ``encoder_depth``, ``encoder_num_heads``,
            ``encoder_global_attn_indexes`` (SAM's prompt encoder and mask decoder are kept).
        device: where the model goes.
        cache_dir: where remote checkpoints are kept (see :func:`~cryosam_ray.weights.resolve_weights`).

    Returns:
        The model in eval mode, on ``device``, in the checkpoint's dtype.

    Raises:
        WeightsError: unknown ``model_type``; no checkpoint for a real model; the checkpoint
            cannot be fetched, is not a state dict, or does not fit ``model_type`` (the message
            names the file and the expected architecture).
    """
    from segment_anything.build_sam import _build_sam

    if model_type == "custom":
        if not architecture:
            raise WeightsError(str(checkpoint or model_type), "model_type 'custom' needs an architecture "
                               "(encoder_embed_dim, encoder_depth, encoder_num_heads, encoder_global_attn_indexes)")
        arch = {**architecture, "encoder_global_attn_indexes": tuple(architecture["encoder_global_attn_indexes"])}
    elif model_type not in SAM_ARCHITECTURES:
        raise WeightsError(str(checkpoint or model_type), f"unknown SAM model_type {model_type!r}; expected one of "
                           f"{', '.join(SAM_ARCHITECTURES)} or custom")
    else:
        arch = SAM_ARCHITECTURES[model_type]
    if checkpoint is None:
        if model_type != "custom":
            raise WeightsError(model_type, "no checkpoint given; SAM needs weights: pass a local path, s3:// or "
                               "http(s):// URL of the official checkpoint (e.g. sam_vit_h_4b8939.pth)")
        return _build_sam(**arch, checkpoint=None).eval().to(device)
    path = resolve_weights(checkpoint, cache_dir=cache_dir)
    state = _load_state_dict(path)
    with torch.device("meta"):  # no random init of weights about to be replaced
        sam = _build_sam(**arch, checkpoint=None)
    _check_state_dict(sam, state, path, model_type)
    try:
        sam.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(str(path), f"cannot load into SAM {model_type}: {exc}") from exc
    sam.register_buffer("pixel_mean", torch.tensor(_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    sam.register_buffer("pixel_std", torch.tensor(_PIXEL_STD).view(-1, 1, 1), persistent=False)
    log.info("loaded SAM %s from %s", model_type, path)
    return sam.eval().to(device)


def _load_state_dict(path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError as exc:
        raise WeightsError(str(path), "is a folder; expected a checkpoint file saved with torch.save") from exc
    except Exception as exc:  # torch.load on arbitrary bytes raises anything (KeyError, UnpicklingError ...)
        raise WeightsError(str(path), f"not a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if isinstance(state, Mapping) and not any(str(k).startswith("image_encoder.") for k in state):
        for key in ("model", "state_dict"):  # training checkpoints wrap the weights
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(str(path), f"expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def _check_state_dict(sam, state: dict, path, model_type: str) -> None:
    """Raise a readable WeightsError when ``state`` does not fit ``sam`` (keys or shapes)."""
    expected = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if v]
    raise WeightsError(str(path), f"not a SAM {model_type} checkpoint: {'; '.join(problems)}. "
                       f"{_guess_architecture(state)}")


def _guess_architecture(state: dict) -> str:
    pos = state.get("image_encoder.pos_embed")
    if pos is None:
        return "It has no SAM image encoder (image_encoder.pos_embed)."
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    width = int(pos.shape[-1])
    for name, arch in SAM_ARCHITECTURES.items():
        if arch["encoder_embed_dim"] == width and arch["encoder_depth"] == depth:
            return f"It looks like a {name} checkpoint: pass model_type={name!r}."
    return f"Its image encoder (width {width}, {depth} blocks) matches none of {', '.join(SAM_ARCHITECTURES)}."
