"""The size of a class's particles on a tomogram, learnt from the candidates found there.

One prompt's mask is one noisy sample of its class's size: in a crowded cytoplasm it may join a
neighbour stacked along z (the missing wedge blurs them into one column) and come out twice the
particle or more; it may also miss part of it. So with a single prompt the size band is first
as wide on the small side as on the large (a quarter to four times the prompt, see
:func:`size_band`), and then narrowed by the data: the sizes of the candidates that score
above the class's cut (:func:`strong_sizes`, the particles that look like the prompt) are
samples of the class's size on this tomogram. Candidates smaller than
``instances.min_size_ratio`` of the smaller of the prompt's size and their median are
fragments (:func:`drop_fragments`). Where the prompt's size lies outside their middle half,
the prompt is atypical of what it finds: the class is searched again at their median size's
scale (:func:`rescaled_query`), with the prompt's density profile measured at that scale.
With several prompts their median size is already robust and neither step changes anything.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.density import DensityMap, density_map
from cryosam_ray.particle import ClassQuery, Particle, equivalent_radius
from cryosam_ray.stages.prompts import prompt_profile

log = logging.getLogger(__name__)

_MIN_STRONG = 8  # strong candidates needed to set a class's scale by their quartiles


def size_band(query: ClassQuery, cfg: CryoSamConfig) -> tuple[float, float]:
    """(smallest, largest) voxel count a candidate mask of ``query``'s class may have when it is
    propagated: ``min_size_ratio`` and ``max_size_ratio`` of the prompts' median size, each
    widened by ``query.max_size_factor`` (a single prompt's size is one noisy sample)."""
    inst = cfg.instances
    lo = (inst.min_size_ratio or 0.0) * query.median_voxels / query.max_size_factor
    hi = (inst.max_size_ratio or math.inf) * query.median_voxels * query.max_size_factor
    return lo, hi


def strong_sizes(found: list[Particle], cut: float) -> np.ndarray:
    """(K,) voxel counts of the candidates scoring at least ``cut`` (the class's automatic cut);
    empty with fewer than 4 candidates: too few to learn from."""
    if len(found) < 4:
        return np.zeros(0)
    return np.array([p.instance.voxel_count for p in found if p.score >= cut], np.float64)


def drop_fragments(found: list[Particle], query: ClassQuery, strong: np.ndarray,
                   cfg: CryoSamConfig) -> list[Particle]:
    """``found`` without candidates under ``min_size_ratio`` of the smaller of the prompts'
    median size and ``strong`` (a single prompt's class only; see the module docstring)."""
    ratio = cfg.instances.min_size_ratio
    if not ratio or query.max_size_factor <= 1.0:
        return found  # several prompts: the band was applied when propagating
    reference = min(query.median_voxels, float(np.median(strong))) if len(strong) else query.median_voxels
    kept = [p for p in found if p.instance.voxel_count >= ratio * reference]
    if len(kept) < len(found):
        log.info("%s: %d candidates under %.0f voxels dropped (fragments)", query.cls, len(found) - len(kept),
                 ratio * reference)
    return kept


def rescaled_query(query: ClassQuery, strong: np.ndarray, known: list[Particle], tomogram,
                   cfg: CryoSamConfig, maps: dict[int, DensityMap] | None = None) -> ClassQuery | None:
    """``query`` at the scale of its strong candidates when a single prompt's size lies outside
    the middle half (interquartile range) of their (K,) voxel counts ``strong`` (8 or more) and
    the prompt lies on this tomogram (its profile is measured again at their median size's
    radius; its mask, atypical of the class, is no measure of how far apart one particle's
    blobs lie: ``blob_span`` 0; ``maps``: the tomogram's density maps by binning, see
    :func:`~cryosam_ray.density.density_proposals`); None when nothing needs to change."""
    if len(strong) < _MIN_STRONG or query.max_size_factor <= 1.0 or not known or query.shells is None:
        return None
    low, size, high = np.percentile(strong, [25, 50, 75])
    if low <= query.median_voxels <= high:
        return None
    radius = equivalent_radius(size)
    dmap = density_map({} if maps is None else maps, tomogram, radius)
    profiles = [prompt_profile(p, dmap, radius, cfg) for p in known]
    log.info("%s: the prompt (%.0f voxels) lies outside its strong candidates' middle half (%.0f-%.0f): searched "
             "again at their median size's radius %.1f", query.cls, query.median_voxels, low, high, radius)
    return replace(query, median_voxels=float(size), radius=radius,
                   shells=np.mean([p.shells for p in profiles], axis=0), blob_span=0.0)
