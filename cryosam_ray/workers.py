"""The units of work a batch runner schedules, as plain Python (no Ray here).

:class:`EncoderWorker` and :class:`SegmenterWorker` hold a model each (built once, from
settings: never from weights or arrays passed in); the functions are stateless tasks. Every
one takes URLs and small values and returns small values: slice data is read by the worker
itself, features go straight to the feature store, masks to the output folder. The Ray wiring
(:mod:`cryosam_ray.ray_runner`) turns the classes into actors and the functions into tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict

import fsspec

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.encoders import build_encoder
from cryosam_ray.feature_store import FeatureStore
from cryosam_ray.features import encode_shard, feature_key, slice_shape
from cryosam_ray.matching import Proposals
from cryosam_ray.pipeline import (ClassQuery, Particle, QueryPart, match_classes, particle_rows, particles_of_tomogram,
                                  query_parts, segment_prompts, write_tomogram_outputs)
from cryosam_ray.segmenters import build_segmenter
from cryosam_ray.tables import Point
from cryosam_ray.tomo_io import Tomogram, VolumeStats, open_tomogram

log = logging.getLogger(__name__)


def open_with_stats(url: str, stats: VolumeStats | None, cfg: CryoSamConfig) -> Tomogram:
    """Open a tomogram; with ``stats`` given, skip the full read that computing them needs."""
    tomo = open_tomogram(url, voxel_size_a=cfg.io.voxel_size_a, storage_options=cfg.io.storage_options)
    if stats is not None:
        tomo.__dict__["stats"] = stats  # the cached_property's slot
    return tomo


def tomogram_stats(url: str, cfg: CryoSamConfig) -> tuple[VolumeStats, dict]:
    """Validate a tomogram and compute its normalisation statistics (one full read).

    Returns (stats, header) where header = {name, shape, voxel_size_a}.
    """
    tomo = open_with_stats(url, None, cfg)
    return tomo.stats, {"name": tomo.name, "shape": tomo.shape, "voxel_size_a": tomo.voxel_size_a}


def with_device(cfg: CryoSamConfig, section: str, device: str) -> CryoSamConfig:
    """``cfg`` with the backend of ``section`` ("encoder" or "segmenter") pinned to ``device``."""
    data = cfg.model_dump()
    if section == "encoder":
        data["encoder"]["dinov2"]["device"] = device
    else:
        data["segmenter"]["sam"]["device"] = device
    return CryoSamConfig.model_validate(data)


class _TomogramCache:
    """The last few tomograms a worker opened (their slices are read many times)."""

    def __init__(self, cfg: CryoSamConfig, size: int = 2):
        self.cfg, self.size = cfg, size
        self._open: OrderedDict[str, Tomogram] = OrderedDict()

    def get(self, url: str, stats: VolumeStats) -> Tomogram:
        if url not in self._open:
            self._open[url] = open_with_stats(url, stats, self.cfg)
            while len(self._open) > self.size:
                self._open.popitem(last=False)
        self._open.move_to_end(url)
        return self._open[url]


class EncoderWorker:
    """Holds one slice encoder; encodes shards of slices straight into the feature store."""

    def __init__(self, cfg: CryoSamConfig):
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        self._tomograms = _TomogramCache(cfg)
        self._fitted: str | None = None

    def describe(self, url: str, stats: VolumeStats) -> dict:
        """What the driver needs to create the tomogram's feature group (no features)."""
        tomo = self._tomograms.get(url, stats)
        signature = self.encoder.signature()
        return {"group": feature_key(tomo, signature), "signature": signature, "shape": tomo.shape,
                "grids": [self.encoder.token_grid(slice_shape(tomo.shape, a)) for a in range(3)],
                "channels": self.encoder.feature_dim}

    def encode(self, url: str, stats: VolumeStats, group_url: str, axis: int, start: int, stop: int) -> dict:
        """Encode slices ``start:stop`` along ``axis`` and commit them; returns a receipt."""
        t0 = time.perf_counter()
        tomo = self._tomograms.get(url, stats)
        if self._fitted != url:  # per-tomogram statistics: deterministic, so every worker agrees
            self.encoder.fit(tomo)
            self._fitted = url
        store = FeatureStore.open(group_url)
        receipt = store.write_shard(axis, start, encode_shard(tomo, self.encoder, axis, start, stop))
        receipt["seconds"] = time.perf_counter() - t0
        return receipt


class SegmenterWorker:
    """Holds one promptable segmenter; propagates prompts and proposals of a tomogram."""

    def __init__(self, cfg: CryoSamConfig):
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter)
        self._tomograms = _TomogramCache(cfg)

    def segment_prompts(self, url: str, stats: VolumeStats, points: list[Point]) -> list[Particle]:
        return segment_prompts(self._tomograms.get(url, stats), points, self.segmenter, self.cfg)

    def find_particles(self, url: str, stats: VolumeStats, group_url: str, queries: dict[str, ClassQuery],
                       proposals: dict[str, Proposals], prompts: list[Particle]) -> list[Particle]:
        """All particles of one tomogram: its prompt particles (scored) and every class's matches."""
        tomo = self._tomograms.get(url, stats)
        volume = FeatureStore.open(group_url, mode="r").volume()
        return particles_of_tomogram(tomo, volume, queries, proposals, prompts, self.segmenter, self.cfg)


class EmbedderWorker:
    """Holds SAM's image encoder; commits slice embeddings to the embedding store.

    Used when ``segmenter.sam.embedding_store`` is set: every slice the propagation may visit is
    embedded ahead, in shards spread over the embedder pool, so the segmenter actors only read.
    """

    def __init__(self, cfg: CryoSamConfig):
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter)
        self._tomograms = _TomogramCache(cfg)
        self._current: str | None = None

    def embed(self, url: str, stats: VolumeStats, axis: int, start: int, stop: int) -> dict:
        t0 = time.perf_counter()
        if self._current != url:
            self.segmenter.set_tomogram(self._tomograms.get(url, stats))
            self._current = url
        self.segmenter.embed_slices(axis, range(start, stop))
        return {"url": url, "axis": axis, "start": start, "slices": stop - start, "seconds": time.perf_counter() - t0}


def precomputes_embeddings(cfg: CryoSamConfig) -> bool:
    """True when SAM embeddings are computed ahead into a store (else on demand, in memory)."""
    return cfg.segmenter.backend == "sam" and bool(cfg.segmenter.sam.embedding_store)


def embedding_axes(cfg: CryoSamConfig) -> tuple[int, ...]:
    """The axes whose slices propagation visits."""
    return (0, 1, 2) if cfg.propagation.directions == "six" else (0,)


def prompt_query_parts(group_url: str, particles: list[Particle]) -> list[QueryPart]:
    """This tomogram's share of each class query (feature sums over its prompt voxels)."""
    return query_parts(FeatureStore.open(group_url, mode="r").volume(), particles)


def match_tomogram(group_url: str, queries: dict[str, ClassQuery], cfg: CryoSamConfig) -> dict[str, Proposals]:
    """Proposals of every class on one tomogram, reading its features from the store."""
    return match_classes(FeatureStore.open(group_url, mode="r").volume(), queries, cfg)


def finish_tomogram(url: str, stats: VolumeStats, particles: list[Particle], classes: list[str], out_dir: str,
                    cfg: CryoSamConfig, record: dict) -> dict:
    """Write one tomogram's masks (and preview), then its record; returns the record (with rows)."""
    tomo = open_with_stats(url, stats, cfg)
    files = write_tomogram_outputs(out_dir, tomo, particles, classes)
    rows = particle_rows(tomo, particles)
    files += write_preview_for(out_dir, tomo, particles, rows)
    record = {**record, "status": "done", "error": "", "rows": rows, "files": files}
    write_record(out_dir, record)
    return record


def write_preview_for(out_dir: str, tomo: Tomogram, particles: list[Particle], rows: list[dict]) -> list[str]:
    """``previews/<name>.png``: central slices with picks and mask outlines."""
    from cryosam_ray.previews import render_preview, write_preview
    from cryosam_ray.segment import label_volume

    labels = label_volume(tomo.shape, [p.instance for p in particles], [r["instance_id"] for r in rows])
    image = render_preview(tomo, rows, labels, label_classes={r["instance_id"]: r["class"] for r in rows})
    return [write_preview(f"{str(out_dir).rstrip('/')}/previews/{tomo.name}.png", image)]


# ---------------------------------------------------------------- per-tomogram records (resume)

def input_fingerprint(url: str, cfg: CryoSamConfig) -> dict:
    """What identifies an input file without reading it: its URL, size and modification stamp."""
    fs, path = fsspec.core.url_to_fs(url, **cfg.io.storage_options)
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    return {"url": url, "size": info.get("size"), "stamp": str(stamp)}


def result_signature(cfg: CryoSamConfig, prompts_digest: str, fingerprint: dict) -> str:
    """Everything a tomogram's picks depend on: its input, the prompts and the settings used."""
    settings = cfg.model_dump(mode="json", include={"io", "segmenter", "propagation", "encoder", "matching",
                                                     "instances"})
    payload = json.dumps({"input": fingerprint, "prompts": prompts_digest, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def record_url(out_dir: str, name: str) -> str:
    return f"{str(out_dir).rstrip('/')}/tomograms/{name}.json"


def read_record(out_dir: str, name: str) -> dict | None:
    try:
        with fsspec.open(record_url(out_dir, name), "r") as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(out_dir: str, record: dict) -> str:
    """The tomogram's record, written atomically (the last file of its outputs: its commit)."""
    from cryosam_ray.tables import write_bytes_atomic

    return write_bytes_atomic(record_url(out_dir, record["name"]), json.dumps(record, indent=1).encode())
