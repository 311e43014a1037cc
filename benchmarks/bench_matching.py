"""Naive vs Hierarchical Feature Matching: time and recall on a large synthetic tomogram.

    python benchmarks/bench_matching.py [--shape 200 512 512] [--snr 0.5] [--json FILE]

One ribosome is prompted (its instance segmented with the classical backend, as in the
pipeline); its masked-average query is matched against the whole tomogram by both methods with
the same tau_sim, NMS radius and K. Recall = fraction of the tomogram's ribosomes with a
proposal within one particle radius. Prints a table; ``--json`` writes
{"naive_s", "hierarchical_s", "speedup", "naive_recall", "hierarchical_recall"}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from cryosam_ray.encoders.filterbank import FilterBankEncoder
from cryosam_ray.features import compute_features
from cryosam_ray.matching import SimilarityField, hierarchical_match, naive_match, query_feature
from cryosam_ray.propagation import propagate
from cryosam_ray.segmenters.classical import ClassicalSegmenter
from cryosam_ray.synth import SynthSettings, synthesize
from cryosam_ray.tomo_io import open_tomogram, write_mrc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512), metavar=("D", "H", "W"))
    parser.add_argument("--snr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--particles", type=int, default=60, help="particles attempted per class")
    parser.add_argument("--tau-sim", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--builtin-shapes", action="store_true")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()

    t = time.perf_counter()
    settings = SynthSettings(shape=tuple(args.shape), snr=args.snr, particles_per_class=args.particles,
                             use_real_maps=not args.builtin_shapes)
    synth = synthesize(settings, seed=args.seed)
    ribosomes = [r for r in synth.truth if r["class"] == "ribosome"]
    truth = np.array([[r["z"], r["y"], r["x"]] for r in ribosomes])
    radius = float(np.median([r["radius"] for r in ribosomes]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.mrc"
        write_mrc(path, synth.volume, settings.voxel_size_a)
        tomo = open_tomogram(path)
        print(f"synthesised {tomo.shape} with {len(ribosomes)} ribosomes in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        volume = compute_features(tomo, FilterBankEncoder())
        print(f"filter-bank features ({volume.channels} channels per axis) in {time.perf_counter() - t:.1f} s")
        instance = propagate(ClassicalSegmenter(), tomo, truth[:1])[0]
        query = query_feature(volume, [np.argwhere(instance.mask) + np.asarray(instance.bbox[:3])])
        nms_radius = 0.6 * radius

        t = time.perf_counter()
        naive = naive_match(volume, query, tau_sim=args.tau_sim, nms_radius=nms_radius, top_k=args.top_k)
        naive_s = time.perf_counter() - t
        t = time.perf_counter()
        hier = hierarchical_match(SimilarityField(volume, query[None]), tau_sim=args.tau_sim, nms_radius=nms_radius,
                                  top_k=args.top_k)
        hier_s = time.perf_counter() - t

    def recall(proposals) -> float:
        if not len(proposals):
            return 0.0
        distance, _ = cKDTree(proposals.zyx).query(truth)
        return float(np.mean(distance <= radius))

    result = {"naive_s": naive_s, "hierarchical_s": hier_s, "speedup": naive_s / hier_s,
              "naive_recall": recall(naive), "hierarchical_recall": recall(hier)}
    print(f"\n{'method':<14}{'time (s)':>10}{'voxels scored':>16}{'proposals':>11}{'recall':>8}")
    print(f"{'naive':<14}{naive_s:>10.3f}{naive.evaluated:>16,}{len(naive):>11}{result['naive_recall']:>8.3f}")
    print(f"{'hierarchical':<14}{hier_s:>10.3f}{hier.evaluated:>16,}{len(hier):>11}{result['hierarchical_recall']:>8.3f}")
    ratio = result["hierarchical_recall"] / result["naive_recall"] if result["naive_recall"] else float("nan")
    print(f"\nspeed-up {result['speedup']:.1f}x; hierarchical recall = {ratio:.3f} of naive's")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
