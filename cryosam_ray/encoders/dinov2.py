"""DINOv2 slice encoder (transformers): final-layer patch tokens of each normalised slice.

The paper's feature backbone (ViT-L/14, 518 x 518 input: a 37 x 37 token grid per slice).
Preprocessing follows the public CryoSAM code, not the ImageNet recipe: the slice arrives
z-scored with the tomogram's own robust mean / std (``Tomogram.normalize``), is replicated to
three channels and resized bilinearly (no antialiasing) to ``image_size x image_size`` without
keeping its aspect ratio. ImageNet mean / std are deliberately NOT applied on top: a z-scored
slice already has zero mean and unit spread, which is what the public code feeds the network.
With ``keep_aspect=True`` the longest side goes to ``image_size`` and the other is scaled and
rounded to a multiple of the patch size (transformers interpolates the position embeddings for
any grid, square or not).

The token grid always spans the whole slice (no padding, no crop), so token (i, j) of an
(A, B) slice with an (h, w) grid covers slice pixels centred at ((i + 0.5) * A / h - 0.5,
(j + 0.5) * B / w - 0.5), the align-corners-false geometry that ``cryosam_ray.features`` samples.

Weights come from where the user says: a local folder written by ``save_pretrained``
(config.json + weights), an ``s3://`` (or other fsspec / http) URL of such a folder, fetched
once through :func:`cryosam_ray.weights.resolve_weights`, or a Hugging Face hub id such as
``facebook/dinov2-with-registers-large`` (only with ``allow_hub=True``). ``config.json``'s
model_type picks the class: ``dinov2`` -> ``Dinov2Model`` (``facebook/dinov2-large``),
``dinov2_with_registers`` -> ``Dinov2WithRegistersModel``. The default is ViT-L/14 with four
registers, as the public CryoSAM code: without registers ViT-L writes high-norm artifact tokens
into low-information regions (most of a cryo-ET slice), which distorts cosine matching.

Speed: attention through ``torch.nn.functional.scaled_dot_product_attention`` (transformers'
``attn_implementation="sdpa"``: flash attention on recent GPUs); ``precision`` "auto" runs the
forward pass under bfloat16 autocast on GPUs with native bf16 (weights stay float32; layer norms,
softmax and the residual stream in float32), float32 on CPUs; slices are resized on the device
after a pinned-memory transfer, and a batch's tokens are copied back while the next batch runs.
``compile=True`` wraps the model in ``torch.compile`` (partial batches padded to one shape).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cryosam_ray.errors import WeightsError
from cryosam_ray.weights import batch_memory_guard, file_fingerprint, resolve_precision, resolve_weights, to_device

log = logging.getLogger(__name__)

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_ATTENTION = ("sdpa", "eager")
# "facebook/dinov2-large" or "dinov2-large": what a hub id looks like (a local path that does not
# exist and looks like this is tried on the hub, if allowed).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Keys a checkpoint may lack without changing inference (mask_token is only used for masked
# image modelling; older DINOv2 exports omit it).
_OPTIONAL_KEYS = ("mask_token",)
_PREPROCESSING = "tomogram z-score, 3x replicate, bilinear resize (no antialias), no ImageNet mean/std"
_VERSION = 1


def preprocess_slices(slices: np.ndarray, size: tuple[int, int], *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised slices -> DINOv2 pixel values.

    Args:
        slices: (N, A, B) float slices, already z-scored with the tomogram's statistics.
        size: (H, W) network input size in pixels.
        device: where the returned tensor lives (the model's device); the slices travel at their
            own size (pinned, non-blocking on CUDA) and are resized there.
        dtype: the returned tensor's dtype (the model's weights' dtype); resizing is done in float32.

    Returns:
        (N, 3, H, W) tensor: each slice resized bilinearly (align_corners False, no antialias)
        and replicated to three channels. No further intensity normalisation.
    """
    x = to_device(np.asarray(slices, dtype=np.float32), torch.device(device))[:, None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    return x.expand(-1, 3, -1, -1).to(dtype=dtype).contiguous()


def load_dinov2(source: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                attention: str = "sdpa", cache_dir: str | None = None, allow_hub: bool = True):
    """Load a DINOv2 backbone (plain or with registers) from a local folder, a URL or a hub id.

    Args:
        source: local folder saved with ``save_pretrained``; fsspec / http URL of such a folder
            (``s3://bucket/models/dinov2-large``); or a hub id (``facebook/dinov2-large``).
        device: where to put the model.
        dtype: dtype of the weights.
        attention: transformers' ``attn_implementation``: "sdpa" (scaled-dot-product / flash
            attention) or "eager" (the reference softmax(QK^T)V).
        cache_dir: where remote folders (and hub downloads) are kept.
        allow_hub: whether a hub id may be loaded (from the local hub cache or the network).

    Returns:
        (model, config, local_path): the model in eval mode on ``device`` in ``dtype``, its config,
        and the local folder it was read from (None for a hub id).

    Raises:
        WeightsError: the folder or URL does not exist, holds no config.json, its config is not a
            DINOv2 one, its weights are missing, unreadable or incomplete, or a hub id was given
            with ``allow_hub=False`` or could not be loaded; the error names ``source``.
    """
    source = str(source)
    local = _local_folder(source, cache_dir=cache_dir, allow_hub=allow_hub)
    if local is not None:
        _check_config_file(source, local)
        where, hub_kwargs = str(local), {"local_files_only": True}
    else:
        where, hub_kwargs = source, {"cache_dir": cache_dir}
        log.info("loading DINOv2 %s from the Hugging Face hub (or its local cache)", source)

    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    try:
        config = AutoConfig.from_pretrained(where, **hub_kwargs)
    except (OSError, ValueError) as exc:  # malformed config.json, unknown type, hub id not found / unreachable
        what = "" if local is not None else "not a local folder, and as a Hugging Face hub id: "
        raise WeightsError(source, f"{what}cannot read a model config ({exc}); expected a DINOv2 folder saved "
                           "with save_pretrained (config.json + weights), an s3:// URL of one, or a hub id") from exc
    if config.model_type not in _MODEL_TYPES:
        raise WeightsError(source, f"config has model_type {config.model_type!r}; expected one of {_MODEL_TYPES}")
    cls = Dinov2Model if config.model_type == "dinov2" else Dinov2WithRegistersModel
    try:
        model, info = cls.from_pretrained(where, config=config, dtype=dtype, attn_implementation=attention,
                                          output_loading_info=True, **hub_kwargs)
    except Exception as exc:  # OSError (no weights file), SafetensorError, torch unpickling errors: no common base
        raise WeightsError(source, f"cannot load the {cls.__name__} weights ({type(exc).__name__}: {exc}); "
                           "expected model.safetensors or pytorch_model.bin next to config.json") from exc
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith(_OPTIONAL_KEYS))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = missing or mismatched
        raise WeightsError(source, f"the weights do not match the {config.model_type} config: "
                           f"{len(missing)} missing and {len(mismatched)} mismatched tensors "
                           f"(first: {', '.join(bad[:3])})")
    model = model.to(device=device).eval()
    return model, config, local


def _local_folder(source: str, *, cache_dir: str | None, allow_hub: bool) -> Path | None:
    """The local folder holding ``source`` (downloading a remote one), or None for a hub id."""
    if "://" in source:
        return resolve_weights(source, cache_dir=cache_dir)  # local file:// or a download; WeightsError
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(source) and not source.startswith((".", "~")):
        if not allow_hub:
            raise WeightsError(source, "no such local folder, and loading hub ids is disabled (allow_hub=False); "
                               "expected a folder saved with save_pretrained or an s3:// URL of one")
        return None
    raise WeightsError(source, "no such file or directory; expected a DINOv2 folder saved with save_pretrained "
                       "(config.json + weights), an s3:// URL of one, or a hub id")


def _check_config_file(source: str, folder: Path) -> None:
    """Clear errors for a local folder that is not a DINOv2 checkpoint, before transformers sees it."""
    if not folder.is_dir():
        raise WeightsError(source, f"{folder} is a file; expected a folder saved with save_pretrained "
                           "(config.json + model.safetensors)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(source, f"no config.json in {folder}; expected a folder saved with save_pretrained")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightsError(source, f"{config_file} is not a readable JSON config ({exc})") from exc
    if model_type not in _MODEL_TYPES:
        raise WeightsError(source, f"config.json has model_type {model_type!r}; expected one of {_MODEL_TYPES}")


def _config_digest(config) -> str:
    """Hash of the architecture fields of a config (no paths, versions or dtypes)."""
    skip = {"transformers_version", "architectures", "dtype", "torch_dtype", "id2label", "label2id"}
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in skip}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _parameters_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class Dinov2Encoder:
    """DINOv2 final-layer patch tokens per slice, with the slice-encoder interface (``encoders/base.py``).

    Loads once in ``__init__``; :meth:`encode` works on batches of numpy slices.

    Args:
        model: local folder saved with ``save_pretrained``, an ``s3://`` (fsspec / http) URL of
            one, or a Hugging Face hub id (only loaded when ``allow_hub``); by default ViT-L/14
            with registers (``facebook/dinov2-with-registers-large``), as the public CryoSAM code.
        image_size: network input side in pixels (518 in the paper: 37 x 37 tokens of 14 px).
        keep_aspect: False (the public code): every slice is stretched to image_size x image_size.
            True: the longest side goes to image_size, the other is scaled and rounded to a
            multiple of the patch size.
        batch_size: slices per forward pass (GPU memory grows with it; an out-of-memory batch
            raises a ConfigError naming ``encoder.dinov2.batch_size``).
        device: "cuda", "cuda:N", "cpu" ...; None: cuda when available, else cpu.
        precision: "auto" (bf16 on a GPU with native bfloat16, else fp32), "fp32", "bf16"
            (float32 weights, bfloat16 autocast) or "fp16" (float16 weights, no autocast: the
            old half-precision path; float16's range is 6.5e4, so large activations overflow).
        attention: "sdpa" (scaled-dot-product / flash attention) or "eager".
        compile: wrap the model in ``torch.compile`` (slower first batch; off by default).
        cache_dir: where remote weights are kept (see :func:`~cryosam_ray.weights.resolve_weights`).
        allow_hub: whether ``model`` may be a hub id.

    Raises:
        WeightsError: the weights cannot be found, are not DINOv2, or cannot be loaded (see
            :func:`load_dinov2`).
        ConfigError: an unknown precision, or bf16 on a GPU without native bfloat16.
        ValueError: a setting is out of range (image_size below the patch size, batch_size < 1,
            unknown attention or device).
    """

    name = "dinov2"

    def __init__(self, *, model: str = "facebook/dinov2-with-registers-large", image_size: int = 518,
                 keep_aspect: bool = False, batch_size: int = 16, device: str | None = None, precision: str = "auto",
                 attention: str = "sdpa", compile: bool = False, cache_dir: str | None = None, allow_hub: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if attention not in _ATTENTION:
            raise ValueError(f"attention must be one of {_ATTENTION}, got {attention!r}")
        try:
            self.device = torch.device(device if device is not None else
                                       ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as exc:
            raise ValueError(f"device must be like 'cuda', 'cuda:0' or 'cpu', got {device!r}") from exc
        self.precision = resolve_precision(precision, self.device, setting="encoder.dinov2.precision")
        self.source, self.attention, self.compile = str(model), attention, bool(compile)
        self.model, self.config, self.local_path = load_dinov2(self.source, device=self.device,
                                                               dtype=self.precision.weights, attention=attention,
                                                               cache_dir=cache_dir, allow_hub=allow_hub)
        # Device follows the model, dtype follows the weights.
        first = next(self.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._forward = torch.compile(self.model, dynamic=False) if self.compile else self.model
        self.patch_size = int(self.config.patch_size)
        if int(image_size) < self.patch_size:
            raise ValueError(f"image_size must be at least the patch size {self.patch_size}, got {image_size}")
        self.image_size, self.keep_aspect, self.batch_size = int(image_size), bool(keep_aspect), int(batch_size)
        self.num_register_tokens = int(getattr(self.config, "num_register_tokens", 0) or 0)
        self.feature_dim = int(self.config.hidden_size)
        self._weights_id: str | None = None
        log.info("DINOv2 %s (%s, %d layers, C=%d, %d registers) on %s in %s (%s attention%s), input %d px%s",
                 self.source, self.config.model_type, self.config.num_hidden_layers, self.feature_dim,
                 self.num_register_tokens, self.device, self.precision.name, attention,
                 ", compiled" if self.compile else "", self.image_size, " (aspect kept)" if self.keep_aspect else "")

    def input_shape(self, slice_shape: tuple[int, int]) -> tuple[int, int]:
        """(H, W) pixels the network sees for an (A, B) slice."""
        a, b = (int(s) for s in slice_shape)
        if a < 1 or b < 1:
            raise ValueError(f"slice_shape must be two positive sizes, got {tuple(slice_shape)}")
        if not self.keep_aspect:
            return self.image_size, self.image_size
        p, longest = self.patch_size, max(a, b)

        def side(n: int) -> int:
            if n == longest:
                return self.image_size
            return max(p, int(math.floor(n * self.image_size / longest / p + 0.5)) * p)

        return side(a), side(b)

    def token_grid(self, slice_shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) token grid for an (A, B) slice.

        keep_aspect False: (image_size // patch, image_size // patch) whatever the slice.
        keep_aspect True: the longest side gives image_size // patch tokens, the other its
        rounded share (for a (40, 100) slice at 518 / 14: (15, 37)).
        """
        height, width = self.input_shape(slice_shape)
        return height // self.patch_size, width // self.patch_size

    def fit(self, tomogram) -> None:
        """Nothing to fit: slices arrive z-scored with the tomogram's statistics (kept for the protocol)."""

    def encode(self, slices: np.ndarray) -> np.ndarray:
        """(N, A, B) float32 normalised slices -> (N, h, w, C) float32 patch tokens (numpy, CPU).

        ``(h, w) = token_grid((A, B))``, ``C = feature_dim``. The CLS token and any register tokens
        are dropped; tokens are the final layer's layer-normed ``last_hidden_state``. Slices go
        through the model ``batch_size`` at a time; only one batch's tokens and the next one's
        are on the device at once.

        Raises:
            ConfigError: a batch does not fit in the GPU's memory (names ``encoder.dinov2.batch_size``).
        """
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 3:
            raise ValueError(f"expected (N, A, B) slices, got shape {slices.shape}")
        n = slices.shape[0]
        size = self.input_shape(slices.shape[1:])
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        out = np.empty((n, *grid, self.feature_dim), dtype=np.float32)
        pending = None  # the previous batch, its tokens on their way to the host
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                with batch_memory_guard("encoder.dinov2.batch_size", self.batch_size, self.device):
                    tokens = self._tokens(slices[start:stop], size, grid)
                if pending is not None:  # collected after the next batch is queued: the GPU stays busy
                    _collect(out, *pending)
                pending = (start, stop, *_to_host(tokens))
                log.debug("encoded slices %d-%d of %d", start, stop, n)
        if pending is not None:
            _collect(out, *pending)
        return out

    def _tokens(self, batch: np.ndarray, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """(b, h, w, C) patch tokens of a (b, A, B) batch, on the device (queued, not waited for)."""
        b = len(batch)
        pixels = preprocess_slices(batch, size, device=self.device, dtype=self.dtype)
        if self.compile and b < self.batch_size:  # one input shape: no recompilation for the last batch
            pixels = torch.cat([pixels, pixels.new_zeros(self.batch_size - b, *pixels.shape[1:])])
        with self.precision.context(self.device):
            hidden = self._forward(pixel_values=pixels).last_hidden_state[:b, 1 + self.num_register_tokens:]
        if hidden.shape[1] != grid[0] * grid[1]:  # guards the register / grid bookkeeping
            raise RuntimeError(f"expected {grid[0]}x{grid[1]}={grid[0] * grid[1]} patch tokens from {size} input, "
                               f"got {hidden.shape[1]}")
        return hidden.reshape(b, *grid, self.feature_dim)

    def signature(self) -> dict:
        """Everything that changes the output, JSON-serialisable, for feature-store keys.

        The weights are identified by content (:func:`~cryosam_ray.weights.file_fingerprint` of
        the local folder; for a hub id its commit, else a digest of the parameters), not by the
        local path, which differs between cache folders on different nodes.
        """
        if self._weights_id is None:
            if self.local_path is not None:
                self._weights_id = file_fingerprint(self.local_path)
            else:
                commit = getattr(self.config, "_commit_hash", None)
                self._weights_id = f"hub:{commit}" if commit else _parameters_digest(self.model)
        return {"encoder": self.name, "version": _VERSION, "model": self.source, "weights": self._weights_id,
                "model_type": self.config.model_type, "config": _config_digest(self.config),
                "hidden_size": self.feature_dim, "num_layers": int(self.config.num_hidden_layers),
                "num_register_tokens": self.num_register_tokens, "patch_size": self.patch_size,
                "image_size": self.image_size, "keep_aspect": self.keep_aspect,
                "precision": self.precision.name, "preprocessing": _PREPROCESSING}

    def __repr__(self) -> str:
        return (f"Dinov2Encoder(model={self.source!r}, image_size={self.image_size}, keep_aspect={self.keep_aspect}, "
                f"device={str(self.device)!r}, precision={self.precision.name!r})")


def _to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying device tokens to host memory: (host tensor, event marking the copy's end).

    On CUDA the copy goes into pinned memory without blocking; on the CPU it is done at once.
    """
    if tokens.device.type != "cuda":
        return tokens.float(), None
    host = torch.empty(tokens.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _collect(out: np.ndarray, start: int, stop: int, host: torch.Tensor, done) -> None:
    """Wait for a batch's copy (:func:`_to_host`) and write it into ``out[start:stop]``."""
    if done is not None:
        done.synchronize()
    out[start:stop] = host.numpy()
