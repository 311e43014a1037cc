"""Slice-encoder throughput: DINOv2 token maps and SAM image embeddings, slices per second.

    python benchmarks/bench_encoders.py [--dinov2 large] [--sam vit_h] [--slices 64] [--side 512] [--json FILE]

Models of the real architectures with random weights (nothing downloaded), saved and loaded
through the product's loading code; speed does not depend on the weights' values. On a GPU the
encoders run in half precision, as in production. Also prints what that means for one
200 x 512 x 512 tomogram (200 + 512 + 512 slices along z, y and x).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DINOV2 = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}


def _time(fn, warmup: int = 1, repeats: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def bench_dinov2(size: str, slices: np.ndarray, batch: int, tmp: Path) -> float:
    import transformers

    from cryosam_ray.encoders.dinov2 import Dinov2Encoder

    hidden, layers, heads = DINOV2[size]
    config = transformers.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=4 * hidden, patch_size=14, image_size=518)
    transformers.Dinov2Model(config).save_pretrained(tmp / "dinov2")
    encoder = Dinov2Encoder(model=str(tmp / "dinov2"), batch_size=batch, allow_hub=False)
    return len(slices) / _time(lambda: encoder.encode(slices))


def bench_sam(model_type: str, tomogram_path: Path, n: int, batch: int, tmp: Path) -> float:
    from cryosam_ray.segmenters.sam import SamSegmenter
    from cryosam_ray.tomo_io import open_tomogram

    torch.save(_random_sam_state(model_type), tmp / "sam.pth")
    seg = SamSegmenter(model_type=model_type, checkpoint=str(tmp / "sam.pth"), batch_size=batch)
    seg.set_tomogram(open_tomogram(tomogram_path))
    start = [0]

    def run():
        seg.embed_slices(0, range(start[0], start[0] + n))  # new slices each time: no cache hits
        start[0] += n
    return n / _time(run, warmup=1, repeats=1)


def _random_sam_state(model_type: str) -> dict:
    from segment_anything.build_sam import _build_sam

    from cryosam_ray.segmenters.sam import SAM_ARCHITECTURES

    return _build_sam(**SAM_ARCHITECTURES[model_type], checkpoint=None).state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dinov2", default="large", choices=[*DINOV2, "none"])
    parser.add_argument("--sam", default="vit_h", choices=["vit_h", "vit_l", "vit_b", "vit_tiny", "none"])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rng = np.random.default_rng(0)
    slices = rng.normal(size=(args.slices, args.side, args.side)).astype(np.float32)
    result = {"device": device, "side": args.side}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dinov2 != "none":
            result[f"dinov2_{args.dinov2}_slices_per_s"] = bench_dinov2(args.dinov2, slices, args.batch, tmp)
        if args.sam != "none":
            from cryosam_ray.tomo_io import write_mrc

            write_mrc(tmp / "t.mrc", rng.normal(size=(3 * args.slices, 64, args.side)).astype(np.float32), 10.0)
            result[f"sam_{args.sam}_slices_per_s"] = bench_sam(args.sam, tmp / "t.mrc", args.slices, args.batch, tmp)
    per_tomogram = 200 + 512 + 512
    print(f"\n{'encoder':<28}{'slices/s':>10}{'s per 200x512x512 tomogram':>30}   ({device})")
    for key, rate in result.items():
        if key.endswith("_slices_per_s"):
            print(f"{key[:-13]:<28}{rate:>10.1f}{per_tomogram / rate:>30.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
