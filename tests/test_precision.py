"""Precision settings: the float16 failure of SAM's LayerNorm2d, its fixes, and what "auto" resolves to.

SAM ViT-H's image encoder in pure float16 gives garbage masks (segment-anything issues 540 and
696): ``LayerNorm2d`` squares ``x - mean`` in the input dtype, and once channel deviations pass
~256 the square passes float16's maximum (65504), the variance is inf and the output collapses to
the bias. These tests rebuild that on the CPU with activations of a few hundred to a thousand,
and hold the paths this package runs to float32's answer:

- bf16 autocast (the default on GPUs with native bfloat16): bfloat16 has float32's exponent
  range, so nothing overflows; tolerance 2% of the output's range (bf16 keeps 8 mantissa bits).
- fp16 with :class:`~cryosam_ray.segmenters.sam_kernels.Fp32LayerNorm2d`: float16 weights and
  activations, normalisation in float32; tolerance 1% of the output's range (float16 input
  rounding of values near 1000 is 0.5).
"""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d

from cryosam_ray.config import load_config
from cryosam_ray.errors import ConfigError
from cryosam_ray.segmenters.sam_kernels import Fp32LayerNorm2d, patch_image_encoder
from cryosam_ray.weights import native_bf16, resolve_precision

from tiny_models import tiny_sam

BF16_TOL = 0.02  # of the float32 output's range
FP16_TOL = 0.01


def _activations(seed: int = 0) -> torch.Tensor:
    """(2, 64, 8, 8) float32 at the scale that overflows float16 when squared: mean ~600, spread ~300."""
    g = torch.Generator().manual_seed(seed)
    return 600.0 + 300.0 * torch.randn(2, 64, 8, 8, generator=g)


def _norm(cls=LayerNorm2d, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    norm = cls(64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    return norm


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's range (inf if out is not finite)."""
    out, ref = out.detach().float(), ref.detach()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / (ref.max() - ref.min()))


def test_stock_layernorm2d_overflows_in_float16():
    x, norm = _activations(), _norm()
    ref = norm(x)
    centred = (x - x.mean(1, keepdim=True)).half()
    assert torch.isinf(centred.pow(2)).any()  # the square passes 65504
    half = copy.deepcopy(norm).half()
    out = half(x.half())
    # The variance is inf, so every normalised value is 0 and the output is the bias alone.
    torch.testing.assert_close(out.float(), half.bias.float()[None, :, None, None].expand_as(out), rtol=0, atol=0)
    assert _err(out, ref) > 0.2


def test_fp32_layernorm2d_fixes_float16():
    x, norm = _activations(), _norm()
    ref = norm(x)
    safe = _norm(Fp32LayerNorm2d)
    safe.load_state_dict(norm.state_dict())
    torch.testing.assert_close(safe(x), ref, rtol=0, atol=0)  # float32: the stock computation exactly
    out = safe.half()(x.half())
    assert out.dtype == torch.float16
    assert _err(out, ref) < FP16_TOL


def test_bf16_autocast_keeps_the_range():
    x, norm = _activations(), _norm()
    conv = torch.nn.Conv2d(64, 64, 1, bias=False)
    torch.nn.init.eye_(conv.weight[:, :, 0, 0])  # identity: the norm sees the activations, in bf16
    ref = norm(conv(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = norm(conv(x))
        safe = patch_image_encoder(torch.nn.Sequential(conv, copy.deepcopy(norm)))(x)
    assert isinstance(safe, torch.Tensor) and safe.dtype == torch.float32
    assert _err(stock, ref) < BF16_TOL  # even the stock module: bf16 does not overflow
    assert _err(safe, ref) < BF16_TOL


@pytest.fixture(scope="module")
def hot_encoder():
    """A tiny SAM image encoder whose neck sees activations ~1e3 (the ViT-H failure on a small model)."""
    torch.manual_seed(0)
    encoder = tiny_sam().image_encoder
    with torch.no_grad():
        encoder.neck[0].weight.mul_(3000.0)  # the 1x1 conv before the first LayerNorm2d
    x = torch.randn(1, 3, 1024, 1024)
    return encoder, x


def test_sam_encoder_in_float16_stock_vs_safe(hot_encoder):
    encoder, x = hot_encoder
    with torch.inference_mode():
        ref = encoder(x)
        pre_norm = encoder.neck[0](encoder.blocks[-1](encoder.blocks[0](encoder.patch_embed(x) + encoder.pos_embed))
                                   .permute(0, 3, 1, 2))
        assert pre_norm.std(dim=1).mean() > 256  # squares of deviations pass float16's maximum
        stock = copy.deepcopy(encoder).half()(x.half())
        safe = patch_image_encoder(copy.deepcopy(encoder)).half()(x.half())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = patch_image_encoder(copy.deepcopy(encoder))(x)
    assert _err(stock, ref) > 0.2  # pure float16: wrong embeddings, no error raised
    assert _err(safe, ref) < FP16_TOL
    assert _err(bf16, ref) < BF16_TOL


# ---- what "auto" means ------------------------------------------------------------------------

@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA GPU of a chosen compute capability (nothing runs on it)."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


def test_auto_is_fp32_on_cpu():
    p = resolve_precision("auto", torch.device("cpu"), setting="segmenter.sam.precision")
    assert (p.name, p.weights, p.autocast) == ("fp32", torch.float32, None)
    bf16 = resolve_precision("bf16", torch.device("cpu"), setting="segmenter.sam.precision")
    assert (bf16.name, bf16.weights, bf16.autocast) == ("bf16", torch.float32, torch.bfloat16)


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32"),
                                                  ((6, 0), "fp32")])
def test_auto_on_cuda_follows_native_bf16(gpu, capability, expected):
    gpu["value"] = capability
    device = torch.device("cuda:0")
    assert native_bf16(device) == (expected == "bf16")
    assert resolve_precision("auto", device, setting="encoder.dinov2.precision").name == expected


def test_explicit_choices_on_cuda(gpu):
    gpu["value"] = (7, 0)  # a V100: no native bfloat16
    device = torch.device("cuda")
    fp16 = resolve_precision("fp16", device, setting="segmenter.sam.precision")
    assert (fp16.name, fp16.weights, fp16.autocast) == ("fp16", torch.float16, None)  # asked for: given
    with pytest.raises(ConfigError, match=r"segmenter\.sam\.precision=bf16: cuda \(compute capability 7\.0; "
                       r"needs 8\.0 or newer\) has no native bfloat16"):
        resolve_precision("bf16", device, setting="segmenter.sam.precision")
    with pytest.raises(ConfigError, match=r"encoder\.dinov2\.precision: expected one of auto, fp32, bf16, fp16"):
        resolve_precision("float16", device, setting="encoder.dinov2.precision")


def test_precision_autocast_context_on_cpu():
    p = resolve_precision("bf16", torch.device("cpu"), setting="x")
    lin = torch.nn.Linear(4, 4)
    with p.context(torch.device("cpu")):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with resolve_precision("fp32", torch.device("cpu"), setting="x").context(torch.device("cpu")):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


# ---- config keys ------------------------------------------------------------------------------

def test_config_precision_keys_default_to_auto():
    cfg = load_config()
    assert cfg.segmenter.sam.precision == "auto" and cfg.encoder.dinov2.precision == "auto"
    assert cfg.segmenter.sam.attention == "sdpa" and cfg.encoder.dinov2.attention == "sdpa"
    assert cfg.segmenter.sam.compile is False and cfg.encoder.dinov2.compile is False
    with pytest.raises(ConfigError, match=r"segmenter\.sam\.precision"):
        load_config(None, {"segmenter.sam.precision": "half"})


@pytest.mark.parametrize("old, new", [("auto", "auto"), ("float32", "fp32"), ("bfloat16", "bf16"),
                                      ("float16", "fp16")])
def test_old_dinov2_dtype_key_maps_to_precision(old, new):
    with pytest.warns(FutureWarning, match=f"write precision: {new}"):
        cfg = load_config(None, {"encoder.dinov2.dtype": old})
    assert cfg.encoder.dinov2.precision == new
    assert "dtype" not in cfg.encoder.dinov2.model_dump()


def test_old_dinov2_dtype_key_errors():
    with pytest.raises(ConfigError, match="dtype is replaced by precision"):
        load_config(None, {"encoder.dinov2.dtype": "float8"})
    with pytest.raises(ConfigError, match=r"both dtype \('float16'\) and precision \('bf16'\) are set"):
        load_config(None, {"encoder.dinov2.dtype": "float16", "encoder.dinov2.precision": "bf16"})


def test_paper_config_runs_the_real_models_at_auto_precision():
    cfg = load_config("paper")
    assert cfg.encoder.dinov2.model == "facebook/dinov2-with-registers-large"
    assert cfg.segmenter.sam.model_type == "vit_h"
    assert cfg.segmenter.sam.precision == "auto" and cfg.encoder.dinov2.precision == "auto"
    assert cfg.segmenter.sam.attention == "sdpa" and cfg.encoder.dinov2.attention == "sdpa"
