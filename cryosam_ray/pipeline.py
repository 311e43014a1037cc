"""The CryoSAM pipeline in process: prompts -> instances -> query -> matching -> particles.

Stages (each a plain function, reused by the Ray wiring):

1. :func:`segment_prompts`: each prompt's 3D instance (Cross-Plane Self-Prompting).
2. :func:`build_queries`: one query per class, the masked average of voxel features over the
   class's prompt instances, wherever they lie in the dataset.
3. :func:`find_particles`: per tomogram and class, Hierarchical Feature Matching proposes
   points; they are propagated in batches, best first; a proposal inside a particle already
   found (or already rejected) is skipped, overlapping masks are one particle, and particles
   whose size or mean feature is unlike the prompts' are dropped.
4. :func:`write_tomogram_outputs`: instance and semantic masks; the picks table is built from
   :func:`particle_rows` of all tomograms.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.features import FeatureVolume
from cryosam_ray.matching import Proposals, SimilarityField, hierarchical_match, naive_match, query_feature
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
        instance_similarity: cosine of the particle's mean feature with the class query.
    """

    cls: str
    instance: Instance
    source: str
    similarity: float = math.nan
    instance_similarity: float = math.nan

    def voxels(self) -> np.ndarray:
        """(M, 3) ZYX voxel coordinates of the mask."""
        return np.argwhere(self.instance.mask) + np.asarray(self.instance.bbox[:3])


@dataclass
class ClassQuery:
    """What matching needs to know about one class, from its prompt instances."""

    cls: str
    vector: np.ndarray  # (3C,)
    median_voxels: float
    radius: float  # equivalent-sphere radius of the median prompt instance, voxels


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
    return [Particle(p.cls, inst, "prompt") for p, inst in zip(points, instances) if not inst.empty]


@dataclass
class QueryPart:
    """One tomogram's contribution to a class query: the feature sum over its prompt voxels."""

    cls: str
    feature_sum: np.ndarray  # (3C,) float64
    voxels: int
    sizes: list[int]


def query_parts(volume: FeatureVolume, particles: list[Particle]) -> list[QueryPart]:
    """Per class, the sum of voxel features over this tomogram's prompt particles."""
    parts: dict[str, QueryPart] = {}
    for particle in particles:
        vox = particle.voxels()
        total = query_feature(volume, [vox]).astype(np.float64) * len(vox)
        part = parts.setdefault(particle.cls, QueryPart(particle.cls, np.zeros_like(total), 0, []))
        part.feature_sum += total
        part.voxels += len(vox)
        part.sizes.append(particle.instance.voxel_count)
    return list(parts.values())


def combine_queries(parts: list[QueryPart]) -> dict[str, ClassQuery]:
    """The paper's query: sum over all prompt voxels of a class, wherever they lie, over their count."""
    merged: dict[str, QueryPart] = {}
    for part in parts:
        acc = merged.setdefault(part.cls, QueryPart(part.cls, np.zeros_like(part.feature_sum), 0, []))
        acc.feature_sum += part.feature_sum
        acc.voxels += part.voxels
        acc.sizes += part.sizes
    queries = {}
    for cls, part in sorted(merged.items()):
        median = float(np.median(part.sizes))
        queries[cls] = ClassQuery(cls, (part.feature_sum / part.voxels).astype(np.float32), median,
                                  (3 * median / (4 * math.pi)) ** (1 / 3))
    return queries


def score_particles(volume: FeatureVolume, particles: list[Particle], queries: dict[str, ClassQuery]) -> None:
    """Set each particle's ``instance_similarity``: its mean feature's cosine with its class query."""
    for particle in particles:
        particle.instance_similarity = _cosine(query_feature(volume, [particle.voxels()]),
                                               queries[particle.cls].vector)


def build_queries(prompt_particles: dict[str, list[Particle]], volumes: dict[str, FeatureVolume]) -> dict[str, ClassQuery]:
    """One :class:`ClassQuery` per class from the prompt particles of every tomogram (in process).

    Args:
        prompt_particles: tomogram name -> its prompt particles (scored in place).
        volumes: tomogram name -> its features (for every tomogram holding prompts).
    """
    queries = combine_queries([part for name, particles in prompt_particles.items()
                               for part in query_parts(volumes[name], particles)])
    for name, particles in prompt_particles.items():
        score_particles(volumes[name], particles, queries)
    return queries


def match(volume: FeatureVolume, query: ClassQuery, cfg: CryoSamConfig, field_: SimilarityField | None = None,
          query_index: int = 0) -> Proposals:
    """Proposals of one class on one tomogram, by the configured method."""
    m = cfg.matching
    radius = m.nms_radius or query.radius
    if m.method == "naive":
        return naive_match(volume, query.vector, tau_sim=m.tau_sim, nms_radius=radius, top_k=m.top_k)
    field_ = field_ or SimilarityField(volume, query.vector[None])
    return hierarchical_match(field_, query=query_index, ratios=m.ratios, tau_sim=m.tau_sim, dilate=m.dilate,
                              nms_radius=radius, top_k=m.top_k)


def find_particles(tomogram: Tomogram, volume: FeatureVolume, query: ClassQuery, proposals: Proposals,
                   segmenter, cfg: CryoSamConfig, known: list[Particle]) -> list[Particle]:
    """Propagate proposals (best first, in batches) into new particles of ``query.cls``.

    ``known`` particles (this class's prompt instances on this tomogram) are never found twice.
    """
    inst_cfg, prop = cfg.instances, cfg.propagation
    claimed = np.zeros(tomogram.shape, bool)  # voxels of particles found, or of rejected masks
    for particle in known:
        particle.instance.paste(claimed, True)
    found: list[Particle] = []
    lo, hi = inst_cfg.min_size_ratio * query.median_voxels, inst_cfg.max_size_ratio * query.median_voxels
    order = list(range(len(proposals)))
    while order:
        batch = [i for i in order[:inst_cfg.batch] if not claimed[tuple(np.rint(proposals.zyx[i]).astype(int))]]
        order = order[inst_cfg.batch:]
        if not batch:
            continue
        instances = propagate(segmenter, tomogram, proposals.zyx[batch], directions=prop.directions,
                              iou_threshold=prop.iou_threshold, max_steps=prop.max_steps)
        for i, inst in zip(batch, instances):
            if inst.empty:
                continue
            z0, y0, x0, z1, y1, x1 = inst.bbox
            if claimed[z0:z1, y0:y1, x0:x1][inst.mask].sum() >= inst_cfg.overlap * inst.voxel_count:
                continue  # the same particle as one found (or rejected) before
            inst.paste(claimed, True)
            if not lo <= inst.voxel_count <= hi:
                continue
            particle = Particle(query.cls, inst, "match", similarity=float(proposals.similarity[i]))
            score_particles(volume, [particle], {query.cls: query})
            if particle.instance_similarity >= inst_cfg.min_similarity:
                found.append(particle)
    log.info("%s: %d %s particles from %d proposals", tomogram.name, len(found), query.cls, len(proposals))
    return found


def resolve_classes(particles: list[Particle], shape: tuple[int, int, int], *, overlap: float) -> list[Particle]:
    """One class per physical particle: where particles of different classes overlap (by at least
    ``overlap`` of the smaller), the prompt wins, else the best-matching class (highest
    ``instance_similarity``). Returns the survivors, prompts first, each group in input order."""
    ranked = sorted(range(len(particles)), key=lambda i: (particles[i].source != "prompt",
                                                            -np.nan_to_num(particles[i].instance_similarity, nan=1.0)))
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
        z, y, x = particle.instance.centroid
        rows.append({"tomogram": tomogram.name, "class": particle.cls, "instance_id": number, "z": z, "y": y, "x": x,
                     "voxel_size_a": tomogram.voxel_size_a, "voxel_count": particle.instance.voxel_count,
                     "score": particle.instance_similarity, "similarity": particle.similarity,
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
