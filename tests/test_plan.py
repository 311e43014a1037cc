"""plan: inputs expanded, names unique, prompts grouped, records and resume decisions."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryosam_ray.config import CryoSamConfig
from cryosam_ray.errors import PromptError
from cryosam_ray.particle import Pick
from cryosam_ray.plan import (PlanError, TomogramRecord, expand_tomograms, make_plan, read_record, write_record)


def _mrc(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(seed).normal(size=(8, 12, 16)).astype(np.float32))
        mrc.voxel_size = 10.0
    return path


def test_two_inputs_with_one_name_are_refused_with_both_urls(tmp_path):
    a, b = _mrc(tmp_path / "A" / "TS_01.mrc"), _mrc(tmp_path / "B" / "TS_01.mrc")
    with pytest.raises(PlanError, match="TS_01") as info:
        expand_tomograms([str(tmp_path / "A"), str(tmp_path / "B")])
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_record_round_trips_through_json(tmp_path):
    pick = Pick("TS_01", "ribosome", 1, 1.5, 2.0, 3.0, 10.0, 120, 0.9, float("nan"), 0.8)
    record = TomogramRecord("TS_01", "/d/TS_01.mrc", "abc").finished([pick], ["/o/m.mrc"], {"ribosome": 4})
    write_record(str(tmp_path), record)
    back = read_record(str(tmp_path), "TS_01")
    assert back.status == "done" and back.proposals == {"ribosome": 4} and back.files == ["/o/m.mrc"]
    assert back.picks[0].row() == pytest.approx(pick.row(), nan_ok=True)
    assert read_record(str(tmp_path), "missing") is None


def test_plan_skips_what_is_done_with_the_same_inputs(tmp_path):
    _mrc(tmp_path / "data" / "TS_01.mrc"), _mrc(tmp_path / "data" / "TS_02.mrc", seed=1)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("tomogram,z,y,x,class\nTS_01,4,6,8,ribosome\n")
    cfg, out = CryoSamConfig(), str(tmp_path / "out")
    plan = make_plan([str(tmp_path / "data")], str(prompts), out, cfg)
    assert plan.todo == ["TS_01", "TS_02"] and plan.new == ["TS_01", "TS_02"] and plan.query_only == []
    assert [p.cls for p in plan.points["TS_01"]] == ["ribosome"]
    for name in plan.todo:
        write_record(out, plan.records[name].finished([], [], {}))
    again = make_plan([str(tmp_path / "data")], str(prompts), out, cfg)
    assert again.todo == [] and {r.status for r in again.records.values()} == {"skipped"}
    changed = make_plan([str(tmp_path / "data")], str(prompts), out, cfg.model_copy(
        update={"matching": cfg.matching.model_copy(update={"top_k": 7})}))
    assert changed.todo == ["TS_01", "TS_02"]  # a setting the picks depend on changed
    _mrc(tmp_path / "data" / "TS_03.mrc", seed=2)
    nightly = make_plan([str(tmp_path / "data")], str(prompts), out, cfg, incremental=True)
    assert nightly.todo == ["TS_03"] and nightly.new == ["TS_03"]
    assert nightly.query_only == ["TS_01"]  # done, but its prompts make the query


def test_an_unreadable_input_gets_a_failed_record(tmp_path):
    _mrc(tmp_path / "data" / "TS_01.mrc")
    (tmp_path / "data" / "TS_02.mrc").write_bytes(b"not a tomogram" * 50)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("tomogram,z,y,x\nTS_01,4,6,8\n")
    plan = make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), CryoSamConfig())
    assert plan.todo == ["TS_01"] and plan.records["TS_02"].status == "failed"
    assert "TS_02.mrc" in read_record(str(tmp_path / "out"), "TS_02").error
    assert plan.new == ["TS_01", "TS_02"]  # never seen before, even though it failed


def test_prompts_naming_no_tomogram_of_the_run(tmp_path):
    _mrc(tmp_path / "data" / "TS_01.mrc")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("tomogram,z,y,x\nTS_09,4,6,8\n")
    with pytest.raises(PromptError, match="TS_09"):
        make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), CryoSamConfig())


@pytest.mark.parametrize("make, expected", [
    (lambda t: t / "picks.parquet", "expected a folder"),
    (lambda t: (t / "file").write_text("x") and t / "file", "existing file"),
])
def test_unusable_output_folders_are_refused_before_any_work(tmp_path, make, expected):
    from cryosam_ray.plan import check_output

    with pytest.raises(PlanError, match=expected):
        check_output(str(make(tmp_path)))


def test_an_unwritable_output_folder_is_refused(tmp_path):
    from cryosam_ray.plan import check_output

    (tmp_path / "file").write_text("x")  # a folder cannot be made below a file, even by root
    with pytest.raises(PlanError, match="cannot write"):
        check_output(str(tmp_path / "file" / "out"))


def test_a_missing_output_bucket_is_named(s3_bucket):
    from cryosam_ray.plan import check_output

    check_output(f"{s3_bucket}/run")  # exists: fine
    with pytest.raises(PlanError, match="no-such-bucket-cryosam"):
        check_output("s3://no-such-bucket-cryosam/run")


def test_missing_weights_stop_the_run_before_any_work(tmp_path):
    from cryosam_ray.errors import WeightsError

    _mrc(tmp_path / "data" / "TS_01.mrc")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("tomogram,z,y,x\nTS_01,4,6,8\n")
    sam = CryoSamConfig.model_validate({"segmenter": {"backend": "sam", "sam": {"checkpoint": str(tmp_path / "no.pth")}}})
    with pytest.raises(WeightsError, match="no.pth: no such file"):
        make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), sam)
    bare = CryoSamConfig.model_validate({"segmenter": {"backend": "sam"}})
    with pytest.raises(WeightsError, match="no checkpoint given"):
        make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), bare)
    dinov2 = CryoSamConfig.model_validate({"encoder": {"backend": "dinov2", "dinov2": {"model": "/no/dinov2"}}})
    with pytest.raises(WeightsError, match="/no/dinov2"):
        make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), dinov2)


@pytest.mark.parametrize("row, message", [("TS_01,4,6,nan", "not a number"), ("TS_01,4,60,8", "outside its volume"),
                                          ("TS_01,-3,6,8", "outside its volume")])
def test_unusable_prompt_coordinates_are_named_before_any_work(tmp_path, row, message):
    _mrc(tmp_path / "data" / "TS_01.mrc")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f"tomogram,z,y,x\n{row}\n")
    with pytest.raises(PromptError, match=message) as info:
        make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), CryoSamConfig())
    assert str(prompts) in str(info.value)
    if message != "not a number":
        assert "(8, 12, 16)" in str(info.value)


def test_the_error_names_the_real_cause_when_no_tomogram_is_there(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("tomogram,z,y,x\nTS_01,4,6,8\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no tomogram there"):
        make_plan([str(tmp_path / "empty")], str(prompts), str(tmp_path / "out"), CryoSamConfig())
    with pytest.raises(PlanError, match="no tomogram there"):
        make_plan([str(tmp_path / "*.mrc")], str(prompts), str(tmp_path / "out"), CryoSamConfig())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "TS_01.mrc").write_bytes(b"not a tomogram" * 10)
    with pytest.raises(PlanError, match="could be opened.*TS_01.mrc: not a readable MRC"):
        make_plan([str(tmp_path / "data")], str(prompts), str(tmp_path / "out"), CryoSamConfig())
