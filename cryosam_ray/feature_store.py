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

import numpy as np

from cryosam_ray.storage import DoneFlags, create_array, join, open_group

log = logging.getLogger(__name__)


class FeatureStore:
    """One tomogram's feature group in the store. Build with :meth:`create` or :meth:`open`."""

    def __init__(self, group, url: str):
        self.group = group
        self.url = url

    @staticmethod
    def group_url(store_url: str, key: str) -> str:
        return join(store_url, key)

    @classmethod
    def open(cls, group_url: str, mode: str = "r+", storage_options: dict | None = None) -> "FeatureStore":
        """An existing group (``mode="r"`` to only read)."""
        return cls(open_group(group_url, mode, storage_options), group_url)

    @classmethod
    def create(cls, group_url: str, *, shape: tuple[int, int, int], tomogram_url: str, encoder_signature: dict,
               grids: list[tuple[int, int]], channels: int, shard_slices: int,
               storage_options: dict | None = None) -> "FeatureStore":
        """The group with its three axis arrays, created where absent; existing shards are kept."""
        group = open_group(group_url, "a", storage_options)
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
        DoneFlags.create(self.group, done, -(-n // shard_slices), reset=True)
        return create_array(self.group, name, shape=(n, *grid, channels), dtype="float16",
                            chunks=(shard_slices, *grid, channels), fill_value=0, overwrite=True)

    def axis_array(self, axis: int):
        return self.group[f"axis{axis}"]

    def shard_slices(self, axis: int) -> int:
        return int(self.group[f"axis{axis}"].chunks[0])

    def _done(self, axis: int) -> DoneFlags:
        return DoneFlags(self.group[f"done{axis}"])

    def shard_done(self, axis: int, start: int) -> bool:
        return bool(self._done(axis).get([start // self.shard_slices(axis)])[0])

    def missing_shards(self, axis: int) -> list[tuple[int, int]]:
        """(start, stop) slice ranges of the shards not yet committed along ``axis``."""
        n, step = self.group[f"axis{axis}"].shape[0], self.shard_slices(axis)
        done = self._done(axis).all()
        return [(i * step, min(n, (i + 1) * step)) for i in range(len(done)) if not done[i]]

    def write_shard(self, axis: int, start: int, feats: np.ndarray) -> int:
        """Write one shard's maps, then mark it done. Returns the number of slices written."""
        array = self.group[f"axis{axis}"]
        array[start:start + feats.shape[0]] = feats.astype(np.float16)
        self._done(axis).set([start // array.chunks[0]])
        return int(feats.shape[0])

    def complete(self) -> bool:
        return all(f"done{a}" in self.group and bool(self._done(a).all().all()) for a in range(3))

    def volume(self):
        """The stored maps as a :class:`~cryosam_ray.features.FeatureVolume` (read lazily)."""
        from cryosam_ray.features import AxisMaps, FeatureVolume, slice_shape

        shape = tuple(self.group.attrs["shape"])
        return FeatureVolume(shape, [AxisMaps(a, self.group[f"axis{a}"], slice_shape(shape, a)) for a in range(3)])
