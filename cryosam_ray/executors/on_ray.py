"""``cryosam run`` on Ray: the only module of the package that imports Ray (besides the Jobs API
client in :mod:`cryosam_ray.submit`).

Shape (DESIGN.md): encoder, embedder and segmenter actors each hold one model (a
:mod:`cryosam_ray.job` worker), pinned to the device Ray assigned them; plain tasks compute
statistics, query parts and matches and write outputs. The driver holds the plan, small results
(receipts, query vectors, picks) and object refs; slice data, features and masks never pass
through it.

Scheduling: Ray Core actors with ``ray.wait`` rather than Ray Data, because the stages of one
tomogram depend on each other (encode -> queries from every prompt tomogram -> match ->
propagate -> write) and on a dataset-wide barrier (the queries), which an event loop over refs
expresses directly; the loop also bounds what is in flight (shards, tomograms), so memory stays
flat however large the dataset, and one tomogram is encoded while another is matched or
propagated. Each tomogram's state is a small :class:`TomoState`; :meth:`_RayRun._advance` holds
every rule that starts a stage, each with the reason for its guard.

Faults: actors restart (``max_restarts``) and their calls are retried (``max_task_retries``);
tasks retry on lost workers (``max_retries``) and transient network errors. A tomogram whose
work fails for good is recorded as failed with its reason while the others finish.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict, deque

import ray

from cryosam_ray.config import CryoSamConfig, PoolConfig
from cryosam_ray.copick_io import prior_radii
from cryosam_ray.console import Progress, stderr_to_log
from cryosam_ray.errors import CryoSamError, RunInterrupted
from cryosam_ray.executors.schedule import Event, Pending, StallError, TomoState
from cryosam_ray.job import (EmbedderWorker, EncoderWorker, SegmenterWorker, embedding_shards, finish_tomogram,
                             match_tomogram, open_feature_group, pinned, precomputes_embeddings, prompt_query_parts,
                             tomogram_header)
from cryosam_ray.particle import ClassQuery
from cryosam_ray.plan import (Plan, RunSummary, claim_output, interruption, make_plan, no_query_error, write_record,
                              write_run_outputs)
from cryosam_ray.stages.query import combine_queries

log = logging.getLogger(__name__)

_TRANSIENT = [ConnectionError, TimeoutError]


def connect(address: str, *, num_cpus: int | None = None) -> bool:
    """Join or start Ray. Returns True when this call started a local Ray (to shut down after)."""
    if ray.is_initialized():
        return False
    if address == "local":
        with stderr_to_log("starting a local Ray", log):  # Ray's own start-up notices go to run.log, not the console
            ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, configure_logging=False)
        return True
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return False


def fit_to_local_cpus(cfg: CryoSamConfig, total_cpus: float) -> CryoSamConfig:
    """Scale CPU requests so the actor pools and two tasks fit a local Ray of ``total_cpus``.

    Whole-CPU actors plus whole-CPU tasks deadlock a small machine: actors hold their CPUs for
    the whole run, so tasks that need one more could never start. A cluster (which may
    autoscale) is left as configured.
    """
    r = cfg.ray
    pools = ["encoders", "segmenters"] + (["embedders"] if precomputes_embeddings(cfg) else [])
    demand = sum(getattr(r, p).size * getattr(r, p).num_cpus for p in pools) + 2 * r.task_cpus
    if demand <= total_cpus:
        return cfg
    factor = total_cpus / demand
    log.info("scaling CPU requests by %.2f to fit a local Ray of %g CPUs", factor, total_cpus)
    update = {p: getattr(r, p).model_copy(update={"num_cpus": getattr(r, p).num_cpus * factor}) for p in pools}
    return cfg.model_copy(update={"ray": r.model_copy(update={**update, "task_cpus": r.task_cpus * factor})})


def _device() -> str:
    """The device Ray assigned to this actor: an actor with num_gpus=0 sees every GPU but owns none."""
    return "cuda" if ray.get_gpu_ids() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs


class _EncoderActor(EncoderWorker):
    def __init__(self, cfg_json: dict):
        super().__init__(pinned(CryoSamConfig.model_validate(cfg_json), _device()))


class _EmbedderActor(EmbedderWorker):
    def __init__(self, cfg_json: dict):
        super().__init__(pinned(CryoSamConfig.model_validate(cfg_json), _device()))


class _SegmenterActor(SegmenterWorker):
    def __init__(self, cfg_json: dict):
        super().__init__(pinned(CryoSamConfig.model_validate(cfg_json), _device()))


class _Pool:
    """Actors of one kind; each call goes to the actor with the fewest calls outstanding."""

    def __init__(self, actor_class, pool: PoolConfig, cfg: CryoSamConfig, name: str):
        remote = ray.remote(actor_class)
        cfg_json = cfg.model_dump(mode="json")  # settings only: a restarted actor rebuilds its model from them
        # Named (cryosam-<run>-<kind>-<i>) so that operators and tests can find them in the cluster.
        self.actors = [remote.options(name=f"{name}-{i}", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                                      max_restarts=cfg.ray.max_restarts, max_task_retries=cfg.ray.max_retries)
                       .remote(cfg_json) for i in range(pool.size)]
        self.outstanding = [0] * pool.size
        self._owner: dict = {}

    def call(self, method: str, *args):
        index = min(range(len(self.actors)), key=self.outstanding.__getitem__)
        ref = getattr(self.actors[index], method).remote(*args)
        self.outstanding[index] += 1
        self._owner[ref] = index
        return ref

    def release(self, ref) -> None:
        index = self._owner.pop(ref, None)
        if index is not None:
            self.outstanding[index] -= 1


class _RayRun:
    def __init__(self, plan: Plan, cfg: CryoSamConfig, fail_fast: bool, progress: bool):
        self.plan, self.cfg, self.fail_fast = plan, cfg, fail_fast
        self.out_dir, self.store = plan.out_dir, plan.feature_store(cfg)
        self.tomos: dict[str, TomoState] = {}
        self.pending: dict = {}  # ref -> Pending
        self.shard_queue: deque = deque()  # (tomo, event, shard)
        self.inflight_shards = 0
        self.queries: dict[str, ClassQuery] | None = None
        self.parts: list = []
        self.waiting_parts: set[str] = set()
        self.active = 0  # tomograms admitted and not yet closed
        self.times: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.progress = Progress(progress)
        self.precompute = precomputes_embeddings(cfg)
        run_id = uuid.uuid4().hex[:8]
        r = cfg.ray
        self.encoders = _Pool(_EncoderActor, r.encoders, cfg, f"cryosam-{run_id}-encoder")
        self.segmenters = _Pool(_SegmenterActor, r.segmenters, cfg, f"cryosam-{run_id}-segmenter")
        self.embedders = _Pool(_EmbedderActor, r.embedders, cfg, f"cryosam-{run_id}-embedder") \
            if self.precompute else None
        opts = {"num_cpus": r.task_cpus, "max_retries": r.max_retries, "retry_exceptions": _TRANSIENT}
        self.header_task = ray.remote(tomogram_header).options(**opts)
        self.parts_task = ray.remote(prompt_query_parts).options(**opts)
        self.match_task = ray.remote(match_tomogram).options(**opts)
        self.finish_task = ray.remote(finish_tomogram).options(**opts)
        self.handlers = {Event.HEADER: self._on_header, Event.LAYOUT: self._on_layout, Event.SHARD: self._on_shard,
                         Event.EMBED: self._on_embed, Event.PROMPTS: self._on_prompts, Event.PARTS: self._on_parts,
                         Event.MATCH: self._on_match, Event.FIND: self._on_find, Event.FINISH: self._on_finish}

    # -- starting work -----------------------------------------------------------------------
    def _submit(self, ref, t: TomoState, event: Event, *, pool: _Pool | None = None, slices: int = 0) -> None:
        self.pending[ref] = Pending(t, event, slices, pool)

    def _pump_shards(self) -> None:
        """Send queued shards while fewer than ``ray.max_inflight_shards`` are in flight (bounds memory)."""
        while self.shard_queue and self.inflight_shards < self.cfg.ray.max_inflight_shards:
            t, event, shard = self.shard_queue.popleft()
            if t.closed:
                continue  # its tomogram failed meanwhile
            if event is Event.SHARD:
                ref = self.encoders.call("encode", t.header, t.group_url, shard)
                self._submit(ref, t, event, pool=self.encoders, slices=shard.slices)
            else:
                ref = self.embedders.call("embed", t.header, shard)
                self._submit(ref, t, event, pool=self.embedders, slices=shard.slices)
            self.inflight_shards += 1

    def _advance(self, t: TomoState) -> None:
        """Start every stage of ``t`` whose inputs are ready."""
        if t.closed:
            return
        # Prompts: after the header (statistics) and, when SAM embeddings are precomputed, after
        # them, since the segmenter only reads them from the store.
        if t.points and t.embedded and t.prompts_ref is None:
            t.prompts_ref = self.segmenters.call("segment_prompts", t.header, t.points)
            self._submit(t.prompts_ref, t, Event.PROMPTS, pool=self.segmenters)
        # Query parts: they average the stored features over the prompt masks, so both must be in.
        if t.points and t.encoded and t.prompts_done and not t.parts_sent:
            t.parts_sent = True
            self._submit(self.parts_task.remote(t.group_url, t.prompts_ref, self.cfg), t, Event.PARTS)
        # Matching: needs the queries (every prompt tomogram's parts, which follow its prompts) and
        # its own features. A tomogram done before is here for its prompts only.
        if self.queries is not None and t.encoded and not t.query_only and not t.matched:
            t.matched = True
            self._submit(self.match_task.remote(t.group_url, self.queries, self.cfg), t, Event.MATCH)
        # Propagation: the proposals, and the SAM embeddings it reads.
        if t.proposals_ref is not None and t.embedded:
            ref = self.segmenters.call("find_particles", t.header, t.group_url, self.queries, t.proposals_ref,
                                       t.prompts_ref if t.points else [])
            t.proposals_ref = None
            self._submit(ref, t, Event.FIND, pool=self.segmenters)

    # -- finished work -----------------------------------------------------------------------
    def _on_header(self, t: TomoState, ref, slices: int) -> None:
        t.header = ray.get(ref)
        self._submit(self.encoders.call("describe", t.header), t, Event.LAYOUT, pool=self.encoders)
        if self.precompute:
            shards = embedding_shards(t.header.shape, self.cfg)
            t.embeddings_left = len(shards)
            self.progress.add("embeddings", total=sum(s.slices for s in shards))
            self.shard_queue.extend((t, Event.EMBED, s) for s in shards)

    def _on_layout(self, t: TomoState, ref, slices: int) -> None:
        group = open_feature_group(ray.get(ref), t.header.url, self.store, self.cfg)
        t.group_url, t.features_left = group.url, len(group.missing)
        self.progress.add("slices", total=sum(s.slices for s in group.missing))
        self.shard_queue.extend((t, Event.SHARD, s) for s in group.missing)

    def _on_shard(self, t: TomoState, ref, slices: int) -> None:
        ray.get(ref)  # raises if the shard failed for good
        self.counts["shards_encoded"] += 1
        self.progress.add("slices", done=slices)
        t.features_left -= 1

    def _on_embed(self, t: TomoState, ref, slices: int) -> None:
        ray.get(ref)
        self.counts["embedding_shards"] += 1
        self.progress.add("embeddings", done=slices)
        t.embeddings_left -= 1

    def _on_prompts(self, t: TomoState, ref, slices: int) -> None:
        t.prompts_done = True  # the particles stay in the object store: the parts and find tasks read them
        self.progress.add("prompts", done=len(t.points))

    def _on_parts(self, t: TomoState, ref, slices: int) -> None:
        self.parts += ray.get(ref)
        self.waiting_parts.discard(t.name)
        if t.query_only:
            self._close(t)

    def _on_match(self, t: TomoState, ref, slices: int) -> None:
        t.proposals = {cls: len(p) for cls, p in ray.get(ref).items()}
        self.counts["proposals"] += sum(t.proposals.values())
        t.proposals_ref = ref  # propagated once the tomogram's SAM embeddings are in (see _advance)

    def _on_find(self, t: TomoState, ref, slices: int) -> None:
        classes = sorted(self.queries)
        self._submit(self.finish_task.remote(t.header, ref, classes, self.out_dir, self.cfg), t, Event.FINISH)

    def _on_finish(self, t: TomoState, ref, slices: int) -> None:
        result = ray.get(ref)
        t.record = t.record.finished(result.picks, result.files, t.proposals)
        write_record(self.out_dir, t.record, self.cfg.io.storage_options)
        self._close(t)
        self.progress.add("tomograms", done=1)

    def _stalled(self) -> None:
        """Nothing finished for ray.stall_timeout_s: fail what is left, saying what waits and what the cluster has."""
        waiting = defaultdict(int)
        for job in self.pending.values():
            waiting[job.event.value] += 1
        r = self.cfg.ray
        asks = {p: f"{getattr(r, p).size} x ({getattr(r, p).num_cpus:g} CPU, {getattr(r, p).num_gpus:g} GPU)"
                for p in ("encoders", "segmenters") + (("embedders",) if self.precompute else ())}
        try:
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        except Exception:  # the cluster itself is gone
            have, total = {}, {}
        message = (f"no work finished for {r.stall_timeout_s:g} s (ray.stall_timeout_s); waiting: {dict(waiting)}; "
                   f"the cluster has {total} ({have} free) and the pools ask {asks} plus {r.task_cpus:g} CPU per "
                   f"task: after a lost node, lower ray.*.num_cpus or add nodes, then rerun (finished tomograms "
                   f"are kept)")
        log.error(message)
        for t in self.tomos.values():
            if not t.closed:
                self._on_failure(t, StallError(message))

    def _close(self, t: TomoState) -> None:
        """``t`` needs nothing more: its slot goes to the next tomogram."""
        t.closed = True
        self.active -= 1

    def _maybe_queries(self) -> None:
        """Combine the queries once every prompt tomogram's parts are in (or it failed)."""
        if self.queries is None and not self.waiting_parts:
            if not self.parts:
                raise no_query_error(self.plan, {t.name: t.error for t in self.tomos.values() if t.error})
            self.queries = combine_queries(self.parts, radii=prior_radii(self.cfg.copick))
            for t in self.tomos.values():
                self._advance(t)

    def _on_failure(self, t: TomoState, exc: BaseException) -> None:
        cause = getattr(exc, "cause", None) or exc
        message = str(cause) if isinstance(cause, CryoSamError) else f"{type(cause).__name__}: {cause}"
        log.error("%s failed: %s", t.name, message)
        t.error = message
        if self.fail_fast:
            raise cause if isinstance(cause, Exception) else exc
        self._close(t)
        self.waiting_parts.discard(t.name)
        if not t.query_only:  # a tomogram done before keeps its record: only its prompts were lost
            t.record = t.record.failed(message)
            write_record(self.out_dir, t.record, self.cfg.io.storage_options)
            self.progress.add("tomograms", done=1)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        plan = self.plan
        for name in plan.prompt_tomograms + [n for n in plan.todo if not plan.points.get(n)]:
            self.tomos[name] = TomoState(name, plan.records[name], plan.points.get(name, []), name in plan.query_only)
        self.waiting_parts = set(plan.prompt_tomograms)
        self.progress.add("tomograms", total=len(plan.todo))
        self.progress.add("prompts", total=sum(len(plan.points[n]) for n in plan.prompt_tomograms))
        queue = deque(self.tomos.values())
        limit = self.cfg.ray.max_inflight_tomograms
        last_done = time.monotonic()
        # Shards wait in their own queue: the loop goes on while any remain, even when nothing is
        # in flight (a tomogram's last finished call may be the one that queued them).
        while queue or self.pending or self.shard_queue:
            # Prompt tomograms are admitted past the limit: the queries need all of them, and
            # admitted tomograms would otherwise wait for the queries forever.
            while queue and (self.active < limit or queue[0].name in self.waiting_parts):
                t = queue.popleft()
                self.active += 1
                self._submit(self.header_task.remote(t.record.url, self.cfg), t, Event.HEADER)
            self._pump_shards()
            if not self.pending:
                break
            # A timeout, so that signals (SIGTERM) are handled within a second whatever is in flight.
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            if not ready:
                if time.monotonic() - last_done > self.cfg.ray.stall_timeout_s:
                    self._stalled()
                    break
                continue
            last_done = time.monotonic()
            ref = ready[0]
            job = self.pending.pop(ref)
            self.times[job.event.value] += time.perf_counter() - job.since
            if job.pool is not None:
                job.pool.release(ref)
            if job.event in (Event.SHARD, Event.EMBED):
                self.inflight_shards -= 1
            if job.tomo.closed:
                continue  # work of a tomogram that failed meanwhile
            try:
                self.handlers[job.event](job.tomo, ref, job.slices)
                self._advance(job.tomo)
            except (ray.exceptions.RayError, CryoSamError, OSError) as exc:
                self._on_failure(job.tomo, exc)
            self._maybe_queries()
        self.progress.close()
        for t in self.tomos.values():  # a scheduling gap must not pass for success, nor lose the others
            if not t.closed:
                state = {k: getattr(t, k) for k in ("features_left", "embeddings_left", "prompts_done", "parts_sent",
                                                     "matched")}
                log.error("%s: the scheduler stopped before it finished (%s; queries %s; %d shards queued)",
                          t.name, state, self.queries is not None, len(self.shard_queue))
                self._on_failure(t, RuntimeError(f"internal: the run stopped before this tomogram finished "
                                                 f"({state})"))


def run_on_ray(tomogram_specs: list[str], prompts_path: str, out_dir: str, cfg: CryoSamConfig, *,
               fail_fast: bool = False, progress: bool = True, incremental: bool = False,
               wait_for_lock: bool = False) -> RunSummary:
    """The full pipeline over a dataset on Ray (joining or starting one per ``cfg.ray.address``).

    Resume and ``incremental`` as planned by :func:`cryosam_ray.plan.make_plan`; the picks table
    and ``run.json`` always cover every tomogram of the run. The run holds the output folder's
    lease (see :func:`cryosam_ray.plan.claim_output`).
    """
    t0 = time.perf_counter()
    with claim_output(out_dir, cfg, wait=wait_for_lock):
        plan = make_plan(tomogram_specs, prompts_path, out_dir, cfg, incremental=incremental, fail_fast=fail_fast)
        times = {"plan": time.perf_counter() - t0}
        run, resources = None, {}

        def outputs(**extra) -> RunSummary:
            records = dict(plan.records)
            if run is not None:
                records.update({name: t.record for name, t in run.tomos.items() if not t.query_only})
                times.update(run.times)
            classes = sorted(run.queries) if run and run.queries else sorted({p.cls for ps in plan.points.values()
                                                                             for p in ps})
            return write_run_outputs(plan, records, times, cfg, classes, extra={
                "executor": "ray", "resources": resources, "work": dict(run.counts) if run else {}, **extra})

        if plan.todo:
            started = connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
            try:
                cfg = _fit(cfg)
                run = _RayRun(plan, cfg, fail_fast, progress)
                run.run()
                resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
            except (KeyboardInterrupt, RunInterrupted) as exc:  # what is finished is committed: record it, stop
                outputs(interrupted=interruption(exc))
                raise
            finally:
                if started:
                    ray.shutdown()
        summary = outputs()
    summary.times["wall"] = time.perf_counter() - t0
    return summary


def _fit(cfg: CryoSamConfig) -> CryoSamConfig:
    """Fit CPU requests to a local Ray; on a cluster, warn when they cannot fit what it has now."""
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    if cfg.ray.address == "local":
        return fit_to_local_cpus(cfg, cluster_cpus)
    if fit_to_local_cpus(cfg, cluster_cpus) is not cfg:
        log.warning("the actor pools and tasks ask for more CPUs than the cluster has now (%g); unless it "
                    "autoscales, tasks will wait for CPUs the actors hold: lower ray.*.num_cpus", cluster_cpus)
    return cfg
