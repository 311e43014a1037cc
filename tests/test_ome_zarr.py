"""OME-Zarr label images: metadata napari and neuroglancer read, values, pyramid, bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import zarr

from cryosam_ray.cli import main
from cryosam_ray.ome_zarr import write_label_image


def _masks(shape, count, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for label in range(1, count + 1):
        lo = rng.integers(0, np.array(shape) - 12)
        size = rng.integers(4, 12, 3)
        out.append(((*lo, *(lo + size)), rng.random(tuple(size)) < 0.7, label))
    return out


def test_label_image_metadata_values_and_pyramid(tmp_path):
    shape = (40, 300, 270)
    masks = _masks(shape, 25)
    url = str(tmp_path / "TS_01_instances.ome.zarr")
    write_label_image(url, shape, masks, 13.5, levels=3, name="TS_01 instances")
    group = zarr.open_group(url, mode="r")
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"angstrom"} and "image-label" in group.attrs
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[13.5] * 3, [27.0] * 3, [54.0] * 3]
    expected = np.zeros(shape, np.uint32)
    for (z0, y0, x0, z1, y1, x1), mask, label in masks:
        view = expected[z0:z1, y0:y1, x0:x1]
        view[mask & (view == 0)] = label
    np.testing.assert_array_equal(group["0"][:], expected)
    np.testing.assert_array_equal(group["1"][:], expected[::2, ::2, ::2])
    np.testing.assert_array_equal(group["2"][:], expected[::4, ::4, ::4])
    assert (tmp_path / "TS_01_instances.ome.zarr" / ".zattrs").exists()  # zarr format 2, as OME-NGFF 0.4 wants


def test_writing_never_holds_the_whole_volume(tmp_path):
    shape = (128, 512, 512)  # 128 MiB as uint32
    tracemalloc.start()
    write_label_image(str(tmp_path / "big.ome.zarr"), shape, _masks(shape, 40), 10.0, levels=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 * 2**20, peak / 2**20


def test_run_writes_ome_zarr_masks(tmp_path):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--n", "1", "--seed", "5", "--shape", "48", "96", "96",
                 "--snr", "0.5", "--builtin-shapes", "--classes", "ribosome", "--prompts-per-class", "1"]) == 0
    out = tmp_path / "out"
    assert main(["run", "--tomograms", str(data / "synth_000.mrc"), "--prompts", str(data / "prompts.csv"),
                 "--out", str(out), "--address", "none", "--no-progress", "--mask-format", "ome-zarr"]) == 0
    labels = zarr.open_group(str(out / "masks" / "synth_000_instances.ome.zarr"), mode="r")
    ids = set(np.unique(labels["0"][:])) - {0}
    record = json.loads((out / "tomograms" / "synth_000.json").read_text())
    assert ids == {row["instance_id"] for row in record["rows"]} and ids
    assert labels.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [10.0] * 3
