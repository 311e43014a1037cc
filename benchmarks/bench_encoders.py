"""Slice-encoder throughput against the device's FLOP floor: DINOv2 and the SAM image encoder.

    python benchmarks/bench_encoders.py [--dinov2 large] [--sam vit_h] [--slices 256] [--side 512]
        [--dinov2-batch 64] [--sam-batch 16] [--precision auto] [--attention sdpa] [--compile] [--json FILE]
    python benchmarks/bench_encoders.py --dinov2 tiny --sam tiny --slices 4   # a quick check on a CPU
    python benchmarks/bench_encoders.py --flops-only   # FLOPs per slice of ViT-L/14 and ViT-H, no timing

One run measures, on the same device:

1. the matrix-product peak: square products of --peak-size (bf16 on a GPU, float32 on a CPU,
   the precision the encoders use there by default), TFLOP/s = 2 n^3 / time;
2. the FLOPs of one slice through each encoder's architecture: matrix products, convolutions and
   attention (2 per multiply-add; normalisations, softmax and activations are not counted).
   DINOv2 ViT-L/14 at 518 px: 37 x 37 = 1369 patch tokens + CLS + 4 registers, 24 blocks;
   SAM ViT-H at 1024 px: 64 x 64 tokens, 14 x 14 windows (the grid padded to 70 x 70) except the
   global blocks 7, 15, 23, 31, decomposed relative positions, the neck. Counted from the
   architecture (:func:`dinov2_flops`, :func:`sam_encoder_flops`) and checked against torch's
   FlopCounterMode on meta tensors of the real modules (nothing allocated);
3. each encoder's slices/s with random weights (speed does not depend on their values), saved
   and loaded through the product's loading code, on --side x --side slices;
4. the achieved fraction of the floor: slices/s x FLOPs per slice / peak.

Needs torch, transformers, segment-anything, mrcfile (the SAM tomogram comes from cryosam_ray.tomo_io);
not Ray, zarr or s3fs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# hidden size, blocks, heads (MLP 4x hidden); ViT-g is left out: its SwiGLU MLP is another count.
DINOV2 = {"tiny": (32, 2, 2), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
PATCH, REGISTERS = 14, 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, *, warmup: int = 1, repeats: int = 3) -> float:
    """Seconds per call of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Measured FLOP/s of (n x n) @ (n x n) products in ``dtype`` on ``device`` (random data)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _time(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2.0 * n ** 3 / seconds


# ---- FLOPs of the architectures --------------------------------------------------------------

def _vit_block(tokens: int, dim: int, mlp: int) -> int:
    """Linear layers of one ViT block on ``tokens`` tokens: qkv, projection, 2-layer MLP."""
    return 2 * tokens * dim * (3 * dim + dim) + 2 * 2 * tokens * dim * mlp


def dinov2_flops(hidden: int, layers: int, *, image_size: int = 518, registers: int = REGISTERS) -> int:
    """FLOPs of one slice through a DINOv2 backbone (patch 14, MLP 4x) at ``image_size`` pixels:
    patch embedding, then per block qkv / projection / MLP on all tokens and QK^T, AV."""
    patches = (image_size // PATCH) ** 2
    tokens = patches + 1 + registers
    embed = 2 * patches * (3 * PATCH * PATCH) * hidden
    attention = 2 * 2 * tokens * tokens * hidden
    return embed + layers * (_vit_block(tokens, hidden, 4 * hidden) + attention)


def sam_encoder_flops(dim: int, depth: int, global_blocks: tuple[int, ...], *, img_size: int = 1024,
                      patch: int = 16, window: int = 14, out_chans: int = 256) -> int:
    """FLOPs of one slice through SAM's ``ImageEncoderViT``: patch embedding; per block the MLP on
    the grid's tokens, qkv / projection / QK^T / AV / relative positions on the attention's tokens
    (windowed blocks: the grid padded to a multiple of ``window``, attention within windows); the
    neck (1x1 conv to ``out_chans``, 3x3 conv)."""
    grid = img_size // patch
    tokens = grid * grid
    padded = -(-grid // window) * window
    total = 2 * tokens * (3 * patch * patch) * dim
    for index in range(depth):
        if index in global_blocks:
            n_tok, per, side = tokens, tokens, grid
        else:
            n_tok, per, side = padded * padded, window * window, window
        total += 2 * n_tok * dim * 4 * dim  # qkv, projection
        total += 2 * 2 * n_tok * per * dim  # QK^T, AV (per window: per x per, summed over windows)
        total += 2 * 2 * n_tok * dim * side  # decomposed relative positions: q . R_h, q . R_w
        total += 2 * 2 * tokens * dim * 4 * dim  # MLP, on the unpadded grid
    total += 2 * tokens * dim * out_chans + 2 * tokens * out_chans * out_chans * 9
    return total


def counted_flops(module: torch.nn.Module, *inputs, **kwargs) -> int:
    """FLOPs of one forward pass by torch's FlopCounterMode (meta tensors: shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs, **kwargs)
    return int(counter.get_total_flops())


def _dinov2_config(size: str, registers: int):
    import transformers

    hidden, layers, heads = DINOV2[size]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, patch_size=PATCH, image_size=518)
    if registers:
        return transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=registers)
    return transformers.Dinov2Config(**common)


def dinov2_model(size: str, registers: int):
    import transformers

    config = _dinov2_config(size, registers)
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    return cls(config)


# A 2-block, 32-wide SAM image encoder (``model_type: custom``): a quick check on a CPU.
TINY_SAM = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,))


def sam_architecture(name: str) -> dict:
    """The image-encoder sizes of a registry SAM, or of the tiny one."""
    from cryosam_ray.segmenters.sam_build import SAM_ARCHITECTURES

    return TINY_SAM if name == "tiny" else SAM_ARCHITECTURES[name]


def check_flops(dinov2: str, registers: int, image_size: int, sam: str) -> dict:
    """Analytic and counted FLOPs per slice of the two architectures."""
    from segment_anything.build_sam import _build_sam

    out = {}
    if dinov2 != "none":
        with torch.device("meta"):
            model = dinov2_model(dinov2, registers)
            pixels = torch.empty(1, 3, image_size, image_size)
        hidden, layers, _ = DINOV2[dinov2]
        out["dinov2"] = (dinov2_flops(hidden, layers, image_size=image_size, registers=registers),
                         counted_flops(model, pixel_values=pixels))
    if sam != "none":
        arch = sam_architecture(sam)
        with torch.device("meta"):
            encoder = _build_sam(**arch, checkpoint=None).image_encoder
            image = torch.empty(1, 3, 1024, 1024)
        out["sam"] = (sam_encoder_flops(arch["encoder_embed_dim"], arch["encoder_depth"],
                                        tuple(arch["encoder_global_attn_indexes"])), counted_flops(encoder, image))
    return out


# ---- throughput -------------------------------------------------------------------------------

def bench_dinov2(args, slices: np.ndarray, tmp: Path) -> tuple[float, str]:
    from cryosam_ray.encoders.dinov2 import Dinov2Encoder

    dinov2_model(args.dinov2, args.registers).save_pretrained(tmp / "dinov2")
    encoder = Dinov2Encoder(model=str(tmp / "dinov2"), image_size=args.image_size, batch_size=args.dinov2_batch,
                            precision=args.precision, attention=args.attention, compile=args.compile,
                            allow_hub=False)
    seconds = _time(lambda: encoder.encode(slices), encoder.device, warmup=1, repeats=args.repeats)
    return len(slices) / seconds, encoder.precision.name


def bench_sam(args, volume: np.ndarray, tmp: Path) -> tuple[float, str]:
    from segment_anything.build_sam import _build_sam

    from cryosam_ray.segmenters.sam import SamSegmenter
    from cryosam_ray.tomo_io import Tomogram

    arch = sam_architecture(args.sam)
    torch.save(_build_sam(**arch, checkpoint=None).state_dict(), tmp / "sam.pth")
    seg = SamSegmenter(model_type="custom" if args.sam == "tiny" else args.sam, checkpoint=str(tmp / "sam.pth"),
                       architecture=arch if args.sam == "tiny" else None, batch_size=args.sam_batch,
                       precision=args.precision, attention=args.attention, compile=args.compile,
                       cache_slices=max(1, args.sam_batch))
    seg.set_tomogram(Tomogram("memory://bench/TS_bench", volume, 10.0))
    n, start = args.slices, [0]

    def run():
        seg.embed_slices(0, range(start[0], start[0] + n))  # new slices each time: no cache hits
        start[0] += n

    return n / _time(run, seg.device, warmup=1, repeats=args.repeats), seg.precision.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dinov2", default="large", choices=[*DINOV2, "none"])
    parser.add_argument("--registers", type=int, default=REGISTERS, help="DINOv2 register tokens (0: none)")
    parser.add_argument("--image-size", type=int, default=518, help="DINOv2 input side")
    parser.add_argument("--sam", default="vit_h", choices=["vit_h", "vit_l", "vit_b", "tiny", "none"])
    parser.add_argument("--slices", type=int, default=256, help="slices per timed pass")
    parser.add_argument("--side", type=int, default=512, help="slice side in pixels")
    parser.add_argument("--dinov2-batch", type=int, default=64)
    parser.add_argument("--sam-batch", type=int, default=16)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (after one warm-up)")
    parser.add_argument("--peak-size", type=int, default=None, help="matrix side for the peak (8192 GPU, 1024 CPU)")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOPs per slice and stop")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.flops_only:
        for key, (analytic, counted) in check_flops(args.dinov2, args.registers, args.image_size, args.sam).items():
            print(f"{key}: {analytic / 1e9:.1f} GFLOP per slice (FlopCounterMode: {counted / 1e9:.1f})")
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak_n = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak(device, peak_n, peak_dtype)
    flops = check_flops(args.dinov2, args.registers, args.image_size, args.sam)

    rng = np.random.default_rng(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dinov2 != "none":
            slices = rng.normal(size=(args.slices, args.side, args.side)).astype(np.float32)
            rate, precision = bench_dinov2(args, slices, tmp)
            label = f"dinov2_{args.dinov2}{'_reg' if args.registers else ''}_{args.image_size}px"
            rows[label] = (rate, precision, flops["dinov2"][0])
        if args.sam != "none":
            volume = rng.normal(size=((1 + args.repeats) * args.slices, 64, args.side)).astype(np.float32)
            rate, precision = bench_sam(args, volume, tmp)
            rows[f"sam_{args.sam}_encoder_1024px"] = (rate, precision, flops["sam"][0])

    print(f"\n{name}: {str(peak_dtype).removeprefix('torch.')} matrix-product peak {peak / 1e12:.3g} TFLOP/s "
          f"({peak_n}^3)")
    for key, (analytic, counted) in flops.items():
        print(f"{key}: {analytic / 1e9:.1f} GFLOP per slice (FlopCounterMode: {counted / 1e9:.1f})")
    per_tomogram = 200 + 512 + 512
    print(f"\n{'encoder':<32}{'precision':>10}{'slices/s':>10}{'TFLOP/s':>9}{'of peak':>9}"
          f"{'s / 200x512x512 (3 axes)':>27}")
    result = {"device": name, "peak_dtype": str(peak_dtype).removeprefix("torch."), "peak_tflops": peak / 1e12,
              "side": args.side, "slices": args.slices, "flops_per_slice": {}, "encoders": {}}
    for key, (rate, precision, per_slice) in rows.items():
        achieved = rate * per_slice
        print(f"{key:<32}{precision:>10}{rate:>10.1f}{achieved / 1e12:>9.3g}{achieved / peak:>9.0%}"
              f"{per_tomogram / rate:>27.1f}")
        result["encoders"][key] = {"slices_per_s": rate, "precision": precision, "flops_per_slice": per_slice,
                                   "achieved_tflops": achieved / 1e12, "fraction_of_peak": achieved / peak}
    result["flops_per_slice"] = {k: {"analytic": a, "flop_counter": c} for k, (a, c) in flops.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
