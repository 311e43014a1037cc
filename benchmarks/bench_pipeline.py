"""The Ray pipeline against the in-process pipeline: throughput, overhead, scaling.

    python benchmarks/bench_pipeline.py [--n 4] [--shape 64 128 128] [--cpus 2] [--json FILE]

Synthesises a dataset (one ribosome prompt), then runs `cryosam run` on the same tomograms with
the same weight-free backends: in process (no Ray), on Ray with one encoder and one segmenter
actor, and on Ray with two of each. One local Ray is started first and shared, so its start-up
(reported apart) is not in the runs' times. Prints tomograms per hour, per-stage times, the
Ray / in-process overhead ratio at one worker and the speed-up from one to two workers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

from cryosam_ray.config import load_config
from cryosam_ray.runner import run_in_process
from cryosam_ray.synth import SynthSettings, write_dataset


def _prompts(data: Path, out: Path) -> Path:
    with open(data / "truth.csv") as handle:
        first = next(r for r in csv.DictReader(handle) if r["class"] == "ribosome")
    out.write_text(f"tomogram,z,y,x,class\n{first['tomogram']},{first['z']},{first['y']},{first['x']},ribosome\n")
    (data / "prompts.csv").unlink()
    return out


def _cfg(workers: int, cpus_per_actor: float, task_cpus: float):
    return load_config(None, {"ray.address": "auto", "ray.encoders.size": workers, "ray.segmenters.size": workers,
                              "ray.encoders.num_cpus": cpus_per_actor, "ray.segmenters.num_cpus": cpus_per_actor,
                              "ray.task_cpus": task_cpus})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="tomograms")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        write_dataset(str(data), n=args.n, seed=11, settings=SynthSettings(shape=tuple(args.shape), snr=0.5,
                                                                            use_real_maps=False))
        prompts = _prompts(data, root / "prompts.csv")

        results = {}
        t = time.perf_counter()
        summary = run_in_process([str(data)], str(prompts), str(root / "inprocess"), load_config())
        results["in-process"] = (time.perf_counter() - t, summary.times)

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, log_to_driver=False)
        startup = time.perf_counter() - t
        from cryosam_ray.ray_runner import run_on_ray

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
