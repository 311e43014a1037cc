"""One large tomogram end to end, its memory watched from outside: does it fit an 8 GiB worker?

    python benchmarks/bench_large.py [--shape 500x1024x1024] [--limit-gib 8] [--work DIR] [--json FILE]

A synthetic tomogram (built-in shapes, one ribosome prompt, 128 x 384 x 384) is tiled up to
``--shape`` and written as float32 MRC; then ``cryosam run --address none`` (weight-free
backends, one process) runs on it in a child process while this script reads the child's
``/proc/<pid>/status`` every half second (Linux). The table gives the peak anonymous memory
(what the process itself holds), the peak resident set (anonymous plus file-backed pages of the
memory-mapped tomogram, feature store and scratch files, which the kernel reclaims under
pressure) and the wall time. With ``--work DIR`` the tomogram and the run folder are kept, so a
second run resumes from the stored features (encoding 500 x 1024 x 1024 takes about 40 minutes
on 2 CPU cores). With ``--limit-gib N`` (root, a writable cgroup v1 or v2 memory controller) the
child runs in a memory cgroup limited to N GiB, as a worker of that size would: the kernel then
reclaims file pages as it must and kills the run if what it holds does not fit; the table adds
the cgroup's peak usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TILE = (128, 384, 384)


def build(data: Path, shape: tuple[int, int, int]) -> Path:
    """The tiled tomogram and its prompts CSV in ``data`` (reused when already there)."""
    import mrcfile

    from cryosam_ray.synth import SynthSettings, write_dataset

    target = data / "large.mrc"
    if target.exists():
        return target
    tile_dir = data / "tile"
    write_dataset(str(tile_dir), n=1, seed=0, settings=SynthSettings(shape=TILE, classes=("ribosome",), snr=0.5,
                                                                      use_real_maps=False), prompts_per_class=1)
    tile_mrc = next(p for p in sorted(tile_dir.glob("*.mrc")) if "label" not in p.name)
    with mrcfile.mmap(tile_mrc, permissive=True) as m:
        tile, voxel = np.asarray(m.data, np.float32), float(m.voxel_size.x)
    reps = tuple(-(-s // t) for s, t in zip(shape, TILE))
    out = mrcfile.new_mmap(str(target) + ".part", shape=shape, mrc_mode=2, overwrite=True)
    for z0 in range(0, shape[0], 32):
        planes = tile[np.arange(z0, min(z0 + 32, shape[0])) % TILE[0]]
        out.data[z0:z0 + len(planes)] = np.tile(planes, (1, *reps[1:]))[:, :shape[1], :shape[2]]
    out.voxel_size = voxel
    out.close()
    Path(str(target) + ".part").rename(target)
    lines = (tile_dir / "prompts.csv").read_text().splitlines()
    (data / "prompts.csv").write_text("\n".join([lines[0]] + [",".join(["large"] + row.split(",")[1:])
                                                               for row in lines[1:]]) + "\n")
    return target


def memory_cgroup(limit_gib: float) -> Path:
    """A fresh memory cgroup limited to ``limit_gib`` GiB (v2 if mounted so, else v1)."""
    limit = str(int(limit_gib * 2**30))
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # v2
        group = root / f"bench_large_{os.getpid()}"
        group.mkdir()
        (group / "memory.max").write_text(limit)
    else:
        group = root / "memory" / f"bench_large_{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(limit)
    return group


def cgroup_peak_mib(group: Path) -> float | None:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        if (group / name).exists():
            return int((group / name).read_text()) / 2**20
    return None


def watch(pid: int, peaks: dict, stop: threading.Event) -> None:
    """Peak RssAnon and RssAnon + RssFile (MiB) of ``pid``, read every 0.5 s."""
    while not stop.is_set():
        try:
            fields = {k: int(v.split()[0]) / 1024 for k, v in
                      (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                      if k in ("RssAnon", "RssFile")}
        except (OSError, ValueError):
            return
        peaks["anon"] = max(peaks["anon"], fields.get("RssAnon", 0.0))
        peaks["rss"] = max(peaks["rss"], fields.get("RssAnon", 0.0) + fields.get("RssFile", 0.0))
        stop.wait(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="500x1024x1024", help="tomogram shape DxHxW")
    parser.add_argument("--limit-gib", type=float, help="run in a memory cgroup of this many GiB (root)")
    parser.add_argument("--work", help="keep the tomogram and the run here (a rerun resumes its features)")
    parser.add_argument("--json", help="write the result as JSON here")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench_large reads /proc: Linux only")
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if len(shape) != 3 or any(s < t for s, t in zip(shape, TILE)):
        raise SystemExit(f"--shape {args.shape}: expected DxHxW of at least {'x'.join(map(str, TILE))} (the tile)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_large_"))
    group = None
    try:
        tomogram = build(work / "data", shape)
        out = work / "out"
        argv = ["run", "--tomograms", str(tomogram), "--prompts", str(work / "data" / "prompts.csv"),
                "--out", str(out), "--address", "none", "--no-progress"]
        child = f"import sys; from cryosam_ray.cli import main; sys.exit(main({argv!r}))"
        peaks, stop = {"anon": 0.0, "rss": 0.0}, threading.Event()
        group = memory_cgroup(args.limit_gib) if args.limit_gib else None

        def enter_group() -> None:  # in the child, before it runs anything
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=enter_group)
        watcher = threading.Thread(target=watch, args=(proc.pid, peaks, stop), daemon=True)
        watcher.start()
        log, _ = proc.communicate()
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join()
        if proc.returncode != 0:
            raise SystemExit(f"the run failed (exit {proc.returncode}):\n{log[-3000:]}")
        run = json.loads((out / "run.json").read_text())
        result = {"shape": list(shape), "volume_mib": round(float(np.prod(shape)) * 4 / 2**20, 1),
                  "peak_anon_mib": round(peaks["anon"], 1), "peak_rss_mib": round(peaks["rss"], 1),
                  "limit_gib": args.limit_gib, "cgroup_peak_mib": cgroup_peak_mib(group) if group else None,
                  "wall_s": round(wall, 1), "picks": run["counts"]["picks"], "times_s": run.get("times_s", {})}
    finally:
        if group is not None:
            group.rmdir()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'shape (z, y, x)':>18}  {'float32 MiB':>11}  {'peak anon MiB':>13}  {'peak RSS MiB':>12}  "
          f"{'wall s':>7}  {'picks':>5}")
    print(f"{'x'.join(map(str, shape)):>18}  {result['volume_mib']:>11.1f}  {result['peak_anon_mib']:>13.1f}  "
          f"{result['peak_rss_mib']:>12.1f}  {result['wall_s']:>7.1f}  {result['picks']:>5}")
    if result["limit_gib"]:
        print(f"in a memory cgroup of {result['limit_gib']:g} GiB: peak usage {result['cgroup_peak_mib']:.1f} MiB "
              "(page cache included)")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(result["times_s"].items())))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
