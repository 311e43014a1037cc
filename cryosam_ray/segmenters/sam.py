"""SAM (segment-anything) as a promptable 2D segmenter, batched over slices and fronts.

:func:`~cryosam_ray.segmenters.sam_build.build_sam` builds a registry architecture and loads a
checkpoint the user named (local path, ``s3://`` or ``http(s)://`` URL, see
:mod:`cryosam_ray.weights`). :class:`SamSegmenter`
implements :class:`~cryosam_ray.segmenters.base.PromptableSegmenter`:

- Slices are normalised with the tomogram's robust statistics (clipped at +-``clip_sigma``),
  mapped linearly to 0..255, repeated to 3 channels, resized so the long side is 1024 and
  padded, exactly as ``SamPredictor.set_torch_image`` prepares an image (on the device, after a
  pinned-memory transfer). The image encoder runs over batches of ``batch_size`` slices;
  embeddings (256 x 64 x 64, float16) are kept in an LRU keyed by (axis, index) and, optionally,
  in a zarr :class:`~cryosam_ray.embedding_store.EmbeddingStore`.
- Precision (``precision``, see :func:`~cryosam_ray.weights.resolve_precision`): "auto" runs the
  image encoder under bfloat16 autocast on GPUs with native bf16 (float32 weights, bf16's float32
  exponent range), float32 on CPUs. "fp16" casts the encoder's weights to float16, as the stock
  ``SamPredictor`` examples do, but every ``LayerNorm2d`` computes in float32: the stock module
  squares ``x - mean`` in the input dtype, which overflows float16 at ViT-H's activation scale
  and silently gives empty or whole-slice masks (segment-anything issues 540 and 696). Other
  float16 overflows in ViT-H are not ruled out, so fp16 is not recommended.
- :func:`patch_image_encoder` (applied at load) computes attention with
  ``F.scaled_dot_product_attention``, the decomposed relative-position terms as its additive mask
  (``attention="sdpa"``; "eager" keeps segment-anything's own), and makes ``LayerNorm2d`` float32.
- One prompt-encoder and one mask-decoder call answer every request of a :meth:`~SamSegmenter.predict`
  batch (up to ``decode_batch`` at a time), even when the requests lie on different slices:
  :func:`decode_masks` is ``MaskDecoder.predict_masks`` with one image embedding per prompt.
- Low-resolution masks cover SAM's padded square input; they are upscaled with
  ``Sam.postprocess_masks``, which crops the padding before resizing back to the slice, so
  points on non-square slices land where they should (the public CryoSAM code skips the crop).

Seeds use three candidates when ``multimask``; propagation steps (a request with ``state``)
use SAM's single-mask output, the output SAM was trained to give for a point plus a mask
input. ``multimask_steps=True`` uses the three candidates on every step, as the public code does.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from cryosam_ray.embedding_store import EmbeddingStore, signature
from cryosam_ray.errors import PromptError
from cryosam_ray.segmenters.base import SegmenterInfo, SlicePrediction, SliceRequest, area_cap
from cryosam_ray.segmenters.sam_build import build_sam
from cryosam_ray.segmenters.sam_kernels import patch_image_encoder
from cryosam_ray.tomo_io import data_fingerprint
from cryosam_ray.weights import batch_memory_guard, file_fingerprint, resolve_precision, resolve_weights, to_device

log = logging.getLogger(__name__)

def preprocess_slices(images: torch.Tensor, sam) -> torch.Tensor:
    """SAM's input from grey slices, as ``SamPredictor.set_torch_image`` prepares an image.

    Args:
        images: (B, H, W) float slices with values in 0..255, on the model's device.
        sam: the ``Sam`` model (its ``img_size``, pixel mean / std).

    Returns:
        (B, 3, S, S) float32, S = ``sam.image_encoder.img_size``: resized (bilinear, antialiased)
        so the long side is S, normalised with SAM's pixel statistics, zero-padded bottom / right.
        (``ResizeLongestSide.apply_image_torch`` would size from the batch and channel dimensions
        in segment-anything 1.0, so the target size is computed here from (H, W).)
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    size = sam.image_encoder.img_size
    target = ResizeLongestSide.get_preprocess_shape(images.shape[-2], images.shape[-1], size)
    x = F.interpolate(images[:, None].float(), target, mode="bilinear", align_corners=False, antialias=True)
    return sam.preprocess(x.expand(-1, 3, -1, -1))


def decode_masks(mask_decoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                 sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor):
    """``MaskDecoder.predict_masks`` with one image embedding per prompt (prompts on different slices).

    Args:
        mask_decoder: a ``segment_anything.modeling.MaskDecoder``.
        image_embeddings: (B, C, h, w), one per prompt.
        image_pe: (1, C, h, w) positional encoding (``prompt_encoder.get_dense_pe()``).
        sparse_prompt_embeddings: (B, N, C) point embeddings.
        dense_prompt_embeddings: (B, C, h, w) mask-input embeddings.

    Returns:
        masks: (B, 1 + num_multimask_outputs, 4h, 4w) low-resolution logits; index 0 is the
            single-mask output, 1.. the multimask candidates.
        iou_pred: (B, 1 + num_multimask_outputs) predicted IoU of each.
    """
    d = mask_decoder
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = d.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:(1 + d.num_mask_tokens), :]
    upscaled = d.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)],
                           dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, d.iou_prediction_head(iou_token_out)


class SamSegmenter:
    """SAM behind the :class:`~cryosam_ray.segmenters.base.PromptableSegmenter` protocol.

    Args:
        model_type: "vit_h", "vit_l", "vit_b", or "custom" with ``architecture`` (see
            :func:`~cryosam_ray.segmenters.sam_build.build_sam`).
        checkpoint: local path, s3:// or http(s):// URL of the weights.
        device: "cuda", "cuda:N" or "cpu"; None: cuda when available.
        precision: the image encoder's: "auto" (bf16 autocast on a GPU with native bfloat16,
            else fp32), "fp32", "bf16" or "fp16" (float16 weights, LayerNorm2d in float32; not
            recommended for ViT-H). Prompt encoder and mask decoder always run in float32.
        attention: "sdpa" (``F.scaled_dot_product_attention``) or "eager" (segment-anything's).
        compile: wrap the image encoder in ``torch.compile`` (partial batches padded to one shape).
        batch_size: slices per image-encoder call (an out-of-memory batch raises a ConfigError
            naming ``segmenter.sam.batch_size``).
        embedding_store: zarr URL (local or fsspec) caching embeddings across runs; None: memory only.
        cache_dir: where downloaded checkpoints are kept.
        min_area, max_area: accepted mask area in pixels (``max_area`` None: no cap); an empty
            mask is never accepted.
        min_pred_iou: candidates need a predicted IoU above this.
        mask_input: "logits" feeds the previous low-res logits as SAM's mask input; "binary"
            feeds (logits > 0) as 0 / 1, as the public CryoSAM code does.
        multimask: three candidates per seed (else SAM's single-mask output).
        window_margin: pixels kept around each mask's bounding box in the returned window.
        multimask_steps: also three candidates on propagation steps (public CryoSAM code).
        clip_sigma: slices are clipped at +-clip_sigma robust standard deviations, then mapped to 0..255.
        cache_slices: slice embeddings kept in memory (LRU).
        decode_batch: requests per decoder call.
    """

    name = "sam"

    def __init__(self, *, model_type: str = "vit_h", checkpoint: str | None = None, architecture: dict | None = None,
                 device: str | None = None, precision: str = "auto", attention: str = "sdpa", compile: bool = False,
                 batch_size: int = 8, embedding_store: str | None = None, cache_dir: str | None = None,
                 min_area: int = 16, max_area: int | None = None, min_pred_iou: float = 0.0,
                 mask_input: str = "logits", multimask: bool = True, window_margin: int = 16,
                 multimask_steps: bool = False, clip_sigma: float = 3.0, cache_slices: int = 256,
                 decode_batch: int = 64):
        from segment_anything.utils.transforms import ResizeLongestSide

        if mask_input not in ("logits", "binary"):
            raise ValueError(f"mask_input must be 'logits' or 'binary', got {mask_input!r}")
        if batch_size < 1 or decode_batch < 1 or cache_slices < 1:
            raise ValueError("batch_size, decode_batch and cache_slices must be >= 1")
        self.model_type, self.batch_size, self.embedding_store = model_type, batch_size, embedding_store
        self.min_area, self.max_area, self.min_pred_iou = min_area, max_area, min_pred_iou
        self.mask_input, self.multimask, self.multimask_steps = mask_input, multimask, multimask_steps
        self.window_margin, self.clip_sigma = window_margin, clip_sigma
        self.cache_slices, self.decode_batch = cache_slices, decode_batch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device, setting="segmenter.sam.precision")
        self.attention, self.compile = attention, bool(compile)
        path = None if checkpoint is None else resolve_weights(checkpoint, cache_dir=cache_dir)
        self.sam = build_sam(model_type, None if path is None else str(path), architecture=architecture,
                             device=self.device)
        self.sam.float()
        weights_id = file_fingerprint(path) if path is not None else _parameters_digest(self.sam)
        patch_image_encoder(self.sam.image_encoder, attention=attention).to(self.precision.weights)
        self._image_encoder = (torch.compile(self.sam.image_encoder, dynamic=False) if self.compile
                               else self.sam.image_encoder)
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        self._model_id = {"model_type": model_type, "weights": weights_id, "precision": self.precision.name}
        pe = self.sam.prompt_encoder
        self.embedding_shape = (pe.embed_dim, *pe.image_embedding_size)
        self._tomogram = None
        self._data_id: dict | None = None
        self.store: EmbeddingStore | None = None
        self._lru: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def info(self) -> SegmenterInfo:
        """Name and settings, for run manifests."""
        settings = {k: getattr(self, k) for k in ("model_type", "attention", "batch_size", "min_area", "max_area",
                                                  "min_pred_iou", "mask_input", "multimask", "multimask_steps",
                                                  "window_margin", "clip_sigma")}
        return SegmenterInfo(self.name, {**settings, "precision": self.precision.name,
                                         "weights": self._model_id["weights"]})

    def _preprocessing_id(self) -> dict:
        return {"clip_sigma": float(self.clip_sigma), "img_size": int(self.sam.image_encoder.img_size),
                "to_uint8_range": "linear [-clip, clip] -> [0, 255]", "resize": "bilinear antialias"}

    # ---- tomogram and embeddings -------------------------------------------------------------

    def set_tomogram(self, tomogram) -> None:
        """Use ``tomogram`` for the next requests; keeps cached embeddings if it is the same data.

        Raises:
            BadVoxelDataError: the tomogram's statistics cannot be computed (NaN, constant).
        """
        data_id = data_fingerprint(tomogram)
        if data_id != self._data_id:
            self._lru.clear()
            self.store = None
            if self.embedding_store is not None:
                sig = signature(data_id, self._model_id, self._preprocessing_id())
                self.store = EmbeddingStore(self.embedding_store, sig, volume_shape=tomogram.shape,
                                            embedding_shape=self.embedding_shape,
                                            description={"data": data_id, "model": self._model_id,
                                                         "preprocessing": self._preprocessing_id()},
                                            storage_options=getattr(tomogram, "storage_options", None))
                log.info("%s: embedding store %s", tomogram.name, self.store.url)
        self._tomogram, self._data_id = tomogram, data_id

    @torch.inference_mode()
    def embed_slices(self, axis: int, indices: Sequence[int]) -> None:
        """Compute the embeddings of slices ``indices`` along ``axis`` that are neither in memory
        nor in the embedding store, ``batch_size`` at a time, and keep / store them."""
        self._require_tomogram()
        todo = [i for i in dict.fromkeys(int(i) for i in indices) if (axis, i) not in self._lru]
        self._check_indices(axis, todo)
        if self.store is not None and todo:
            todo = [i for i, done in zip(todo, self.store.done(axis, todo)) if not done]
        for start in range(0, len(todo), self.batch_size):
            self._encode(axis, todo[start:start + self.batch_size])

    def _embeddings(self, axis: int, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        """{index: (C, h, w) float16 on the device}, from memory, the store or the encoder."""
        out, missing = {}, []
        for i in dict.fromkeys(int(i) for i in indices):
            if (axis, i) in self._lru:
                self._lru.move_to_end((axis, i))
                out[i] = self._lru[(axis, i)]
            else:
                missing.append(i)
        if self.store is not None and missing:
            for i, emb in self.store.get_many(axis, missing).items():
                out[i] = self._remember(axis, i, torch.from_numpy(emb).to(self.device))
            missing = [i for i in missing if i not in out]
        for start in range(0, len(missing), self.batch_size):
            out.update(self._encode(axis, missing[start:start + self.batch_size]))
        return out

    def _encode(self, axis: int, indices: list[int]) -> dict[int, torch.Tensor]:
        """Run the image encoder on slices ``indices`` of ``axis``; remember and store the result.

        Raises:
            ConfigError: the batch does not fit in the GPU's memory (names ``segmenter.sam.batch_size``).
        """
        images = to_device(self._slice_images(axis, indices), self.device)
        with batch_memory_guard("segmenter.sam.batch_size", self.batch_size, self.device):
            x = preprocess_slices(images, self.sam).to(self.precision.weights)
            if self.compile and len(indices) < self.batch_size:  # one input shape: no recompilation
                x = torch.cat([x, x.new_zeros(self.batch_size - len(indices), *x.shape[1:])])
            with self.precision.context(self.device):
                emb = self._image_encoder(x)[:len(indices)].to(torch.float16)
        log.debug("%s: encoded %d slices of axis %d", self._tomogram.name, len(indices), axis)
        if self.store is not None:
            self.store.put(axis, indices, emb.cpu().numpy())
        return {i: self._remember(axis, i, emb[k].clone()) for k, i in enumerate(indices)}

    def _remember(self, axis: int, index: int, emb: torch.Tensor) -> torch.Tensor:
        self._lru[(axis, index)] = emb
        while len(self._lru) > self.cache_slices:
            self._lru.popitem(last=False)
        return emb

    def _slice_images(self, axis: int, indices: list[int]) -> np.ndarray:
        """(len(indices), A, B) float32 in 0..255, read in contiguous slabs."""
        tomo = self._tomogram
        order = sorted(range(len(indices)), key=lambda k: indices[k])
        runs: list[list[int]] = []
        for k in order:
            if runs and indices[k] == indices[runs[-1][-1]] + 1:
                runs[-1].append(k)
            else:
                runs.append([k])
        images = [None] * len(indices)
        for run in runs:
            slab = tomo.slab(axis, indices[run[0]], indices[run[-1]] + 1)
            for k, img in zip(run, slab):
                images[k] = img
        c = float(self.clip_sigma)
        return np.stack([(tomo.normalize(img, clip_sigma=c) + c) * (255.0 / (2 * c)) for img in images])

    # ---- prediction --------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction | None]:
        """Answer every request (any mix of slices and axes); ``None`` where no candidate passes
        the area and predicted-IoU filters. One decoder call per ``decode_batch`` requests.

        Raises:
            RuntimeError: :meth:`set_tomogram` was not called.
            PromptError: a request's slice or point lies outside the tomogram.
        """
        self._require_tomogram()
        requests = list(requests)
        out: list[SlicePrediction | None] = []
        for start in range(0, len(requests), self.decode_batch):
            out += self._predict_chunk(requests[start:start + self.decode_batch])
        return out

    def _predict_chunk(self, requests: list[SliceRequest]) -> list[SlicePrediction | None]:
        if not requests:
            return []
        for r in requests:
            self._check_indices(r.axis, [r.index])
            h, w = self._slice_shape(r)
            if not (0 <= r.point[0] < h and 0 <= r.point[1] < w):
                raise PromptError(f"{self._tomogram.name}: point (row, col) = {tuple(r.point)} is outside slice "
                                  f"{r.index} of axis {r.axis}, of shape ({h}, {w})")
        embeddings: dict[tuple[int, int], torch.Tensor] = {}
        for axis in sorted({r.axis for r in requests}):
            indices = [r.index for r in requests if r.axis == axis]
            embeddings.update({(axis, i): e for i, e in self._embeddings(axis, indices).items()})
        dtype = next(self.sam.mask_decoder.parameters()).dtype
        image_emb = torch.stack([embeddings[(r.axis, r.index)] for r in requests]).to(dtype)
        coords = np.stack([self.transform.apply_coords(np.array([[r.point[1], r.point[0]]], dtype=np.float64),
                                                       self._slice_shape(r)) for r in requests])
        coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
        labels_t = torch.ones(coords_t.shape[:2], dtype=torch.int, device=self.device)
        mask_inputs = [None if r.state is None else self._mask_input(r.state) for r in requests]
        low_res, iou = self._decode(image_emb, coords_t, labels_t, mask_inputs)
        return [self._select(r, low_res[k], iou[k]) for k, r in enumerate(requests)]

    def _decode(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_inputs: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + batched mask decoder.

        Args:
            image_embeddings: (B, C, h, w) decoder dtype, one per request.
            point_coords: (B, N, 2) (x, y) in SAM's resized input frame; point_labels: (B, N).
            mask_inputs: per request a (1, 4h, 4w) mask input or None.

        Returns:
            (B, 4, 4h, 4w) low-res logits (0: single-mask output, 1-3: candidates), (B, 4) IoU.
        """
        pe = self.sam.prompt_encoder
        with torch.inference_mode():
            sparse, dense = pe(points=(point_coords, point_labels), boxes=None, masks=None)
            with_mask = [k for k, m in enumerate(mask_inputs) if m is not None]
            if with_mask:
                dense = dense.clone()
                dense[with_mask] = pe.mask_downscaling(torch.stack([mask_inputs[k] for k in with_mask]))
            return decode_masks(self.sam.mask_decoder, image_embeddings, pe.get_dense_pe(), sparse, dense)

    def _mask_input(self, state) -> torch.Tensor:
        size = tuple(4 * s for s in self.sam.prompt_encoder.image_embedding_size)
        logits = np.asarray(state, dtype=np.float32)
        if logits.size != size[0] * size[1]:
            raise ValueError(f"SAM request state must be the previous low-res logits of shape (1, {size[0]}, "
                             f"{size[1]}), got shape {logits.shape}")
        if self.mask_input == "binary":
            logits = (logits > 0).astype(np.float32)
        return torch.as_tensor(logits.reshape(1, *size), device=self.device)

    def _select(self, request: SliceRequest, low_res: torch.Tensor, iou: torch.Tensor) -> SlicePrediction | None:
        """Best candidate of one request as a windowed :class:`SlicePrediction` (or None)."""
        step = request.state is not None
        cands = list(range(1, low_res.shape[0])) if self.multimask and (self.multimask_steps or not step) else [0]
        h, w = self._slice_shape(request)
        input_size = self.transform.get_preprocess_shape(h, w, self.sam.image_encoder.img_size)
        logits = self.sam.postprocess_masks(low_res[cands][None].float(), input_size, (h, w))[0]
        areas = (logits > self.sam.mask_threshold).sum(dim=(1, 2)).cpu().numpy()
        scores = iou[cands].float().cpu().numpy()
        ok = (areas >= max(1, self.min_area)) & (scores > self.min_pred_iou)
        cap = min(self.max_area or np.inf, area_cap(request.radius))
        ok &= areas <= cap
        if not ok.any():
            return None
        masks = (logits > self.sam.mask_threshold).cpu().numpy()
        rank = scores.astype(np.float64)
        if request.prev_mask is not None and len(cands) > 1:
            # Of several candidates, the one continuing the previous slice's mask (SAM's
            # multimask outputs are part / whole / whole-plus-surroundings).
            prev = np.zeros((h, w), bool)
            r, c = request.prev_offset
            prev[r:r + request.prev_mask.shape[0], c:c + request.prev_mask.shape[1]] = request.prev_mask
            inter = (masks & prev[None]).sum(axis=(1, 2))
            rank = inter / np.maximum((masks | prev[None]).sum(axis=(1, 2)), 1) + 1e-3 * rank
        best = int(np.flatnonzero(ok)[np.argmax(rank[ok])])
        mask = masks[best]
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        m = self.window_margin
        r0, r1 = max(0, rows[0] - m), min(h, rows[-1] + 1 + m)
        c0, c1 = max(0, cols[0] - m), min(w, cols[-1] + 1 + m)
        confidence = torch.sigmoid(logits[best, r0:r1, c0:c1]).cpu().numpy().astype(np.float32)
        return SlicePrediction(mask=mask[r0:r1, c0:c1], offset=(int(r0), int(c0)), confidence=confidence,
                               pred_iou=float(np.clip(scores[best], 0.0, 1.0)),
                               state=low_res[cands[best]][None].float().cpu().numpy())

    # ---- checks ------------------------------------------------------------------------------

    def _require_tomogram(self) -> None:
        if self._tomogram is None:
            raise RuntimeError("call set_tomogram() before predict() or embed_slices()")

    def _slice_shape(self, request: SliceRequest) -> tuple[int, int]:
        shape = self._tomogram.shape
        return tuple(s for a, s in enumerate(shape) if a != request.axis)

    def _check_indices(self, axis: int, indices: Sequence[int]) -> None:
        shape = self._tomogram.shape
        if axis not in (0, 1, 2):
            raise PromptError(f"{self._tomogram.name}: slice axis must be 0, 1 or 2, got {axis!r}")
        bad = [i for i in indices if not 0 <= i < shape[axis]]
        if bad:
            raise PromptError(f"{self._tomogram.name}: slices {bad} are outside axis {axis} of size {shape[axis]}")


def _parameters_digest(model: torch.nn.Module) -> str:
    """Content id of a model's weights (random-init test models have no checkpoint file)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]
