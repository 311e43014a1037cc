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
    """One tomogram's feature group in the store. Build with :meth:`create` or :meth:`open`."""

    def __init__(self, group, url: str):
        self.group = group
        self.url = url

    @staticmethod
    def group_url(store_url: str, key: str) -> str:
        return f"{str(store_url).rstrip('/')}/{key}"

    @classmethod
    def open(cls, group_url: str, mode: str = "r+") -> "FeatureStore":
        """An existing group (``mode="r"`` to only read)."""
        store = fsspec.get_mapper(group_url) if is_remote(group_url) else group_url
        return cls(zarr.open_group(store=store, mode=mode), group_url)

    @classmethod
    def create(cls, group_url: str, *, shape: tuple[int, int, int], tomogram_url: str, encoder_signature: dict,
               grids: list[tuple[int, int]], channels: int, shard_slices: int) -> "FeatureStore":
        """The group with its three axis arrays, created where absent; existing shards are kept."""
        store = fsspec.get_mapper(group_url) if is_remote(group_url) else group_url
        group = zarr.open_group(store=store, mode="a")
        group.attrs.update({"tomogram": tomogram_url, "shape": list(shape), "encoder": encoder_signature})
        self = cls(group, group_url)
        for axis in range(3):
            self._axis_array(axis, shape[axis], tuple(grids[axis]), channels, shard_slices)
        return self

    def _axis_array(self, axis: int, n: int, grid: tuple[int, int], channels: int, shard_slices: int):
        name, done = f"axis{axis}", f"done{axis}"
        if name in self.group and done in self.group:
            array = self.group[name]
            if tuple(array.shape) == (n, *grid, channels) and array.chunks[0] == shard_slices:
                return array
            log.warning("%s/%s has shape %s, expected %s: recomputing", self.url, name, array.shape, (n, *grid, channels))
        n_shards = -(-n // shard_slices)
        self.group.create_array(done, shape=(n_shards,), dtype=bool, chunks=(1,), fill_value=False, overwrite=True)
        return self.group.create_array(name, shape=(n, *grid, channels), dtype="float16",
                                       chunks=(shard_slices, *grid, channels), fill_value=0, overwrite=True)

    def axis_array(self, axis: int):
        return self.group[f"axis{axis}"]

    def shard_slices(self, axis: int) -> int:
        return int(self.group[f"axis{axis}"].chunks[0])

    def shard_done(self, axis: int, start: int) -> bool:
        return bool(self.group[f"done{axis}"][start // self.shard_slices(axis)])

    def missing_shards(self, axis: int) -> list[tuple[int, int]]:
        """(start, stop) slice ranges of the shards not yet committed along ``axis``."""
        n, step = self.group[f"axis{axis}"].shape[0], self.shard_slices(axis)
        done = self.group[f"done{axis}"][:]
        return [(i * step, min(n, (i + 1) * step)) for i in range(len(done)) if not done[i]]

    def write_shard(self, axis: int, start: int, feats: np.ndarray) -> dict:
        """Write one shard's maps, then mark it done. Returns a small receipt."""
        array = self.group[f"axis{axis}"]
        array[start:start + feats.shape[0]] = feats.astype(np.float16)
        self.group[f"done{axis}"][start // array.chunks[0]] = True
        return {"url": self.url, "axis": axis, "start": start, "slices": int(feats.shape[0])}

    def complete(self) -> bool:
        return all(f"done{a}" in self.group and bool(np.all(self.group[f"done{a}"][:])) for a in range(3))

    def volume(self):
        """The stored maps as a :class:`~cryosam_ray.features.FeatureVolume` (read lazily)."""
        from cryosam_ray.features import AxisMaps, FeatureVolume, slice_shape

        shape = tuple(self.group.attrs["shape"])
        return FeatureVolume(shape, [AxisMaps(a, self.group[f"axis{a}"], slice_shape(shape, a)) for a in range(3)])
