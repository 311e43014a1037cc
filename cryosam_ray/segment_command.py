"""``cryosam segment``: the 3D instance of each point prompt on one tomogram, without matching.

Prompts in; a picks table (one row per prompt) and an instance mask out. The segmentation
itself is :func:`cryosam_ray.propagation.propagate` (Cross-Plane Self-Prompting).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.errors import PromptError
from cryosam_ray.previews import render_preview, write_preview
from cryosam_ray.propagation import Instance, propagate
from cryosam_ray.segmenters import build_segmenter
from cryosam_ray.tables import Point, picks_table, read_prompts, write_picks
from cryosam_ray.stages.outputs import label_volume
from cryosam_ray.storage import join
from cryosam_ray.tomo_io import Tomogram, open_tomogram, write_mrc

log = logging.getLogger(__name__)


@dataclass
class SegmentOutput:
    """What ``cryosam segment`` wrote for one tomogram."""

    table: pa.Table
    instances: list[Instance]
    files: list[str]

    @property
    def messages(self) -> list[str]:
        return [inst.message for inst in self.instances if inst.message]


def prompts_for(tomogram: Tomogram, points: list[Point], *, source: str = "prompts") -> list[Point]:
    """The prompts whose ``tomogram`` column names this tomogram.

    Raises:
        PromptError: none does (the message lists the names the table uses).
    """
    mine = [p for p in points if p.tomogram == tomogram.name]
    if not mine:
        names = sorted({p.tomogram for p in points})
        raise PromptError(f"{source}: no prompt names tomogram {tomogram.name!r} (the file stem of "
                          f"{tomogram.url}); the table names {names[:10]}")
    return mine


def instance_rows(tomogram: Tomogram, points: list[Point], instances: list[Instance], *,
                  first_id: int = 1) -> list[dict]:
    """Picks-table rows, one per instance (centroid of its mask; the prompt when it is empty)."""
    rows = []
    for offset, (point, inst) in enumerate(zip(points, instances)):
        z, y, x = inst.centroid
        rows.append({"tomogram": tomogram.name, "class": point.cls, "instance_id": first_id + offset,
                     "z": z, "y": y, "x": x, "voxel_size_a": tomogram.voxel_size_a,
                     "voxel_count": inst.voxel_count, "score": 0.0 if inst.empty else inst.pred_iou,
                     "similarity": math.nan, "pred_iou": inst.pred_iou})
    return rows


def segment_tomogram(tomogram: Tomogram, points: list[Point], cfg: CryoSamConfig, segmenter=None) -> list[Instance]:
    """The 3D instance of every prompt on this tomogram (prompts outside or on background: empty)."""
    segmenter = segmenter or build_segmenter(cfg.segmenter)
    coords = np.array([[p.z, p.y, p.x] for p in points], dtype=np.float64).reshape(-1, 3)
    prop = cfg.propagation
    return propagate(segmenter, tomogram, coords, directions=prop.directions, iou_threshold=prop.iou_threshold,
                     max_steps=prop.max_steps)


def run_segment(tomogram_url: str, prompts_path: str, out_dir: str, cfg: CryoSamConfig) -> SegmentOutput:
    """``cryosam segment``: write ``out_dir/picks.{parquet,csv}`` and ``out_dir/masks/<name>_instances.mrc``."""
    tomogram = open_tomogram(tomogram_url, voxel_size_a=cfg.io.voxel_size_a, storage_options=cfg.io.storage_options)
    points = prompts_for(tomogram, read_prompts(prompts_path, voxel_size_a=tomogram.voxel_size_a,
                                                shapes={tomogram.name: tomogram.shape}), source=prompts_path)
    instances = segment_tomogram(tomogram, points, cfg)
    rows = instance_rows(tomogram, points, instances)
    table = picks_table(rows)
    files = write_picks(table, out_dir)
    labels = label_volume(tomogram.shape, instances, [r["instance_id"] for r in rows])
    mask_path = join(out_dir, "masks", f"{tomogram.name}_instances.mrc")
    files.append(write_mrc(mask_path, labels, tomogram.voxel_size_a))
    image = render_preview(tomogram, rows, labels, label_classes={r["instance_id"]: r["class"] for r in rows})
    files.append(write_preview(join(out_dir, "previews", f"{tomogram.name}.png"), image))
    found = sum(not inst.empty for inst in instances)
    log.info("%s: %d of %d prompts segmented; wrote %s", tomogram.name, found, len(instances), Path(out_dir))
    return SegmentOutput(table=table, instances=instances, files=files)
