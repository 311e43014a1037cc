"""The bad-input table through ``cryosam run``, as a user meets it: each case one clear line on
the console (no traceback) naming the file or URL and what was expected, the exit code (2: bad
input or config, refused before any work; 1: some tomograms failed, the others done) and, for a
tomogram that fails, its reason in ``run.json``. Every typed error crosses a process boundary
intact."""

from __future__ import annotations

import json
import pickle

import mrcfile
import numpy as np
import pytest

from cryosam_ray.cli import main
from cryosam_ray.errors import (BadVoxelDataError, BadVoxelSizeError, ConfigError, NotAnMrcError, NotAVolumeError,
                                PromptError, TableError, TomogramNotFoundError, WeightsError)
from cryosam_ray.plan import PlanError

from tiny_models import write_blob_tomogram

GOOD = "tomogram,z,y,x\nblob,6,20,24\n"


def _run(tmp_path, capsys, *, tomograms=None, prompts: str | None = GOOD, out=None, extra=()):
    """``cryosam run`` in this process; (exit code, stderr lines)."""
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_blob_tomogram(data / "blob.mrc")
    prompt_file = tmp_path / "prompts.csv"
    if prompts is not None:
        prompt_file.write_text(prompts)
    code = main(["run", "--tomograms", str(tomograms or data), "--prompts", str(prompt_file),
                 "--out", str(out or tmp_path / "out"), "--address", "none", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\x1b[" not in err  # no raw traceback, no colour codes
    return code, [line for line in err.splitlines() if line.strip()]


def _one_error_line(lines: list[str], *needles: str) -> str:
    """The run's one error (its line and the indented details under it), holding ``needles``."""
    starts = [i for i, line in enumerate(lines) if line.startswith("cryosam run: error:")]
    assert len(starts) == 1, lines
    block = [lines[starts[0]]] + [line for line in lines[starts[0] + 1:] if line.startswith(" ")]
    message = "\n".join(block)
    assert all(n in message for n in needles), message
    return message


STAR_WITHOUT_COORDINATES = "data_\nloop_\n_rlnTomoName #1\n_rlnClassNumber #2\nblob 1\n"


@pytest.mark.parametrize("name, prompts, expected", [
    ("missing prompt file", None, ["prompts.csv", "file not found"]),
    ("empty prompt file", "", ["prompts.csv", "empty"]),
    ("missing columns", "tomogram,z,y\nblob,6,20\n", ["prompts.csv", "missing columns ['x']"]),
    ("non-numeric", "tomogram,z,y,x\nblob,6,twenty,24\n", ["prompts.csv", "column 'y'", "'twenty'"]),
    ("NaN coordinate", "tomogram,z,y,x\nblob,6,nan,24\n", ["prompts.csv", "not a number"]),
    ("outside the volume", "tomogram,z,y,x\nblob,6,20,480\n", ["prompts.csv", "outside its volume", "(12, 40, 48)"]),
    ("no matching tomogram", "tomogram,z,y,x\nTS_99,6,20,24\n", ["TS_99", "blob"]),
])
def test_unusable_prompts_are_refused_before_any_work(tmp_path, capsys, name, prompts, expected):
    code, lines = _run(tmp_path, capsys, prompts=prompts)
    assert code == 2
    _one_error_line(lines, *expected)
    assert not (tmp_path / "out" / "features").exists()  # no work started


@pytest.mark.parametrize("suffix, content, expected", [
    (".star", STAR_WITHOUT_COORDINATES, ["prompts.star", "rlnCoordinateX"]),
    (".json", "{not json", ["prompts.json", "not valid JSON"]),
])
def test_prompt_files_of_other_formats(tmp_path, capsys, suffix, content, expected):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    data = tmp_path / "data"
    data.mkdir()
    write_blob_tomogram(data / "blob.mrc")
    code = main(["run", "--tomograms", str(data), "--prompts", str(path), "--out", str(tmp_path / "out"),
                 "--address", "none", "--no-progress"])
    assert code == 2
    _one_error_line(capsys.readouterr().err.splitlines(), *expected)


@pytest.mark.parametrize("setting, expected", [
    ("matching.top_k=-3", "matching.top_k"),
    ("propagation.directions=diagonal", "propagation.directions"),
    ("ray.stall_timeout_s=[", "ray.stall_timeout_s"),
])
def test_bad_config_values_name_the_key(tmp_path, capsys, setting, expected):
    code, lines = _run(tmp_path, capsys, extra=["--set", setting])
    assert code == 2
    _one_error_line(lines, expected)


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code, lines = _run(tmp_path, capsys, out=tmp_path / "taken")
    assert code == 2
    _one_error_line(lines, "taken")
    code, lines = _run(tmp_path, capsys, out=tmp_path / "taken" / "below")
    assert code == 2
    _one_error_line(lines, "below")


def test_missing_input_and_output_buckets_are_named(tmp_path, capsys, s3_bucket):
    code, lines = _run(tmp_path, capsys, tomograms="s3://no-such-bucket-here/data/")
    assert code == 2
    _one_error_line(lines, "s3://no-such-bucket-here/data")
    code, lines = _run(tmp_path, capsys, out="s3://no-such-bucket-here/out")
    assert code == 2
    _one_error_line(lines, "s3://no-such-bucket-here")


def _mrc(path, data, voxel=10.0):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel
    return path


def _bad_tomograms(folder) -> dict[str, str]:
    """Every kind of unusable tomogram, next to a good one: name -> what its error must say."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(10, 12, 14)).astype(np.float32)
    (folder / "notes.mrc").write_text("a text file, not a tomogram\n" * 50)
    good = _mrc(folder / "whole.mrc", noise)
    (folder / "cut.mrc").write_bytes(good.read_bytes()[:2000])
    header = bytearray(good.read_bytes())
    header[0:4] = np.int32(140).tobytes()  # nx larger than the data the file holds
    (folder / "bigheader.mrc").write_bytes(bytes(header))
    good.unlink()
    _mrc(folder / "flat2d.mrc", np.ones((32, 32), np.float32))
    with_nan = noise.copy()
    with_nan[3, 4, 5] = np.nan
    _mrc(folder / "withnan.mrc", with_nan)
    _mrc(folder / "constant.mrc", np.full((8, 8, 8), 2.0, np.float32))
    _mrc(folder / "spectrum.mrc", np.zeros((4, 5, 6), np.complex64))
    _mrc(folder / "novoxel.mrc", noise, voxel=0.0)
    return {"notes": "not a readable MRC", "cut": "cut.mrc", "bigheader": "bigheader.mrc",
            "flat2d": "expected a 3D volume", "withnan": "voxel (z=3, y=4, x=5) is nan",
            "constant": "every voxel equals 2.0", "spectrum": "complex64", "novoxel": "voxel size is 0.0"}


@pytest.mark.filterwarnings("ignore:Data array contains NaN")  # written on purpose
def test_each_unusable_tomogram_fails_alone_with_its_reason(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_blob_tomogram(data / "blob.mrc")
    expected = _bad_tomograms(data)
    code, lines = _run(tmp_path, capsys)
    assert code == 1  # some failed, the good one is done
    records = json.loads((tmp_path / "out" / "run.json").read_text())["tomograms"]
    assert records["blob"]["status"] == "done"
    for name, reason in expected.items():
        assert records[name]["status"] == "failed", name
        assert reason in records[name]["error"] and f"{name}.mrc" in records[name]["error"], records[name]
        assert sum(f"{name}.mrc" in line for line in lines) == 1, (name, lines)  # on the console once


@pytest.mark.parametrize("error", [
    TomogramNotFoundError("s3://b/TS_01.mrc", "no such file"), NotAnMrcError("a.mrc", "not a readable MRC"),
    NotAVolumeError("a.mrc", "expected a 3D volume"), BadVoxelDataError("a.mrc", "every voxel equals 0"),
    BadVoxelSizeError("a.mrc", "voxel size is 0.0"), TableError("p.csv", "missing columns ['x']"),
    WeightsError("/w/sam.pth", "no such file"), ConfigError("matching.top_k: must be >= 1"),
    PromptError("p.csv: row 1 is outside its volume"), PlanError("no tomogram there"),
])
def test_typed_errors_cross_process_boundaries_intact(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


@pytest.fixture
def fresh_s3():
    """s3fs caches filesystems by their options: one made without credentials must not be reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


CLOSED_ENDPOINT = ["--set", 'io.storage_options={client_kwargs: {endpoint_url: "http://127.0.0.1:9"}, '
                            "config_kwargs: {retries: {max_attempts: 1}}}"]


@pytest.mark.parametrize("where", ["tomograms", "prompts", "out"])
def test_remote_stores_without_credentials_are_named_with_the_remedy(tmp_path, capsys, monkeypatch, fresh_s3, where):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    url = f"s3://private-bucket/{where}"
    if where == "prompts":
        _run(tmp_path, capsys)  # writes the local tomogram and prompts
        data, prompts = tmp_path / "data", url + ".csv"
        code = main(["run", "--tomograms", str(data), "--prompts", prompts, "--out", str(tmp_path / "o"),
                     "--address", "none", "--no-progress", *CLOSED_ENDPOINT])
        lines = capsys.readouterr().err.splitlines()
    else:
        code, lines = _run(tmp_path, capsys, extra=CLOSED_ENDPOINT,
                           **({"tomograms": url} if where == "tomograms" else {"out": url}))
    assert code == 2
    if where == "out":  # s3fs answers "no such bucket" for a bucket it cannot see
        _one_error_line(lines, url, "bucket 'private-bucket'")
    else:
        _one_error_line(lines, url, "no credentials found", "anon: true")


def test_an_unreachable_endpoint_is_named(tmp_path, capsys, s3_endpoint, fresh_s3):
    code, lines = _run(tmp_path, capsys, tomograms="s3://some-bucket/data/", extra=CLOSED_ENDPOINT)
    assert code == 2
    _one_error_line(lines, "s3://some-bucket/data/", "EndpointConnectionError", "127.0.0.1:9")
