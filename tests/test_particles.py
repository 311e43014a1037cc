"""Decision logic: scale from the prompts, the score cut, rejected masks, projection similarity,
and the rotation-invariant ring encoder."""

from __future__ import annotations

import numpy as np
import pytest

from cryosam_ray.config import load_config
from cryosam_ray.encoders.rings import RingEncoder
from cryosam_ray.features import compute_features
from cryosam_ray.matching import SimilarityField, auto_ratios, naive_match
from cryosam_ray.particle import ClassQuery, Particle
from cryosam_ray.stages.particles import find_particles, score_cut
from cryosam_ray.propagation import Instance
from cryosam_ray.segmenters.base import SlicePrediction
from cryosam_ray.synth import SynthSettings, synthesize
from cryosam_ray.tomo_io import open_tomogram, write_mrc


@pytest.mark.parametrize("radius, ratios", [(4.5, (8, 4, 2)), (3.0, (4, 2, 1)), (10.0, (16, 8, 4)),
                                            (13.5, (16, 8, 4)), (20.0, (32, 16, 8))])
def test_auto_ratios_follow_the_particle_radius(radius, ratios):
    """The finest cell is the largest power of two <= r / 2; 16/8/4 (the paper) for r 8-16."""
    assert auto_ratios(radius) == ratios


def test_score_cut_splits_two_groups_by_otsu():
    # Two groups: 0.1, 0.2, 0.3 and 0.8, 0.9, 1.0; the between-group variance is largest for
    # the split after 0.3, so the cut is halfway between 0.3 and 0.8.
    scores = np.array([0.9, 0.1, 1.0, 0.2, 0.8, 0.3])
    assert score_cut(scores, "auto") == pytest.approx(0.55)
    assert score_cut(scores, "auto", "cosine") == pytest.approx(0.55)
    assert score_cut(scores, 0.7) == 0.7 and score_cut(scores, None) == -np.inf
    # projection scores are in units of the prompt's: the cut stays within [0.25, 0.6]
    assert score_cut(np.array([0.01, 0.02, 0.03, 0.05, 0.06, 0.07]), "auto") == 0.25
    assert score_cut(np.array([0.90, 0.95, 0.97, 1.5, 1.6, 1.7]), "auto") == 0.6


def test_density_cut_never_drops_what_scores_like_the_prompts():
    # The split lies halfway between 0.3 and 0.8; a prompt scoring 0.25 (median of its class's
    # prompts) lowers the cut to it, a prompt above the split leaves the split alone.
    scores = np.array([0.9, 0.1, 1.0, 0.2, 0.8, 0.3])
    assert score_cut(scores, "auto", "density", np.array([0.25])) == pytest.approx(0.25)
    assert score_cut(scores, "auto", "density", np.array([0.2, 0.25, 3.0])) == pytest.approx(0.25)
    assert score_cut(scores, "auto", "density", np.array([2.0])) == pytest.approx(0.55)
    assert score_cut(scores, "auto", "density", np.array([np.nan])) == pytest.approx(0.55)
    assert score_cut(scores, 0.7, "density", np.array([0.25])) == 0.7  # an explicit cut is the user's


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decisions")
    synth = synthesize(SynthSettings(shape=(48, 96, 96), snr=0.5, use_real_maps=False,
                                     classes=("ribosome",), particles_per_class=4, membranes=0, gold_beads=0), seed=3)
    write_mrc(tmp / "scene.mrc", synth.volume, 10.0)
    tomo = open_tomogram(tmp / "scene.mrc")
    return synth, tomo, compute_features(tomo, RingEncoder(stride=2)).load()


def test_projection_field_is_exact_and_prompt_scores_one(scene):
    """The token-level projection equals (f - m).(q - b) / |q - b|^2 from explicit voxel features."""
    synth, tomo, volume = scene
    row = synth.truth[0]
    voxels = np.argwhere(synth.labels == row["instance_id"])
    query = volume.sample(voxels).mean(axis=0)
    mean = volume.mean_feature()
    field = SimilarityField(volume, query[None], similarity="projection")
    pts = np.random.default_rng(0).uniform(0, np.array(tomo.shape) - 1, size=(500, 3))
    direction = query - mean
    expected = (volume.sample(pts) - mean) @ direction / (direction @ direction)
    np.testing.assert_allclose(field.score(pts)[0], expected, atol=1e-4)
    assert field.score(voxels)[0].mean() == pytest.approx(1.0, abs=1e-3)
    # the same projection the slow way, every voxel: its best proposal is on a particle
    naive = naive_match(volume, query, tau_sim=None, nms_radius=row["radius"], top_k=4, similarity="projection")
    best = np.rint(naive.zyx[0]).astype(int)
    assert synth.labels[tuple(best)] > 0


def test_ring_features_are_rotation_invariant_in_plane():
    rng = np.random.default_rng(1)
    image = np.zeros((1, 64, 64), np.float32)
    image[0, 20:30, 28:34] = 1.0  # an asymmetric bar
    image += 0.05 * rng.standard_normal(image.shape).astype(np.float32)
    encoder = RingEncoder(stride=1)
    rotated = np.rot90(image, axes=(1, 2)).copy()
    a, b = encoder.encode(image)[0], encoder.encode(rotated)[0]
    np.testing.assert_allclose(np.rot90(a, axes=(0, 1)), b, atol=1e-4)


class _ScriptedSegmenter:
    """Answers each seed with a fixed 2D disc, or a huge leaked mask for the first proposal."""

    name = "scripted"

    def __init__(self, leak_at):
        self.leak_at = leak_at

    def set_tomogram(self, tomogram):
        pass

    def predict(self, requests):
        out = []
        for req in requests:
            if req.prev_mask is not None:
                out.append(None)  # seeds only: one slice per axis is enough here
                continue
            zyx = list(req.point)
            zyx.insert(req.axis, req.index)
            half = 12 if tuple(zyx) == self.leak_at else 2
            size = 2 * half + 1
            out.append(SlicePrediction(mask=np.ones((size, size), bool), offset=(req.point[0] - half,
                                       req.point[1] - half), confidence=np.ones((size, size), np.float32),
                                       pred_iou=1.0))
        return out


def test_a_rejected_leaky_mask_does_not_hide_its_neighbour(scene):
    """The best proposal leaks (too big: rejected); the true particle next to it is still found."""
    _, tomo, volume = scene
    cfg = load_config(None, {"instances.min_score": None, "instances.batch": 1, "instances.min_size_ratio": 0.3})
    leak, neighbour = (24, 48, 40), (24, 48, 47)
    from cryosam_ray.matching import Proposals

    proposals = Proposals(zyx=np.array([leak, neighbour], float), similarity=np.array([0.9, 0.8]))
    prompt = Instance(prompt=(0, 0, 0), bbox=(0, 0, 0, 5, 5, 5), mask=np.ones((5, 5, 5), bool))
    query = ClassQuery("ribosome", volume.sample(np.argwhere(prompt.mask)).mean(0), volume.mean_feature(),
                       float(prompt.voxel_count), 2.5)
    found = find_particles(tomo, volume, query, proposals, _ScriptedSegmenter(leak), cfg,
                           [Particle("ribosome", prompt, "prompt")])
    assert [tuple(np.rint(p.instance.prompt).astype(int)) for p in found] == [neighbour]


def test_a_single_prompt_allows_larger_particles_than_several(scene):
    """One prompt's mask size is one noisy sample: the size filter's upper bound doubles for it
    (a 61-voxel mask passes against a 20-voxel prompt); with several prompts it does not."""
    _, tomo, volume = scene
    from cryosam_ray.matching import Proposals
    from cryosam_ray.particle import QueryPart
    from cryosam_ray.stages.query import combine_queries

    cfg = load_config(None, {"instances.min_score": None, "instances.batch": 1})
    part = QueryPart("ribosome", np.ones(3 * volume.channels), np.ones(3 * volume.channels), 20, [20])
    single = combine_queries([part])["ribosome"]
    several = combine_queries([QueryPart("ribosome", np.ones(3 * volume.channels), np.ones(3 * volume.channels), 60,
                                         [20, 20, 20])])["ribosome"]
    assert (single.max_size_factor, several.max_size_factor) == (2.0, 1.0)
    proposals = Proposals(zyx=np.array([(24, 48, 48)], float), similarity=np.array([0.9]))
    found = [len(find_particles(tomo, volume, query, proposals, _ScriptedSegmenter(None), cfg, []))
             for query in (single, several)]
    assert found == [1, 0]

