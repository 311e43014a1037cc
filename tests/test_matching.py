"""Slice features, the feature store, query features, hierarchical and naive matching."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from cryosam_ray.encoders.filterbank import FilterBankEncoder
from cryosam_ray.features import compute_features, feature_key
from cryosam_ray.matching import SimilarityField, hierarchical_match, naive_match, nms, query_feature
from cryosam_ray.synth import SynthSettings, synthesize
from cryosam_ray.tomo_io import open_tomogram, write_mrc

# Recall of the prompted class's particles among the proposals (within one particle radius),
# one ribosome prompt, SNR 0.5; reached when written: hierarchical 1.0, naive 1.0.
MIN_RECALL = 0.9


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("match")
    synth = synthesize(SynthSettings(shape=(64, 128, 128), snr=0.5, use_real_maps=False), seed=2)
    write_mrc(tmp / "scene.mrc", synth.volume, 10.0)
    tomo = open_tomogram(tmp / "scene.mrc")
    volume = compute_features(tomo, FilterBankEncoder())
    return synth, tomo, volume


def _class_points(synth, cls):
    return np.array([[r["z"], r["y"], r["x"]] for r in synth.truth if r["class"] == cls])


def _label_voxels(synth, row):
    return np.argwhere(synth.labels == row["instance_id"])


def test_voxel_feature_equals_reference_interpolation(scene):
    """Each axis map sampled at a voxel = its slice's token map interpolated at the voxel's pixel."""
    _, tomo, volume = scene
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.integers(0, s, 50) for s in tomo.shape]).astype(float)
    feats = volume.sample(pts)
    c = volume.channels
    for axis, ax in enumerate(volume.axes):
        h, w = ax.grid
        a, b = ax.slice_shape
        for p, f in zip(pts, feats[:, axis * c:(axis + 1) * c]):
            r, col = [p[k] for k in range(3) if k != axis]
            u = np.clip((r + 0.5) * h / a - 0.5, 0, h - 1)
            v = np.clip((col + 0.5) * w / b - 0.5, 0, w - 1)
            ref = [ndimage.map_coordinates(ax.maps[int(p[axis]), :, :, ch], [[u], [v]], order=1)[0] for ch in range(c)]
            np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-5)


def test_similarity_field_is_exact(scene):
    """The token-level shortcut gives the same cosine as explicit voxel features, anywhere."""
    _, tomo, volume = scene
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(3, 3 * volume.channels)).astype(np.float32)
    pts = rng.uniform(0, np.array(tomo.shape) - 1, size=(2000, 3))
    feats = volume.sample(pts)
    ref = (queries @ feats.T) / (np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(feats, axis=1)[None])
    np.testing.assert_allclose(SimilarityField(volume, queries).cosine(pts), ref, atol=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "projection"])
def test_query_of_one_instance_is_closest_to_its_own_voxels(scene, similarity):
    synth, _, volume = scene
    rows = synth.truth
    query = query_feature(volume, [_label_voxels(synth, rows[0])])
    field = SimilarityField(volume, query[None], similarity=similarity)
    own = field.score(_label_voxels(synth, rows[0]))[0].mean()
    others = [field.score(_label_voxels(synth, r))[0].mean() for r in rows[1:] if r["class"] != rows[0]["class"]]
    background = field.score(np.argwhere(ndimage.binary_erosion(synth.labels == 0, iterations=4))[::97])[0].mean()
    assert own > background + 0.2
    if similarity == "projection":  # the default; cosine is blind to magnitude, so classes blur
        assert own > max(others)


@pytest.mark.parametrize("method", ["hierarchical", "naive"])
def test_proposals_recover_the_prompted_class(scene, method):
    synth, _, volume = scene
    ribosomes = [r for r in synth.truth if r["class"] == "ribosome"]
    query = query_feature(volume, [_label_voxels(synth, ribosomes[0])])
    radius = ribosomes[0]["radius"] * 0.6
    if method == "hierarchical":
        proposals = hierarchical_match(SimilarityField(volume, query[None]), tau_sim=0.5, nms_radius=radius)
    else:
        proposals = naive_match(volume, query, tau_sim=0.5, nms_radius=radius)
    distance, _ = cKDTree(proposals.zyx).query(_class_points(synth, "ribosome"))
    assert np.mean(distance <= ribosomes[0]["radius"]) >= MIN_RECALL
    assert len(proposals) <= 512 and np.all(np.diff(proposals.similarity) <= 0)


def test_hierarchical_scores_far_fewer_voxels_than_naive(scene):
    synth, tomo, volume = scene
    query = query_feature(volume, [_label_voxels(synth, synth.truth[0])])
    hier = hierarchical_match(SimilarityField(volume, query[None]), nms_radius=8)
    naive = naive_match(volume, query, nms_radius=8)
    assert naive.evaluated == np.prod(tomo.shape)
    assert hier.evaluated < naive.evaluated / 20
    # naive sees every voxel, so its best is at least as good; the coarse-to-fine search comes close
    assert naive.similarity[0] >= hier.similarity[0] >= naive.similarity[0] - 0.05


def test_nms_keeps_best_first_and_respects_radius():
    pts = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 5], [0, 0, 5.5]], float)
    kept = nms(pts, np.array([0.5, 0.9, 0.7, 0.1]), radius=2, top_k=10)
    assert kept.tolist() == [1, 2]
    assert nms(pts, np.array([0.5, 0.9, 0.7, 0.1]), radius=2, top_k=1).tolist() == [1]


class _CountingEncoder(FilterBankEncoder):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def encode(self, slices):
        self.calls += 1
        return super().encode(slices)


def test_feature_store_reuses_and_resumes(scene, tmp_path):
    _, tomo, reference = scene
    store = str(tmp_path / "features")
    first = _CountingEncoder()
    stored = compute_features(tomo, first, store_url=store, shard_slices=32)
    assert first.calls == sum(-(-s // 32) for s in tomo.shape)
    np.testing.assert_allclose(stored.sample([[10, 20, 30]]), reference.sample([[10, 20, 30]]), rtol=2e-3, atol=2e-3)
    assert stored.axes[0].maps.dtype == np.float16

    again = _CountingEncoder()
    compute_features(tomo, again, store_url=store, shard_slices=32)
    assert again.calls == 0  # everything reused

    import zarr

    group = zarr.open_group(f"{store}/{feature_key(tomo, again.signature())}", mode="a")
    group["done1"][1] = False  # as if a worker died before committing this shard
    resumed = _CountingEncoder()
    compute_features(tomo, resumed, store_url=store, shard_slices=32)
    assert resumed.calls == 1

    other = _CountingEncoder(stride=8)  # a changed setting: a new key, recomputed
    assert feature_key(tomo, other.signature()) != feature_key(tomo, again.signature())
    compute_features(tomo, other, store_url=store, shard_slices=32)
    assert other.calls == first.calls


def test_stored_features_are_read_a_few_slices_at_a_time_with_the_same_result(scene, tmp_path, monkeypatch):
    import cryosam_ray.features as features

    _, tomo, _ = scene
    stored = compute_features(tomo, FilterBankEncoder(), store_url=str(tmp_path / "features"), shard_slices=32)
    in_memory = stored.load()
    rng = np.random.default_rng(0)
    streak = np.column_stack([np.arange(tomo.shape[0]), np.full(tomo.shape[0], 7.0), np.full(tomo.shape[0], 9.0)])
    points = np.concatenate([streak, rng.uniform(0, np.array(tomo.shape) - 1, (200, 3))])  # every slice of all 3 axes
    monkeypatch.setattr(features, "SLICE_BATCH", 3)
    reads = []

    class Counted:  # the store array, recording how many slices each read takes
        def __init__(self, maps):
            self.maps, self.shape = maps, maps.shape
            self.oindex = self

        def __getitem__(self, wanted):
            reads.append(len(wanted))
            return self.maps.oindex[wanted]

    for axis in stored.axes:
        axis.maps = Counted(axis.maps)
    np.testing.assert_allclose(stored.sample(points), in_memory.sample(points), rtol=1e-6, atol=1e-6)
    assert reads and max(reads) <= 3  # the streak touches every slice of axis 0, never all at once


def test_feature_store_on_s3(scene, s3_bucket):
    _, tomo, reference = scene
    stored = compute_features(tomo, FilterBankEncoder(), store_url=f"{s3_bucket}/features", shard_slices=64)
    np.testing.assert_allclose(stored.sample([[5, 6, 7]]), reference.sample([[5, 6, 7]]), rtol=2e-3, atol=2e-3)
