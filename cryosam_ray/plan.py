"""What a run does, and what it did: inputs, prompts, resume, records, the run's outputs.

:func:`make_plan` expands the inputs, opens their headers, reads and groups the prompts, and
decides from each tomogram's record (``OUT/tomograms/<name>.json``) what is already done: a
tomogram whose record matches this run's inputs and settings is skipped (resume), and with
``incremental`` every tomogram with finished outputs is. Executors then do the work of
:attr:`Plan.todo` (and the prompts of :attr:`Plan.query_only`) with :mod:`cryosam_ray.job`,
commit each tomogram's :class:`TomogramRecord` with :func:`write_record` (the last file of its
outputs), and end with :func:`write_run_outputs`: the picks tables of every tomogram of the run
and ``run.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.encoders import check_encoder
from cryosam_ray.errors import CryoSamError, PromptError
from cryosam_ray.lease import OutputLease
from cryosam_ray.particle import Pick
from cryosam_ray.segmenters import check_segmenter
from cryosam_ray.storage import filesystem, fingerprint, is_remote, join, reach_error, read_bytes, write_bytes_atomic
from cryosam_ray.star import write_star
from cryosam_ray.tables import Point, picks_table, read_prompts, write_picks
from cryosam_ray.tomo_io import MRC_SUFFIXES, ZARR_SUFFIXES, Tomogram, open_tomogram, tomogram_name

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_OUTPUT_SUFFIXES = ("_labels.mrc", "_instances.mrc", "_semantic.mrc")


class PlanError(CryoSamError):
    """The run's inputs cannot be planned (for example two inputs with one tomogram name)."""


@dataclass
class TomogramRecord:
    """One tomogram's state in the output folder: what identifies its inputs and what came out.

    Attributes:
        signature: digest of its input file, the prompts and the settings (see :func:`result_signature`).
        status: "pending" (not finished), "done", "failed" or "skipped" (done by an earlier run).
        picks: its picks, ids as in its masks.
        proposals: proposals per class from matching.
    """

    name: str
    url: str
    signature: str = ""
    status: str = "pending"
    error: str = ""
    picks: list[Pick] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    proposals: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, "signature": self.signature, "status": self.status,
                "error": self.error, "rows": [p.row() for p in self.picks], "files": self.files,
                "proposals": self.proposals}

    @classmethod
    def from_json(cls, data: dict) -> "TomogramRecord":
        return cls(data["name"], data["url"], data.get("signature", ""), data.get("status", "pending"),
                   data.get("error", ""), [Pick.from_row(r) for r in data.get("rows", [])],
                   list(data.get("files", [])), dict(data.get("proposals") or {}))

    def finished(self, picks: list[Pick], files: list[str], proposals: dict[str, int]) -> "TomogramRecord":
        return dataclasses.replace(self, status="done", error="", picks=picks, files=files, proposals=proposals)

    def failed(self, error: str) -> "TomogramRecord":
        return dataclasses.replace(self, status="failed", error=error, picks=[], files=[])


@dataclass
class Plan:
    """What one run does.

    Attributes:
        tomograms: every input that opened, by name (headers only; data is read lazily).
        points: the prompts of each tomogram, by name.
        records: every input's record: final for skipped and unreadable ones, "pending" for the rest.
        todo: the tomograms to process, those holding prompts first.
        query_only: tomograms holding prompts that are done already: their prompts are segmented
            again (the queries need them) but their record stands.
        new: tomograms that had no record in the output folder.
    """

    out_dir: str
    prompts_path: str
    tomograms: dict[str, Tomogram]
    points: dict[str, list[Point]]
    records: dict[str, TomogramRecord]
    todo: list[str]
    query_only: list[str]
    new: list[str]
    incremental: bool = False

    @property
    def prompt_tomograms(self) -> list[str]:
        """Every tomogram whose prompts this run segments: todo ones, then query_only ones."""
        return [n for n in self.todo if self.points.get(n)] + self.query_only

    def feature_store(self, cfg: CryoSamConfig) -> str:
        return cfg.features.store or join(self.out_dir, "features")


@dataclass
class RunSummary:
    """What a run did: every tomogram's record, stage times (seconds), the run's own files."""

    records: list[TomogramRecord]
    times: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TomogramRecord]:
        return [r for r in self.records if r.status == "failed"]


class StageTimes:
    """Seconds spent per stage (summed over tomograms)."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)

    def add(self, stage: str, since: float) -> None:
        self.times[stage] += time.perf_counter() - since


def expand_tomograms(specs: list[str], storage_options: dict | None = None) -> list[str]:
    """Files, folders (their MRC files and zarr arrays) and globs -> sorted, de-duplicated URLs.

    A spec that matches nothing is kept as is, so that opening it reports the missing file.
    """
    urls: list[str] = []
    for spec in map(str, specs):
        try:
            urls += _listed(spec, storage_options)
        except Exception as exc:  # noqa: BLE001 (a storage error becomes the user's; others propagate)
            reason = reach_error(exc)
            if reason is None:
                raise
            raise PlanError(f"--tomograms {spec}: cannot list it: {reason}") from exc
    urls = sorted(dict.fromkeys(urls))
    by_name: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_name[tomogram_name(url)].append(url)
    clashes = {name: found for name, found in by_name.items() if len(found) > 1}
    if clashes:  # names key prompts, records and outputs: two inputs with one name would overwrite each other
        name, found = sorted(clashes.items())[0]
        raise PlanError(f"{len(clashes)} tomogram name(s) occur more than once among the inputs, e.g. {name!r}: "
                        f"{found}; tomograms are named by their file stem, so rename or run them separately")
    return urls


def _listed(spec: str, storage_options: dict | None) -> list[str]:
    """The tomogram URLs one --tomograms spec names (itself when it names one, or nothing)."""
    fs, path = filesystem(spec, storage_options)
    prefix = spec.split("://", 1)[0] + "://" if is_remote(spec) else ""
    if any(ch in path for ch in _GLOB_CHARS):
        return [prefix + p for p in sorted(fs.glob(path))]
    if fs.isdir(path) and not path.rstrip("/").lower().endswith(ZARR_SUFFIXES):
        return [prefix + p for p in sorted(fs.ls(path, detail=False))
                if p.rstrip("/").lower().endswith(MRC_SUFFIXES + ZARR_SUFFIXES)
                and not p.rstrip("/").lower().endswith(_OUTPUT_SUFFIXES)]
    return [spec]


def group_prompts(points: list[Point], names: set[str], source: str) -> dict[str, list[Point]]:
    """Prompts by tomogram name. Raises PromptError when none names a tomogram of the run."""
    by_tomo: dict[str, list[Point]] = defaultdict(list)
    unknown = set()
    for p in points:
        if p.tomogram in names:
            by_tomo[p.tomogram].append(p)
        else:
            unknown.add(p.tomogram)
    if unknown:
        log.warning("%s: prompts name tomograms not in this run: %s", source, sorted(unknown))
    if not by_tomo:
        raise PromptError(f"{source}: no prompt names a tomogram of this run (prompts name {sorted(unknown)[:10]}; "
                          f"the run has {sorted(names)[:10]})")
    return dict(by_tomo)


def check_prompts(by_tomo: dict[str, list[Point]], tomograms: dict[str, Tomogram], source: str) -> None:
    """Every prompt has finite coordinates inside its tomogram (PromptError naming the first few that do not)."""
    bad = []
    for name, points in by_tomo.items():
        shape = tomograms[name].shape
        for p in points:
            zyx = (p.z, p.y, p.x)
            if not all(math.isfinite(v) for v in zyx):
                bad.append(f"{name} ({p.z}, {p.y}, {p.x}): not a number")
            elif not all(-0.5 <= v <= n - 0.5 for v, n in zip(zyx, shape)):
                bad.append(f"{name} (z={p.z:g}, y={p.y:g}, x={p.x:g}): outside its volume of shape {shape} (z, y, x)")
    if bad:
        raise PromptError(f"{source}: {len(bad)} prompt(s) cannot be used: {'; '.join(bad[:5])}; coordinates are "
                          f"0-based voxels (z, y, x) of the tomogram the row names")


def result_signature(cfg: CryoSamConfig, prompts_digest: str, input_fingerprint: dict) -> str:
    """Everything a tomogram's picks depend on: its input, the prompts and the settings used."""
    settings = cfg.model_dump(mode="json", include={"io", "segmenter", "propagation", "encoder", "matching",
                                                     "instances", "density"})
    payload = json.dumps({"input": input_fingerprint, "prompts": prompts_digest, "settings": settings},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def record_url(out_dir: str, name: str) -> str:
    return join(out_dir, "tomograms", f"{name}.json")


def read_record(out_dir: str, name: str, storage_options: dict | None = None) -> TomogramRecord | None:
    try:
        return TomogramRecord.from_json(json.loads(read_bytes(record_url(out_dir, name), storage_options)))
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def write_record(out_dir: str, record: TomogramRecord, storage_options: dict | None = None) -> str:
    """The tomogram's record, written atomically (the last file of its outputs: its commit)."""
    return write_bytes_atomic(record_url(out_dir, record.name), json.dumps(record.to_json(), indent=1).encode(),
                              storage_options=storage_options)


def check_output(out_dir: str, storage_options: dict | None = None) -> None:
    """Refuse an output folder that cannot hold the run's outputs, before any work starts."""
    fs, path = filesystem(out_dir, storage_options)
    if path.rstrip("/").lower().endswith((".parquet", ".csv", ".star", ".json", ".mrc")):
        raise PlanError(f"--out {out_dir}: expected a folder (the run writes picks.parquet, masks/ ... inside it), "
                        f"got a file name")
    if is_remote(out_dir):
        bucket = path.split("/", 1)[0]
        try:
            found = fs.exists(bucket)
        except Exception as exc:  # noqa: BLE001 endpoint unreachable, no or refused credentials
            reason = reach_error(exc) or (str(exc) if isinstance(exc, ValueError) else None)
            if reason is None:
                raise
            raise PlanError(f"--out {out_dir}: cannot reach bucket {bucket!r}: {reason}") from exc
        if not found:
            raise PlanError(f"--out {out_dir}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
        return
    if fs.exists(path) and not fs.isdir(path):
        raise PlanError(f"--out {out_dir}: is an existing file; expected a folder")
    probe = join(path, f".cryosam-write-test-{os.getpid()}")
    try:
        fs.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise PlanError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from exc


def claim_output(out_dir: str, cfg: CryoSamConfig, *, wait: bool = False) -> OutputLease:
    """Check the output folder, then its lease for this run (a context manager around the run)."""
    check_output(out_dir, cfg.io.storage_options)
    return OutputLease(out_dir, ttl_s=cfg.io.lease_ttl_s, wait=wait, storage_options=cfg.io.storage_options)


def make_plan(specs: list[str], prompts_path: str, out_dir: str, cfg: CryoSamConfig, *, incremental: bool = False,
              fail_fast: bool = False) -> Plan:
    """Open the inputs' headers, read the prompts, and decide what is left to do (see the module doc)."""
    out_dir = str(out_dir).rstrip("/")
    options = cfg.io.storage_options
    check_encoder(cfg.encoder, options)
    check_segmenter(cfg.segmenter, options)
    tomograms, records, new = {}, {}, []
    urls = expand_tomograms(specs, options)
    if not urls:
        raise PlanError(f"--tomograms {' '.join(map(str, specs))}: no tomogram there (expected MRC files "
                        f"{', '.join(MRC_SUFFIXES)} or zarr / OME-Zarr folders)")
    for url in urls:
        try:
            tomo = open_tomogram(url, voxel_size_a=cfg.io.voxel_size_a, storage_options=options)
            tomograms[tomo.name] = tomo
        except CryoSamError as exc:
            if fail_fast:
                raise
            name = tomogram_name(url)
            log.error("%s failed: %s", name, exc)
            if read_record(out_dir, name, options) is None:
                new.append(name)
            records[name] = TomogramRecord(name, url).failed(str(exc))
            write_record(out_dir, records[name], options)
    if not tomograms:  # name the cause, not the prompts that then match nothing
        causes = "; ".join(r.error for r in list(records.values())[:5])
        raise PlanError(f"no tomogram of the run could be opened ({len(records)} tried): {causes}")
    points = read_prompts(prompts_path, voxel_size_a={n: t.voxel_size_a for n, t in tomograms.items()},
                          shapes={n: t.shape for n, t in tomograms.items()}, storage_options=options)
    by_tomo = group_prompts(points, set(tomograms), prompts_path)
    check_prompts(by_tomo, tomograms, prompts_path)
    digest = hashlib.sha256(read_bytes(prompts_path, options)).hexdigest()
    todo = []
    for name, tomo in tomograms.items():
        signature = result_signature(cfg, digest, fingerprint(tomo.url, options))
        previous = read_record(out_dir, name, options)
        if previous is None:
            new.append(name)
        if previous is not None and previous.status == "done" and (incremental or previous.signature == signature):
            records[name] = dataclasses.replace(previous, status="skipped")  # done before with the same inputs
            continue
        records[name] = TomogramRecord(name, tomo.url, signature)
        todo.append(name)
    todo.sort(key=lambda n: (n not in by_tomo, n))
    query_only = sorted(n for n in by_tomo if n not in todo) if todo else []
    return Plan(out_dir, prompts_path, tomograms, by_tomo, records, todo, query_only, sorted(new), incremental)


def no_query_error(plan: Plan, failures: dict[str, str]) -> PromptError:
    """Why a run has no class query, naming the cause (failed prompt tomograms, or empty masks)."""
    if failures:
        causes = "; ".join(f"{name}: {error}" for name, error in sorted(failures.items())[:5])
        return PromptError(f"{plan.prompts_path}: no class query to match, because every tomogram holding prompts "
                           f"failed ({causes})")
    return PromptError(f"{plan.prompts_path}: no prompt gave a particle mask (prompts outside the volume, or on "
                       f"background?), so there is no class query to match")


def interruption(exc: BaseException) -> str:
    """What stopped a run, for run.json: SIGINT (Ctrl-C) or the signal's name."""
    import signal

    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


def write_run_outputs(plan: Plan, records: dict[str, TomogramRecord], times: dict[str, float], cfg: CryoSamConfig,
                      classes: list[str], *, extra: dict | None = None) -> RunSummary:
    """picks.parquet / picks.csv / picks.star of every tomogram of the run, and ``run.json``."""
    ordered = [records[name] for name in sorted(records)]
    table = picks_table([p.row() for r in ordered if r.status in ("done", "skipped") for p in r.picks])
    options = cfg.io.storage_options
    files = write_picks(table, plan.out_dir, storage_options=options)
    files.append(write_star(table, join(plan.out_dir, "picks.star"), version=cfg.io.star_version,
                            shapes={n: t.shape for n, t in plan.tomograms.items()}, storage_options=options))
    lost = sorted({p.cls for ps in plan.points.values() for p in ps} - set(classes)) if plan.todo else []
    for cls in lost:
        log.warning("class %s: none of its prompts gave a particle mask, so it was not searched for", cls)
    sets = {"new": plan.new, "done": [], "skipped": [], "failed": []}
    for record in ordered:
        sets.setdefault(record.status, []).append(record.name)
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "versions": _versions(),
        **(extra or {}),
        "incremental": plan.incremental,
        "classes": classes,
        "classes_without_mask": lost,
        "times_s": {k: round(v, 3) for k, v in sorted(times.items())},
        "counts": {"tomograms": len(ordered), "done": len(sets["done"]), "skipped": len(sets["skipped"]),
                   "failed": len(sets["failed"]), "picks": table.num_rows},
        "tomogram_sets": sets,
        "tomograms": {r.name: {"url": r.url, "status": r.status, "error": r.error, "picks": len(r.picks),
                               "proposals": r.proposals} for r in ordered},
    }
    files.append(write_bytes_atomic(join(plan.out_dir, "run.json"), json.dumps(manifest, indent=2).encode(),
                                    storage_options=options))
    return RunSummary(ordered, dict(times), files)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("cryosam_ray", "numpy", "torch", "ray", "zarr", "segment-anything", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
