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
from cryosam_ray.config import Dinov2Config
from cryosam_ray.encoders.dinov2 import Dinov2Encoder, preprocess_slices
from cryosam_ray.errors import ConfigError, WeightsError

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
    # config.json's model_type picks the class; both load with scaled-dot-product attention.
    assert type(enc.model) is type(reference)
    assert type(enc.model).__name__ == ("Dinov2WithRegistersModel" if variant == "tiny_registers" else "Dinov2Model")
    assert enc.model.config._attn_implementation == "sdpa"
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


def test_default_model_is_vit_l_with_registers():
    assert Dinov2Config().model == "facebook/dinov2-with-registers-large"
    assert Dinov2Encoder.__init__.__kwdefaults__["model"] == "facebook/dinov2-with-registers-large"


@pytest.mark.parametrize("variant", ["tiny_dinov2", "tiny_registers"])
def test_sdpa_matches_eager_attention(variant, request):
    folder, _ = request.getfixturevalue(variant)
    slices = _slices(3, 50, 60, seed=4)
    sdpa = Dinov2Encoder(model=str(folder), image_size=98, device="cpu")
    eager = Dinov2Encoder(model=str(folder), image_size=98, device="cpu", attention="eager")
    assert eager.model.config._attn_implementation == "eager"
    np.testing.assert_allclose(sdpa.encode(slices), eager.encode(slices), rtol=1e-5, atol=1e-5)


def test_precisions_on_cpu(tiny_registers):
    """fp32 is the default on a CPU; bf16 autocasts (float32 weights); fp16 casts the weights.
    Tolerances: bf16 keeps 8 mantissa bits, fp16 11; features are layer-normed (order 1)."""
    folder, reference = tiny_registers
    slices = _slices(2, 40, 40)
    expected = _reference(reference, slices, (98, 98), REGISTERS)
    auto = Dinov2Encoder(model=str(folder), image_size=98, device="cpu")
    assert auto.precision.name == "fp32" and auto.signature()["precision"] == "fp32"
    bf16 = Dinov2Encoder(model=str(folder), image_size=98, device="cpu", precision="bf16")
    assert bf16.dtype == torch.float32 and next(bf16.model.parameters()).dtype == torch.float32
    assert bf16.signature()["precision"] == "bf16" and bf16.signature() != auto.signature()
    out = bf16.encode(slices)
    assert out.dtype == np.float32 and out.shape == (2, 7, 7, 32)
    np.testing.assert_allclose(out, expected, atol=0.1, rtol=0)
    assert np.abs(out - expected).max() > 1e-5  # really computed in bf16
    fp16 = Dinov2Encoder(model=str(folder), image_size=98, device="cpu", precision="fp16")
    assert fp16.dtype == torch.float16 and next(fp16.model.parameters()).dtype == torch.float16
    np.testing.assert_allclose(fp16.encode(slices), expected, atol=0.02, rtol=0)


def test_out_of_memory_names_the_batch_size(tiny_dinov2, monkeypatch):
    enc = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu", batch_size=8)

    def forward(**_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(enc, "_forward", forward)
    with pytest.raises(ConfigError, match=r"encoder\.dinov2\.batch_size=8: a batch does not fit .* lower "
                       r"encoder\.dinov2\.batch_size \(for example to 4\)") as info:
        enc.encode(_slices(3, 20, 20))
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


def test_compiled_model_sees_one_batch_shape(tiny_registers, monkeypatch):
    """compile=True wraps the model in torch.compile (here dynamo with the eager backend: no C++
    toolchain needed) and pads the last batch, so one graph serves every batch."""
    compiled = []
    real = torch.compile

    def compile_eager(model, **kwargs):
        compiled.append(kwargs)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eager)
    folder, reference = tiny_registers
    enc = Dinov2Encoder(model=str(folder), image_size=98, device="cpu", batch_size=2, compile=True)
    assert compiled == [{"dynamic": False}]
    shapes = []
    enc.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["pixel_values"].shape)),
                                        with_kwargs=True)
    slices = _slices(5, 30, 30, seed=2)
    out = enc.encode(slices)
    assert set(shapes) == {(2, 3, 98, 98)}  # 2 + 2 + 1 padded to 2
    np.testing.assert_allclose(out, _reference(reference, slices, (98, 98), REGISTERS), rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ConfigError, match=r"encoder\.dinov2\.precision: expected one of"):
        Dinov2Encoder(model=str(tiny_dinov2[0]), precision="float8", device="cpu")
    with pytest.raises(ValueError, match="attention"):
        Dinov2Encoder(model=str(tiny_dinov2[0]), attention="flash", device="cpu")
    with pytest.raises(ValueError, match="image_size"):
        Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=10, device="cpu")


def test_signature(tiny_dinov2, tiny_registers, tmp_path):
    base = Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu").signature()
    json.dumps(base)  # serialisable
    assert base == Dinov2Encoder(model=str(tiny_dinov2[0]), image_size=98, device="cpu").signature()
    assert base["hidden_size"] == 32 and base["num_layers"] == 2 and base["num_register_tokens"] == 0
    assert base["image_size"] == 98 and base["keep_aspect"] is False and base["precision"] == "fp32"
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
def test_cuda_auto_precision_matches_cpu(tiny_registers):
    enc = Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, keep_aspect=True, device="cuda")
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32"
    assert enc.device.type == "cuda" and enc.precision.name == expected and enc.dtype == torch.float32
    slices = _slices(3, 40, 100)
    out = enc.encode(slices)
    assert out.dtype == np.float32 and out.shape == (3, 3, 7, 32)
    cpu = Dinov2Encoder(model=str(tiny_registers[0]), image_size=98, keep_aspect=True, device="cpu").encode(slices)
    np.testing.assert_allclose(out, cpu, atol=0.1, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_vit_l_registers_bf16_matches_fp32(tmp_path):
    """The real architecture (ViT-L/14, 4 registers, 518 px) with random weights: bf16 autocast
    against fp32 on the GPU; features compared by cosine similarity per token."""
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                    intermediate_size=4096, patch_size=14, image_size=518,
                                                    num_register_tokens=4)
    transformers.Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "vitl")
    slices = _slices(4, 512, 512)
    fp32 = Dinov2Encoder(model=str(tmp_path / "vitl"), device="cuda", precision="fp32").encode(slices)
    bf16 = Dinov2Encoder(model=str(tmp_path / "vitl"), device="cuda", precision="bf16").encode(slices)
    cos = (fp32 * bf16).sum(-1) / (np.linalg.norm(fp32, axis=-1) * np.linalg.norm(bf16, axis=-1))
    assert bf16.shape == (4, 37, 37, 1024) and np.isfinite(bf16).all()
    assert cos.min() > 0.99, cos.min()
