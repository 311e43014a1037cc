"""What crosses the stages of one tomogram: particles, class queries and their parts.

Plain dataclasses (picklable, so the Ray executor moves them between processes as they are);
the stage modules in :mod:`cryosam_ray.stages` make and consume them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cryosam_ray.propagation import Instance

if TYPE_CHECKING:
    from cryosam_ray.density import DensityProfile


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
        max_size_factor: the factor by which the size filter's upper bound
            (``instances.max_size_ratio``) widens: 2 for a single prompt, whose mask size is one
            noisy sample (masks of the 80S in the real tomogram range over 5x, 205-1151 voxels),
            1 for several (their median is robust; widening by their spread lets leaky masks
            claim true neighbours). The lower bound does not widen: small background fragments
            would pass the score cut.
        prior_radius: the class's radius known beforehand, voxels (a copick pickable object's
            ``radius`` over the voxel spacing); with ``propagation.size_prior`` the segmenter gets it
            instead of ``radius`` (the prompts' masks may be leaky or partial; a curated radius is
            not). Matching and the density stage keep ``radius``, the scale they were tuned at.
        blob_span: the median ``span`` of the prompts' density profiles, voxels: how far apart
            blobs of one particle of the class may lie (0 for compact particles; see
            :mod:`cryosam_ray.stages.stacks`).
        z_stretch: the smallest ``stretch`` of the prompts' density profiles (1: none measured): a
            prompt joined with a neighbour stacked along z looks more drawn out than one particle.
    """

    cls: str
    vector: np.ndarray
    background: np.ndarray
    median_voxels: float
    radius: float
    shells: np.ndarray | None = None
    polarity: float = -1.0
    max_size_factor: float = 1.0
    prior_radius: float | None = None
    blob_span: float = 0.0
    z_stretch: float = 1.0


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


def equivalent_radius(voxels: float) -> float:
    """Radius in voxels of a sphere of ``voxels`` voxels."""
    return (3 * voxels / (4 * math.pi)) ** (1 / 3)


@dataclass(frozen=True)
class Pick:
    """One row of the picks table: a particle's reported centre (voxels, ZYX) and its scores."""

    tomogram: str
    cls: str
    instance_id: int
    z: float
    y: float
    x: float
    voxel_size_a: float
    voxel_count: int
    score: float
    similarity: float
    pred_iou: float

    def row(self) -> dict:
        """The picks-table row (``tables.picks_table`` and JSON records use the column ``class``)."""
        return {"tomogram": self.tomogram, "class": self.cls, "instance_id": self.instance_id, "z": self.z,
                "y": self.y, "x": self.x, "voxel_size_a": self.voxel_size_a, "voxel_count": self.voxel_count,
                "score": self.score, "similarity": self.similarity, "pred_iou": self.pred_iou}

    @classmethod
    def from_row(cls, row: dict) -> "Pick":
        return cls(row["tomogram"], row["class"], int(row["instance_id"]), float(row["z"]), float(row["y"]),
                   float(row["x"]), float(row["voxel_size_a"]), int(row["voxel_count"]), float(row["score"]),
                   float(row["similarity"]), float(row["pred_iou"]))
