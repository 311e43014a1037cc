"""A zarr cache of per-slice image embeddings, keyed by a signature of the data and the model.

Layout under ``<url>/<signature>/`` (``url`` a local path or an fsspec URL such as
``s3://bucket/embeddings``)::

    axis0   (D, C, h, w) float16, one chunk per slice    embeddings of the z slices
    axis1   (H, C, h, w) float16                          y slices
    axis2   (W, C, h, w) float16                          x slices
    done0, done1, done2   (n,) bool, one chunk per slice  True once that slice's embedding is written

A slice counts as stored only when its ``done`` flag is set, and the flag is written after the
embedding, so a worker that dies mid-write leaves a slice that is simply computed again.
Writes touch one chunk per slice, so several workers can fill the same store at once. The
signature (see :func:`signature`) folds in the tomogram, the model weights and the
preprocessing, so a different model or different data never reuses a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Sequence

import numpy as np

from cryosam_ray.storage import DoneFlags, join, open_group, require_array

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


def signature(*parts: dict) -> str:
    """A hex digest (32 characters) of JSON-serialisable descriptions (data, model, preprocessing)."""
    text = json.dumps([_FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EmbeddingStore:
    """Per-slice embeddings of one tomogram under one model, in zarr on any fsspec storage.

    Args:
        url: root of the store (local path or fsspec URL); this store lives in ``<url>/<signature>``.
        signature: see :func:`signature`; a different model or tomogram gives a different folder.
        volume_shape: (D, H, W) of the tomogram: slices per axis.
        embedding_shape: (C, h, w) of one slice's embedding; SAM: (256, 64, 64).
        description: JSON-serialisable record of what the signature covers, stored as attributes.
        storage_options: passed to fsspec for remote URLs.
    """

    def __init__(self, url: str, signature: str, *, volume_shape: Sequence[int],
                 embedding_shape: Sequence[int] = (256, 64, 64), description: dict | None = None,
                 storage_options: dict | None = None):
        self.url = join(url, signature)
        self.signature = signature
        self.volume_shape = tuple(int(s) for s in volume_shape)
        self.embedding_shape = tuple(int(s) for s in embedding_shape)
        self._group = open_group(self.url, "a", storage_options)
        if description is not None and "description" not in self._group.attrs:
            self._group.attrs["description"] = description
        self._arrays: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.url!r})"

    def _axis(self, axis: int):
        """(embeddings, done) arrays of ``axis``, created on first use (idempotent across workers)."""
        if axis not in self._arrays:
            if axis not in (0, 1, 2):
                raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
            n, g = self.volume_shape[axis], self._group
            emb = require_array(g, f"axis{axis}", shape=(n, *self.embedding_shape), dtype="float16",
                                chunks=(1, *self.embedding_shape), fill_value=0)
            done = DoneFlags.create(g, f"done{axis}", n, reset=False)
            self._arrays[axis] = (emb, done)
        return self._arrays[axis]

    def done(self, axis: int, indices: Sequence[int] | None = None) -> np.ndarray:
        """Bool flags of ``indices`` (default: every slice of ``axis``): True where stored."""
        _, done = self._axis(axis)
        return done.all() if indices is None else done.get(indices)

    def get(self, axis: int, index: int) -> np.ndarray | None:
        """The (C, h, w) float16 embedding of one slice, or None if it is not stored."""
        return self.get_many(axis, [index]).get(int(index))

    def get_many(self, axis: int, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """{index: (C, h, w) float16} for those ``indices`` that are stored (others left out)."""
        idx = np.asarray(sorted({int(i) for i in indices}), dtype=np.int64)
        if idx.size == 0:
            return {}
        stored = idx[self.done(axis, idx)]
        if stored.size == 0:
            return {}
        emb, _ = self._axis(axis)
        block = np.asarray(emb.get_orthogonal_selection((stored,)), dtype=np.float16)
        return {int(i): block[k] for k, i in enumerate(stored)}

    def put(self, axis: int, indices: Sequence[int], embeddings: np.ndarray) -> None:
        """Store ``embeddings`` (len(indices), C, h, w) of slices ``indices`` along ``axis``.

        The embeddings are written before their ``done`` flags, one chunk per slice.
        """
        idx = np.asarray(list(indices), dtype=np.int64)
        embeddings = np.asarray(embeddings, dtype=np.float16)
        if embeddings.shape != (idx.size, *self.embedding_shape):
            raise ValueError(f"{self.url}: expected embeddings of shape {(idx.size, *self.embedding_shape)}, "
                             f"got {embeddings.shape}")
        if idx.size == 0:
            return
        if np.unique(idx).size != idx.size:
            raise ValueError(f"{self.url}: duplicate slice indices {idx.tolist()}")
        order = np.argsort(idx)
        idx, embeddings = idx[order], embeddings[order]
        emb, done = self._axis(axis)
        emb.set_orthogonal_selection((idx,), embeddings)
        done.set(idx)
        log.debug("%s: stored %d embeddings of axis %d", self.url, idx.size, axis)
