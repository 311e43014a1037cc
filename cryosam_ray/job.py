"""One tomogram's work, stage by stage, as plain Python over dataclasses (no Ray here).

Both executors (:mod:`cryosam_ray.executors.in_process`, :mod:`cryosam_ray.executors.on_ray`)
are thin schedules over exactly these pieces, in this order::

    tomogram_header                     validate; normalisation statistics (one full read)
    EncoderWorker.describe / open_feature_group / EncoderWorker.encode
                                        encode: slice shards into the feature store
    EmbedderWorker.embed                SAM slice embeddings ahead (only with an embedding store)
    SegmenterWorker.segment_prompts     prompt instances (stages.prompts)
    prompt_query_parts                  query parts (stages.query); the executor combines them
    match_tomogram                      match (stages.match)
    SegmenterWorker.find_particles      find particles, resolve classes (stages.particles, classes)
    finish_tomogram                     write masks, preview; the picks (stages.outputs)

The workers hold one model each, built once from settings (never from weights or arrays passed
in); the functions are stateless. Everything takes URLs and small values and returns small
dataclasses: slice data is read by the worker itself, features go straight to the store, masks
to the output folder.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.encoders import build_encoder
from cryosam_ray.feature_store import FeatureStore
from cryosam_ray.features import encode_shard, feature_key, slice_shape
from cryosam_ray.heap import fix_mmap_threshold
from cryosam_ray.matching import Proposals
from cryosam_ray.particle import ClassQuery, Particle, Pick, QueryPart
from cryosam_ray.segmenters import build_segmenter
from cryosam_ray.stages.match import match_classes
from cryosam_ray.stages.outputs import output_urls, picks_of, write_masks, write_preview
from cryosam_ray.stages.particles import particles_of_tomogram
from cryosam_ray.stages.prompts import segment_prompts
from cryosam_ray.stages.query import query_parts
from cryosam_ray.storage import remove, retried
from cryosam_ray.tables import Point
from cryosam_ray.tomo_io import Tomogram, VolumeStats, open_tomogram


@dataclass(frozen=True)
class TomogramHeader:
    """A validated tomogram: what the executors pass around instead of the open file."""

    name: str
    url: str
    shape: tuple[int, int, int]
    voxel_size_a: float
    stats: VolumeStats


@dataclass(frozen=True)
class Shard:
    """Slices ``start:stop`` along ``axis`` (0 = z, 1 = y, 2 = x)."""

    axis: int
    start: int
    stop: int

    @property
    def slices(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class FeatureLayout:
    """What the feature group of one tomogram under one encoder looks like (no features)."""

    key: str
    signature: dict
    shape: tuple[int, int, int]
    grids: tuple[tuple[int, int], ...]
    channels: int


@dataclass(frozen=True)
class FeatureGroup:
    """A tomogram's feature group in the store and the shards it still lacks."""

    url: str
    missing: tuple[Shard, ...]


@dataclass(frozen=True)
class ShardReceipt:
    """A committed shard (features or SAM embeddings)."""

    shard: Shard
    seconds: float


@dataclass
class TomogramResult:
    """One tomogram's finished work: its picks (ids as in its masks) and the files written."""

    picks: list[Pick]
    files: list[str]
    proposals: dict[str, int] = field(default_factory=dict)


def open_with_stats(header: TomogramHeader, cfg: CryoSamConfig) -> Tomogram:
    """Open a validated tomogram without the full read its statistics need."""
    tomo = open_tomogram(header.url, voxel_size_a=cfg.io.voxel_size_a, storage_options=cfg.io.storage_options,
                         cache_dir=tomogram_cache(cfg))
    tomo.__dict__["stats"] = header.stats  # the cached_property's slot
    return tomo


def tomogram_cache(cfg: CryoSamConfig) -> str | None:
    """The folder for local copies of remote tomograms on this node (``io.cache_dir``)."""
    if cfg.io.cache_dir == "auto":
        return os.path.join(tempfile.gettempdir(), "cryosam-tomograms")
    return cfg.io.cache_dir


def tomogram_header(url: str, cfg: CryoSamConfig) -> TomogramHeader:
    """Validate a tomogram (NaN, constant data) and compute its normalisation statistics."""
    tomo = open_tomogram(url, voxel_size_a=cfg.io.voxel_size_a, storage_options=cfg.io.storage_options)
    return TomogramHeader(tomo.name, tomo.url, tomo.shape, tomo.voxel_size_a, tomo.stats)


def pinned(cfg: CryoSamConfig, device: str) -> CryoSamConfig:
    """``cfg`` with each selected backend that runs on a device pinned to ``device``.

    A backend declares that it runs on a device by a ``device`` setting in its config section;
    weight-free backends have none and are left as they are.
    """
    data = cfg.model_dump()
    for section in ("encoder", "segmenter"):
        settings = data[section].get(data[section]["backend"])
        if isinstance(settings, dict) and "device" in settings:
            settings["device"] = device
    return CryoSamConfig.model_validate(data)


def precomputes_embeddings(cfg: CryoSamConfig) -> bool:
    """True when SAM embeddings are computed ahead into a store (else on demand, in memory)."""
    return cfg.segmenter.backend == "sam" and bool(cfg.segmenter.sam.embedding_store)


def embedding_shards(shape: tuple[int, int, int], cfg: CryoSamConfig) -> list[Shard]:
    """The slices propagation may visit, in shards (every axis with six directions, else z)."""
    step = cfg.features.shard_slices
    axes = (0, 1, 2) if cfg.propagation.directions == "six" else (0,)
    return [Shard(axis, a, min(a + step, shape[axis])) for axis in axes for a in range(0, shape[axis], step)]


class _TomogramCache:
    """The last few tomograms a worker opened (their slices are read many times)."""

    def __init__(self, cfg: CryoSamConfig, size: int = 2):
        self.cfg, self.size = cfg, size
        self._open: OrderedDict[str, Tomogram] = OrderedDict()

    def get(self, header: TomogramHeader) -> Tomogram:
        if header.url not in self._open:
            self._open[header.url] = open_with_stats(header, self.cfg)
            while len(self._open) > self.size:
                self._open.popitem(last=False)
        self._open.move_to_end(header.url)
        return self._open[header.url]


class EncoderWorker:
    """Holds one slice encoder; encodes shards of slices straight into the feature store."""

    def __init__(self, cfg: CryoSamConfig):
        fix_mmap_threshold()  # large blocks freed one after another must not grow the heap
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        self._tomograms = _TomogramCache(cfg)
        self._fitted: str | None = None

    def describe(self, header: TomogramHeader) -> FeatureLayout:
        """What the tomogram's feature group looks like under this encoder."""
        tomo = self._tomograms.get(header)
        signature = self.encoder.signature()
        return FeatureLayout(feature_key(tomo, signature), signature, tomo.shape,
                             tuple(tuple(self.encoder.token_grid(slice_shape(tomo.shape, a))) for a in range(3)),
                             self.encoder.feature_dim)

    def encode(self, header: TomogramHeader, group_url: str, shard: Shard) -> ShardReceipt:
        """Encode one shard of slices and commit it to the feature group."""
        t0 = time.perf_counter()
        tomo = self._tomograms.get(header)
        if self._fitted != header.url:  # per-tomogram statistics: deterministic, so every worker agrees
            self.encoder.fit(tomo)
            self._fitted = header.url
        feats = encode_shard(tomo, self.encoder, shard.axis, shard.start, shard.stop)
        store = FeatureStore.open(group_url, storage_options=self.cfg.io.storage_options)
        # Idempotent (the chunk, then its flag), so a write that a network error broke is simply redone.
        retried(lambda: store.write_shard(shard.axis, shard.start, feats), group_url)
        return ShardReceipt(shard, time.perf_counter() - t0)


def open_feature_group(layout: FeatureLayout, tomogram_url: str, store_url: str, cfg: CryoSamConfig) -> FeatureGroup:
    """Create (or reopen) the tomogram's feature group; list the shards not yet committed (resume)."""
    url = FeatureStore.group_url(store_url, layout.key)
    store = FeatureStore.create(url, shape=layout.shape, tomogram_url=tomogram_url,
                                encoder_signature=layout.signature, grids=[list(g) for g in layout.grids],
                                channels=layout.channels, shard_slices=cfg.features.shard_slices,
                                storage_options=cfg.io.storage_options)
    return FeatureGroup(url, tuple(Shard(axis, a, b) for axis in range(3) for a, b in store.missing_shards(axis)))


class EmbedderWorker:
    """Holds SAM's image encoder; commits slice embeddings to the embedding store.

    Used when ``segmenter.sam.embedding_store`` is set: every slice the propagation may visit is
    embedded ahead, in shards spread over the embedder pool, so the segmenter workers only read.
    """

    def __init__(self, cfg: CryoSamConfig):
        fix_mmap_threshold()  # large blocks freed one after another must not grow the heap
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter)
        self._tomograms = _TomogramCache(cfg)
        self._current: str | None = None

    def embed(self, header: TomogramHeader, shard: Shard) -> ShardReceipt:
        t0 = time.perf_counter()
        if self._current != header.url:
            self.segmenter.set_tomogram(self._tomograms.get(header))
            self._current = header.url
        self.segmenter.embed_slices(shard.axis, range(shard.start, shard.stop))
        return ShardReceipt(shard, time.perf_counter() - t0)


class SegmenterWorker:
    """Holds one promptable segmenter; segments prompts and finds the particles of a tomogram."""

    def __init__(self, cfg: CryoSamConfig):
        fix_mmap_threshold()  # large blocks freed one after another must not grow the heap
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter)
        self._tomograms = _TomogramCache(cfg)

    def segment_prompts(self, header: TomogramHeader, points: list[Point]) -> list[Particle]:
        return segment_prompts(self._tomograms.get(header), points, self.segmenter, self.cfg)

    def find_particles(self, header: TomogramHeader, group_url: str, queries: dict[str, ClassQuery],
                       proposals: dict[str, Proposals], prompts: list[Particle]) -> list[Particle]:
        """All particles of one tomogram: its prompt particles (scored) and every class's matches."""
        tomo = self._tomograms.get(header)
        volume = FeatureStore.open(group_url, mode="r", storage_options=self.cfg.io.storage_options).volume()
        return particles_of_tomogram(tomo, volume, queries, proposals, prompts, self.segmenter, self.cfg)


def prompt_query_parts(group_url: str, particles: list[Particle], cfg: CryoSamConfig) -> list[QueryPart]:
    """This tomogram's share of each class query (feature sums over its prompt voxels)."""
    return query_parts(FeatureStore.open(group_url, mode="r", storage_options=cfg.io.storage_options).volume(),
                       particles)


def match_tomogram(group_url: str, queries: dict[str, ClassQuery], cfg: CryoSamConfig) -> dict[str, Proposals]:
    """Proposals of every class on one tomogram, reading its features from the store."""
    volume = FeatureStore.open(group_url, mode="r", storage_options=cfg.io.storage_options).volume()
    return match_classes(volume, queries, cfg)


def finish_tomogram(header: TomogramHeader, particles: list[Particle], classes: list[str], out_dir: str,
                    cfg: CryoSamConfig) -> TomogramResult:
    """Write one tomogram's masks and preview (and, with ``copick.config``, its picks and masks
    into the copick project); return its picks and the files written."""
    tomo = open_with_stats(header, cfg)
    options = cfg.io.storage_options
    picks = picks_of(tomo, particles)
    planned = output_urls(out_dir, tomo.name, cfg.io.mask_format)
    try:
        files = write_masks(out_dir, tomo, particles, classes, mask_format=cfg.io.mask_format,
                            storage_options=options)
        labels = open_tomogram(files[0], voxel_size_a=tomo.voxel_size_a, storage_options=options)  # read by slabs
        files.append(write_preview(out_dir, tomo, labels, picks, classes, storage_options=options))
    except BaseException:  # a full disk, a lost bucket: leave no half of this tomogram's outputs behind
        remove(planned, options)
        raise
    if cfg.copick.config:  # the copick project gets this tomogram's picks and masks too
        from cryosam_ray.copick_io import write_back

        write_back(cfg.copick, tomo.name, tomo.shape, particles, picks, classes)
    return TomogramResult(picks, files)
