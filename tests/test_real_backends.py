"""The SAM and DINOv2 paths of `cryosam segment` and `cryosam run`, with tiny random-weight models.

Random weights give no quality; these tests hold the outputs to being well formed and the paths
to running end to end through the real loading code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryosam_ray.cli import main
from cryosam_ray.tables import PICK_COLUMNS, read_picks
from cryosam_ray.tomo_io import read_mrc

from tiny_models import TINY_SAM_FLAGS, save_tiny_dinov2, save_tiny_sam, write_blob_tomogram


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_blob_tomogram(root / "TS_01.mrc")
    (root / "prompts.csv").write_text("tomogram,z,y,x,class\nTS_01,6,20,24,blob\nTS_01,3,8,9,blob\n")
    return root, save_tiny_sam(root / "sam_vit_tiny.pth"), save_tiny_dinov2(root / "dinov2_tiny")


SAM_FLAGS = ["--set", "segmenter.backend=sam", *TINY_SAM_FLAGS,
             "--set", "segmenter.sam.device=cpu", "--set", "segmenter.sam.min_area=0",
             "--set", "segmenter.sam.min_pred_iou=-1", "--set", "propagation.directions=z",
             "--set", "propagation.max_steps=2"]


def test_segment_with_sam(tiny):
    root, sam, _ = tiny
    out = root / "seg"
    assert main(["segment", "--tomogram", str(root / "TS_01.mrc"), "--prompts", str(root / "prompts.csv"),
                 "--out", str(out), "--checkpoint", sam, *SAM_FLAGS]) == 0
    picks = read_picks(str(out / "picks.parquet"))
    assert picks.column_names == list(PICK_COLUMNS) and picks.num_rows == 2
    labels, voxel = read_mrc(out / "masks" / "TS_01_instances.mrc")
    assert labels.shape == (12, 40, 48) and voxel == pytest.approx(12.0)
    for row in picks.to_pylist():
        assert (labels == row["instance_id"]).sum() == row["voxel_count"] or row["voxel_count"] > 0


def test_run_with_dinov2_and_sam(tiny):
    root, sam, dinov2 = tiny
    out = root / "run"
    code = main(["run", "--tomograms", str(root / "TS_01.mrc"), "--prompts", str(root / "prompts.csv"),
                 "--out", str(out), "--address", "none", *SAM_FLAGS, "--set", f"segmenter.sam.checkpoint={sam}",
                 "--set", "encoder.backend=dinov2", "--set", f"encoder.dinov2.model={dinov2}",
                 "--set", "encoder.dinov2.image_size=98", "--set", "encoder.dinov2.device=cpu",
                 "--set", "matching.top_k=3", "--set", "matching.tau_sim=null", "--set", "instances.batch=3",
                 "--set", "instances.min_score=null"])
    manifest = json.loads((out / "run.json").read_text())
    assert code == 0 and manifest["tomograms"]["TS_01"]["status"] == "done", manifest["tomograms"]
    assert manifest["config"]["encoder"]["backend"] == "dinov2"
    picks = read_picks(str(out / "picks.parquet"))
    assert picks.column_names == list(PICK_COLUMNS) and picks.num_rows >= 1
    assert set(picks.column("class").to_pylist()) == {"blob"}
    labels, _ = read_mrc(out / "masks" / "TS_01_instances.mrc")
    assert set(np.unique(labels)) - {0} <= set(picks.column("instance_id").to_pylist())
    stores = list((out / "features").iterdir())
    assert len(stores) == 1 and stores[0].name.startswith("TS_01-")


def _bench_encoders():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_encoders.py"
    spec = importlib.util.spec_from_file_location("bench_encoders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dinov2, sam", [("large", "vit_h"), ("tiny", "tiny")])
def test_benchmark_flop_counts_match_torchs_counter(dinov2, sam):
    """The FLOP floor of bench_encoders.py: the architecture's count equals torch's FlopCounterMode
    over the real modules (meta tensors). DINOv2 ViT-L/14 at 518 px with 4 registers: 1374 tokens;
    SAM ViT-H at 1024 px: windowed and global blocks, relative positions, neck."""
    bench = _bench_encoders()
    flops = bench.check_flops(dinov2, 4, 518, sam)
    for key, (analytic, counted) in flops.items():
        assert analytic == counted, key
    if dinov2 == "large":
        assert flops["dinov2"][0] == pytest.approx(1.0171e12, rel=1e-4)
        assert flops["sam"][0] == pytest.approx(5.9611e12, rel=1e-4)
