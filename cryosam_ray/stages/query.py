"""Stage: query parts and class queries. Each tomogram's share of a class query (feature sums
over its prompt voxels), and the queries from the parts of every tomogram (the paper's masked
average over all prompt voxels of a class, wherever they lie in the dataset)."""

from __future__ import annotations

import numpy as np

from cryosam_ray.features import FeatureVolume
from cryosam_ray.matching import query_feature
from cryosam_ray.particle import ClassQuery, Particle, QueryPart, equivalent_radius


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


def combine_queries(parts: list[QueryPart], *, radii: dict[str, float] | None = None) -> dict[str, ClassQuery]:
    """The paper's query: sum over all prompt voxels of a class, wherever they lie, over their count.

    ``radii``: a known radius per class in voxels (a copick object's), each query's ``prior_radius``.
    """
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
            polarity=1.0 if sum(p.polarity for p in profiles) > 0 else -1.0,
            max_size_factor=max_size_factor(len(part.sizes)), prior_radius=(radii or {}).get(cls),
            blob_span=float(np.median([p.span for p in profiles])) if profiles else 0.0,
            z_stretch=min((p.stretch for p in profiles), default=1.0))
    return queries


def max_size_factor(prompts: int) -> float:
    """See :attr:`~cryosam_ray.particle.ClassQuery.max_size_factor`."""
    return 2.0 if prompts < 2 else 1.0


def build_queries(prompt_particles: dict[str, list[Particle]], volumes: dict[str, FeatureVolume]) -> dict[str, ClassQuery]:
    """One :class:`ClassQuery` per class from the prompt particles of every tomogram (in process).

    Args:
        prompt_particles: tomogram name -> its prompt particles (scored in place).
        volumes: tomogram name -> its features (for every tomogram holding prompts).
    """
    queries = combine_queries([part for name, particles in prompt_particles.items()
                               for part in query_parts(volumes[name], particles)])
    return queries
