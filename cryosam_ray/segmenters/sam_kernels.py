"""Float16-safe normalisation and fused attention for segment-anything's image encoder.

:func:`patch_image_encoder` swaps the classes of a loaded encoder's modules in place (weights,
state dict and hooks untouched): every ``LayerNorm2d`` computes in float32, and with
``attention="sdpa"`` every ``Attention`` runs ``F.scaled_dot_product_attention`` with SAM's
decomposed relative positions as the additive mask.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch.nn import functional as F


class Fp32LayerNorm2d(LayerNorm2d):
    """segment-anything's ``LayerNorm2d`` computed in float32 whatever the input's dtype.

    The stock module computes ``(x - u).pow(2)`` in the input dtype; in float16 (max 65504) that
    overflows once channel deviations pass ~256, the variance becomes inf and the output collapses
    to ``bias``. Same parameters and state dict; the output dtype is the stock module's
    (the promotion of the input's and the weights' dtypes).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), normalised over C."""
        y = x.float()
        u = y.mean(1, keepdim=True)
        s = (y - u).pow(2).mean(1, keepdim=True)
        y = (y - u) / torch.sqrt(s + self.eps)
        y = self.weight.float()[:, None, None] * y + self.bias.float()[:, None, None]
        return y.to(torch.promote_types(x.dtype, self.weight.dtype))


class SdpaAttention(Attention):
    """segment-anything's image-encoder ``Attention`` through ``F.scaled_dot_product_attention``.

    ``softmax(q k^T * scale + rel_h + rel_w) v`` as the stock module, with the decomposed
    relative-position terms (``add_decomposed_rel_pos``) passed as SDPA's additive mask: the
    bias is built once in the compute dtype (bf16 under autocast), and scores, softmax and the
    product with ``v`` run in one fused kernel (memory-efficient attention on CUDA) instead of
    three float32 passes over the (heads x N x N) scores.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) tokens -> (B, H, W, dim)."""
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative positions as an additive attention bias.

    Args:
        q: (B, heads, h * w, C) unscaled queries of an (h, w) token grid.
        rel_pos_h, rel_pos_w: (2h - 1, C), (2w - 1, C) relative position embeddings.
        size: (h, w).

    Returns:
        (B, heads, h * w, h * w) bias in ``q``'s dtype: bias[.., (i, j), (k, l)] =
        q(i, j) . Rh[i - k] + q(i, j) . Rw[j - l], the terms ``add_decomposed_rel_pos`` adds.
    """
    h, w = size
    r_q = q.reshape(*q.shape[:2], h, w, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, rel_pos_w))
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, h, w, h, w)
    return bias.reshape(*q.shape[:2], h * w, h * w).to(q.dtype)


def patch_image_encoder(image_encoder: torch.nn.Module, *, attention: str = "sdpa") -> torch.nn.Module:
    """Speed and float16 safety for a loaded SAM image encoder, in place (weights untouched).

    Every ``LayerNorm2d`` becomes a :class:`Fp32LayerNorm2d`; with ``attention="sdpa"`` every
    ``Attention`` becomes a :class:`SdpaAttention` ("eager": segment-anything's own). Classes
    are swapped on the existing modules, so parameters, state dict and hooks stay as they are.

    Returns:
        ``image_encoder``.

    Raises:
        ValueError: ``attention`` is neither "sdpa" nor "eager".
    """
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    for module in image_encoder.modules():
        if type(module) is LayerNorm2d:
            module.__class__ = Fp32LayerNorm2d
        elif type(module) is Attention and attention == "sdpa":
            module.__class__ = SdpaAttention
    return image_encoder
