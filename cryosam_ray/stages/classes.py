"""Stage: resolve classes. One class per physical particle, where the particles that several
class queries found overlap."""

from __future__ import annotations

import logging
import math

import numpy as np

from cryosam_ray.blocks import BlockLabels
from cryosam_ray.particle import Particle

log = logging.getLogger(__name__)


def resolve_classes(particles: list[Particle], shape: tuple[int, int, int], *, overlap: float) -> list[Particle]:
    """One class per physical particle: where particles of different classes overlap (by at least
    ``overlap`` of the smaller), the prompt wins, else the best-matching class (highest
    ``class_score`` where set, else ``score``). Returns the survivors, prompts first, each group
    in input order."""
    def rank(i: int):
        p = particles[i]
        return p.source != "prompt", -np.nan_to_num(p.score if math.isnan(p.class_score) else p.class_score, nan=1.0)

    ranked = sorted(range(len(particles)), key=rank)
    owner = BlockLabels(shape, np.int32)  # 1 + index of the accepted particle holding each voxel
    sizes = {}
    kept = []
    for i in ranked:
        inst = particles[i].instance
        region = owner.get(inst.bbox)
        holders = np.bincount(region[inst.mask], minlength=1)[1:]
        clash = any(count >= overlap * min(inst.voxel_count, sizes[j]) for j, count in enumerate(holders) if count)
        if clash:
            log.debug("dropping a %s particle that overlaps a better match", particles[i].cls)
            continue
        region[inst.mask & (region == 0)] = i + 1
        owner.put(inst.bbox, region)
        sizes[i] = inst.voxel_count
        kept.append(i)
    return [particles[i] for i in sorted(kept, key=lambda i: (particles[i].source != "prompt", i))]
