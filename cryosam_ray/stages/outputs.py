"""Stage: write one tomogram's outputs. Its picks (rows of the picks table), its instance and
semantic masks, and its preview picture."""

from __future__ import annotations

import numpy as np

from cryosam_ray.ome_zarr import write_label_image
from cryosam_ray.particle import Particle, Pick
from cryosam_ray.propagation import Instance
from cryosam_ray.storage import join
from cryosam_ray.tomo_io import Tomogram, write_labels_mrc


def picks_of(tomogram: Tomogram, particles: list[Particle]) -> list[Pick]:
    """One pick per particle, instance ids 1..N in the given order (as in the masks)."""
    picks = []
    for number, particle in enumerate(particles, start=1):
        z, y, x = (float(v) for v in (particle.centre or particle.instance.centroid))
        picks.append(Pick(tomogram.name, particle.cls, number, z, y, x, tomogram.voxel_size_a,
                          int(particle.instance.voxel_count), float(particle.score), float(particle.similarity),
                          float(particle.instance.pred_iou)))
    return picks


def label_volume(shape: tuple[int, int, int], instances: list[Instance], ids: list[int]) -> np.ndarray:
    """(D, H, W) int32 instance labels, 0 = background; where masks overlap the first one keeps the voxel."""
    labels = np.zeros(shape, dtype=np.int32)
    for inst, label in zip(instances, ids):
        if inst.empty:
            continue
        z0, y0, x0, z1, y1, x1 = inst.bbox
        view = labels[z0:z1, y0:y1, x0:x1]
        view[inst.mask & (view == 0)] = label
    return labels


def output_urls(out_dir: str, name: str, mask_format: str) -> list[str]:
    """Every file :func:`write_masks` and :func:`write_preview` write for tomogram ``name``."""
    suffix = ".ome.zarr" if mask_format == "ome-zarr" else ".mrc"
    base = join(out_dir, "masks", name)
    return [f"{base}_instances{suffix}", f"{base}_semantic{suffix}", join(out_dir, "previews", f"{name}.png")]


def write_masks(out_dir: str, tomogram: Tomogram, particles: list[Particle], classes: list[str], *,
                mask_format: str = "mrc", storage_options: dict | None = None) -> list[str]:
    """``masks/<name>_instances.<mrc|ome.zarr>`` (ids as in the picks table) and
    ``masks/<name>_semantic.<...>`` (1 + the class's index in ``classes``, 0 = background),
    written piece by piece (never a whole volume in memory). Returns the URLs written."""
    base = join(out_dir, "masks", tomogram.name)
    live = [(n, p) for n, p in enumerate(particles, start=1) if not p.instance.empty]
    instances = [(p.instance.bbox, p.instance.mask, n) for n, p in live]
    kinds = [(p.instance.bbox, p.instance.mask, 1 + classes.index(p.cls)) for _, p in live]
    if mask_format == "ome-zarr":
        return [write_label_image(f"{base}_instances.ome.zarr", tomogram.shape, instances, tomogram.voxel_size_a,
                                  name=f"{tomogram.name} instances", storage_options=storage_options),
                write_label_image(f"{base}_semantic.ome.zarr", tomogram.shape, kinds, tomogram.voxel_size_a,
                                  dtype=np.uint16, name=f"{tomogram.name} classes", storage_options=storage_options)]
    wide = np.uint16 if len(particles) < 2**16 else np.float32  # MRC has no 32-bit integer mode
    return [write_labels_mrc(f"{base}_instances.mrc", tomogram.shape, instances, tomogram.voxel_size_a, dtype=wide,
                             storage_options=storage_options),
            write_labels_mrc(f"{base}_semantic.mrc", tomogram.shape, kinds, tomogram.voxel_size_a, dtype=np.int16,
                             storage_options=storage_options)]


def write_preview(out_dir: str, tomogram: Tomogram, labels, picks: list[Pick], classes: list[str], *,
                  storage_options: dict | None = None) -> str:
    """``previews/<name>.png``: z slabs of the tomogram with every pick and its mask outline, one
    colour per class of ``classes`` (the same in every tomogram's preview). ``labels``: the
    instance labels (an opened mask file: read slab by slab). Returns its URL."""
    from cryosam_ray import previews

    rows = [pick.row() for pick in picks]
    image = previews.render_preview(tomogram, rows, labels, classes=classes,
                                    label_classes={p.instance_id: p.cls for p in picks})
    return previews.write_preview(join(out_dir, "previews", f"{tomogram.name}.png"), image,
                                  storage_options=storage_options)
