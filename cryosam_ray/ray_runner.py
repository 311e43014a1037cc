"""``cryosam run`` on Ray: the only module that knows about Ray.

Shape (DESIGN.md): encoder actors and segmenter actors each hold one model, pinned to the
device Ray assigned them; plain tasks compute statistics, match features and write outputs.
The driver holds the plan, small results (receipts, query vectors, rows) and object refs;
slice data, features and masks never pass through it.

Scheduling: Ray Core actors with ``ray.wait`` rather than Ray Data, because the stages of one
tomogram depend on each other (encode -> queries from every prompt tomogram -> match ->
propagate -> write) and on a dataset-wide barrier (the queries), which an event loop over refs
expresses directly; the loop also bounds what is in flight (shards, tomograms), so memory stays
flat however large the dataset, and one tomogram is encoded while another is matched or
propagated.

Faults: actors restart (``max_restarts``) and their calls are retried (``max_task_retries``);
tasks retry on lost workers (``max_retries``) and transient network errors. A tomogram whose
work fails for good is recorded as failed with its reason while the others finish.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field

import fsspec
import ray

from cryosam_ray.config import CryoSamConfig, PoolConfig
from cryosam_ray.errors import CryoSamError, PromptError
from cryosam_ray.feature_store import FeatureStore
from cryosam_ray.pipeline import ClassQuery, TomogramOutcome, combine_queries
from cryosam_ray.runner import RunSummary, _group_prompts, expand_tomograms, write_run_outputs_from_rows
from cryosam_ray.tables import Point, read_prompts
from cryosam_ray.tomo_io import open_tomogram, tomogram_name
from cryosam_ray.workers import (EmbedderWorker, EncoderWorker, SegmenterWorker, embedding_axes, finish_tomogram,
                                 input_fingerprint, match_tomogram, precomputes_embeddings, prompt_query_parts,
                                 read_record, result_signature, tomogram_stats, with_device, write_record)

log = logging.getLogger(__name__)

_TRANSIENT = [ConnectionError, TimeoutError]


def connect(address: str, *, num_cpus: int | None = None) -> bool:
    """Join or start Ray. Returns True when this call started a local Ray (to shut down after)."""
    if ray.is_initialized():
        return False
    if address == "local":
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


class _EncoderActor:
    def __init__(self, cfg_json: dict):
        self.worker = EncoderWorker(with_device(CryoSamConfig.model_validate(cfg_json), "encoder", _device()))

    def describe(self, url, stats):
        return self.worker.describe(url, stats)

    def encode(self, url, stats, group_url, axis, start, stop):
        return self.worker.encode(url, stats, group_url, axis, start, stop)


class _EmbedderActor:
    def __init__(self, cfg_json: dict):
        self.worker = EmbedderWorker(with_device(CryoSamConfig.model_validate(cfg_json), "segmenter", _device()))

    def embed(self, url, stats, axis, start, stop):
        return self.worker.embed(url, stats, axis, start, stop)


class _SegmenterActor:
    def __init__(self, cfg_json: dict):
        self.worker = SegmenterWorker(with_device(CryoSamConfig.model_validate(cfg_json), "segmenter", _device()))

    def segment_prompts(self, url, stats, points):
        return self.worker.segment_prompts(url, stats, points)

    def find_particles(self, url, stats, group_url, queries, proposals, prompts):
        return self.worker.find_particles(url, stats, group_url, queries, proposals, prompts)


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


@dataclass
class _Tomo:
    """Where one tomogram stands in the run."""

    name: str
    url: str
    record: dict
    points: list[Point] = field(default_factory=list)
    stats: object = None
    stats_shape: tuple = ()
    group_url: str = ""
    shards: int = 0  # not yet committed
    encoded: bool = False
    embeds: int = 0  # SAM embedding shards not yet committed
    embedded: bool = True
    prompts_sent: bool = False
    proposals_ref: object = None  # match result waiting for the embeddings
    prompts_ref: object = None  # its prompt particles (ref)
    prompts_done: bool = False
    parts_sent: bool = False
    matched: bool = False
    failed: bool = False


class _Progress:
    """One progress display per stage on the driver (tomograms, slices, prompts)."""

    def __init__(self, enabled: bool):
        self.bars = {}
        self.enabled = enabled

    def add(self, stage: str, total: int = 0, done: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(total=0, desc=stage, unit="", position=len(self.bars), leave=True)
        bar = self.bars[stage]
        bar.total += total
        bar.update(done)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class _RayRun:
    def __init__(self, cfg: CryoSamConfig, out_dir: str, fail_fast: bool, progress: bool):
        self.cfg, self.out_dir, self.fail_fast = cfg, str(out_dir).rstrip("/"), fail_fast
        self.store = cfg.features.store or f"{self.out_dir}/features"
        self.tomos: dict[str, _Tomo] = {}
        self.pending: dict = {}  # ref -> (tomogram name, kind, extra)
        self.shard_queue: deque = deque()
        self.inflight_shards = 0
        self.queries: dict[str, ClassQuery] | None = None
        self.parts: list = []
        self.waiting_parts: set[str] = set()
        self.times: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.run_id = uuid.uuid4().hex[:8]
        self.progress = _Progress(progress)
        self._encoders = self._segmenters = self._embedders = None
        self.precompute = precomputes_embeddings(cfg)
        opts = {"num_cpus": cfg.ray.task_cpus, "max_retries": cfg.ray.max_retries, "retry_exceptions": _TRANSIENT}
        self.stats_task = ray.remote(tomogram_stats).options(**opts)
        self.parts_task = ray.remote(prompt_query_parts).options(**opts)
        self.match_task = ray.remote(match_tomogram).options(**opts)
        self.finish_task = ray.remote(finish_tomogram).options(**opts)

    @property
    def encoders(self) -> _Pool:
        self._encoders = self._encoders or _Pool(_EncoderActor, self.cfg.ray.encoders, self.cfg,
                                               f"cryosam-{self.run_id}-encoder")
        return self._encoders

    @property
    def embedders(self) -> _Pool:
        self._embedders = self._embedders or _Pool(_EmbedderActor, self.cfg.ray.embedders, self.cfg,
                                                   f"cryosam-{self.run_id}-embedder")
        return self._embedders

    @property
    def segmenters(self) -> _Pool:
        self._segmenters = self._segmenters or _Pool(_SegmenterActor, self.cfg.ray.segmenters, self.cfg,
                                                   f"cryosam-{self.run_id}-segmenter")
        return self._segmenters

    # -- submission ------------------------------------------------------------------------
    def _submit(self, ref, name: str, kind: str, extra=None, pool: _Pool | None = None) -> None:
        self.pending[ref] = (name, kind, extra, pool, time.perf_counter())

    def admit(self, t: _Tomo) -> None:
        self._submit(self.stats_task.remote(t.url, self.cfg), t.name, "stats")

    def _pump_shards(self) -> None:
        while self.shard_queue and self.inflight_shards < self.cfg.ray.max_inflight_shards:
            t, kind, axis, start, stop = self.shard_queue.popleft()
            if t.failed:
                continue
            if kind == "shard":
                ref = self.encoders.call("encode", t.url, t.stats, t.group_url, axis, start, stop)
                self._submit(ref, t.name, kind, stop - start, self.encoders)
            else:
                ref = self.embedders.call("embed", t.url, t.stats, axis, start, stop)
                self._submit(ref, t.name, kind, stop - start, self.embedders)
            self.inflight_shards += 1

    def _advance(self, t: _Tomo) -> None:
        if t.failed:
            return
        if t.points and t.embedded and t.stats is not None and not t.prompts_sent:
            t.prompts_sent = True
            t.prompts_ref = self.segmenters.call("segment_prompts", t.url, t.stats, t.points)
            self._submit(t.prompts_ref, t.name, "prompts", pool=self.segmenters)
        if t.proposals_ref is not None and t.embedded:
            prompts = t.prompts_ref if t.points else []
            ref = self.segmenters.call("find_particles", t.url, t.stats, t.group_url, self.queries,
                                       t.proposals_ref, prompts)
            t.proposals_ref = None
            self._submit(ref, t.name, "find", pool=self.segmenters)
        if t.points and t.encoded and t.prompts_done and not t.parts_sent and t.name in self.waiting_parts:
            t.parts_sent = True
            self._submit(self.parts_task.remote(t.group_url, t.prompts_ref), t.name, "parts")
        if self.queries is not None and t.encoded and (t.prompts_done or not t.points) and not t.matched:
            t.matched = True
            self._submit(self.match_task.remote(t.group_url, self.queries, self.cfg), t.name, "match")

    # -- completion ------------------------------------------------------------------------
    def on_done(self, ref, name: str, kind: str, extra) -> None:
        t = self.tomos[name]
        if kind in ("shard", "embed"):
            self.inflight_shards -= 1
        if t.failed:
            return
        if kind == "stats":
            t.stats, header = ray.get(ref)
            t.stats_shape = tuple(header["shape"])
            self._submit(self.encoders.call("describe", t.url, t.stats), name, "describe", pool=self.encoders)
            if self.precompute:
                step = self.cfg.features.shard_slices
                shards = [(axis, a, min(a + step, t.stats_shape[axis])) for axis in embedding_axes(self.cfg)
                          for a in range(0, t.stats_shape[axis], step)]
                t.embeds, t.embedded = len(shards), not shards
                self.progress.add("embeddings", total=sum(b - a for _, a, b in shards))
                self.shard_queue.extend((t, "embed", axis, a, b) for axis, a, b in shards)
        elif kind == "describe":
            info = ray.get(ref)
            t.group_url = FeatureStore.group_url(self.store, info["group"])
            store = FeatureStore.create(t.group_url, shape=info["shape"], tomogram_url=t.url,
                                        encoder_signature=info["signature"], grids=info["grids"],
                                        channels=info["channels"], shard_slices=self.cfg.features.shard_slices)
            missing = [(axis, a, b) for axis in range(3) for a, b in store.missing_shards(axis)]
            self.progress.add("slices", total=sum(b - a for _, a, b in missing))
            t.shards = len(missing)
            t.encoded = not missing
            self.shard_queue.extend((t, "shard", axis, a, b) for axis, a, b in missing)
        elif kind == "shard":
            ray.get(ref)  # raises if the shard failed for good
            self.counts["shards_encoded"] += 1
            self.progress.add("slices", done=extra)
            t.shards -= 1
            t.encoded = t.shards == 0
        elif kind == "embed":
            ray.get(ref)
            self.counts["embedding_shards"] += 1
            self.progress.add("embeddings", done=extra)
            t.embeds -= 1
            t.embedded = t.embeds == 0
        elif kind == "prompts":
            t.prompts_done = True
            self.progress.add("prompts", done=len(t.points))
        elif kind == "parts":
            self.parts += ray.get(ref)
            self.waiting_parts.discard(name)
            self._maybe_queries()
        elif kind == "match":
            self.counts["proposals"] += sum(len(p) for p in ray.get(ref).values())
            t.proposals_ref = ref  # propagated once the tomogram's SAM embeddings are in (see _advance)
        elif kind == "find":
            classes = sorted(self.queries)
            self._submit(self.finish_task.remote(t.url, t.stats, ref, classes, self.out_dir, self.cfg, t.record),
                         name, "finish")
        elif kind == "finish":
            t.record = ray.get(ref)
            self.progress.add("tomograms", done=1)
            return
        self._advance(t)

    def _maybe_queries(self) -> None:
        if self.queries is None and not self.waiting_parts:
            if not self.parts:
                raise PromptError("no prompt gave a particle mask, so there is no query to match")
            self.queries = combine_queries(self.parts)
            for t in self.tomos.values():
                self._advance(t)

    def on_failure(self, name: str, exc: BaseException) -> None:
        t = self.tomos[name]
        cause = getattr(exc, "cause", None) or exc
        message = str(cause) if isinstance(cause, CryoSamError) else f"{type(cause).__name__}: {cause}"
        log.error("%s failed: %s", name, message)
        t.failed = True
        t.record = {**t.record, "status": "failed", "error": message, "rows": [], "files": []}
        write_record(self.out_dir, t.record)
        self.progress.add("tomograms", done=1)
        if self.fail_fast:
            raise cause if isinstance(cause, Exception) else exc
        if name in self.waiting_parts:
            self.waiting_parts.discard(name)
            self._maybe_queries()

    # -- the loop --------------------------------------------------------------------------
    def run(self, order: list[_Tomo]) -> None:
        queue = deque(order)
        active = 0
        limit = self.cfg.ray.max_inflight_tomograms
        # Shards wait in their own queue: the loop goes on while any remain, even when nothing is
        # in flight (a tomogram's last pending call may be the one that queued them).
        while queue or self.pending or self.shard_queue:
            while queue and (active < limit or queue[0].name in self.waiting_parts):
                self.admit(queue.popleft())
                active += 1
            self._pump_shards()
            if not self.pending:
                break
            ready, _ = ray.wait(list(self.pending), num_returns=1)
            ref = ready[0]
            name, kind, extra, pool, since = self.pending.pop(ref)
            self.times[kind] += time.perf_counter() - since
            if pool is not None:
                pool.release(ref)
            try:
                self.on_done(ref, name, kind, extra)
            except (ray.exceptions.RayError, CryoSamError, OSError) as exc:
                if isinstance(exc, PromptError) and kind == "parts":
                    raise
                self.on_failure(name, exc)
            t = self.tomos[name]
            if (kind == "finish" or t.failed) and not getattr(t, "_closed", False):
                t._closed = True
                active -= 1
        self.progress.close()
        for t in self.tomos.values():  # a scheduling gap must not pass for success, nor lose the others
            if "status" not in t.record:
                state = {k: getattr(t, k) for k in ("encoded", "shards", "embedded", "prompts_sent", "prompts_done",
                                                     "parts_sent", "matched")}
                log.error("%s: the scheduler stopped before it finished (%s; queries %s; %d shards queued)",
                          t.name, state, self.queries is not None, len(self.shard_queue))
                self.on_failure(t.name, RuntimeError(f"internal: the run stopped before this tomogram finished "
                                                     f"({state})"))


def run_on_ray(tomogram_specs: list[str], prompts_path: str, out_dir: str, cfg: CryoSamConfig, *,
               fail_fast: bool = False, progress: bool = True, incremental: bool = False) -> RunSummary:
    """The full pipeline over a dataset on Ray (joining or starting one per ``cfg.ray.address``).

    Tomograms whose record in ``out_dir/tomograms/`` matches this run's inputs and settings are
    skipped (resume); with ``incremental``, every tomogram with finished outputs is skipped, so a
    nightly job over a growing folder processes only what is new. The picks table and
    ``run.json`` always cover every tomogram of the run.
    """
    t0 = time.perf_counter()
    started = connect(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    if cfg.ray.address == "local":
        cfg = fit_to_local_cpus(cfg, cluster_cpus)
    elif fit_to_local_cpus(cfg, cluster_cpus) is not cfg:
        log.warning("the actor pools and tasks ask for more CPUs than the cluster has now (%g); unless it "
                    "autoscales, tasks will wait for CPUs the actors hold: lower ray.*.num_cpus", cluster_cpus)
    try:
        summary = _run(tomogram_specs, prompts_path, out_dir, cfg, fail_fast, progress, incremental)
    finally:
        if started:
            ray.shutdown()
    summary.times["wall"] = time.perf_counter() - t0
    return summary


def _run(specs, prompts_path, out_dir, cfg, fail_fast, progress, incremental) -> RunSummary:
    out_dir = str(out_dir).rstrip("/")
    run = _RayRun(cfg, out_dir, fail_fast, progress)
    with fsspec.open(prompts_path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    headers, outcomes = {}, {}
    for url in expand_tomograms(specs):
        try:
            headers[tomogram_name(url)] = open_tomogram(url, voxel_size_a=cfg.io.voxel_size_a,
                                                        storage_options=cfg.io.storage_options)
        except CryoSamError as exc:
            if fail_fast:
                raise
            log.error("%s failed: %s", tomogram_name(url), exc)
            outcomes[tomogram_name(url)] = {"name": tomogram_name(url), "url": url, "status": "failed",
                                            "error": str(exc), "rows": []}
    points = read_prompts(prompts_path, voxel_size_a={n: t.voxel_size_a for n, t in headers.items()})
    by_tomo = _group_prompts(points, headers, prompts_path)
    todo, new = [], []
    for name, tomo in headers.items():
        signature = result_signature(cfg, digest, input_fingerprint(tomo.url, cfg))
        previous = read_record(out_dir, name)
        if previous is None:
            new.append(name)
        finished = previous is not None and previous.get("status") == "done"
        if finished and (incremental or previous.get("signature") == signature):
            outcomes[name] = {**previous, "status": "skipped"}  # done by an earlier run with the same inputs
            continue
        record = {"name": name, "url": tomo.url, "signature": signature}
        run.tomos[name] = _Tomo(name, tomo.url, record, points=by_tomo.get(name, []))
        todo.append(run.tomos[name])
    if todo:
        prompt_tomos = [t for t in todo if t.points]
        missing_prompts = set(by_tomo) - {t.name for t in prompt_tomos}
        for name in sorted(missing_prompts):  # prompt tomograms already done: their queries are needed again
            tomo = headers[name]
            signature = result_signature(cfg, digest, input_fingerprint(tomo.url, cfg))
            run.tomos[name] = _Tomo(name, tomo.url, {"name": name, "url": tomo.url, "signature": signature},
                                    points=by_tomo[name])
            prompt_tomos.append(run.tomos[name])
        run.waiting_parts = {t.name for t in prompt_tomos}
        run.progress.add("tomograms", total=len(todo))
        run.progress.add("prompts", total=sum(len(t.points) for t in prompt_tomos))
        order = prompt_tomos + [t for t in todo if not t.points]
        run.run(order)
        for name, t in run.tomos.items():
            if name in missing_prompts:
                continue  # its earlier record stands
            outcomes[name] = t.record
    for name in headers:
        if name not in outcomes:
            outcomes[name] = {**read_record(out_dir, name), "status": "skipped"}
    classes = sorted(run.queries) if run.queries else sorted({p.cls for p in points})
    summary = RunSummary([_outcome(o) for o in outcomes.values()], dict(run.times))
    summary.files = write_run_outputs_from_rows(out_dir, summary, [o.get("rows", []) for o in outcomes.values()],
                                                cfg, classes, extra={
                                                    "executor": "ray", "incremental": incremental,
                                                    "resources": _resources(), "work": dict(run.counts),
                                                    "tomogram_sets": _sets(outcomes, new)})
    return summary


def _sets(outcomes: dict[str, dict], new: list[str]) -> dict[str, list[str]]:
    """Which tomograms were new to the output folder, and which were done, skipped or failed."""
    sets = {"new": sorted(new), "done": [], "skipped": [], "failed": []}
    for name, record in sorted(outcomes.items()):
        sets[record["status"]].append(name)
    return sets


def _outcome(record: dict) -> TomogramOutcome:
    outcome = TomogramOutcome(record["name"], record["url"], status=record["status"], error=record.get("error", ""))
    outcome.files = record.get("files", [])
    outcome.picks = len(record.get("rows", []))
    return outcome


def _resources() -> dict:
    try:
        return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    except Exception:  # the cluster went away while the outputs were written
        return {}

