"""SAM backend with a tiny random-weight SAM (real prompt encoder / mask decoder, 1024 input), on CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos

from cryosam_ray.embedding_store import EmbeddingStore
from cryosam_ray.errors import ConfigError, PromptError, WeightsError
from cryosam_ray.segmenters.base import PromptableSegmenter, SliceRequest
from cryosam_ray.segmenters.sam import SamSegmenter, decode_masks
from cryosam_ray.segmenters.sam_build import SAM_ARCHITECTURES, build_sam
from cryosam_ray.segmenters.sam_kernels import Fp32LayerNorm2d, SdpaAttention, patch_image_encoder, rel_pos_bias
from cryosam_ray.tomo_io import data_fingerprint, open_tomogram, write_mrc

from tiny_models import TINY_SAM
from tiny_models import tiny_sam as build_tiny_sam

LOW = 256  # SAM's low-res mask grid


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_tiny_sam()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_sam):
    path = tmp_path_factory.mktemp("weights") / "sam_vit_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    return str(path)


def _blob_volume(shape, seed=0) -> np.ndarray:
    """Noise plus a few bright balls, ZYX float32."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=shape).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    for _ in range(4):
        c = [rng.uniform(2, s - 2) for s in shape]
        vol += 4.0 * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 9)
    return vol


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory):
    path = tmp_path_factory.mktemp("tomo") / "TS_01.mrc"
    write_mrc(path, _blob_volume((12, 40, 56)), 10.0)
    return open_tomogram(path)


def _count_encoder(seg: SamSegmenter, *, fake: bool = False) -> list[int]:
    """Record the batch size of every image-encoder call; ``fake`` returns zeros instead of running it."""
    calls: list[int] = []
    real = seg.sam.image_encoder.forward

    def forward(x):
        assert x.shape[1:] == (3, 1024, 1024)
        calls.append(int(x.shape[0]))
        return torch.zeros(x.shape[0], *seg.embedding_shape) if fake else real(x)

    seg.sam.image_encoder.forward = forward
    return calls


def _seg(checkpoint, **kw) -> SamSegmenter:
    kw = {"min_area": 0, "min_pred_iou": -np.inf, **kw}
    return SamSegmenter(model_type="custom", architecture=TINY_SAM, checkpoint=checkpoint, device="cpu", **kw)


# ---- building and loading ---------------------------------------------------------------------

def test_architectures_match_segment_anything(monkeypatch):
    import importlib

    module = importlib.import_module("segment_anything.build_sam")
    seen = {}
    monkeypatch.setattr(module, "_build_sam", lambda checkpoint=None, **arch: arch)
    for name in ("vit_h", "vit_l", "vit_b"):
        seen[name] = module.sam_model_registry[name]()
        expected = SAM_ARCHITECTURES[name]
        assert seen[name].keys() == expected.keys()
        assert all(tuple(seen[name][k]) == tuple(expected[k]) if isinstance(expected[k], tuple)
                   else seen[name][k] == expected[k] for k in expected), name


def test_checkpoint_round_trip(tiny_sam, checkpoint):
    loaded = build_tiny_sam(checkpoint)
    expected = tiny_sam.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(loaded.pixel_mean, tiny_sam.pixel_mean) and torch.equal(loaded.pixel_std, tiny_sam.pixel_std)
    assert not loaded.training
    assert loaded.prompt_encoder.embed_dim == 256 and loaded.image_encoder.img_size == 1024


def test_wrong_model_type_names_file_and_guess(checkpoint):
    with pytest.raises(WeightsError) as info:
        build_sam("vit_b", checkpoint)
    assert info.value.source == checkpoint
    assert "vit_b" in info.value.reason and "width 32, 2 blocks" in info.value.reason


def test_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "notes.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pth"):
        build_tiny_sam(str(garbage))
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsError, match="state dict"):
        build_tiny_sam(str(tensor))


def test_unknown_model_and_missing_checkpoint():
    with pytest.raises(WeightsError, match="vit_h, vit_l, vit_b"):
        build_sam("vit_xxl", None)
    with pytest.raises(WeightsError, match="no checkpoint"):
        build_sam("vit_h", None)
    with pytest.raises(WeightsError, match="no such file"):
        build_tiny_sam("/nonexistent/sam_vit_tiny.pth")


# ---- the patched image encoder: SDPA attention, float32 LayerNorm2d ------------------------------

def _with_rel_pos(encoder: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random relative-position tables (checkpoints carry trained ones; random init has zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, Attention):
                module.rel_pos_h.copy_(0.5 * torch.randn(module.rel_pos_h.shape, generator=g))
                module.rel_pos_w.copy_(0.5 * torch.randn(module.rel_pos_w.shape, generator=g))
    return encoder


def test_rel_pos_bias_is_segment_anythings_decomposed_terms():
    torch.manual_seed(1)
    b, heads, (h, w), c = 2, 3, (5, 7), 8
    q = torch.randn(b, heads, h * w, c)
    rel_h, rel_w = torch.randn(2 * h - 1, c), torch.randn(2 * w - 1, c)
    zeros = torch.zeros(b * heads, h * w, h * w)
    expected = add_decomposed_rel_pos(zeros, q.reshape(b * heads, h * w, c), rel_h, rel_w, (h, w), (h, w))
    torch.testing.assert_close(rel_pos_bias(q, rel_h, rel_w, (h, w)), expected.view(b, heads, h * w, h * w))


def test_sdpa_attention_equals_stock_attention_on_a_non_square_grid():
    torch.manual_seed(2)
    stock = _with_rel_pos(Attention(32, num_heads=4, use_rel_pos=True, input_size=(5, 7)))
    sdpa = copy.deepcopy(stock)
    sdpa.__class__ = SdpaAttention
    x = torch.randn(3, 5, 7, 32)
    with torch.inference_mode():
        torch.testing.assert_close(sdpa(x), stock(x), rtol=1e-5, atol=1e-5)


def test_patched_encoder_equals_segment_anything(tiny_sam):
    """The tiny SAM's block 0 is windowed (14 x 14 windows over a padded 70 x 70 grid), block 1 global."""
    stock = _with_rel_pos(copy.deepcopy(tiny_sam.image_encoder))
    patched = patch_image_encoder(copy.deepcopy(stock))
    assert [type(b.attn) for b in patched.blocks] == [SdpaAttention, SdpaAttention]
    assert {type(m) for m in patched.neck} >= {Fp32LayerNorm2d} and not any(type(m) is LayerNorm2d
                                                                            for m in patched.modules())
    assert patched.state_dict().keys() == stock.state_dict().keys()
    eager = patch_image_encoder(copy.deepcopy(stock), attention="eager")
    assert [type(b.attn) for b in eager.blocks] == [Attention, Attention]
    x = torch.randn(2, 3, 1024, 1024)
    with torch.inference_mode():
        expected = stock(x)
        torch.testing.assert_close(patched(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eager(x), expected, rtol=0, atol=0)  # float32 LayerNorm2d: the same ops
    with pytest.raises(ValueError, match="attention"):
        patch_image_encoder(copy.deepcopy(stock), attention="flash")


def test_segmenter_patches_at_load_and_sdpa_matches_eager(checkpoint, tomogram):
    sdpa, eager = _seg(checkpoint), _seg(checkpoint, attention="eager")
    assert type(sdpa.sam.image_encoder.blocks[0].attn) is SdpaAttention
    assert type(eager.sam.image_encoder.blocks[0].attn) is Attention
    assert sdpa.info().settings["attention"] == "sdpa" and sdpa.info().settings["precision"] == "fp32"
    for seg in (sdpa, eager):
        seg.set_tomogram(tomogram)
        seg.embed_slices(0, [3, 4])
    for i in (3, 4):  # float16 embeddings of float32 computations
        torch.testing.assert_close(sdpa._lru[(0, i)], eager._lru[(0, i)], rtol=2e-3, atol=2e-3)


def test_segmenter_precisions_on_cpu(checkpoint, tomogram, tmp_path):
    """auto is fp32 on a CPU; bf16 autocasts the image encoder; fp16 casts its weights. Prompt
    encoder and mask decoder stay float32. Embeddings are layer-normed (order 1)."""
    segs = {p: _seg(checkpoint, precision=p, embedding_store=str(tmp_path / "emb")) for p in ("auto", "bf16", "fp16")}
    assert segs["auto"].precision.name == "fp32"
    assert next(segs["bf16"].sam.image_encoder.parameters()).dtype == torch.float32
    assert next(segs["fp16"].sam.image_encoder.parameters()).dtype == torch.float16
    for seg in segs.values():
        assert next(seg.sam.mask_decoder.parameters()).dtype == torch.float32
        seg.set_tomogram(tomogram)
        seg.embed_slices(0, [3])
    reference = segs["auto"]._lru[(0, 3)].float()
    for name, tol in (("bf16", 0.1), ("fp16", 0.02)):
        emb = segs[name]._lru[(0, 3)].float()
        assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
        torch.testing.assert_close(emb, reference, rtol=0, atol=tol, msg=name)
    assert len({seg.store.url for seg in segs.values()}) == 3  # precision is part of the store signature
    preds = segs["bf16"].predict([SliceRequest(0, 3, (10, 20))])
    assert len(preds) == 1


def test_out_of_memory_names_the_batch_size(checkpoint, tomogram, monkeypatch):
    seg = _seg(checkpoint, batch_size=4)

    def encoder(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(seg, "_image_encoder", encoder)
    seg.set_tomogram(tomogram)
    with pytest.raises(ConfigError, match=r"segmenter\.sam\.batch_size=4: .* lower segmenter\.sam\.batch_size "
                       r"\(for example to 2\)"):
        seg.embed_slices(0, [1, 2, 3])


def test_compiled_encoder_sees_one_batch_shape(checkpoint, tomogram, monkeypatch):
    """compile=True wraps the image encoder in torch.compile (dynamo with the eager backend here)
    and pads the last batch to batch_size."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="eager", **kw))
    seg = _seg(checkpoint, batch_size=2, compile=True)
    plain = _seg(checkpoint)
    shapes = []
    seg.sam.image_encoder.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    for s in (seg, plain):
        s.set_tomogram(tomogram)
        s.embed_slices(0, [1, 2, 3])
    assert shapes and set(shapes) == {(2, 3, 1024, 1024)}
    for i in (1, 2, 3):
        torch.testing.assert_close(seg._lru[(0, i)], plain._lru[(0, i)], rtol=2e-3, atol=2e-3)


# ---- prediction ---------------------------------------------------------------------------------

def _check_prediction(pred, tomogram, request):
    shape = [s for a, s in enumerate(tomogram.shape) if a != request.axis]
    r0, c0 = pred.offset
    h, w = pred.mask.shape
    assert pred.mask.dtype == np.bool_ and pred.mask.any()
    assert 0 <= r0 and 0 <= c0 and r0 + h <= shape[0] and c0 + w <= shape[1]
    assert pred.confidence.shape == pred.mask.shape and pred.confidence.dtype == np.float32
    assert pred.confidence[pred.mask].min() >= 0.5
    assert (~pred.mask).sum() == 0 or pred.confidence[~pred.mask].max() <= 0.5
    assert np.isfinite(pred.pred_iou) and 0.0 <= pred.pred_iou <= 1.0
    assert pred.state.shape == (1, LOW, LOW) and pred.state.dtype == np.float32
    row, col = pred.best_point()
    assert 0 <= row < shape[0] and 0 <= col < shape[1]


def test_predict_batch_on_different_slices_and_axes(checkpoint, tomogram):
    seg = _seg(checkpoint, batch_size=2)
    assert isinstance(seg, PromptableSegmenter)
    with pytest.raises(RuntimeError, match="set_tomogram"):
        seg.predict([SliceRequest(axis=0, index=0, point=(1, 1))])
    calls = _count_encoder(seg)
    seg.set_tomogram(tomogram)
    seeds = [SliceRequest(0, 3, (10, 20)), SliceRequest(0, 7, (30, 50)), SliceRequest(1, 20, (5, 40)),
             SliceRequest(2, 30, (6, 20)), SliceRequest(0, 3, (20, 10))]
    preds = seg.predict(seeds)
    assert len(preds) == len(seeds)
    assert sorted(calls) == [1, 1, 2]  # 4 distinct slices: axis 0 in one batch of 2, axes 1 and 2 alone
    for req, pred in zip(seeds, preds):
        if pred is not None:
            _check_prediction(pred, tomogram, req)
    assert any(p is not None for p in preds)

    # Propagation steps on the neighbouring slices, fed the previous low-res logits.
    steps = [SliceRequest(r.axis, r.index + 1, p.best_point(), p.mask, p.offset, p.state)
             for r, p in zip(seeds, preds) if p is not None]
    for req, pred in zip(steps, seg.predict(steps)):
        if pred is not None:
            _check_prediction(pred, tomogram, req)

    n_calls = len(calls)
    again = seg.predict(seeds)  # every embedding is cached: no encoder call
    assert len(calls) == n_calls
    for a, b in zip(preds, again):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a.mask, b.mask)

    with pytest.raises(PromptError, match="outside"):
        seg.predict([SliceRequest(0, 3, (40, 0))])
    with pytest.raises(PromptError, match="outside"):
        seg.predict([SliceRequest(1, 56, (0, 0))])


def test_embed_slices_batches_and_skips_cached(checkpoint, tomogram):
    seg = _seg(checkpoint, batch_size=3)
    calls = _count_encoder(seg, fake=True)
    seg.set_tomogram(tomogram)
    seg.embed_slices(1, range(0, 7))
    assert calls == [3, 3, 1]
    seg.embed_slices(1, [5, 6, 7, 8])
    assert calls == [3, 3, 1, 2]
    seg.set_tomogram(tomogram)  # same data: memory cache kept
    seg.predict([SliceRequest(1, 2, (3, 3))])
    assert calls == [3, 3, 1, 2]


# ---- embedding store ---------------------------------------------------------------------------

def _store_round_trip(checkpoint, tomogram, store_url, requests):
    first = _seg(checkpoint, embedding_store=store_url)
    calls1 = _count_encoder(first)
    first.set_tomogram(tomogram)
    preds1 = first.predict(requests)
    assert sum(calls1) == len({(r.axis, r.index) for r in requests})
    assert first.store is not None and first.store.url.startswith(store_url)

    second = _seg(checkpoint, embedding_store=store_url)
    calls2 = _count_encoder(second)
    second.set_tomogram(open_tomogram(tomogram.url))
    assert second.store.url == first.store.url
    preds2 = second.predict(requests)
    assert calls2 == []  # every slice came from the store
    for a, b in zip(preds1, preds2):
        assert (a is None) == (b is None)
        if a is not None:  # float16 embeddings in memory and in the store: identical results
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.pred_iou == b.pred_iou
    second.embed_slices(requests[0].axis, [requests[0].index])
    assert calls2 == []
    return first


def test_embedding_store_reused_across_instances_local(checkpoint, tomogram, tmp_path):
    store_url = str(tmp_path / "embeddings")
    requests = [SliceRequest(0, 5, (20, 28)), SliceRequest(2, 11, (6, 20))]
    first = _store_round_trip(checkpoint, tomogram, store_url, requests)
    assert first.store.done(0).tolist() == [i == 5 for i in range(12)]
    assert first.store.get(0, 4) is None and first.store.get(0, 5).shape == (256, 64, 64)

    # Other weights: another signature, so another folder.
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(build_tiny_sam().state_dict(), other)
    seg = _seg(str(other), embedding_store=store_url)
    seg.set_tomogram(tomogram)
    assert seg.store.url != first.store.url
    seg = _seg(checkpoint, embedding_store=store_url, clip_sigma=4.0)  # other preprocessing
    seg.set_tomogram(tomogram)
    assert seg.store.url != first.store.url


def test_embedding_store_reused_across_instances_s3(checkpoint, tomogram, s3_bucket):
    _store_round_trip(checkpoint, tomogram, f"{s3_bucket}/embeddings", [SliceRequest(0, 6, (12, 12))])


def test_embedding_store_put_get_done(tmp_path, tomogram):
    url = str(tmp_path / "store")
    store = EmbeddingStore(url, "sig1", volume_shape=(3, 4, 5), embedding_shape=(2, 3, 3))
    emb = np.arange(2 * 18, dtype=np.float16).reshape(2, 2, 3, 3)
    store.put(1, [2, 0], emb)
    np.testing.assert_array_equal(store.get(1, 0), emb[1])
    assert store.get(1, 1) is None and store.get(0, 0) is None
    assert store.done(1).tolist() == [True, False, True, False]
    again = EmbeddingStore(url, "sig1", volume_shape=(3, 4, 5), embedding_shape=(2, 3, 3))
    assert sorted(again.get_many(1, [0, 1, 2])) == [0, 2]
    assert EmbeddingStore(url, "sig2", volume_shape=(3, 4, 5), embedding_shape=(2, 3, 3)).get(1, 0) is None
    with pytest.raises(ValueError, match="shape"):
        store.put(1, [3], emb)
    assert data_fingerprint(open_tomogram(tomogram.url)) == data_fingerprint(tomogram)


# ---- batched decoder ---------------------------------------------------------------------------

def test_batched_decoder_equals_stock_one_at_a_time(checkpoint):
    seg = _seg(checkpoint)
    sam = seg.sam
    torch.manual_seed(3)
    b = 4
    emb = torch.randn(b, 256, 64, 64)
    coords = torch.rand(b, 1, 2) * torch.tensor([1024.0, 600.0])
    labels = torch.ones(b, 1, dtype=torch.int)
    masks_in = [None, torch.randn(1, LOW, LOW) * 5, None, (torch.randn(1, LOW, LOW) > 0).float()]
    low_res, iou = seg._decode(emb, coords, labels, masks_in)
    assert low_res.shape == (b, 4, LOW, LOW) and iou.shape == (b, 4)
    pe = sam.prompt_encoder
    with torch.inference_mode():
        for k in range(b):
            sparse, dense = pe(points=(coords[k:k + 1], labels[k:k + 1]), boxes=None,
                               masks=None if masks_in[k] is None else masks_in[k][None])
            for multimask, sl in ((True, slice(1, None)), (False, slice(0, 1))):
                ref_masks, ref_iou = sam.mask_decoder(image_embeddings=emb[k:k + 1], image_pe=pe.get_dense_pe(),
                                                      sparse_prompt_embeddings=sparse,
                                                      dense_prompt_embeddings=dense, multimask_output=multimask)
                torch.testing.assert_close(low_res[k:k + 1, sl], ref_masks, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(iou[k:k + 1, sl], ref_iou, rtol=1e-4, atol=1e-4)
        direct = decode_masks(sam.mask_decoder, emb[:1], pe.get_dense_pe(), *pe(
            points=(coords[:1], labels[:1]), boxes=None, masks=None))
    torch.testing.assert_close(direct[0], low_res[:1], rtol=1e-4, atol=1e-4)


# ---- geometry on non-square slices --------------------------------------------------------------

def _disk_decoder(radius=4.0, ious=(0.5, 0.9, 0.8, 0.7)):
    """A stand-in for SAM's decoder: positive logits only in a disk around each prompt, in SAM's frame.

    SAM's points are (x, y) in the resized, padded 1024 input; the prompt encoder takes a point
    at the centre of its pixel (+0.5), and low-res cell i covers input pixels [4i, 4i + 4).
    """
    seen = {}

    def decode(image_embeddings, point_coords, point_labels, mask_inputs):
        seen["mask_inputs"] = mask_inputs
        b = point_coords.shape[0]
        grid = torch.arange(LOW, dtype=torch.float32)
        cx = (point_coords[:, 0, 0] + 0.5) / 4 - 0.5
        cy = (point_coords[:, 0, 1] + 0.5) / 4 - 0.5
        dist = torch.hypot(grid[None, :, None] - cy[:, None, None], grid[None, None, :] - cx[:, None, None])
        disk = (radius - dist)[:, None].expand(b, 4, LOW, LOW).clone()
        return disk, torch.tensor(ious).expand(b, 4)

    return decode, seen


@pytest.fixture(scope="module")
def long_tomogram(tmp_path_factory):
    """(40, 100, 24): z slices are tall (100 x 24), x slices wide (40 x 100)."""
    path = tmp_path_factory.mktemp("long") / "TS_long.mrc"
    write_mrc(path, _blob_volume((40, 100, 24), seed=1), 10.0)
    return open_tomogram(path)


@pytest.mark.parametrize("axis", [0, 2])
def test_points_land_in_place_on_non_square_slices(checkpoint, long_tomogram, axis):
    seg = _seg(checkpoint, window_margin=2)
    _count_encoder(seg, fake=True)
    seg._decode, _ = _disk_decoder()
    seg.set_tomogram(long_tomogram)
    h, w = [s for a, s in enumerate(long_tomogram.shape) if a != axis]
    points = [(1, 1), (1, w - 2), (h - 2, 1), (h - 2, w - 2), (h // 2, w // 3)]
    preds = seg.predict([SliceRequest(axis, 3, p) for p in points])
    for (row, col), pred in zip(points, preds):
        assert pred is not None
        r0, c0 = pred.offset
        assert pred.mask[row - r0, col - c0], (row, col)
        cy, cx = np.argwhere(pred.mask).mean(axis=0) + (r0, c0)
        assert abs(cy - row) <= 2 and abs(cx - col) <= 2, ((row, col), (cy, cx))
        assert pred.mask.sum() < 30  # the small disk, not a smeared stripe


def test_candidate_selection_filters_and_mask_input(checkpoint, long_tomogram):
    seg = _seg(checkpoint, min_area=1)
    _count_encoder(seg, fake=True)
    seg._decode, seen = _disk_decoder(ious=(0.5, 0.9, 0.95, 0.7))
    seg.set_tomogram(long_tomogram)
    seed = seg.predict([SliceRequest(0, 2, (50, 12))])[0]
    assert seed.pred_iou == pytest.approx(0.95)  # best of the three multimask candidates
    assert seen["mask_inputs"] == [None]
    state = seed.state.copy()
    state[0, 0, 0] = 3.5
    step = seg.predict([SliceRequest(0, 3, (50, 12), seed.mask, seed.offset, state)])[0]
    assert step.pred_iou == pytest.approx(0.5)  # steps: the single-mask output
    np.testing.assert_array_equal(seen["mask_inputs"][0].numpy(), state)

    binary = _seg(checkpoint, min_area=1, mask_input="binary", multimask_steps=True)
    _count_encoder(binary, fake=True)
    binary._decode, seen = _disk_decoder(ious=(0.5, 0.9, 0.95, 0.7))
    binary.set_tomogram(long_tomogram)
    step = binary.predict([SliceRequest(0, 3, (50, 12), seed.mask, seed.offset, state)])[0]
    assert step.pred_iou == pytest.approx(0.95)
    assert set(np.unique(seen["mask_inputs"][0].numpy())) == {0.0, 1.0}

    for kwargs in ({"min_pred_iou": 0.99}, {"max_area": 2}, {"min_area": 1000}):
        strict = _seg(checkpoint, **kwargs)
        _count_encoder(strict, fake=True)
        strict._decode, _ = _disk_decoder()
        strict.set_tomogram(long_tomogram)
        assert strict.predict([SliceRequest(0, 2, (50, 12))]) == [None], kwargs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_default_precision_encoder(checkpoint, tomogram):
    seg = SamSegmenter(model_type="custom", architecture=TINY_SAM, checkpoint=checkpoint, min_area=0, min_pred_iou=-np.inf)
    assert seg.device.type == "cuda"
    assert seg.precision.name == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32")
    assert next(seg.sam.image_encoder.parameters()).dtype == torch.float32  # autocast, not cast weights
    assert next(seg.sam.mask_decoder.parameters()).dtype == torch.float32
    seg.set_tomogram(tomogram)
    requests = [SliceRequest(0, 3, (10, 20)), SliceRequest(1, 20, (5, 40))]
    for req, pred in zip(requests, seg.predict(requests)):
        if pred is not None:
            _check_prediction(pred, tomogram, req)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_vit_h_bf16_and_safe_fp16_match_fp32(tmp_path):
    """The real ViT-H image encoder with random weights (random relative positions): bf16
    autocast and fp16 with float32 LayerNorm2d against fp32, by cosine per embedding vector."""
    torch.manual_seed(0)
    path = tmp_path / "vit_h.pth"
    torch.save(_with_rel_pos(_random_vit_h()).state_dict(), path)
    x = torch.randn(2, 3, 1024, 1024)
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        seg = SamSegmenter(model_type="vit_h", checkpoint=str(path), device="cuda", precision=precision)
        with torch.inference_mode(), seg.precision.context(seg.device):
            out[precision] = seg.sam.image_encoder(x.cuda().to(seg.precision.weights)).float()
        del seg
        torch.cuda.empty_cache()
    for precision in ("bf16", "fp16"):
        cos = torch.nn.functional.cosine_similarity(out[precision], out["fp32"], dim=1)
        assert torch.isfinite(out[precision]).all() and cos.min() > 0.99, (precision, cos.min())


def _random_vit_h():
    from segment_anything.build_sam import _build_sam

    return _build_sam(**SAM_ARCHITECTURES["vit_h"], checkpoint=None)
