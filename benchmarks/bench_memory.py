"""Peak memory of a run against tomogram size, so that its growth is visible.

    python benchmarks/bench_memory.py [--sizes 64x256x256 128x384x384 160x512x512] [--json FILE]

For each size: one synthetic tomogram (built-in shapes, one ribosome prompt) is written as MRC,
then ``cryosam run --address none`` (weight-free backends, one process) runs in a fresh child
process; the table gives the tomogram's size as float32, the child's peak resident memory (its
``ru_maxrss``) and their ratio, and the run's wall time. A run whose memory followed only the
particles would show a ratio falling with size; whole-volume arrays show up as a ratio of
1 or more each.
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


def measure(shape: tuple[int, int, int], root: Path) -> dict:
    from cryosam_ray.synth import SynthSettings, write_dataset

    data = root / f"{shape[0]}x{shape[1]}x{shape[2]}"
    write_dataset(str(data), n=1, seed=0, settings=SynthSettings(shape=shape, classes=("ribosome",), snr=0.5,
                                                                  use_real_maps=False), prompts_per_class=1)
    argv = ["run", "--tomograms", str(data), "--prompts", str(data / "prompts.csv"), "--out", str(data / "out"),
            "--address", "none", "--no-progress"]
    child = (f"import resource, sys; from cryosam_ray.cli import main; code = main({argv!r}); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{shape}: the run failed:\n{proc.stderr[-2000:]}")
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024  # Linux: kilobytes
    volume_mib = shape[0] * shape[1] * shape[2] * 4 / 2**20
    return {"shape": list(shape), "volume_mib": round(volume_mib, 1), "peak_rss_mib": round(peak_mib, 1),
            "ratio": round(peak_mib / volume_mib, 2), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["64x256x256", "128x384x384", "160x512x512"],
                        help="tomogram shapes DxHxW")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.sizes:
            shape = tuple(int(v) for v in text.lower().split("x"))
            rows.append(measure(shape, Path(tmp)))
            print(f"measured {text}", file=sys.stderr)
    print(f"{'shape (z, y, x)':>18}  {'float32 MiB':>11}  {'peak RSS MiB':>12}  {'RSS / volume':>12}  {'wall s':>7}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>18}  {r['volume_mib']:>11.1f}  {r['peak_rss_mib']:>12.1f}  "
              f"{r['ratio']:>12.2f}  {r['wall_s']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
