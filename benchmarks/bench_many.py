"""Driver memory over a run of many small tomograms, so that its growth (or flatness) is visible.

    python benchmarks/bench_many.py [--n 200] [--marks 50 100 200] [--shape 48x96x96] [--json FILE]

Writes ``--n`` small synthetic tomograms (built-in shapes, the ribosome prompts of one of them),
then runs ``cryosam run`` on a local Ray (2 CPUs, fractional actor requests) in a child process
whose sampler thread reads the driver's resident memory whenever another tomogram's record is
committed. The table gives the driver's RSS when the 1st and each ``--marks`` record was written
and its peak; a driver that streams records shows the same figure at every mark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, os, sys, threading, time
from pathlib import Path
from cryosam_ray.cli import main
out, marks, argv = Path(sys.argv[1]), [int(m) for m in sys.argv[2].split(",")], json.loads(sys.argv[3])
seen, done = {}, threading.Event()
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def sample():
    peak = 0.0
    while not done.is_set():
        records = out / "tomograms"
        count = len(list(records.glob("*.json"))) if records.exists() else 0
        peak = max(peak, rss_mib())
        for mark in [1] + marks:
            if count >= mark and mark not in seen:
                seen[mark] = rss_mib()
        seen["peak"] = peak
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
code = main(argv)
time.sleep(0.5); done.set()
print(json.dumps({"code": code, "rss": {str(k): v for k, v in seen.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="tomograms in the run")
    parser.add_argument("--marks", type=int, nargs="+", default=[50, 100, 200], help="record counts to report at")
    parser.add_argument("--shape", default="48x96x96", help="tomogram shape DxHxW")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    from cryosam_ray.synth import SynthSettings, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        write_dataset(str(data), n=args.n, seed=0, prompts_per_class=1,
                      settings=SynthSettings(shape=shape, classes=("ribosome",), snr=1.0, use_real_maps=False))
        lines = (data / "prompts.csv").read_text().splitlines()
        if len(lines) < 2:
            raise SystemExit(f"no particle fits a {args.shape} tomogram: use a larger --shape")
        first = [line for line in lines[1:] if line.split(",")[0] == lines[1].split(",")[0]]
        (Path(tmp) / "prompts.csv").write_text("\n".join([lines[0], *first]) + "\n")
        (data / "prompts.csv").unlink()
        argv = ["run", "--tomograms", str(data), "--prompts", str(Path(tmp) / "prompts.csv"), "--out", str(out),
                "--no-progress", "--set", "ray.num_cpus=2", "--set", "ray.encoders.num_cpus=0.5",
                "--set", "ray.segmenters.num_cpus=0.5", "--set", "ray.task_cpus=0.25"]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), ",".join(map(str, args.marks)),
                               json.dumps(argv)], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not proc.stdout.strip():
            raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if not (out / "run.json").exists():
            raise SystemExit(f"the run wrote no run.json (exit code {result['code']}):\n{proc.stderr[-3000:]}")
        manifest = json.loads((out / "run.json").read_text())
    rss = result["rss"]
    print(f"{args.n} tomograms of {args.shape} on a local Ray, {wall:.0f} s, exit code {result['code']}, "
          f"run.json {len(manifest['tomograms'])} records")
    print(f"{'records written':>16}  {'driver RSS MiB':>14}")
    for mark in ["1"] + [str(m) for m in args.marks]:
        if mark in rss:
            print(f"{mark:>16}  {rss[mark]:>14.1f}")
    print(f"{'peak':>16}  {rss['peak']:>14.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "shape": shape, "wall_s": wall, "rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
