"""``cryosam run --address none``: the whole dataset in this process, tomogram by tomogram.

A plain loop over :mod:`cryosam_ray.job`, in the order the Ray executor also follows: every
tomogram holding prompts is encoded and its prompts segmented, the class queries are combined
from all of them, then each tomogram is matched, its particles found and its outputs written.
A tomogram that fails is recorded with its reason and the others go on.
"""

from __future__ import annotations

import logging
import time

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.copick_io import prior_radii
from cryosam_ray.errors import CryoSamError, RunInterrupted
from cryosam_ray.job import (EmbedderWorker, EncoderWorker, SegmenterWorker, TomogramHeader, embedding_shards,
                             finish_tomogram, match_tomogram, open_feature_group, precomputes_embeddings,
                             prompt_query_parts, tomogram_header)
from cryosam_ray.particle import Particle
from cryosam_ray.plan import (Plan, RunSummary, StageTimes, claim_output, interruption, make_plan, no_query_error,
                              write_record, write_run_outputs)
from cryosam_ray.console import Progress
from cryosam_ray.stages.query import combine_queries

log = logging.getLogger(__name__)


def run_in_process(tomogram_specs: list[str], prompts_path: str, out_dir: str, cfg: CryoSamConfig, *,
                   fail_fast: bool = False, incremental: bool = False, progress: bool = False,
                   wait_for_lock: bool = False) -> RunSummary:
    """The full pipeline over a dataset, in this process; outputs under ``out_dir``.

    Resume and ``incremental`` work as on Ray (see :func:`cryosam_ray.plan.make_plan`); the run
    holds the output folder's lease (see :func:`cryosam_ray.plan.claim_output`).
    """
    t0 = time.perf_counter()
    timer = StageTimes()
    with claim_output(out_dir, cfg, wait=wait_for_lock):
        plan = make_plan(tomogram_specs, prompts_path, out_dir, cfg, incremental=incremental, fail_fast=fail_fast)
        timer.add("plan", t0)
        run = _Run(plan, cfg, timer, fail_fast, Progress(progress))
        classes = sorted({p.cls for ps in plan.points.values() for p in ps})
        try:
            classes = run.run() if plan.todo else classes
        except (KeyboardInterrupt, RunInterrupted) as exc:  # what is finished is committed: record it, then stop
            write_run_outputs(plan, run.records, timer.times, cfg, classes, extra={
                "executor": "in-process", "interrupted": interruption(exc)})
            raise
        summary = write_run_outputs(plan, run.records, timer.times, cfg, classes, extra={"executor": "in-process"})
    summary.times["wall"] = time.perf_counter() - t0
    return summary


class _Run:
    def __init__(self, plan: Plan, cfg: CryoSamConfig, timer: StageTimes, fail_fast: bool, progress: Progress):
        self.plan, self.cfg, self.timer, self.fail_fast, self.progress = plan, cfg, timer, fail_fast, progress
        self.records = dict(plan.records)
        self.headers: dict[str, TomogramHeader] = {}
        self.groups: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self.store = plan.feature_store(cfg)

    def run(self) -> list[str]:
        cfg = self.cfg
        self.encoder, self.segmenter = EncoderWorker(cfg), SegmenterWorker(cfg)
        self.embedder = EmbedderWorker(cfg) if precomputes_embeddings(cfg) else None
        prompts: dict[str, list[Particle]] = {}
        parts = []
        self.progress.add("tomograms", total=len(self.plan.todo))
        for name in self.plan.prompt_tomograms:
            try:
                self._prepare(name)
                t = time.perf_counter()
                prompts[name] = self.segmenter.segment_prompts(self.headers[name], self.plan.points[name])
                self.timer.add("prompts", t)
                t = time.perf_counter()
                parts += prompt_query_parts(self.groups[name], prompts[name], cfg)
                self.timer.add("parts", t)
            except (CryoSamError, OSError) as exc:  # one tomogram's failure (a bad file, a full disk)
                self._fail(name, exc)
        queries = combine_queries(parts, radii=prior_radii(cfg.copick))
        if not queries:
            raise no_query_error(self.plan, self.failures)
        classes = sorted(queries)
        for name in self.plan.todo:
            if self.records[name].status == "failed":
                continue
            try:
                self._prepare(name)
                t = time.perf_counter()
                proposals = match_tomogram(self.groups[name], queries, cfg)
                self.timer.add("match", t)
                t = time.perf_counter()
                particles = self.segmenter.find_particles(self.headers[name], self.groups[name], queries, proposals,
                                                          prompts.get(name, []))
                self.timer.add("propagate", t)
                t = time.perf_counter()
                result = finish_tomogram(self.headers[name], particles, classes, self.plan.out_dir, cfg)
                self.timer.add("finish", t)
                record = self.records[name].finished(result.picks, result.files,
                                                     {cls: len(p) for cls, p in proposals.items()})
                self.records[name] = record
                write_record(self.plan.out_dir, record, cfg.io.storage_options)
            except (CryoSamError, OSError) as exc:  # one tomogram's failure (a bad file, a full disk)
                self._fail(name, exc)
            self.progress.add("tomograms", done=1)
        self.progress.close()
        return classes

    def _prepare(self, name: str) -> None:
        """Validate the tomogram; commit its features (and SAM embeddings) to the stores, once."""
        if name in self.groups:
            return
        t = time.perf_counter()
        header = tomogram_header(self.plan.tomograms[name].url, self.cfg)
        self.timer.add("header", t)
        t = time.perf_counter()
        group = open_feature_group(self.encoder.describe(header), header.url, self.store, self.cfg)
        for shard in group.missing:
            self.encoder.encode(header, group.url, shard)
        self.timer.add("encode", t)
        if self.embedder is not None:
            t = time.perf_counter()
            for shard in embedding_shards(header.shape, self.cfg):
                self.embedder.embed(header, shard)
            self.timer.add("embed", t)
        self.headers[name], self.groups[name] = header, group.url

    def _fail(self, name: str, exc: Exception) -> None:
        log.error("%s failed: %s", name, exc)
        self.failures[name] = str(exc)
        if self.fail_fast:
            raise exc
        if name not in self.plan.query_only:  # a tomogram done before keeps its record: only its prompts were lost
            self.records[name] = self.records[name].failed(str(exc))
            write_record(self.plan.out_dir, self.records[name], self.cfg.io.storage_options)
