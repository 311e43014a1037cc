"""Label volumes as OME-Zarr (OME-NGFF 0.4 multiscale label images), written piece by piece.

napari (napari-ome-zarr) and neuroglancer open the result directly: a zarr (format 2) group with
``multiscales`` metadata (axes z, y, x in Angstrom, a scale transform per level) and
``image-label`` metadata, chunk keys nested (``z/y/x``, as OME-NGFF 0.4 asks and copick reads).
Level ``0`` is full resolution; level ``k`` takes every ``2**k``-th
voxel (nearest neighbour: labels are never averaged). Level 0 is filled particle by particle
(each writes only the chunks its box touches) and the smaller levels are made slab by slab from
it, so no whole volume is ever in memory.
"""

from __future__ import annotations

import numpy as np

from cryosam_ray.storage import create_array, open_group

CHUNK = 64


def write_label_image(url: str, shape: tuple[int, int, int], masks, voxel_size_a: float, *, dtype=np.uint32,
                      levels: int | None = None, name: str = "labels", storage_options: dict | None = None) -> str:
    """Write a (D, H, W) label volume as an OME-Zarr multiscale label image; returns ``url``.

    Args:
        masks: (bbox, mask, label) triples: bbox (z0, y0, x0, z1, y1, x1), a bool mask of the
            box's shape, the label (> 0) written where the mask is set and no earlier label is.
        levels: pyramid levels (default: halve until the smallest side is under 2 chunks).
    """
    shape = tuple(int(s) for s in shape)
    if levels is None:
        levels = 1
        while min(shape) // 2**levels >= 2 * CHUNK:
            levels += 1
    group = open_group(url, "w", storage_options, zarr_format=2)
    arrays = []
    for k in range(levels):
        level_shape = tuple(-(-s // 2**k) for s in shape)
        arrays.append(create_array(group, str(k), shape=level_shape, dtype=dtype,
                                   chunks=tuple(min(CHUNK, s) for s in level_shape), nested=True))
    full = arrays[0]
    for (z0, y0, x0, z1, y1, x1), mask, label in masks:
        region = np.asarray(full[z0:z1, y0:y1, x0:x1])
        region[mask & (region == 0)] = label
        full[z0:z1, y0:y1, x0:x1] = region
    for k in range(1, levels):
        step, target = 2**k, arrays[k]
        for z in range(0, target.shape[0], CHUNK):  # one slab of the smaller level at a time
            stop = min(target.shape[0], z + CHUNK)
            target[z:stop] = np.asarray(full[z * step:stop * step:step, ::step, ::step])
    group.attrs.update(_metadata(name, levels, voxel_size_a))
    return url


def _metadata(name: str, levels: int, voxel_size_a: float) -> dict:
    """OME-NGFF 0.4 ``multiscales`` and ``image-label`` attributes."""
    return {
        "multiscales": [{
            "version": "0.4", "name": name, "type": "nearest",
            "axes": [{"name": axis, "type": "space", "unit": "angstrom"} for axis in "zyx"],
            "datasets": [{"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [float(voxel_size_a) * 2**k] * 3}]} for k in range(levels)],
        }],
        "image-label": {"version": "0.4", "colors": []},
    }
