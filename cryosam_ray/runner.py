"""``cryosam run`` in one process: the whole dataset, tomogram by tomogram.

The plan (which tomograms, which prompts) and the outputs (picks table, masks, ``run.json``)
are shared with the Ray runner; only the scheduling differs. A tomogram that fails is recorded
with its reason and the others go on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import fsspec

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.encoders import build_encoder
from cryosam_ray.errors import CryoSamError, PromptError
from cryosam_ray.features import FeatureVolume, compute_features
from cryosam_ray.pipeline import (TomogramOutcome, build_queries, match_classes, particle_rows, particles_of_tomogram,
                                  segment_prompts, write_tomogram_outputs)
from cryosam_ray.segmenters import build_segmenter
from cryosam_ray.tables import Point, picks_table, read_prompts, write_bytes_atomic, write_picks, write_star
from cryosam_ray.tomo_io import MRC_SUFFIXES, ZARR_SUFFIXES, Tomogram, is_remote, open_tomogram
from cryosam_ray.workers import write_preview_for

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


def expand_tomograms(specs: list[str]) -> list[str]:
    """Files, folders (their MRC files and zarr arrays) and globs -> sorted, de-duplicated URLs.

    A spec that matches nothing is kept as is, so that opening it reports the missing file.
    """
    urls: list[str] = []
    for spec in specs:
        spec = str(spec)
        fs, path = fsspec.core.url_to_fs(spec)
        prefix = spec.split("://", 1)[0] + "://" if is_remote(spec) else ""
        if any(ch in path for ch in _GLOB_CHARS):
            urls += [prefix + p for p in sorted(fs.glob(path))]
        elif fs.isdir(path) and not path.rstrip("/").lower().endswith(ZARR_SUFFIXES):
            urls += [prefix + p for p in sorted(fs.ls(path, detail=False))
                     if p.rstrip("/").lower().endswith(MRC_SUFFIXES + ZARR_SUFFIXES)
                     and not p.rstrip("/").lower().endswith(("_labels.mrc", "_instances.mrc", "_semantic.mrc"))]
        else:
            urls.append(spec)
    return sorted(dict.fromkeys(urls))


@dataclass
class RunSummary:
    """What a run did: per-tomogram outcomes, stage times, the files written."""

    outcomes: list[TomogramOutcome]
    times: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TomogramOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)

    def add(self, stage: str, since: float) -> None:
        self.times[stage] += time.perf_counter() - since


def run_in_process(tomogram_specs: list[str], prompts_path: str, out_dir: str, cfg: CryoSamConfig, *,
                   fail_fast: bool = False) -> RunSummary:
    """The full pipeline over a dataset, in this process. Writes the outputs under ``out_dir``."""
    timer = _Timer()
    t0 = time.perf_counter()
    outcomes: dict[str, TomogramOutcome] = {}
    tomograms: dict[str, Tomogram] = {}
    for url in expand_tomograms(tomogram_specs):
        try:
            tomo = open_tomogram(url, voxel_size_a=cfg.io.voxel_size_a, storage_options=cfg.io.storage_options)
            tomo.stats  # validates the data (NaN, constant) before any work
            tomograms[tomo.name] = tomo
            outcomes[tomo.name] = TomogramOutcome(tomo.name, url)
        except CryoSamError as exc:
            _fail(outcomes, url, exc, fail_fast)
    points = read_prompts(prompts_path, voxel_size_a={n: t.voxel_size_a for n, t in tomograms.items()})
    by_tomo = _group_prompts(points, tomograms, prompts_path)
    timer.add("plan", t0)

    segmenter, encoder = build_segmenter(cfg.segmenter), build_encoder(cfg.encoder)
    store = cfg.features.store or f"{str(out_dir).rstrip('/')}/features"
    volumes: dict[str, FeatureVolume] = {}

    def features(name: str) -> FeatureVolume:
        if name not in volumes:
            t = time.perf_counter()
            volumes[name] = compute_features(tomograms[name], encoder, store_url=store,
                                             shard_slices=cfg.features.shard_slices)
            timer.add("encode", t)
        return volumes[name]

    prompt_particles = {}
    for name, mine in by_tomo.items():
        try:
            t = time.perf_counter()
            prompt_particles[name] = segment_prompts(tomograms[name], mine, segmenter, cfg)
            timer.add("prompts", t)
            features(name)
        except CryoSamError as exc:
            _fail(outcomes, tomograms[name].url, exc, fail_fast, name)
    t = time.perf_counter()
    queries = build_queries({n: p for n, p in prompt_particles.items() if n in volumes}, volumes)
    timer.add("query", t)
    if not queries:
        raise PromptError(f"{prompts_path}: no prompt gave a particle mask, so there is no query to match")

    classes = sorted(queries)
    files: list[str] = []
    for name, outcome in outcomes.items():
        if outcome.status == "failed":
            continue
        try:
            tomo = tomograms[name]
            volume = features(name)
            t = time.perf_counter()
            proposals = match_classes(volume, queries, cfg)
            timer.add("match", t)
            outcome.proposals = {cls: len(p) for cls, p in proposals.items()}
            t = time.perf_counter()
            outcome.particles = particles_of_tomogram(tomo, volume, queries, proposals, prompt_particles.get(name, []),
                                                      segmenter, cfg)
            timer.add("propagate", t)
            t = time.perf_counter()
            outcome.files = write_tomogram_outputs(out_dir, tomo, outcome.particles, classes)
            outcome.files += write_preview_for(out_dir, tomo, outcome.particles, particle_rows(tomo, outcome.particles))
            timer.add("write", t)
            volumes.pop(name, None)  # bounded memory: one tomogram's features at a time
        except CryoSamError as exc:
            _fail(outcomes, tomograms[name].url, exc, fail_fast, name)
    summary = RunSummary(list(outcomes.values()), dict(timer.times))
    summary.files = write_run_outputs(out_dir, summary, tomograms, cfg, classes)
    return summary


def write_run_outputs(out_dir: str, summary: RunSummary, tomograms: dict[str, Tomogram], cfg: CryoSamConfig,
                      classes: list[str]) -> list[str]:
    """picks.parquet / picks.csv / picks.star of all tomograms, and run.json (in-process run)."""
    rows = []
    for outcome in summary.outcomes:
        if outcome.status == "done":
            outcome.picks = len(outcome.particles)
            rows.append(particle_rows(tomograms[outcome.name], outcome.particles))
    return write_run_outputs_from_rows(out_dir, summary, rows, cfg, classes, extra={"executor": "in-process"})


def write_run_outputs_from_rows(out_dir: str, summary: RunSummary, rows: list[list[dict]], cfg: CryoSamConfig,
                                classes: list[str], *, extra: dict | None = None) -> list[str]:
    """The run's tables (from every tomogram's picks rows) and its manifest ``run.json``."""
    table = picks_table([row for part in rows for row in part])
    base = str(out_dir).rstrip("/")
    files = write_picks(table, base)
    files.append(write_star(table, f"{base}/picks.star"))
    statuses = [o.status for o in summary.outcomes]
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "versions": _versions(),
        **(extra or {}),
        "classes": classes,
        "times_s": {k: round(v, 3) for k, v in summary.times.items()},
        "counts": {"tomograms": len(summary.outcomes), "done": statuses.count("done"),
                   "skipped": statuses.count("skipped"), "failed": statuses.count("failed"), "picks": table.num_rows},
        "tomograms": {o.name: {"url": o.url, "status": o.status, "error": o.error, "picks": o.picks,
                               "proposals": o.proposals} for o in summary.outcomes},
    }
    files.append(write_bytes_atomic(f"{base}/run.json", json.dumps(manifest, indent=2).encode()))
    return files


def _group_prompts(points: list[Point], tomograms: dict[str, Tomogram], source: str) -> dict[str, list[Point]]:
    by_tomo: dict[str, list[Point]] = defaultdict(list)
    unknown = set()
    for p in points:
        if p.tomogram in tomograms:
            by_tomo[p.tomogram].append(p)
        else:
            unknown.add(p.tomogram)
    if unknown:
        log.warning("%s: prompts name tomograms not in this run: %s", source, sorted(unknown))
    if not by_tomo:
        raise PromptError(f"{source}: no prompt names a tomogram of this run (prompts name {sorted(unknown)[:10]}; "
                          f"the run has {sorted(tomograms)[:10]})")
    return dict(by_tomo)


def _fail(outcomes, url: str, exc: Exception, fail_fast: bool, name: str | None = None) -> None:
    from cryosam_ray.tomo_io import tomogram_name

    name = name or tomogram_name(url)
    log.error("%s failed: %s", name, exc)
    outcomes[name] = TomogramOutcome(name, url, status="failed", error=str(exc))
    if fail_fast:
        raise exc


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("cryosam_ray", "numpy", "torch", "ray", "zarr", "segment-anything", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
