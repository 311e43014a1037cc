"""A small finished run folder for the report tests, written without running the pipeline.

Two tomograms that worked (one with a name that needs escaping in HTML), one that failed with a
reason that looks like markup; picks with scores, previews, run.json and an evaluation result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cryosam_ray.previews import render_preview, write_preview
from cryosam_ray.tables import picks_table, write_picks
from cryosam_ray.tomo_io import open_tomogram, write_mrc

SHAPE = (24, 48, 48)
NAMES = ("TS_01", "TS<&2>")
FAILED = "TS_bad"
FAILURE = "<script>alert('x')</script> header says 0 x 0 x 0 & more"
PICKS = {"TS_01": {"ribosome": 3, "hsp60": 2}, "TS<&2>": {"ribosome": 1, "hsp60": 4}}


def make_run(root: Path) -> tuple[Path, dict]:
    """Write ``root/data/*.mrc`` and ``root/run/`` (picks, previews, run.json); return the run
    folder and an evaluation dict shaped like ``cryosam evaluate --json``'s output."""
    rng = np.random.default_rng(0)
    data, out = root / "data", root / "run"
    rows, manifest_tomos = [], {}
    for t, name in enumerate(NAMES):
        volume = rng.normal(size=SHAPE).astype(np.float32)
        url = write_mrc(data / f"{name}.mrc", volume, 10.0)
        mine = []
        for cls, n in PICKS[name].items():
            for i in range(n):
                z, y, x = rng.uniform(3, np.array(SHAPE) - 3)
                mine.append({"tomogram": name, "class": cls, "z": z, "y": y, "x": x, "voxel_size_a": 10.0,
                             "voxel_count": 500, "score": float(rng.normal(3 + (cls == "ribosome"), 1))})
        rows += mine
        image = render_preview(open_tomogram(url), mine, classes=["hsp60", "ribosome"])
        write_preview(out / "previews" / f"{name}.png", image)
        manifest_tomos[name] = {"url": url, "status": "done", "error": "", "picks": len(mine),
                                "proposals": {"ribosome": 40 + t, "hsp60": 30 + t}}
    manifest_tomos[FAILED] = {"url": str(data / f"{FAILED}.mrc"), "status": "failed", "error": FAILURE,
                              "picks": 0, "proposals": {}}
    write_picks(picks_table(rows), str(out))
    manifest = {"config": {}, "versions": {"cryosam_ray": "0.1.0"}, "executor": "in-process",
                "classes": ["hsp60", "ribosome"], "times_s": {"plan": 0.5, "encode": 8.25, "propagate": 30.0},
                "counts": {"tomograms": 3, "done": 2, "skipped": 0, "failed": 1, "picks": len(rows)},
                "tomograms": manifest_tomos}
    (out / "run.json").write_text(json.dumps(manifest, indent=2))
    metrics = {"tp": 4, "fp": 1, "fn": 2, "precision": 0.8, "recall": 4 / 6, "f1": 0.727, "fbeta": 0.67,
               "ap": 0.61, "recall_at_1x": 0.5, "recall_at_2x": 0.66, "recall_at_3x": 0.66}
    evaluation = {"per_class": {"hsp60": metrics, "ribosome": {**metrics, "ap": None}},
                  "per_tomogram": {name: metrics for name in NAMES}, "overall": metrics, "ranked_by": "score",
                  "match": {"radius_fraction": 0.5, "beta": 4.0},
                  "pr_curve": {"hsp60": {"rank": [1, 2, 3], "precision": [1.0, 0.5, 0.667],
                                         "recall": [0.25, 0.25, 0.5], "n_truth": 4},
                               "ribosome": {"rank": [], "precision": [], "recall": [], "n_truth": 0}}}
    return out, evaluation
