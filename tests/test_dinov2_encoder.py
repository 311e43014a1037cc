"""DINOv2 slice encoder: tiny random-weight models saved to disk (and S3), loaded by the real code.

Nothing is downloaded: every model is built here from a tiny config and written with
``save_pretrained``; the hub is switched off.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cryosam_ray.encoders.base import SliceEncoder
from cryosam_ray.encoders.dinov2 import Dinov2Encoder, preprocess_slices
from cryosam_ray.errors import WeightsError

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
            image_size=98)
REGISTERS = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _save(folder, *, registers: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=REGISTERS))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """(folder, in-memory reference model) of a tiny random Dinov2Model."""
    folder = tmp_path_factory.mktemp("models") / "tiny_dinov2"
    return folder, _save(folder)


@pytest.fixture(scope="module")
def tiny_registers(tmp_path_factory):
    """(folder, in-memory reference model) of a tiny random Dinov2WithRegistersModel."""
    folder = tmp_path_factory.mktemp("models") / "tiny_dinov2_reg"
    return folder, _save(folder, registers=True, seed=1)


def _slices(n: int, a: int, b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, a, b)).astype(np.float32)


def _reference(model, slices: np.ndarray, size: tuple[int, int], registers: int) -> np.ndarray:
    """Direct computation: resize, replicate to RGB, last_hidden_state minus CLS and registers."""
    x = F.interpolate(torch.from_numpy(slices)[:, None], size=size, mode="bilinear", align_corners=False)
    pixels = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state[:, 1 + registers:]
    h, w = size[0] // 14, size[1] // 14
    return hidden.reshape(len(slices), h, w, -1).numpy()


@pytest.mark.parametrize("variant", ["tiny_dinov2", "tiny_registers"])
def test_loads_saved_weights_exactly(variant, request):
    folder, reference = request.getfixturevalue(variant)
    enc = Dinov2Encoder(model=str(folder), image_size=98, device="cpu")
    assert isinstance(enc, SliceEncoder)
    assert enc.feature_dim == 32 and enc.device.type == "cpu" and enc.dtype == torch.float32
    assert enc.num_register_tokens == (REGISTERS if variant == "tiny_registers" else 0)
    loaded, saved = enc.model.state_dict(), reference.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("variant", ["tiny_dinov2", "tiny_registers"])
def test_encode_matches_direct_computation(variant, request):
    folder, reference = request.getfixturevalue(variant)
    registers = REGISTERS if variant == "tiny_registers" else 0
    enc = Dinov2Encoder(model=str(folder), image_size=98, device="cpu")
    slices = _slices(3, 50, 60)
    out = enc.encode(slices)
    assert out.shape == (3, 7, 7, 32) and out.dtype == np.float32  # registers are not in the grid
    assert enc.token_grid((50, 60)) == (7, 7)
    np.testing.assert_allclose(out, _reference(reference, slices, (98, 98), registers), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["tiny_dinov2", "tiny_registers"])
def test_keep_aspect_gives_a_non_square_grid(variant, request):
    folder, reference = request.getfixturevalue(variant)
    registers = REGISTERS if variant == "tiny_registers" else 0
    enc = Dinov2Encoder(model=str(folder), image_size=98, keep_aspect=True, device="cpu")
    # 100 -> 98 px = 7 tokens; 40 -> 39.2 px -> rounded to 42 px = 3 tokens (ratio 3/7 ~ 40/100).
    assert enc.input_shape((40, 100)) == (42, 98)
    assert enc.token_grid((40, 100)) == (3, 7)
    assert enc.token_grid((100, 40)) == (7, 3)
    assert enc.token_grid((64, 64)) == (7, 7)
    slices = _slices(2, 40, 100, seed=3)
    out = enc.encode(slices)
    assert out.shape == (2, 3, 7, 32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _reference(reference, slices, (42, 98), registers), rtol=1e-5, atol=1e-5)
    assert enc.encode(slices.transpose(0, 2, 1).copy()).shape == (2, 7, 3, 32)


def test_default_stretch_ignores_aspect(tiny_dinov2):
    enc = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu")
    assert enc.token_grid((40, 100)) == (7, 7)
    assert enc.encode(_slices(1, 40, 100)).shape == (1, 7, 7, 32)


def test_larger_image_size_interpolates_positions(tiny_dinov2):
    enc = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=140, device="cpu")
    slices = _slices(2, 30, 30)
    out = enc.encode(slices)
    assert out.shape == (2, 10, 10, 32)
    np.testing.assert_allclose(out, _reference(tiny_dinov2[1], slices, (140, 140), 0), rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_features(tiny_registers):
    slices = _slices(5, 33, 47, seed=7)
    small = Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, batch_size=2, device="cpu").encode(slices)
    large = Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, batch_size=16, device="cpu").encode(slices)
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-5)


def test_empty_batch_and_bad_input(tiny_dinov2):
    enc = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu")
    assert enc.encode(np.zeros((0, 20, 30), np.float32)).shape == (0, 7, 7, 32)
    with pytest.raises(ValueError, match="N, A, B"):
        enc.encode(np.zeros((20, 30), np.float32))


def test_preprocess_replicates_without_imagenet_normalisation():
    slices = _slices(2, 14, 28)
    pixels = preprocess_slices(slices, (14, 28))
    assert pixels.shape == (2, 3, 14, 28) and pixels.dtype == torch.float32
    for c in range(3):  # same size: the z-scored slice itself in every channel
        np.testing.assert_array_equal(pixels[:, c].numpy(), slices)
    assert preprocess_slices(slices, (28, 28), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_inputs_follow_the_weights_dtype(tiny_dinov2):
    enc = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu", dtype="bfloat16")
    assert enc.dtype == torch.bfloat16 and next(enc.model.parameters()).dtype == torch.bfloat16
    out = enc.encode(_slices(2, 40, 40))
    assert out.dtype == np.float32 and out.shape == (2, 7, 7, 32) and np.isfinite(out).all()
    assert enc.signature()["dtype"] == "bfloat16"


def test_loads_from_s3(tiny_dinov2, s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    url = f"{s3_bucket}/models/tiny_dinov2"
    fs.put(str(tiny_dinov2[0]), url, recursive=True)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(url)) == ["config.json", "model.safetensors"]
    enc = Dinov2Encoder(model=url, image_size=98, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert enc.local_path.is_relative_to(tmp_path / "cache")
    local = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu")
    slices = _slices(2, 30, 40)
    np.testing.assert_array_equal(enc.encode(slices), local.encode(slices))
    assert enc.signature()["weights"] == local.signature()["weights"]  # content, not path


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsError, match="no such file") as err:
        Dinov2Encoder(model=str(tmp_path / "nowhere"), device="cpu")
    assert err.value.source == str(tmp_path / "nowhere")


def test_missing_s3_folder(s3_bucket, tmp_path):
    with pytest.raises(WeightsError):
        Dinov2Encoder(model=f"{s3_bucket}/no/such/model", device="cpu", cache_dir=str(tmp_path))


def test_not_a_dinov2_config(tmp_path):
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=50))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(WeightsError, match="'bert'"):
        Dinov2Encoder(model=str(tmp_path / "bert"), device="cpu")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        Dinov2Encoder(model=str(tmp_path / "empty"), device="cpu")


def test_unreadable_or_missing_weights(tiny_dinov2, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(tiny_dinov2[0] / "config.json", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(WeightsError, match="cannot load"):
        Dinov2Encoder(model=str(corrupt), device="cpu")
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="cannot load"):
        Dinov2Encoder(model=str(corrupt), device="cpu")


def test_weights_that_do_not_fill_the_config(tiny_dinov2, tmp_path):
    deeper = tmp_path / "deeper"
    shutil.copytree(tiny_dinov2[0], deeper)
    config = json.loads((deeper / "config.json").read_text())
    config["num_hidden_layers"] = 3  # layer 2 would be random: refuse
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="missing"):
        Dinov2Encoder(model=str(deeper), device="cpu")


def test_hub_id_needs_allow_hub():
    with pytest.raises(WeightsError, match="allow_hub"):
        Dinov2Encoder(model="facebook/dinov2-large", allow_hub=False, device="cpu")


def test_bad_settings(tiny_dinov2):
    with pytest.raises(ValueError, match="batch_size"):
        Dinov2Encoder(model=str(tiny_dinov2[0]), batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        Dinov2Encoder(model=str(tiny_dinov2[0]), dtype="float8", device="cpu")
    with pytest.raises(ValueError, match="image_size"):
        Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=10, device="cpu")


def test_signature(tiny_dinov2, tiny_registers, tmp_path):
    base = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu").signature()
    json.dumps(base)  # serialisable
    assert base == Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu").signature()
    assert base["hidden_size"] == 32 and base["num_layers"] == 2 and base["num_register_tokens"] == 0
    assert base["image_size"] == 98 and base["keep_aspect"] is False and base["dtype"] == "float32"
    assert Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=112, device="cpu").signature() != base
    assert Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, keep_aspect=True,
                         device="cpu").signature() != base
    assert Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, device="cpu").signature() != base
    # Same architecture, other weights, same folder name: the weights fingerprint tells them apart.
    other = tmp_path / "tiny_dinov2"
    _save(other, seed=5)
    other_sig = Dinov2Encoder(model=str(other), image_size=98, device="cpu").signature()
    assert other_sig["config"] == base["config"] and other_sig["weights"] != base["weights"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_matches_cpu(tiny_registers):
    enc = Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, keep_aspect=True, device="cuda")
    assert enc.device.type == "cuda" and enc.dtype == torch.float16  # dtype "auto" on cuda
    slices = _slices(3, 40, 100)
    out = enc.encode(slices)
    assert out.dtype == np.float32 and out.shape == (3, 3, 7, 32)
    cpu = Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, keep_aspect=True, device="cpu").encode(slices)
    np.testing.assert_allclose(out, cpu, atol=5e-2, rtol=5e-2)
