"""The CryoSAM pipeline in process: prompts -> instances -> query -> matching -> particles.

Stages (each a plain function, reused by the Ray wiring):

1. :func:`segment_prompts`: each prompt's 3D instance (Cross-Plane Self-Prompting).
2. :func:`build_queries`: one query per class, the masked average of voxel features over the
   class's prompt instances, wherever they lie in the dataset.
3. :func:`match_classes`, :func:`density_proposals` and :func:`find_particles`: per tomogram
   and class, Hierarchical Feature Matching proposes points at the prompts' scale; with the
   density stage (default) blobs at that scale join them and all are ranked by their density
   score (:mod:`cryosam_ray.density`). They are propagated in batches, best first; a proposal
   inside a particle already found is skipped, overlapping masks are one particle, masks far
   from the prompts' size are rejected (and claim no voxels), and each particle gets a
   ``score``. Particles under a cut calibrated from the run's score distribution are dropped
   (:func:`score_cut`), and one class keeps each physical particle (:func:`resolve_classes`).
4. :func:`write_tomogram_outputs`: instance and semantic masks; the picks table is built from
   :func:`particle_rows` of all tomograms.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.density import DensityMap, DensityProfile, density_map, density_proposals
from cryosam_ray.features import FeatureVolume
from cryosam_ray.matching import Proposals, SimilarityField, auto_ratios, hierarchical_match, naive_match, query_feature
from cryosam_ray.propagation import Instance, propagate
from cryosam_ray.segment import label_volume
from cryosam_ray.tables import Point
from cryosam_ray.tomo_io import Tomogram, write_mrc

log = logging.getLogger(__name__)


@dataclass
class Particle:
    """One segmented particle.

    Attributes:
        cls: its class.
        instance: its 3D mask (bounding box + cropped mask).
        source: "prompt" (a user's prompt) or "match" (found by feature matching).
        similarity: the proposal's voxel similarity with the query (NaN for prompts).
        instance_similarity: the particle's mean feature against the class query, with the
            configured similarity (projection: prompt = 1, background = 0).
        score: what particles are ranked, cut and resolved by. ``density.score: density``: the
            density score of its proposal (:func:`cryosam_ray.density.density_scores`, robust
            z units over the class's candidates on the tomogram). ``features``: with projection,
            ``instance_similarity`` times the cosine of the particle's direction from background
            with the query's, prompt = 1; with cosine, ``instance_similarity``.
        class_score: what decides between classes claiming one particle: with the density score,
            minus the distance of its shell profile to the class prompts' (NaN: ``score`` decides).
        centre: (z, y, x) voxel position reported in the picks table (None: the mask's centroid;
            with the density score, see :func:`place_by_density`).
    """

    cls: str
    instance: Instance
    source: str
    similarity: float = math.nan
    instance_similarity: float = math.nan
    score: float = math.nan
    class_score: float = math.nan
    centre: tuple[float, float, float] | None = None
    density: DensityProfile | None = None  # prompts only, when the density score or blobs are on

    def voxels(self) -> np.ndarray:
        """(M, 3) ZYX voxel coordinates of the mask."""
        return np.argwhere(self.instance.mask) + np.asarray(self.instance.bbox[:3])


@dataclass
class ClassQuery:
    """What matching needs to know about one class, from its prompt instances.

    Attributes:
        vector: (3C,) mean voxel feature over the prompt instances.
        background: (3C,) mean voxel feature of the tomograms holding them (projection's origin).
        median_voxels: voxel count of the median prompt instance.
        radius: equivalent-sphere radius of the median prompt instance, voxels.
        shells: (2S,) mean shell profile of the prompts (None without density profiles).
        polarity: +1 dense is bright, -1 dense is dark (the prompts' majority).
    """

    cls: str
    vector: np.ndarray
    background: np.ndarray
    median_voxels: float
    radius: float
    shells: np.ndarray | None = None
    polarity: float = -1.0


@dataclass
class TomogramOutcome:
    """One tomogram's result in a run: its particles, or why it failed."""

    name: str
    url: str
    status: str = "done"  # done | failed | skipped (done by an earlier run with the same inputs)
    error: str = ""
    picks: int = 0
    particles: list[Particle] = field(default_factory=list)
    proposals: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def segment_prompts(tomogram: Tomogram, points: list[Point], segmenter, cfg: CryoSamConfig) -> list[Particle]:
    """The prompt instances of one tomogram (empty ones are logged and dropped)."""
    coords = np.array([[p.z, p.y, p.x] for p in points], dtype=np.float64).reshape(-1, 3)
    prop = cfg.propagation
    instances = propagate(segmenter, tomogram, coords, directions=prop.directions,
                          iou_threshold=prop.iou_threshold, max_steps=prop.max_steps)
    particles = [Particle(p.cls, inst, "prompt") for p, inst in zip(points, instances) if not inst.empty]
    if uses_density(cfg):
        maps: dict[int, DensityMap] = {}
        for particle in particles:
            radius = equivalent_radius(particle.instance.voxel_count)
            dmap = density_map(maps, tomogram, radius)
            particle.density = dmap.profile(np.asarray(particle.instance.prompt), particle.voxels(), radius,
                                            count=cfg.density.shells, reach=cfg.density.reach)
    return particles


def uses_density(cfg: CryoSamConfig) -> bool:
    """Whether the run needs the prompts' density profiles (blob proposals or the density score)."""
    return cfg.density.blobs or cfg.density.score == "density"


def equivalent_radius(voxels: float) -> float:
    """Radius in voxels of a sphere of ``voxels`` voxels."""
    return (3 * voxels / (4 * math.pi)) ** (1 / 3)


@dataclass
class QueryPart:
    """One tomogram's contribution to a class query: feature sums over its prompt voxels, and its
    mean feature weighted by those voxels (the background the query is measured from)."""

    cls: str
    feature_sum: np.ndarray  # (3C,) float64
    background_sum: np.ndarray  # (3C,) float64: the tomogram's mean feature x voxels
    voxels: int
    sizes: list[int]
    profiles: list[DensityProfile] = field(default_factory=list)


def query_parts(volume: FeatureVolume, particles: list[Particle]) -> list[QueryPart]:
    """Per class, the sum of voxel features over this tomogram's prompt particles."""
    parts: dict[str, QueryPart] = {}
    background = volume.mean_feature() if particles else None
    for particle in particles:
        vox = particle.voxels()
        total = query_feature(volume, [vox]).astype(np.float64) * len(vox)
        part = parts.setdefault(particle.cls, QueryPart(particle.cls, np.zeros_like(total), np.zeros_like(total),
                                                        0, []))
        part.feature_sum += total
        part.background_sum += background * len(vox)
        part.voxels += len(vox)
        part.sizes.append(particle.instance.voxel_count)
        if particle.density is not None:
            part.profiles.append(particle.density)
    return list(parts.values())


def combine_queries(parts: list[QueryPart]) -> dict[str, ClassQuery]:
    """The paper's query: sum over all prompt voxels of a class, wherever they lie, over their count."""
    merged: dict[str, QueryPart] = {}
    for part in parts:
        acc = merged.setdefault(part.cls, QueryPart(part.cls, np.zeros_like(part.feature_sum),
                                                    np.zeros_like(part.feature_sum), 0, []))
        acc.feature_sum += part.feature_sum
        acc.background_sum += part.background_sum
        acc.voxels += part.voxels
        acc.sizes += part.sizes
        acc.profiles += part.profiles
    queries = {}
    for cls, part in sorted(merged.items()):
        median = float(np.median(part.sizes))
        profiles = part.profiles
        queries[cls] = ClassQuery(
            cls, (part.feature_sum / part.voxels).astype(np.float32), part.background_sum / part.voxels, median,
            equivalent_radius(median), shells=np.mean([p.shells for p in profiles], axis=0) if profiles else None,
            polarity=1.0 if sum(p.polarity for p in profiles) > 0 else -1.0)
    return queries


def score_particles(volume: FeatureVolume, particles: list[Particle], queries: dict[str, ClassQuery],
                    similarity: str = "projection") -> None:
    """Set each particle's ``instance_similarity`` and ``score`` (see :class:`Particle`)."""
    mean = volume.mean_feature() if similarity == "projection" and particles else None
    for particle in particles:
        query = queries[particle.cls]
        feature = query_feature(volume, [particle.voxels()]).astype(np.float64)
        if similarity == "cosine":
            particle.instance_similarity = particle.score = _cosine(feature, query.vector)
            continue
        direction = query.vector - query.background
        offset = feature - mean
        particle.instance_similarity = float(offset @ direction / max(float(direction @ direction), 1e-12))
        particle.score = max(particle.instance_similarity, 0.0) * max(_cosine(offset, direction), 0.0)


def build_queries(prompt_particles: dict[str, list[Particle]], volumes: dict[str, FeatureVolume]) -> dict[str, ClassQuery]:
    """One :class:`ClassQuery` per class from the prompt particles of every tomogram (in process).

    Args:
        prompt_particles: tomogram name -> its prompt particles (scored in place).
        volumes: tomogram name -> its features (for every tomogram holding prompts).
    """
    queries = combine_queries([part for name, particles in prompt_particles.items()
                               for part in query_parts(volumes[name], particles)])
    return queries


def match_classes(volume: FeatureVolume, queries: dict[str, ClassQuery], cfg: CryoSamConfig) -> dict[str, Proposals]:
    """Proposals of every class on one tomogram, by the configured method, at each class's scale.

    Hierarchical matching makes one streamed pass over the stored maps for all classes.
    """
    m = cfg.matching
    classes = sorted(queries)
    if m.method == "naive":
        return {cls: naive_match(volume, queries[cls].vector, tau_sim=m.tau_sim, top_k=m.top_k,
                                 nms_radius=m.nms_radius or queries[cls].radius, similarity=m.similarity,
                                 background=queries[cls].background) for cls in classes}
    field = SimilarityField(volume, np.stack([queries[c].vector for c in classes]), similarity=m.similarity,
                            backgrounds=np.stack([queries[c].background for c in classes]))
    return {cls: hierarchical_match(field, query=index, tau_sim=m.tau_sim, keep_fraction=m.keep_fraction,
                                    ratios=auto_ratios(queries[cls].radius) if m.ratios == "auto" else m.ratios,
                                    dilate=m.dilate, nms_radius=m.nms_radius or queries[cls].radius, top_k=m.top_k)
            for index, cls in enumerate(classes)}


def find_particles(tomogram: Tomogram, volume: FeatureVolume, query: ClassQuery, proposals: Proposals,
                   segmenter, cfg: CryoSamConfig, known: list[Particle]) -> list[Particle]:
    """Propagate proposals (best first, in batches) into new particles of ``query.cls``.

    ``known`` particles (this class's prompt instances on this tomogram) are never found twice.
    """
    inst_cfg, prop = cfg.instances, cfg.propagation
    claimed = np.zeros(tomogram.shape, bool)  # voxels of accepted particles (rejected masks claim nothing)
    for particle in known:
        particle.instance.paste(claimed, True)
    found: list[Particle] = []
    lo = (inst_cfg.min_size_ratio or 0.0) * query.median_voxels
    hi = (inst_cfg.max_size_ratio or math.inf) * query.median_voxels
    radius = query.radius if prop.size_prior else None
    order = list(range(len(proposals)))
    while order:
        batch = [i for i in order[:inst_cfg.batch] if not claimed[tuple(np.rint(proposals.zyx[i]).astype(int))]]
        order = order[inst_cfg.batch:]
        if not batch:
            continue
        instances = propagate(segmenter, tomogram, proposals.zyx[batch], directions=prop.directions,
                              iou_threshold=prop.iou_threshold, max_steps=prop.max_steps, radius=radius)
        for i, inst in zip(batch, instances):
            if inst.empty or not lo <= inst.voxel_count <= hi:
                continue  # a leaked or empty mask: it claims nothing, so it hides no true neighbour
            z0, y0, x0, z1, y1, x1 = inst.bbox
            if claimed[z0:z1, y0:y1, x0:x1][inst.mask].sum() >= inst_cfg.overlap * inst.voxel_count:
                continue  # the same particle as one found before
            inst.paste(claimed, True)
            found.append(Particle(query.cls, inst, "match", similarity=float(proposals.similarity[i])))
    score_particles(volume, found, {query.cls: query}, cfg.matching.similarity)
    log.info("%s: %d %s candidates from %d proposals", tomogram.name, len(found), query.cls, len(proposals))
    return found


def score_cut(scores: np.ndarray, min_score: float | str | None, similarity: str = "projection") -> float:
    """The smallest score kept. ``"auto"``: the split of the scores into two groups (Otsu's
    threshold: the cut maximising the between-group variance); for projection scores kept
    within [0.25, 0.6] of the prompt's own score, since a run's candidates may be nearly all
    particles or nearly all background; a number: that; None: keep all (-inf)."""
    if min_score is None:
        return -math.inf
    if min_score != "auto":
        return float(min_score)
    scores = np.sort(np.asarray(scores, np.float64)[np.isfinite(scores)])
    if len(scores) < 4:
        return 0.25 if similarity == "projection" else -math.inf
    n = np.arange(1, len(scores))
    left = np.cumsum(scores)[:-1] / n
    right = (scores.sum() - np.cumsum(scores)[:-1]) / (len(scores) - n)
    between = n * (len(scores) - n) * (left - right) ** 2
    best = int(np.argmax(between))
    split = 0.5 * (scores[best] + scores[best + 1])
    return float(np.clip(split, 0.25, 0.6)) if similarity == "projection" else float(split)


def keep_scored(particles: list[Particle], cfg: CryoSamConfig) -> list[Particle]:
    """Prompts, and matches scoring at least the run's cut (per class, see :func:`score_cut`)."""
    kept = [p for p in particles if p.source == "prompt"]
    for cls in sorted({p.cls for p in particles}):
        matches = [p for p in particles if p.cls == cls and p.source != "prompt"]
        kind = "density" if cfg.density.score == "density" else cfg.matching.similarity
        cut = score_cut(np.array([p.score for p in matches]), cfg.instances.min_score, kind)
        kept += [p for p in matches if p.score >= cut]
        log.info("%s: %d of %d candidates score >= %.3f", cls, sum(p.score >= cut for p in matches), len(matches), cut)
    return kept


def particles_of_tomogram(tomogram: Tomogram, volume: FeatureVolume, queries: dict[str, ClassQuery],
                          proposals: dict[str, Proposals], prompts: list[Particle], segmenter,
                          cfg: CryoSamConfig) -> list[Particle]:
    """Every particle of one tomogram: its prompt particles (scored) and each class's matches
    above the run's cut, one class per physical particle. Both executors call this."""
    prompts = [p for p in prompts if p.cls in queries]
    score_particles(volume, prompts, queries, cfg.matching.similarity)
    scorers = {}
    if uses_density(cfg):
        proposals, scorers = density_proposals(tomogram, queries, proposals, prompts, cfg)
    particles = list(prompts)
    for cls in sorted(queries):
        known = [p for p in prompts if p.cls == cls]
        found = find_particles(tomogram, volume, queries[cls], proposals[cls], segmenter, cfg, known)
        if cls in scorers:
            place_by_density(found, scorers[cls])
        particles += found
    return resolve_classes(keep_scored(particles, cfg), tomogram.shape, overlap=cfg.instances.overlap)


def place_by_density(found: list[Particle], scorer) -> None:
    """Each particle's ``score`` and reported ``centre``: its mask's centroid or the proposal that
    found it, whichever matches the class's prompts better (a mask merged with a touching
    neighbour puts its centroid between the two; an elongated particle's proposal may sit off
    its middle, where its centroid is)."""
    if not found:
        return
    proposals = np.array([p.instance.prompt for p in found], np.float64)
    centroids = np.array([p.instance.centroid for p in found], np.float64)
    at_proposal, shape_at_proposal = scorer.score(proposals)
    at_centroid, shape_at_centroid = scorer.score(centroids)
    for i, particle in enumerate(found):
        use_centroid = at_centroid[i] >= at_proposal[i]
        particle.centre = tuple(float(v) for v in (centroids[i] if use_centroid else proposals[i]))
        particle.score = float(max(at_centroid[i], at_proposal[i]))
        particle.class_score = float(shape_at_centroid[i] if use_centroid else shape_at_proposal[i])


def resolve_classes(particles: list[Particle], shape: tuple[int, int, int], *, overlap: float) -> list[Particle]:
    """One class per physical particle: where particles of different classes overlap (by at least
    ``overlap`` of the smaller), the prompt wins, else the best-matching class (highest
    ``class_score`` where set, else ``score``). Returns the survivors, prompts first, each group
    in input order."""
    def rank(i: int):
        p = particles[i]
        return p.source != "prompt", -np.nan_to_num(p.score if math.isnan(p.class_score) else p.class_score, nan=1.0)

    ranked = sorted(range(len(particles)), key=rank)
    owner = np.zeros(shape, np.int32)  # 1 + index of the accepted particle holding each voxel
    sizes = {}
    kept = []
    for i in ranked:
        inst = particles[i].instance
        z0, y0, x0, z1, y1, x1 = inst.bbox
        region = owner[z0:z1, y0:y1, x0:x1]
        holders = np.bincount(region[inst.mask], minlength=1)[1:]
        clash = any(count >= overlap * min(inst.voxel_count, sizes[j]) for j, count in enumerate(holders) if count)
        if clash:
            log.debug("dropping a %s particle that overlaps a better match", particles[i].cls)
            continue
        region[inst.mask & (region == 0)] = i + 1
        sizes[i] = inst.voxel_count
        kept.append(i)
    return [particles[i] for i in sorted(kept, key=lambda i: (particles[i].source != "prompt", i))]


def particle_rows(tomogram: Tomogram, particles: list[Particle]) -> list[dict]:
    """Picks-table rows (instance ids 1..N in the given order)."""
    rows = []
    for number, particle in enumerate(particles, start=1):
        z, y, x = particle.centre or particle.instance.centroid
        rows.append({"tomogram": tomogram.name, "class": particle.cls, "instance_id": number, "z": z, "y": y, "x": x,
                     "voxel_size_a": tomogram.voxel_size_a, "voxel_count": particle.instance.voxel_count,
                     "score": particle.score, "similarity": particle.similarity,
                     "pred_iou": particle.instance.pred_iou})
    return rows


def write_tomogram_outputs(out_dir: str, tomogram: Tomogram, particles: list[Particle], classes: list[str]) -> list[str]:
    """``masks/<name>_instances.mrc`` (ids as in the picks table) and ``masks/<name>_semantic.mrc``
    (1 + the class's index in ``classes``, 0 = background)."""
    base = f"{str(out_dir).rstrip('/')}/masks/{tomogram.name}"
    instances = [p.instance for p in particles]
    labels = label_volume(tomogram.shape, instances, list(range(1, len(particles) + 1)))
    semantic = label_volume(tomogram.shape, instances, [1 + classes.index(p.cls) for p in particles])
    return [write_mrc(f"{base}_instances.mrc", labels, tomogram.voxel_size_a),
            write_mrc(f"{base}_semantic.mrc", semantic.astype(np.int16), tomogram.voxel_size_a)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
