"""The feature store: per tomogram and axis, the stack of slice token maps in zarr (float16).

Layout under the store URL (a local folder or ``s3://bucket/prefix``)::

    <url>/<tomogram>-<signature>/axis{0,1,2}   (n, h, w, C) float16, one chunk per shard of slices
    <url>/<tomogram>-<signature>/done{0,1,2}   (n_shards,) bool, set after a shard's chunk is written

A shard counts as done only once its flag is set, after its data: a worker killed mid-write
leaves the flag unset and the shard is recomputed, so a rerun resumes without trusting
half-written data. The signature covers the data, the encoder and its settings: a changed
model or setting writes a new group and never reads stale features.
"""

from __future__ import annotations

import logging

import fsspec
import numpy as np
import zarr

from cryosam_ray.tomo_io import is_remote

log = logging.getLogger(__name__)


class FeatureStore:
    """One tomogram's feature group in the store. Build with :meth:`open`."""

    def __init__(self, group, url: str):
        self.group = group
        self.url = url

    @classmethod
    def open(cls, store_url: str, tomogram, encoder) -> "FeatureStore":
        from cryosam_ray.features import feature_key

        url = f"{str(store_url).rstrip('/')}/{feature_key(tomogram, encoder)}"
        store = fsspec.get_mapper(url) if is_remote(url) else url
        group = zarr.open_group(store=store, mode="a")
        group.attrs.update({"tomogram": tomogram.url, "shape": list(tomogram.shape), "encoder": encoder.signature()})
        return cls(group, url)

    def axis_array(self, axis: int, grid: tuple[int, int], channels: int, shard_slices: int):
        """The (n, h, w, C) float16 array of ``axis``, created on first use."""
        n = self.group.attrs["shape"][axis]
        name = f"axis{axis}"
        if name in self.group:
            array = self.group[name]
            if tuple(array.shape) == (n, *grid, channels) and array.chunks[0] == shard_slices:
                return array
            log.warning("%s/%s has shape %s, expected %s: recomputing", self.url, name, array.shape, (n, *grid, channels))
        n_shards = -(-n // shard_slices)
        self.group.create_array(f"done{axis}", shape=(n_shards,), dtype=bool, chunks=(1,), fill_value=False,
                                overwrite=True)
        return self.group.create_array(name, shape=(n, *grid, channels), dtype="float16",
                                       chunks=(shard_slices, *grid, channels), fill_value=0, overwrite=True)

    def shard_done(self, axis: int, start: int) -> bool:
        array = self.group[f"axis{axis}"]
        return bool(self.group[f"done{axis}"][start // array.chunks[0]])

    def write_shard(self, axis: int, start: int, feats: np.ndarray) -> dict:
        """Write one shard's maps, then mark it done. Returns a small receipt."""
        array = self.group[f"axis{axis}"]
        array[start:start + feats.shape[0]] = feats.astype(np.float16)
        self.group[f"done{axis}"][start // array.chunks[0]] = True
        return {"url": self.url, "axis": axis, "start": start, "slices": int(feats.shape[0])}

    def complete(self) -> bool:
        return all(f"done{a}" in self.group and bool(np.all(self.group[f"done{a}"][:])) for a in range(3))
