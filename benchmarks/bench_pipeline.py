"""The pipeline's throughput: on Ray against in process (weight-free backends), or the real
architectures on one GPU (--gpu).

    python benchmarks/bench_pipeline.py [--n 4] [--shape 64 128 128] [--cpus 2] [--json FILE]
    python benchmarks/bench_pipeline.py --gpu [--shape 200 512 512] [--dinov2 large] [--sam vit_h]
        [--directions six] [--proposals 512] [--steps 10] [--json FILE]
    python benchmarks/bench_pipeline.py --gpu --shape 16 64 64 --dinov2 tiny --sam tiny --proposals 8 --steps 2
    python benchmarks/bench_pipeline.py --s3 [--n 2] [--shape 64 128 128] [--json FILE]

Ray mode: synthesises a dataset (one ribosome prompt), then runs `cryosam run` on the same
tomograms with the same weight-free backends: in process (no Ray), on Ray with one encoder and
one segmenter actor, and on Ray with two of each. One local Ray is started first and shared, so
its start-up (reported apart) is not in the runs' times. Prints tomograms per hour, per-stage
times, the Ray / in-process overhead ratio at one worker and the speed-up from one to two workers.

--gpu mode (:func:`run_gpu`): one synthetic tomogram through the pipeline's stage
functions in this process, with random-weight models of the real architectures (DINOv2
ViT-L/14 with registers, SAM ViT-H) on the GPU (on the CPU when there is none, for a smoke run
with small shapes and models); prints the time of each stage, tomograms per hour per GPU and
the peak GPU memory. It imports neither Ray nor zarr nor s3fs (no feature or embedding store).

--s3 mode (:func:`run_s3`): the same in-process job twice, on local files and with its
tomograms, prompts, features and outputs on a local S3 endpoint (moto on 127.0.0.1); prints
the wall times and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _prompts(data: Path, out: Path) -> Path:
    with open(data / "truth.csv") as handle:
        first = next(r for r in csv.DictReader(handle) if r["class"] == "ribosome")
    out.write_text(f"tomogram,z,y,x,class\n{first['tomogram']},{first['z']},{first['y']},{first['x']},ribosome\n")
    (data / "prompts.csv").unlink()
    return out


def _cfg(workers: int, cpus_per_actor: float, task_cpus: float):
    from cryosam_ray.config import load_config

    return load_config(None, {"ray.address": "auto", "ray.encoders.size": workers, "ray.segmenters.size": workers,
                              "ray.encoders.num_cpus": cpus_per_actor, "ray.segmenters.num_cpus": cpus_per_actor,
                              "ray.task_cpus": task_cpus})


# ---- --gpu: the real architectures, in process -------------------------------------------------

# What the --gpu mode imports beyond torch (the GPU machine may lack some: carry their wheels).
GPU_MODULES = {"transformers": "transformers", "segment_anything": "segment-anything", "scipy": "scipy",
               "pyarrow": "pyarrow", "pydantic": "pydantic", "yaml": "pyyaml", "fsspec": "fsspec",
               "mrcfile": "mrcfile (cryosam_ray.tomo_io imports it; masks are written as MRC)"}
STAGES = ("dinov2 (3 axes)", "sam embedding", "prompt propagation", "matching", "proposal propagation", "writing")


def _check_gpu_imports() -> None:
    import importlib.util

    missing = [pip for module, pip in GPU_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"--gpu needs {', '.join(missing)}; install or carry their wheels (Ray, zarr and s3fs "
                         "are not needed)")


class _Clock:
    """Stage seconds, the device synchronised at each boundary so queued GPU work is counted."""

    def __init__(self, device):
        self.device, self.seconds = device, dict.fromkeys(STAGES, 0.0)

    def now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, stage: str, fn):
        """``fn`` with its time added to ``stage``."""
        def wrapper(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += self.now() - start
        return wrapper


def run_gpu(args) -> None:
    """One tomogram through the stages, real architectures with random weights, in process.

    Workload: random weights give no real masks, so the work of real particles is imposed:
    propagation's IoU stop is off (``propagation.iou_threshold=0``) and every front walks
    ``--steps`` slices (``propagation.max_steps``); candidates are not filtered by area or
    predicted IoU; matching keeps its best ``--proposals`` (``tau_sim`` null, NMS radius 8
    voxels), all propagated together (``instances.batch``), so each step is one decoder pass
    over all fronts (``--decode-batch`` requests per call). The counts of proposals, decoder
    requests and embedded slices are printed with the times. SAM embedding time (slices encoded
    when propagation first visits them) is taken out of the two propagation stages.
    """
    _check_gpu_imports()
    import torch
    from segment_anything.build_sam import _build_sam

    from bench_encoders import dinov2_model, sam_architecture
    from cryosam_ray.config import load_config
    from cryosam_ray.encoders import build_encoder
    from cryosam_ray.features import AxisMaps, FeatureVolume, encode_shard, slice_shape
    from cryosam_ray.stages.match import match_classes
    from cryosam_ray.stages.outputs import write_masks
    from cryosam_ray.stages.particles import particles_of_tomogram
    from cryosam_ray.stages.prompts import segment_prompts
    from cryosam_ray.stages.query import build_queries
    from cryosam_ray.segmenters import build_segmenter
    from cryosam_ray.synth import SynthSettings, synthesize
    from cryosam_ray.tables import Point
    from cryosam_ray.tomo_io import Tomogram

    shape = tuple(args.shape or (200, 512, 512))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    classes = ("ribosome",) if min(shape) >= 64 else ("ball",)  # a ribosome is ~26 voxels across
    synth = synthesize(SynthSettings(shape=shape, classes=classes, particles_per_class=64, use_real_maps=False,
                                     snr=0.5), seed=11, name="TS_bench")
    if not synth.truth:
        raise SystemExit(f"no {classes[0]} fits in {shape}; use a larger --shape")
    tomo = Tomogram("memory://bench/TS_bench.mrc", synth.volume, 10.0)
    tomo.stats  # noqa: B018 (robust statistics, as the runner computes before any stage)
    first = synth.truth[0]
    prompts = [Point("TS_bench", float(first["z"]), float(first["y"]), float(first["x"]), classes[0])]
    print(f"synthesised {shape} with {len(synth.truth)} {classes[0]} particles in {time.perf_counter() - t:.1f} s "
          "(not counted)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dinov2_model(args.dinov2, args.registers).save_pretrained(tmp / "dinov2")
        arch = sam_architecture(args.sam)
        torch.save(_build_sam(**arch, checkpoint=None).state_dict(), tmp / "sam.pth")
        custom = {"segmenter.sam.model_type": "custom", "segmenter.sam.architecture": dict(arch)} \
            if args.sam == "tiny" else {"segmenter.sam.model_type": args.sam}
        cfg = load_config("paper", {
            **custom, "segmenter.sam.checkpoint": str(tmp / "sam.pth"),
            "segmenter.sam.precision": args.precision, "segmenter.sam.compile": args.compile,
            "segmenter.sam.batch_size": args.sam_batch, "segmenter.sam.decode_batch": args.decode_batch,
            "segmenter.sam.cache_slices": sum(shape), "segmenter.sam.min_area": 1,
            "segmenter.sam.min_pred_iou": float("-inf"),
            "encoder.dinov2.model": str(tmp / "dinov2"), "encoder.dinov2.image_size": args.image_size,
            "encoder.dinov2.batch_size": args.dinov2_batch, "encoder.dinov2.precision": args.precision,
            "encoder.dinov2.compile": args.compile, "encoder.dinov2.allow_hub": False,
            "propagation.directions": args.directions, "propagation.iou_threshold": 0.0,
            "propagation.max_steps": args.steps, "matching.top_k": args.proposals, "matching.tau_sim": None,
            "matching.nms_radius": 8.0, "instances.batch": args.proposals})
        t = time.perf_counter()
        encoder, segmenter = build_encoder(cfg.encoder), build_segmenter(cfg.segmenter)
        print(f"built DINOv2 {args.dinov2} and SAM {args.sam} on {device} in {time.perf_counter() - t:.1f} s "
              f"(not counted); precision {encoder.precision.name} / {segmenter.precision.name}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        clock = _Clock(device)
        counts = {"decoder_requests": 0, "embedded_slices": 0}
        encode, predict = segmenter._encode, segmenter.predict

        def counted_encode(axis, indices):
            counts["embedded_slices"] += len(indices)
            return encode(axis, indices)

        def counted_predict(requests):
            requests = list(requests)
            counts["decoder_requests"] += len(requests)
            return predict(requests)

        segmenter._encode = clock.timed("sam embedding", counted_encode)
        segmenter.predict = counted_predict

        def propagation(stage: str, fn, *a):
            before = clock.seconds["sam embedding"]
            start = clock.now()
            out = fn(*a)
            clock.seconds[stage] += clock.now() - start - (clock.seconds["sam embedding"] - before)
            return out

        wall = clock.now()
        particles = propagation("prompt propagation", segment_prompts, tomo, prompts, segmenter, cfg)

        def features():
            axes = []
            for axis in range(3):
                hw = slice_shape(tomo.shape, axis)
                maps = np.zeros((tomo.shape[axis], *encoder.token_grid(hw), encoder.feature_dim), np.float32)
                for start in range(0, tomo.shape[axis], args.dinov2_batch):
                    stop = min(tomo.shape[axis], start + args.dinov2_batch)
                    maps[start:stop] = encode_shard(tomo, encoder, axis, start, stop)
                axes.append(AxisMaps(axis, maps, hw))
            return FeatureVolume(tomo.shape, axes)

        volume = clock.timed("dinov2 (3 axes)", features)()
        queries = clock.timed("matching", lambda: build_queries({"TS_bench": particles}, {"TS_bench": volume}))()
        proposals = clock.timed("matching", match_classes)(volume, queries, cfg) if queries else {}
        found = propagation("proposal propagation", particles_of_tomogram, tomo, volume, queries, proposals,
                            particles, segmenter, cfg) if queries else []
        clock.timed("writing", write_masks)(str(tmp / "out"), tomo, found, sorted(queries))
        wall = clock.now() - wall

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    n_prop = sum(len(p) for p in proposals.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}: one {shape[0]} x {shape[1]} x {shape[2]} tomogram, DINOv2 {args.dinov2} "
          f"({args.registers} registers, {args.image_size} px), SAM {args.sam}, {args.directions} directions, "
          f"{args.steps} steps per front")
    print(f"{'stage':<24}{'seconds':>10}")
    for stage in STAGES:
        print(f"{stage:<24}{clock.seconds[stage]:>10.2f}")
    print(f"{'whole tomogram':<24}{wall:>10.2f}   ({3600 / wall:.0f} tomograms per hour per GPU)")
    print(f"{n_prop} proposals, {len(found)} particles, {counts['decoder_requests']} decoder requests, "
          f"{counts['embedded_slices']} slices embedded by SAM, peak GPU memory "
          f"{'n/a (CPU)' if peak is None else f'{peak:.1f} GiB'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "shape": list(shape), "dinov2": args.dinov2, "sam": args.sam,
            "precision": [encoder.precision.name, segmenter.precision.name], "directions": args.directions,
            "steps": args.steps, "stage_s": clock.seconds, "wall_s": wall, "tomograms_per_hour": 3600 / wall,
            "proposals": n_prop, "particles": len(found), "peak_gpu_memory_gib": peak, **counts}, indent=2))


def _dataset(args, root: Path) -> tuple[Path, Path]:
    """The benchmark's synthetic tomograms in ``root/data`` and their one-ribosome prompts file."""
    from cryosam_ray.synth import SynthSettings, write_dataset

    data = root / "data"
    write_dataset(str(data), n=args.n, seed=11, settings=SynthSettings(shape=tuple(args.shape), snr=0.5,
                                                                        use_real_maps=False))
    return data, _prompts(data, root / "prompts.csv")


def run_s3(args) -> None:
    """The same in-process job on local files and through a local S3 endpoint; prints the ratio."""
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    from cryosam_ray.config import load_config
    from cryosam_ray.executors.in_process import run_in_process

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the endpoint's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data, prompts = _dataset(args, root)
            fs = fsspec.filesystem("s3")
            for path in sorted(data.glob("synth_*.mrc")):
                if not path.name.endswith("_labels.mrc"):
                    fs.put_file(str(path), f"bench/data/{path.name}")
            fs.put_file(str(prompts), "bench/prompts.csv")
            cfg = load_config(None, {"io.cache_dir": str(root / "cache")})
            t = time.perf_counter()
            local_times = run_in_process([str(p) for p in sorted(data.glob("synth_*.mrc"))
                                          if not p.name.endswith("_labels.mrc")],
                                         str(prompts), str(root / "local"), cfg).times
            local = time.perf_counter() - t
            t = time.perf_counter()
            remote_times = run_in_process(["s3://bench/data"], "s3://bench/prompts.csv", "s3://bench/out", cfg).times
            remote = time.perf_counter() - t
    finally:
        server.stop()
    print(f"\n{args.n} tomograms of {tuple(args.shape)}, in process; S3 through moto on 127.0.0.1\n")
    print(f"{'storage':<12}{'wall (s)':>10}   stage seconds")
    for label, wall, times in (("local files", local, local_times), ("S3", remote, remote_times)):
        stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items()) if k != "wall")
        print(f"{label:<12}{wall:>10.1f}   {stages}")
    print(f"\nS3 / local: {remote / local:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"local_s": local, "s3_s": remote, "ratio": remote / local}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the real architectures in process (see run_gpu)")
    parser.add_argument("--n", type=int, default=4, help="tomograms (Ray mode)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="tomogram shape (default 64 128 128; --gpu: 200 512 512)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--json", help="write the figures as JSON here")
    parser.add_argument("--dinov2", default="large", help="--gpu: DINOv2 size (tiny, small, base, large)")
    parser.add_argument("--registers", type=int, default=4, help="--gpu: DINOv2 register tokens")
    parser.add_argument("--image-size", type=int, default=518, help="--gpu: DINOv2 input side")
    parser.add_argument("--sam", default="vit_h", help="--gpu: SAM model type (vit_h, vit_l, vit_b, tiny)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="--gpu: torch.compile both encoders")
    parser.add_argument("--directions", default="six", choices=["six", "z"], help="--gpu: propagation directions")
    parser.add_argument("--proposals", type=int, default=512, help="--gpu: matching.top_k, all propagated at once")
    parser.add_argument("--steps", type=int, default=10, help="--gpu: slices each front walks (see run_gpu)")
    parser.add_argument("--dinov2-batch", type=int, default=64)
    parser.add_argument("--sam-batch", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=512)
    parser.add_argument("--s3", action="store_true", help="in process, inputs and outputs on a local S3 endpoint "
                        "(moto on 127.0.0.1) against local files, on the same data")
    args = parser.parse_args()
    if args.gpu:
        run_gpu(args)
        return
    args.shape = tuple(args.shape or (64, 128, 128))
    if args.s3:
        run_s3(args)
        return

    import ray

    from cryosam_ray.config import load_config
    from cryosam_ray.executors.in_process import run_in_process

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, prompts = _dataset(args, root)

        results = {}
        t = time.perf_counter()
        summary = run_in_process([str(data)], str(prompts), str(root / "inprocess"), load_config())
        results["in-process"] = (time.perf_counter() - t, summary.times)

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, log_to_driver=False)
        startup = time.perf_counter() - t
        from cryosam_ray.executors.on_ray import run_on_ray

        for workers in (1, 2):
            share = args.cpus / (2 * workers + 2)  # actors plus two tasks fit: none waits for CPUs forever
            t = time.perf_counter()
            summary = run_on_ray([str(data)], str(prompts), str(root / f"ray{workers}"),
                                 _cfg(workers, share, share), progress=False)
            results[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = (time.perf_counter() - t, summary.times)
        ray.shutdown()

    base = results["in-process"][0]
    print(f"\n{args.n} tomograms of {tuple(args.shape)}, {args.cpus} CPUs; local Ray start-up {startup:.1f} s "
          "(not counted)\n")
    print(f"{'executor':<18}{'wall (s)':>10}{'tomograms/h':>13}{'vs in-process':>15}   stage seconds")
    for label, (wall, times) in results.items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items()) if k != "wall")
        print(f"{label:<18}{wall:>10.1f}{3600 * args.n / wall:>13.0f}{wall / base:>14.2f}x   {stages}")
    overhead = results["ray, 1 worker"][0] / base
    speedup = results["ray, 1 worker"][0] / results["ray, 2 workers"][0]
    print(f"\nRay overhead at one worker: {overhead:.2f}x the in-process time; one -> two workers: {speedup:.2f}x faster")
    print("(Ray stage seconds are summed task latencies, queueing included; in-process ones are busy time.)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "tomograms": args.n, "shape": list(args.shape), "cpus": args.cpus, "ray_startup_s": startup,
            "wall_s": {k: v[0] for k, v in results.items()},
            "tomograms_per_hour": {k: 3600 * args.n / v[0] for k, v in results.items()},
            "stage_s": {k: v[1] for k, v in results.items()},
            "overhead_one_worker": overhead, "speedup_two_workers": speedup}, indent=2))


if __name__ == "__main__":
    main()
