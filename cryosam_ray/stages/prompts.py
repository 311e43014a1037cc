"""Stage: prompt instances. Each point prompt's 3D instance (Cross-Plane Self-Prompting), with
its density profile when the density stage is on."""

from __future__ import annotations

import logging

import numpy as np

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.density import DensityMap, DensityProfile, density_map
from cryosam_ray.particle import Particle, equivalent_radius
from cryosam_ray.propagation import propagate
from cryosam_ray.tables import Point
from cryosam_ray.tomo_io import Tomogram

log = logging.getLogger(__name__)


def segment_prompts(tomogram: Tomogram, points: list[Point], segmenter, cfg: CryoSamConfig) -> list[Particle]:
    """The prompt instances of one tomogram (empty ones are logged and dropped)."""
    coords = np.array([[p.z, p.y, p.x] for p in points], dtype=np.float64).reshape(-1, 3)
    prop = cfg.propagation
    instances = propagate(segmenter, tomogram, coords, directions=prop.directions,
                          iou_threshold=prop.iou_threshold, max_steps=prop.max_steps)
    for point, inst in zip(points, instances):
        if inst.empty:  # a user's click that gave nothing: say so (proposals that do are routine)
            log.warning("%s: %s prompt: %s", tomogram.name, point.cls, inst.message)
    particles = [Particle(p.cls, inst, "prompt") for p, inst in zip(points, instances) if not inst.empty]
    if uses_density(cfg):
        maps: dict[int, DensityMap] = {}
        for particle in particles:
            radius = equivalent_radius(particle.instance.voxel_count)
            particle.density = prompt_profile(particle, density_map(maps, tomogram, radius), radius, cfg)
    return particles


def prompt_profile(particle: Particle, dmap: DensityMap, radius: float, cfg: CryoSamConfig) -> DensityProfile:
    """The density profile of a prompt particle at ``radius`` voxels, from its click."""
    return dmap.profile(np.asarray(particle.instance.prompt), particle.voxels(), radius,
                        count=cfg.density.shells, reach=cfg.density.reach)


def uses_density(cfg: CryoSamConfig) -> bool:
    """Whether the run needs the prompts' density profiles (blob proposals or the density score)."""
    return cfg.density.blobs or cfg.density.score == "density"
