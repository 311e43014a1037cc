"""Picking quality of CryoSAM against one-shot template matching, on synthetic and real data.

    python benchmarks/bench_quality.py [--config FILE] [--set KEY=VALUE ...] [--prompts 1 3]
        [--n 2] [--shape 96 192 192] [--seed 0] [--crowding 0.3] [--quick]
        [--datasets synthetic real] [--real-dir DIR] [--real-rows 0 18 36] [--out DIR] [--json FILE]

The picker runs exactly as a user runs it (``run_in_process`` on the tomograms and a prompts
CSV, config from ``--config`` / ``--set``, no Ray); the baseline is template matching with the
average of the prompt boxes (``benchmarks/template_matching.py``: NCC over the 24 cube
rotations, peaks with non-maximum suppression at the class radius, the best
4 x N_truth peaks per tomogram, scored by NCC). Both get the same point prompts: k per class
(``--prompts``), and both are judged by ``cryosam_ray.evaluate.evaluate_picks`` (a pick matches
a truth particle within half its radius). The prompted particles stay in the truth for both.

Synthetic data: ``write_dataset`` with real density maps where ``../shared/data`` has them (5
classes, crowding, a membrane, gold beads, SNR 0.3, dense is dark); the prompts are the first k
truth particles of each class. Real data (``--real-dir``, default ``<repo>/../shared/data/real``):
EMPIAR-11658 tomogram 9 at 31.36 A/px with 55 annotated 80S ribosomes (truth radius 4.5
voxels). The annotation is a cleaned subset, so precision there is a lower bound; judge by
recall at 1x/2x/3x the annotated count and AP. One-prompt runs there are three trials with the
annotated particles at fixed rows (``--real-rows``) as the prompt, reported each and averaged,
plus one run with those rows together as prompts.

Columns, per class and method: P, R, F1 (CryoSAM: all its picks; TM: at the oracle cut-off,
the NCC threshold chosen with the truth to maximise F1 per class, an upper bound), AP (picks
ranked by score: CryoSAM's instance similarity, TM's NCC), r@1x/2x/3x (recall of the best 1x,
2x, 3x N_truth picks), pDice (mean Dice of the prompts' own instance masks with their truth
particles), iDice (mean Dice of every true-positive pick's mask with the truth particle it
matched), s (seconds: TM per class, volumes already loaded; the picker's whole run, all classes,
in the "all (mean)" rows, which average every other column over the classes).
Synthetic only for the Dice columns (the real tomogram has no masks). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cryosam_ray.config import load_config, parse_override
from cryosam_ray.errors import CryoSamError
from cryosam_ray.evaluate import evaluate_picks, match_points
from cryosam_ray.ranking import RECALL_MULTIPLES
from cryosam_ray.executors.in_process import run_in_process
from cryosam_ray.synth import SynthSettings, write_dataset
from cryosam_ray.tables import empty_picks_table, picks_table, read_picks, read_truth
from cryosam_ray.tomo_io import read_mrc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import template_matching as tm  # noqa: E402

log = logging.getLogger("bench_quality")

REPO = Path(__file__).resolve().parent.parent
REAL_TOMOGRAM = "empiar11658_t009_bin4.mrc"
REAL_ANNOTATION = "empiar11658_t009_80S.csv"
REAL_CLASS, REAL_RADIUS_VOX, REAL_VOXEL_A = "ribosome", 4.5, 31.36
RADIUS_FRACTION = 0.5  # match distance / truth radius, as evaluate_picks' default
TM_TOP_K_PER_TRUTH = 4
# Defaults of the synthetic set, full run and --quick.
FULL = {"n": 2, "shape": (96, 192, 192), "classes": ("ribosome", "atpase", "hsp60", "ball", "rod"),
        "particles_per_class": 10, "datasets": ("synthetic", "real")}
QUICK = {"n": 1, "shape": (64, 128, 128), "classes": ("ribosome", "hsp60", "ball"),
         "particles_per_class": 8, "datasets": ("synthetic",)}
METRICS = ("precision", "recall", "f1", "ap", *(f"recall_at_{m}x" for m in RECALL_MULTIPLES),
           "prompt_dice", "instance_dice")


@dataclass
class Dataset:
    """Tomograms, their truth and what the prompts are drawn from. Coordinates are voxels, ZYX."""

    name: str
    tomograms: list[str]  # MRC paths
    truth_csv: Path
    truth_rows: list[dict]  # tomogram, class, instance_id, z, y, x, radius (floats parsed)
    labels: dict[str, str] = field(default_factory=dict)  # tomogram -> truth label MRC (synthetic)

    def classes(self) -> list[str]:
        return sorted({r["class"] for r in self.truth_rows})

    def radius(self, cls: str) -> float:
        return max(r["radius"] for r in self.truth_rows if r["class"] == cls)


@dataclass
class MethodRun:
    """One row group of the table: a method with one prompt set, its figures per class."""

    label: str
    method: str  # "cryosam" | "tm"
    prompts: int
    per_class: dict[str, dict]
    seconds: float
    class_seconds: dict[str, float] = field(default_factory=dict)
    previews: list[str] = field(default_factory=list)
    error: str = ""

    def mean(self) -> dict:
        """Each metric averaged over the classes that have it (None where none has)."""
        out = {}
        for key in METRICS:
            values = [m[key] for m in self.per_class.values() if m.get(key) is not None]
            out[key] = float(np.mean(values)) if values else None
        return out

    def to_json(self) -> dict:
        return {"label": self.label, "method": self.method, "prompts": self.prompts, "seconds": self.seconds,
                "class_seconds": self.class_seconds or None, "per_class": self.per_class, "mean": self.mean(),
                "previews": self.previews, "error": self.error or None}


# ----------------------------------------------------------------------------- data


def synthetic_dataset(root: Path, args) -> Dataset:
    settings = SynthSettings(shape=tuple(args.shape), voxel_size_a=10.0, classes=tuple(args.classes),
                             particles_per_class=args.particles_per_class, membranes=1, gold_beads=3,
                             snr=args.snr, polarity="raw", crowding=args.crowding)
    data = root / "data"
    log.info("synthesising %d tomogram(s) of %s, classes %s", args.n, settings.shape, ", ".join(settings.classes))
    paths = write_dataset(str(data), n=args.n, seed=args.seed, settings=settings)
    (data / "prompts.csv").unlink()  # the benchmark writes its own, one per k
    with open(data / "truth.csv", newline="") as handle:
        rows = [_truth_row(r) for r in csv.DictReader(handle)]
    labels = {Path(p).stem: str(data / f"{Path(p).stem}_labels.mrc") for p in paths}
    return Dataset("synthetic", paths, data / "truth.csv", rows, labels)


def real_dataset(root: Path, real_dir: Path) -> Dataset:
    """The EMPIAR-11658 tomogram and a truth CSV built from its 80S annotation (CRLF tolerated)."""
    tomogram = real_dir / REAL_TOMOGRAM
    name = tomogram.name.removesuffix(".mrc")
    with open(real_dir / REAL_ANNOTATION, newline="") as handle:
        annotated = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(handle)]
    rows = [{"tomogram": name, "class": REAL_CLASS, "instance_id": i, "z": float(r["z"]), "y": float(r["y"]),
             "x": float(r["x"]), "radius": REAL_RADIUS_VOX, "voxel_size_a": REAL_VOXEL_A}
            for i, r in enumerate(annotated, start=1)]
    root.mkdir(parents=True, exist_ok=True)
    truth_csv = _write_csv(root / "truth.csv", rows, ("tomogram", "class", "instance_id", "z", "y", "x", "radius",
                                                     "voxel_size_a"))
    return Dataset("real", [str(tomogram)], truth_csv, rows)


def _truth_row(row: dict) -> dict:
    out = dict(row)
    for key in ("z", "y", "x", "radius"):
        out[key] = float(row[key])
    out["instance_id"] = int(row["instance_id"])
    return out


def _write_csv(path: Path, rows: list[dict], columns) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def first_per_class(rows: list[dict], k: int) -> list[dict]:
    """The first k truth rows of each class, in truth order, grouped by class."""
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    return [r for group in by_class.values() for r in group[:k]]


# ----------------------------------------------------------------------------- scoring


def class_metrics(truth: pa.Table, picks: pa.Table, classes: list[str]) -> tuple[dict[str, dict], object]:
    """P, R, F1, AP and r@kx per class from ``evaluate_picks``, and the report."""
    report = evaluate_picks(truth, picks, radius_fraction=RADIUS_FRACTION)
    out = {}
    for cls in classes:
        counts, ranked = report.per_class.get(cls), report.ranking.per_class.get(cls)
        metrics = dict.fromkeys(METRICS)
        if counts is not None:
            metrics.update(tp=counts.tp, fp=counts.fp, fn=counts.fn, precision=counts.precision,
                           recall=counts.recall, f1=counts.f1)
        if ranked is not None:
            metrics.update(ranked.to_dict())
        out[cls] = metrics
    return out, report


def _dice_table(pred: np.ndarray, truth: np.ndarray):
    """``dice(pred_id, truth_id)`` for two (D, H, W) label volumes, from one pass over the voxels."""
    p, t = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    p_size, t_size = np.bincount(p), np.bincount(t)
    both = (p > 0) & (t > 0)
    base = int(p.max()) + 1
    keys, counts = np.unique(t[both] * base + p[both], return_counts=True)
    inter = dict(zip(keys.tolist(), counts.tolist()))

    def dice(pred_id: int, truth_id: int) -> float:
        size = ((p_size[pred_id] if 0 < pred_id < len(p_size) else 0)
                + (t_size[truth_id] if truth_id < len(t_size) else 0))
        return 2.0 * inter.get(truth_id * base + pred_id, 0) / size if size else 0.0

    return dice


def mask_dice(out_dir: Path, data: Dataset, picks: pa.Table, prompts: list[dict]) -> dict[str, dict]:
    """Per class: mean Dice of the prompt instances and of every true-positive pick's instance.

    A true-positive pick is one matched (one-to-one, within half the radius, as evaluate_picks
    does) to a truth particle of its class and tomogram; its mask is ``masks/<t>_instances.mrc``
    at its ``instance_id``, compared with that particle in ``<t>_labels.mrc``. A prompt's
    instance is the prompt pick (NaN similarity) of its class nearest the prompt point, else
    the instance under the prompt voxel; none scores 0.
    """
    cols = {c: picks.column(c).to_numpy(zero_copy_only=False) for c in picks.column_names}
    p_zyx = np.column_stack([cols["z"], cols["y"], cols["x"]]) if picks.num_rows else np.zeros((0, 3))
    found: dict[str, list[float]] = {c: [] for c in data.classes()}
    prompted: dict[str, list[float]] = {c: [] for c in data.classes()}
    for tomo, label_path in data.labels.items():
        masks = out_dir / "masks" / f"{tomo}_instances.mrc"
        if not masks.exists():
            log.warning("%s: no instance masks (%s); its Dice counts as missing", tomo, masks)
            continue
        pred, truth_labels = read_mrc(masks)[0], read_mrc(label_path)[0]
        dice = _dice_table(pred, truth_labels)
        for cls in data.classes():
            truth = [r for r in data.truth_rows if r["tomogram"] == tomo and r["class"] == cls]
            mine = np.flatnonzero((cols["tomogram"] == tomo) & (cols["class"] == cls))
            if truth and mine.size:
                t_zyx = np.array([[r["z"], r["y"], r["x"]] for r in truth])
                radius = np.array([r["radius"] for r in truth]) * RADIUS_FRACTION
                for i, j in match_points(p_zyx[mine], t_zyx, radius):
                    found[cls].append(dice(int(cols["instance_id"][mine[i]]), truth[j]["instance_id"]))
            for prompt in (p for p in prompts if p["tomogram"] == tomo and p["class"] == cls):
                point = np.array([prompt["z"], prompt["y"], prompt["x"]])
                own = mine[np.isnan(cols["similarity"][mine])] if mine.size else mine
                if own.size:
                    pred_id = int(cols["instance_id"][own[np.argmin(np.linalg.norm(p_zyx[own] - point, axis=1))]])
                else:
                    pred_id = int(pred[tuple(np.clip(np.rint(point).astype(int), 0, np.array(pred.shape) - 1))])
                prompted[cls].append(dice(pred_id, prompt["instance_id"]) if pred_id else 0.0)
    return {c: {"prompt_dice": float(np.mean(prompted[c])) if prompted[c] else None,
                "instance_dice": float(np.mean(found[c])) if found[c] else None} for c in data.classes()}


# ----------------------------------------------------------------------------- methods


def run_cryosam(label: str, data: Dataset, prompts: list[dict], k: int, out_dir: Path, cfg) -> MethodRun:
    """The picker as a user runs it, then evaluated (and, with truth labels, its masks' Dice)."""
    prompts_csv = _write_csv(out_dir.parent / f"{out_dir.name}_prompts.csv", prompts,
                             ("tomogram", "z", "y", "x", "class"))
    log.info("%s: cryosam run on %d tomogram(s), %d prompt(s) -> %s", label, len(data.tomograms), len(prompts),
             out_dir)
    error = ""
    t = time.perf_counter()
    try:
        summary = run_in_process(data.tomograms, str(prompts_csv), str(out_dir), cfg)
        picks = read_picks(str(out_dir / "picks.parquet"))
        for record in summary.failed:
            log.warning("%s: tomogram %s failed: %s", label, record.name, record.error)
    except CryoSamError as exc:
        log.error("%s: the run failed: %s", label, exc)
        error, picks = str(exc), empty_picks_table()
    seconds = time.perf_counter() - t
    per_class, _ = class_metrics(read_truth(str(data.truth_csv)), picks, data.classes())
    if data.labels and not error:
        for cls, dice in mask_dice(out_dir, data, picks, prompts).items():
            per_class[cls].update(dice)
    log.info("%s: %d picks in %.1f s, mean F1 %.3f", label, picks.num_rows, seconds,
             np.mean([m["f1"] or 0.0 for m in per_class.values()]))
    previews = sorted(str(p) for p in (out_dir / "previews").glob("*.png"))
    return MethodRun(label, "cryosam", k, per_class, seconds, previews=previews, error=error)


def run_template_matching(label: str, data: Dataset, prompts: list[dict], k: int,
                          volumes: dict[str, np.ndarray], voxel_size: dict[str, float]) -> MethodRun:
    """Template matching per class and tomogram; P/R/F1 at each class's oracle NCC cut-off."""
    rows, cut_rows, class_seconds, thresholds = [], [], {}, {}
    names = list(volumes)
    for cls in data.classes():
        t = time.perf_counter()
        radius = data.radius(cls)
        half = math.ceil(1.2 * radius)
        mine = [p for p in prompts if p["class"] == cls]
        if not mine:
            log.warning("%s: no prompt for class %s; no TM picks", label, cls)
            continue
        template, weight = 0.0, 0
        for tomo in sorted({p["tomogram"] for p in mine}):  # boxes cut from the tomograms holding them
            points = np.array([[p["z"], p["y"], p["x"]] for p in mine if p["tomogram"] == tomo])
            template = template + len(points) * tm.prompt_template(volumes[tomo], points, half_size=half)
            weight += len(points)
        template = (template / weight).astype(np.float32)
        class_rows, shifted_picks, shifted_truth, scores = [], [], [], []
        for index, tomo in enumerate(names):
            truth = np.array([[r["z"], r["y"], r["x"]] for r in data.truth_rows
                              if r["tomogram"] == tomo and r["class"] == cls]).reshape(-1, 3)
            if not len(truth):
                continue
            ncc = tm.match_template(volumes[tomo], template, rotations=tm.rotations_24())
            zyx, ncc_scores = tm.pick_peaks(ncc, radius=radius, top_k=TM_TOP_K_PER_TRUTH * len(truth))
            class_rows += [{"tomogram": tomo, "class": cls, "z": z, "y": y, "x": x, "score": s,
                            "voxel_size_a": voxel_size[tomo]}
                           for (z, y, x), s in zip(zyx.tolist(), ncc_scores.tolist())]
            offset = np.array([1e6 * index, 0.0, 0.0])  # one threshold per class over all tomograms
            shifted_picks.append(zyx + offset)
            shifted_truth.append(truth + offset)
            scores.append(ncc_scores)
        class_seconds[cls] = time.perf_counter() - t
        if not class_rows:
            continue
        cut = tm.best_f1_cutoff(np.concatenate(shifted_picks), np.concatenate(scores), np.concatenate(shifted_truth),
                                truth_radius=radius, radius_fraction=RADIUS_FRACTION)
        thresholds[cls] = cut.threshold
        rows += class_rows
        cut_rows += [r for r in class_rows if r["score"] >= cut.threshold]
        log.info("%s: %s in %.1f s, %d peaks, oracle NCC cut-off %.3f (F1 %.3f)", label, cls, class_seconds[cls],
                 len(class_rows), cut.threshold, cut.f1)
    truth = read_truth(str(data.truth_csv))
    ranked, _ = class_metrics(truth, picks_table(rows) if rows else empty_picks_table(), data.classes())
    at_cut, _ = class_metrics(truth, picks_table(cut_rows) if cut_rows else empty_picks_table(), data.classes())
    for cls, metrics in ranked.items():
        for key in ("tp", "fp", "fn", "precision", "recall", "f1"):
            metrics[key] = at_cut[cls].get(key)
        threshold = thresholds.get(cls)
        metrics["ncc_cutoff"] = threshold if threshold is not None and math.isfinite(threshold) else None
    return MethodRun(label, "tm", k, ranked, sum(class_seconds.values()), class_seconds)


def load_volumes(data: Dataset) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    volumes, sizes = {}, {}
    for path in data.tomograms:
        array, voxel = read_mrc(path)
        name = Path(path).name.removesuffix(".mrc")
        volumes[name], sizes[name] = array.astype(np.float32), voxel
    return volumes, sizes


def bench_synthetic(root: Path, args, cfg) -> tuple[Dataset, list[MethodRun]]:
    data = synthetic_dataset(root, args)
    volumes, sizes = load_volumes(data)
    runs = []
    for k in args.prompts:
        prompts = first_per_class(data.truth_rows, k)
        noun = f"{k} prompt{'s' if k > 1 else ''}"
        runs.append(run_cryosam(f"cryosam ({noun})", data, prompts, k, root / f"cryosam_k{k}", cfg))
        runs.append(run_template_matching(f"TM ({noun})", data, prompts, k, volumes, sizes))
    return data, _method_order(runs)


def bench_real(root: Path, real_dir: Path, rows: list[int], cfg) -> tuple[Dataset, list[MethodRun]]:
    data = real_dataset(root, real_dir)
    if any(not 0 <= r < len(data.truth_rows) for r in rows):
        raise SystemExit(f"--real-rows {rows}: the annotation has rows 0..{len(data.truth_rows) - 1}")
    volumes, sizes = load_volumes(data)
    cryosam, template = [], []
    for r in rows:
        prompt = [data.truth_rows[r]]
        cryosam.append(run_cryosam(f"cryosam (1 prompt, row {r})", data, prompt, 1, root / f"cryosam_row{r}", cfg))
        template.append(run_template_matching(f"TM (1 prompt, row {r})", data, prompt, 1, volumes, sizes))
    runs = cryosam + [_mean_run("cryosam (1 prompt, mean)", cryosam)]
    runs += template + [_mean_run("TM (1 prompt, mean)", template)]
    if len(rows) > 1:
        together = [data.truth_rows[r] for r in rows]
        label = f"{len(rows)} prompts, rows {'+'.join(map(str, rows))}"
        runs.insert(len(cryosam) + 1, run_cryosam(f"cryosam ({label})", data, together, len(rows),
                                                  root / "cryosam_rows", cfg))
        runs.append(run_template_matching(f"TM ({label})", data, together, len(rows), volumes, sizes))
    return data, runs


def _method_order(runs: list[MethodRun]) -> list[MethodRun]:
    return [r for r in runs if r.method == "cryosam"] + [r for r in runs if r.method == "tm"]


def _mean_run(label: str, trials: list[MethodRun]) -> MethodRun:
    """The trials' figures averaged per class (metrics missing in a trial are left out)."""
    per_class = {}
    for cls in trials[0].per_class:
        values = {key: [t.per_class[cls].get(key) for t in trials] for key in METRICS}
        per_class[cls] = {key: float(np.mean([v for v in vs if v is not None])) if any(v is not None for v in vs)
                          else None for key, vs in values.items()}
    return MethodRun(label, trials[0].method, trials[0].prompts, per_class,
                     float(np.mean([t.seconds for t in trials])),
                     {c: float(np.mean([t.class_seconds.get(c, 0.0) for t in trials]))
                      for c in trials[0].class_seconds},
                     previews=[p for t in trials for p in t.previews])


# ----------------------------------------------------------------------------- report


def format_table(data: Dataset, runs: list[MethodRun]) -> str:
    header = ("class", "method", "P", "R", "F1", "AP", *(f"r@{m}x" for m in RECALL_MULTIPLES), "pDice", "iDice", "s")
    cells = [header]

    def fmt(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    single = len(data.classes()) == 1  # then the class rows are the whole run
    for cls in data.classes() + ([] if single else ["all (mean)"]):
        for run in runs:
            metrics = run.mean() if cls == "all (mean)" else run.per_class.get(cls, {})
            seconds = run.seconds if cls == "all (mean)" or single else run.class_seconds.get(cls)
            cells.append((cls, run.label, *(fmt(metrics.get(k)) for k in METRICS), fmt(seconds, 1)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def report(data: Dataset, runs: list[MethodRun], description: str, kept: bool) -> dict:
    counts = {c: sum(r["class"] == c for r in data.truth_rows) for c in data.classes()}
    print(f"\n== {data.name}: {description}; truth {', '.join(f'{c} {n}' for c, n in counts.items())}\n")
    print(format_table(data, runs))
    print("\nmean F1 over classes: " + "; ".join(f"{r.label} {r.mean()['f1'] or 0:.3f}" for r in runs))
    if data.name == "real":
        print("(a partial annotation: precision and F1 are lower bounds; judge by r@kx and AP)")
    print("TM P/R/F1 at the oracle per-class NCC cut-off (chosen with the truth: an upper bound)")
    for run in runs:
        if run.error:
            print(f"{run.label}: FAILED: {run.error}")
    previews = [p for r in runs if "mean" not in r.label for p in r.previews]
    if previews:
        print("previews" + ("" if kept else " (deleted at exit; pass --out DIR to keep them)") + ":")
        print("\n".join(f"  {p}" for p in previews))
    return {"description": description, "truth_counts": counts, "runs": [r.to_json() for r in runs],
            "mean_f1": {r.label: r.mean()["f1"] for r in runs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="picker config (YAML file or a name in configs/); default: defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 3], help="prompts per class (synthetic)")
    parser.add_argument("--quick", action="store_true", help="small synthetic set only (n 1, 64x128x128, 3 classes)")
    parser.add_argument("--datasets", nargs="+", choices=("synthetic", "real"),
                        help="default both (--quick: synthetic only)")
    parser.add_argument("--n", type=int, help="synthetic tomograms (default 2)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="default 96 192 192")
    parser.add_argument("--classes", nargs="+", help="default ribosome atpase hsp60 ball rod")
    parser.add_argument("--particles-per-class", type=int, help="default 10 (--quick: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crowding", type=float, default=0.3)
    parser.add_argument("--snr", type=float, default=0.3)
    parser.add_argument("--real-dir", type=Path, default=REPO.parent / "shared" / "data" / "real")
    parser.add_argument("--real-rows", type=int, nargs="+", default=[0, 18, 36],
                        help="annotated particles used as single prompts (one trial each), then together")
    parser.add_argument("--out", type=Path, help="keep the runs' outputs here (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures as JSON here")
    parser.add_argument("--verbose", action="store_true", help="also the package's own log (default: errors only)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.prompts) < 1:
        parser.error("--prompts: each k must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    if not args.verbose:  # the picker warns once per empty prompt/proposal: too many lines for a benchmark
        logging.getLogger("cryosam_ray").setLevel(logging.ERROR)
    cfg = load_config(args.config, {"ray.address": "none", **dict(parse_override(s) for s in args.set)})

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="bench_quality_")
    root = args.out or Path(tmp.name)
    results = {"settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()}, "config": cfg.model_dump(mode="json"), "datasets": {}}
    try:
        if "synthetic" in args.datasets:
            t = time.perf_counter()
            data, runs = bench_synthetic(root / "synthetic", args, cfg)
            description = (f"{args.n} x {tuple(args.shape)} at 10 A/px, seed {args.seed}, SNR {args.snr}, crowding "
                           f"{args.crowding}, prompts {args.prompts} per class ({time.perf_counter() - t:.0f} s)")
            results["datasets"]["synthetic"] = report(data, runs, description, kept=bool(args.out))
        if "real" in args.datasets:
            if (args.real_dir / REAL_TOMOGRAM).exists():
                t = time.perf_counter()
                data, runs = bench_real(root / "real", args.real_dir, args.real_rows, cfg)
                description = (f"EMPIAR-11658 t009, 31.36 A/px, 80S radius {REAL_RADIUS_VOX} vox, prompt rows "
                               f"{args.real_rows} ({time.perf_counter() - t:.0f} s)")
                results["datasets"]["real"] = report(data, runs, description, kept=bool(args.out))
            else:
                log.warning("no real data at %s; skipped", args.real_dir / REAL_TOMOGRAM)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
