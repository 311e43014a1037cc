"""Tomogram I/O: MRC (local memory-mapped and remote), zarr / OME-Zarr, normalisation, writers, bad input."""

from __future__ import annotations



import fsspec
import mrcfile
import numpy as np
import pytest

from cryosam_ray.errors import (
    BadVoxelDataError,
    BadVoxelSizeError,
    NotAnMrcError,
    NotAVolumeError,
    TomogramError,
    TomogramNotFoundError,
)
from cryosam_ray.tomo_io import open_tomogram, read_mrc, tomogram_name, write_mrc, write_zarr


def test_local_mrc_is_memory_mapped_with_voxel_size(mrc_path, small_volume):
    tomo = open_tomogram(mrc_path)
    assert tomo.shape == (20, 24, 28)
    assert tomo.voxel_size_a == pytest.approx(13.5)
    assert tomo.name == "TS_01"
    assert isinstance(tomo._array, np.memmap)
    np.testing.assert_array_equal(tomo.read(), small_volume)


@pytest.mark.parametrize("axis, expected", [("z", lambda v: v[3:6]),
                                             ("y", lambda v: np.moveaxis(v[:, 3:6], 1, 0)),
                                             ("x", lambda v: np.moveaxis(v[:, :, 3:6], 2, 0))])
def test_slabs_along_each_axis(mrc_path, small_volume, axis, expected):
    tomo = open_tomogram(mrc_path)
    np.testing.assert_array_equal(tomo.slab(axis, 3, 6), expected(small_volume))
    np.testing.assert_array_equal(tomo.slice(axis, 3), expected(small_volume)[0])


def test_slab_outside_volume_is_an_index_error(mrc_path):
    with pytest.raises(IndexError, match="outside axis"):
        open_tomogram(mrc_path).slab("y", 20, 30)


def test_robust_normalisation_ignores_outliers(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.normal(5.0, 2.0, size=(32, 64, 64)).astype(np.float32)
    volume[0, :4, :4] = 1e6  # a few gold-like voxels must not move the statistics
    path = tmp_path / "outliers.mrc"
    write_mrc(path, volume, 10.0)
    tomo = open_tomogram(path)
    assert tomo.stats.mean == pytest.approx(5.0, abs=0.05)
    assert tomo.stats.std == pytest.approx(2.0, rel=0.05)
    normed = tomo.normalize(tomo.slab("z", 1, 3))
    assert abs(float(normed.mean())) < 0.05 and float(normed.std()) == pytest.approx(1.0, rel=0.05)
    assert float(tomo.normalize(tomo.slice("z", 0)).max()) == 5.0  # clipped at 5 sigma


def test_write_mrc_roundtrip_labels_and_atomic(tmp_path):
    labels = np.zeros((8, 9, 10), dtype=np.int32)
    labels[2:4, 3:5, 4:6] = 7
    out = tmp_path / "masks" / "TS_01_instances.mrc"
    write_mrc(out, labels, 12.0)
    data, voxel = read_mrc(out)
    np.testing.assert_array_equal(data.astype(np.int32), labels)
    assert voxel == pytest.approx(12.0)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind
    big = labels.copy()
    big[0, 0, 0] = 100_000  # beyond uint16: stored exactly as float32
    write_mrc(out, big, 12.0)
    np.testing.assert_array_equal(read_mrc(out)[0].astype(np.int64), big)


def test_zarr_array_and_ome_zarr(tmp_path, small_volume):
    plain = write_zarr(tmp_path / "TS_02.zarr", small_volume, 8.0)
    tomo = open_tomogram(plain)
    assert tomo.name == "TS_02" and tomo.voxel_size_a == 8.0
    np.testing.assert_array_equal(tomo.slab("x", 2, 5), np.moveaxis(small_volume[:, :, 2:5], 2, 0))

    from cryosam_ray.storage import create_array, open_group

    ome = tmp_path / "TS_03.ome.zarr"
    group = open_group(str(ome), "w")
    create_array(group, "0", shape=small_volume.shape, dtype=small_volume.dtype, chunks=(8, 8, 8))[:] = small_volume
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.2, 1.2, 1.2]}]}],
    }]
    tomo = open_tomogram(ome)
    assert tomo.name == "TS_03" and tomo.voxel_size_a == pytest.approx(12.0)
    np.testing.assert_array_equal(tomo.read(), small_volume)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_zarr_tomogram_is_read_from_one_decompressed_copy(where, tmp_path, small_volume, request):
    from cryosam_ray.storage import create_array, open_group

    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    url = f"{base}/TS_04.ome.zarr"

    def write(volume, chunks):  # an OME-Zarr with chunks smaller than the volume, rewritten as copick does
        group = open_group(url, "w")
        create_array(group, "0", shape=volume.shape, dtype=volume.dtype, chunks=chunks, overwrite=True)[:] = volume
        group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                       "datasets": [{"path": "0", "coordinateTransformations": [
                                           {"type": "scale", "scale": [9.0, 9.0, 9.0]}]}]}]

    write(small_volume, (8, 8, 8))
    cache = tmp_path / "cache"
    tomo = open_tomogram(url, cache_dir=str(cache), name="run_7")
    assert tomo.name == "run_7" and tomo.url == url and tomo.voxel_size_a == 9.0
    assert isinstance(tomo._array, np.memmap)  # read in place no more
    np.testing.assert_array_equal(tomo.slab("y", 3, 9), np.moveaxis(small_volume[:, 3:9], 1, 0))
    copies = sorted(cache.iterdir())
    assert len(copies) == 1 and copies[0].name.endswith("-TS_04.ome.zarr.npy")
    open_tomogram(url, cache_dir=str(cache))
    assert sorted(cache.iterdir()) == copies  # made once
    # A rewritten volume has new metadata files (on S3 told apart by content or a later second): a new copy.
    write(small_volume * 2, (4, 8, 8))
    np.testing.assert_array_equal(open_tomogram(url, cache_dir=str(cache)).read(), small_volume * 2)


def test_zarr_without_voxel_size_needs_an_override(tmp_path, small_volume):
    import zarr

    path = tmp_path / "bare.zarr"
    zarr.open_array(store=str(path), mode="w", shape=small_volume.shape, dtype=small_volume.dtype)[:] = small_volume
    with pytest.raises(BadVoxelSizeError, match="bare.zarr"):
        open_tomogram(path)
    assert open_tomogram(path, voxel_size_a=9.0).voxel_size_a == 9.0


def test_s3_mrc_ranged_reads_and_writes(s3_bucket, mrc_path, small_volume):
    fs = fsspec.filesystem("s3")
    fs.put_file(str(mrc_path), f"{s3_bucket}/raw/TS_01.mrc")
    tomo = open_tomogram(f"{s3_bucket}/raw/TS_01.mrc")
    assert tomo.shape == small_volume.shape and tomo.voxel_size_a == pytest.approx(13.5)
    np.testing.assert_array_equal(tomo.slab("z", 4, 9), small_volume[4:9])
    np.testing.assert_array_equal(tomo.slab("x", 1, 2), np.moveaxis(small_volume[:, :, 1:2], 2, 0))
    assert tomo.stats.mean == pytest.approx(open_tomogram(mrc_path).stats.mean)

    write_mrc(f"{s3_bucket}/out/mask.mrc", (small_volume > 0).astype(np.int32), 13.5)
    np.testing.assert_array_equal(read_mrc(f"{s3_bucket}/out/mask.mrc")[0], small_volume > 0)
    write_zarr(f"{s3_bucket}/out/vol.zarr", small_volume, 13.5)
    np.testing.assert_array_equal(open_tomogram(f"{s3_bucket}/out/vol.zarr").read(), small_volume)


def test_tomogram_name_strips_volume_suffixes():
    assert tomogram_name("s3://b/TS_01.mrc") == "TS_01"
    assert tomogram_name("/d/TS_2.ome.zarr/") == "TS_2"
    assert tomogram_name("/d/run.rec") == "run"


# --- bad input: each case has its own typed error naming the file -----------------------------

def test_missing_file(tmp_path):
    with pytest.raises(TomogramNotFoundError, match="nope.mrc: no such file"):
        open_tomogram(tmp_path / "nope.mrc")


def test_not_an_mrc(tmp_path):
    bad = tmp_path / "notes.mrc"
    bad.write_text("this is a text file, not a tomogram\n" * 100)
    with pytest.raises(NotAnMrcError, match="notes.mrc: not a readable MRC"):
        open_tomogram(bad)


def test_truncated_mrc(tmp_path, mrc_path):
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(mrc_path.read_bytes()[:4000])
    with pytest.raises(NotAnMrcError, match="cut.mrc"):
        open_tomogram(cut)


def test_2d_image_is_not_a_volume(tmp_path):
    path = tmp_path / "image.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((32, 32), np.float32))
        mrc.voxel_size = 10
    with pytest.raises(NotAVolumeError, match=r"image.mrc: expected a 3D volume.*\(32, 32\)"):
        open_tomogram(path)


def test_nan_data(tmp_path, small_volume):
    small_volume[5, 6, 7] = np.nan
    path = tmp_path / "nan.mrc"
    write_mrc(path, small_volume, 10)
    with pytest.raises(BadVoxelDataError, match=r"nan.mrc: voxel \(z=5, y=6, x=7\) is nan"):
        open_tomogram(path).stats


def test_constant_data(tmp_path):
    path = tmp_path / "flat.mrc"
    write_mrc(path, np.full((8, 8, 8), 3.0, np.float32), 10)
    with pytest.raises(BadVoxelDataError, match="flat.mrc: every voxel equals 3.0"):
        open_tomogram(path).normalize(np.zeros((2, 2)))


def test_zero_voxel_size(tmp_path, small_volume):
    path = tmp_path / "novox.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(small_volume)  # voxel size stays 0 in the header
    with pytest.raises(BadVoxelSizeError, match="novox.mrc: voxel size is 0.0"):
        open_tomogram(path)
    assert open_tomogram(path, voxel_size_a=11.0).voxel_size_a == 11.0


def test_all_input_errors_share_a_base_class():
    for cls in (TomogramNotFoundError, NotAnMrcError, NotAVolumeError, BadVoxelDataError, BadVoxelSizeError):
        assert issubclass(cls, TomogramError)
        assert "x.mrc" in str(cls("x.mrc", "why"))


def test_a_complex_map_is_refused(tmp_path):
    import mrcfile

    from cryosam_ray.errors import NotAVolumeError

    path = tmp_path / "fft.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 5, 6), np.complex64))
        mrc.voxel_size = 2.0
    with pytest.raises(NotAVolumeError, match="complex64"):
        open_tomogram(path)


def test_a_remote_mrc_is_read_from_one_local_copy(s3_bucket, tmp_path, small_volume):
    url = f"{s3_bucket}/data/TS_01.mrc"
    write_mrc(url, small_volume, 13.5)
    cache = tmp_path / "cache"
    tomo = open_tomogram(url, cache_dir=str(cache))
    assert tomo.url == url and tomo.name == "TS_01" and tomo.voxel_size_a == 13.5
    np.testing.assert_array_equal(tomo.slab(1, 3, 7), small_volume[:, 3:7].transpose(1, 0, 2))  # slices first
    copies = list(cache.iterdir())
    assert len(copies) == 1 and copies[0].name.endswith("-TS_01.mrc")
    open_tomogram(url, cache_dir=str(cache))
    assert list(cache.iterdir()) == copies  # fetched once
    write_mrc(url, small_volume * 2, 13.5)  # a new version is fetched again
    np.testing.assert_array_equal(open_tomogram(url, cache_dir=str(cache)).slab(0, 0, 2), small_volume[:2] * 2)


def test_label_header_statistics_by_slab_equal_mrcfiles(tmp_path):
    from cryosam_ray.tomo_io import _update_header_stats_by_slab

    labels = np.random.default_rng(0).integers(0, 300, size=(9, 7, 5)).astype(np.uint16)
    stats = []
    for name, update in (("whole", lambda m: m.update_header_stats()),
                         ("slabs", lambda m: _update_header_stats_by_slab(m, slab_voxels=70))):
        with mrcfile.new(tmp_path / f"{name}.mrc", data=labels) as mrc:
            update(mrc)
            stats.append([float(mrc.header[k]) for k in ("dmin", "dmax", "dmean", "rms")])
    assert np.allclose(stats[0], stats[1], rtol=1e-6)
