"""Stage: match. Proposals of every class on one tomogram (Hierarchical Feature Matching, or
naive), each at its class's scale."""

from __future__ import annotations

import numpy as np

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.features import FeatureVolume
from cryosam_ray.matching import Proposals, SimilarityField, auto_ratios, hierarchical_match, naive_match
from cryosam_ray.particle import ClassQuery


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
