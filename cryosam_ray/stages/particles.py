"""Stage: find particles. Per class, proposals (with the density stage: joined by blobs at the
prompts' scale, ranked by their density score, :mod:`cryosam_ray.density`) are propagated in
batches, best first; a proposal inside a particle already found is skipped, overlapping masks
are one particle, masks far from the prompts' size are rejected (and claim no voxels), and each
particle gets a ``score``. Particles under a cut calibrated from the run's score distribution
are dropped (:func:`score_cut`), then one class keeps each physical particle
(:func:`cryosam_ray.stages.classes.resolve_classes`)."""

from __future__ import annotations

import logging
import math

import numpy as np

from cryosam_ray.blocks import BlockLabels
from cryosam_ray.config import CryoSamConfig
from cryosam_ray.density import density_proposals
from cryosam_ray.features import FeatureVolume
from cryosam_ray.matching import Proposals, nms, query_feature
from cryosam_ray.particle import ClassQuery, Particle
from cryosam_ray.propagation import propagate
from cryosam_ray.stages.classes import resolve_classes
from cryosam_ray.stages.prompts import uses_density
from cryosam_ray.stages.sizes import drop_fragments, rescaled_query, size_band, strong_sizes
from cryosam_ray.stages.stacks import place_between_blobs, split_stack
from cryosam_ray.tomo_io import Tomogram

log = logging.getLogger(__name__)


def particles_of_tomogram(tomogram: Tomogram, volume: FeatureVolume, queries: dict[str, ClassQuery],
                          proposals: dict[str, Proposals], prompts: list[Particle], segmenter,
                          cfg: CryoSamConfig) -> list[Particle]:
    """Every particle of one tomogram: its prompt particles (scored) and each class's matches
    above the run's cut, one class per physical particle. A class with a single prompt whose
    size is atypical of its strong candidates is searched again at their scale
    (:mod:`cryosam_ray.stages.sizes`). Both executors call this."""
    prompts = [p for p in prompts if p.cls in queries]
    score_particles(volume, prompts, queries, cfg.matching.similarity)
    scorers, features, maps = {}, proposals, {}
    if uses_density(cfg):
        proposals, scorers = density_proposals(tomogram, queries, proposals, prompts, cfg, maps)
    particles = list(prompts)
    for cls in sorted(queries):
        known = [p for p in prompts if p.cls == cls]
        query = queries[cls]
        found = _found(tomogram, volume, query, proposals[cls], scorers.get(cls), segmenter, cfg, known)
        strong = strong_sizes(found, _auto_cut(found, known, cfg))
        again = rescaled_query(query, strong, known, tomogram, cfg, maps) if cls in scorers else None
        if again is not None:
            ranked, rescorers = density_proposals(tomogram, {cls: again}, {cls: features[cls]}, known, cfg, maps)
            found = _found(tomogram, volume, again, ranked[cls], rescorers[cls], segmenter, cfg, known)
            strong = strong_sizes(found, _auto_cut(found, known, cfg))
        particles += drop_fragments(found, query, strong, cfg)
    return resolve_classes(keep_scored(particles, cfg), tomogram.shape, overlap=cfg.instances.overlap)


def _found(tomogram, volume, query, proposals, scorer, segmenter, cfg, known) -> list[Particle]:
    """One class's candidates, placed and merged by their blob peaks with the density score;
    masks holding a stack of particles are cut, and a class whose prompts hold several blobs is
    centred between them (:mod:`cryosam_ray.stages.stacks`)."""
    if scorer is None:
        return find_particles(tomogram, volume, query, proposals, segmenter, cfg, known)
    blobs = scorer.dmap.peaks(scorer.radius, scorer.polarity, cfg.density.pool) if cfg.density.stacks else None
    found = find_particles(tomogram, volume, query, proposals, segmenter, cfg, known, blobs)
    place_by_density(found, scorer)
    if blobs is not None and query.blob_span > 0:  # a filament, a dimer: its centre lies between its blobs
        place_between_blobs(found, *blobs)
    return without_duplicates(found, 0.5 * query.radius)


def without_duplicates(found: list[Particle], distance: float) -> list[Particle]:
    """``found`` (one class) less any particle whose reported centre lies within ``distance``
    voxels of a better-scoring one's: two masks placed on one blob peak (a fragment beside a
    particle climbs to its centre, :func:`place_by_density`) are one particle. Order is kept."""
    centres = np.array([p.centre or p.instance.centroid for p in found], np.float64).reshape(-1, 3)
    scores = np.nan_to_num(np.array([p.score for p in found], np.float64), nan=-np.inf)
    # nms suppresses within its radius inclusive; a centre exactly ``distance`` away is kept
    kept = nms(centres, scores, radius=float(np.nextafter(distance, 0)), top_k=len(found))
    return [found[i] for i in sorted(kept)]


def _auto_cut(found: list[Particle], known: list[Particle], cfg: CryoSamConfig) -> float:
    """The automatic score cut of a class's candidates (see :func:`score_cut`)."""
    return score_cut(np.array([p.score for p in found]), "auto", _score_kind(cfg), np.array([p.score for p in known]))


def _score_kind(cfg: CryoSamConfig) -> str:
    """What the particles' ``score`` is, as :func:`score_cut` names it."""
    return "density" if cfg.density.score == "density" else cfg.matching.similarity


def find_particles(tomogram: Tomogram, volume: FeatureVolume, query: ClassQuery, proposals: Proposals,
                   segmenter, cfg: CryoSamConfig, known: list[Particle],
                   blobs: tuple[np.ndarray, np.ndarray] | None = None) -> list[Particle]:
    """Propagate proposals (best first, in batches) into new particles of ``query.cls``.

    ``known`` particles (this class's prompt instances on this tomogram) are never found twice.
    ``blobs``: the class's blob peaks on the tomogram ((K, 3) ZYX, (K,) response); a mask holding
    several particles' peaks is cut into one candidate per particle
    (:func:`~cryosam_ray.stages.stacks.split_stack`), each piece then taken or left alone.
    """
    inst_cfg, prop = cfg.instances, cfg.propagation
    claimed = BlockLabels(tomogram.shape, np.uint8)  # accepted particles' voxels (rejected masks claim none)
    for particle in known:
        claimed.paste(particle.instance.bbox, particle.instance.mask, 1)
    found: list[Particle] = []
    lo, hi = size_band(query, cfg)
    radius = (query.prior_radius or query.radius) if prop.size_prior else None
    order = list(range(len(proposals)))
    while order:
        batch = [i for i in order[:inst_cfg.batch] if not claimed.at(np.rint(proposals.zyx[i]))]
        order = order[inst_cfg.batch:]
        if not batch:
            continue
        instances = propagate(segmenter, tomogram, proposals.zyx[batch], directions=prop.directions,
                              iou_threshold=prop.iou_threshold, max_steps=prop.max_steps, radius=radius,
                              max_voxels=hi if math.isfinite(hi) else None)
        for i, inst in zip(batch, instances):
            if inst.empty or not lo <= inst.voxel_count <= hi:
                continue  # a leaked or empty mask: it claims nothing, so it hides no true neighbour
            for piece in split_stack(inst, *blobs, query) if blobs is not None else [inst]:
                if piece.voxel_count < lo:
                    continue  # a stack's tail: too little of a particle to place
                if claimed.get(piece.bbox)[piece.mask].sum() >= inst_cfg.overlap * piece.voxel_count:
                    continue  # the same particle as one found before
                claimed.paste(piece.bbox, piece.mask, 1)
                found.append(Particle(query.cls, piece, "match", similarity=float(proposals.similarity[i])))
    score_particles(volume, found, {query.cls: query}, cfg.matching.similarity)
    log.info("%s: %d %s candidates from %d proposals", tomogram.name, len(found), query.cls, len(proposals))
    return found


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


def place_by_density(found: list[Particle], scorer) -> None:
    """Each particle's ``score`` and reported ``centre``: its mask's centroid or the proposal that
    found it, whichever matches the class's prompts better (a mask merged with a touching
    neighbour puts its centroid between the two; an elongated particle's proposal may sit off
    its middle, where its centroid is), moved to the blob peak within half a radius of it, to a
    sub-voxel (:meth:`~cryosam_ray.density.DensityMap.refine`)."""
    if not found:
        return
    proposals = np.array([p.instance.prompt for p in found], np.float64)
    centroids = np.array([p.instance.centroid for p in found], np.float64)
    at_proposal, shape_at_proposal = scorer.score(proposals)
    at_centroid, shape_at_centroid = scorer.score(centroids)
    use_centroid = at_centroid >= at_proposal
    chosen = np.where(use_centroid[:, None], centroids, proposals)
    chosen = scorer.dmap.refine(chosen, scorer.radius, scorer.polarity, 0.5 * scorer.radius)
    for i, particle in enumerate(found):
        particle.centre = tuple(float(v) for v in chosen[i])
        particle.score = float(max(at_centroid[i], at_proposal[i]))
        particle.class_score = float(shape_at_centroid[i] if use_centroid[i] else shape_at_proposal[i])


def score_cut(scores: np.ndarray, min_score: float | str | None, similarity: str = "projection",
              prompt_scores: np.ndarray | None = None) -> float:
    """The smallest score kept. ``"auto"``: the split of the scores into two groups (Otsu's
    threshold: the cut maximising the between-group variance); for projection scores kept
    within [0.25, 0.6] of the prompt's own score, since a run's candidates may be nearly all
    particles or nearly all background; for density scores never above the median score of
    ``prompt_scores`` (the class's prompts on this tomogram, scored alike): a candidate that
    scores like a particle the user pointed at is kept, even where most candidates score higher
    (in a crowded cytoplasm a faint prompt sits under the split). A number: that; None: keep
    all (-inf)."""
    if min_score is None:
        return -math.inf
    if min_score != "auto":
        return float(min_score)
    anchor = np.asarray([] if prompt_scores is None else prompt_scores, np.float64)
    anchor = float(np.median(anchor[np.isfinite(anchor)])) if np.isfinite(anchor).any() else math.inf
    scores = np.sort(np.asarray(scores, np.float64)[np.isfinite(scores)])
    if len(scores) < 4:
        return 0.25 if similarity == "projection" else -math.inf
    n = np.arange(1, len(scores))
    left = np.cumsum(scores)[:-1] / n
    right = (scores.sum() - np.cumsum(scores)[:-1]) / (len(scores) - n)
    between = n * (len(scores) - n) * (left - right) ** 2
    best = int(np.argmax(between))
    split = 0.5 * (scores[best] + scores[best + 1])
    if similarity == "projection":
        return float(np.clip(split, 0.25, 0.6))
    return float(min(split, anchor)) if similarity == "density" else float(split)


def keep_scored(particles: list[Particle], cfg: CryoSamConfig) -> list[Particle]:
    """Prompts, and matches scoring at least the run's cut (per class, see :func:`score_cut`;
    the class's prompts among ``particles`` anchor a density cut)."""
    kept = [p for p in particles if p.source == "prompt"]
    for cls in sorted({p.cls for p in particles}):
        matches = [p for p in particles if p.cls == cls and p.source != "prompt"]
        prompts = np.array([p.score for p in particles if p.cls == cls and p.source == "prompt"])
        cut = score_cut(np.array([p.score for p in matches]), cfg.instances.min_score, _score_kind(cfg), prompts)
        kept += [p for p in matches if p.score >= cut]
        log.info("%s: %d of %d candidates score >= %.3f", cls, sum(p.score >= cut for p in matches), len(matches), cut)
    return kept


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
