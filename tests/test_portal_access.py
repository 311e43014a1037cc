"""Reading a public bucket anonymously (the CryoET Data Portal's layout), through the local S3 endpoint."""

from __future__ import annotations

import numpy as np

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.plan import expand_tomograms
from cryosam_ray.storage import create_array, open_group
from cryosam_ray.tomo_io import open_tomogram


def _ome_zarr(url: str, volume: np.ndarray, voxel_size_a: float) -> None:
    """An OME-NGFF 0.4 multiscale image with one level, as the portal publishes tomograms."""
    public = {"s3_additional_kwargs": {"ACL": "public-read"}}
    group = open_group(url, "w", public, zarr_format=2)
    create_array(group, "0", shape=volume.shape, dtype=volume.dtype, chunks=(8, 16, 16))[:] = volume
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [voxel_size_a] * 3}]}]}]


def _make_public(bucket: str) -> None:
    """Anyone may list and read, as on the portal's bucket."""
    import boto3

    boto3.client("s3").put_bucket_acl(Bucket=bucket.removeprefix("s3://"), ACL="public-read")


def test_anonymous_read_of_a_portal_style_tomogram(s3_bucket):
    _make_public(s3_bucket)
    run = f"{s3_bucket}/10000/TS_026/Tomograms/VoxelSpacing13.48/CanonicalTomogram"
    volume = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)
    _ome_zarr(f"{run}/TS_026.zarr", volume, 13.48)
    cfg = CryoSamConfig.model_validate({"io": {"storage_options": {"anon": True}}})
    urls = expand_tomograms([run], cfg.io.storage_options)
    assert urls == [f"{run}/TS_026.zarr"]
    tomo = open_tomogram(urls[0], storage_options=cfg.io.storage_options)
    assert tomo.name == "TS_026" and tomo.shape == (16, 32, 32) and tomo.voxel_size_a == 13.48
    np.testing.assert_array_equal(tomo.slab(0, 3, 5), volume[3:5])
