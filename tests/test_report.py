"""The run report, without a browser: what the page says, that it escapes, that it is self-contained."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pyarrow as pa
import pytest
from report_run import FAILED, FAILURE, NAMES, PICKS, make_run

from cryosam_ray.errors import CryoSamError
from cryosam_ray.report import load_evaluation, load_run, write_report
from cryosam_ray.tables import picks_table, write_picks


class _Page(HTMLParser):
    """Tags, attributes and text of a page; fails the test on a script or an external resource."""

    def __init__(self):
        super().__init__()
        self.images, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        assert tag not in ("script", "link", "iframe", "object"), f"<{tag}> in a self-contained page"
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not re.match(r"(https?:)?//", value), f"external {key}={value!r}"
        if tag == "img":
            self.images.append(attrs)

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path)


def test_load_run_reads_the_manifest(run):
    out, _ = run
    data = load_run(str(out))
    assert [t.name for t in data.tomograms] == sorted([*NAMES, FAILED])
    bad = next(t for t in data.tomograms if t.name == FAILED)
    assert bad.status == "failed" and bad.error == FAILURE
    assert data.picks.num_rows == sum(sum(v.values()) for v in PICKS.values())
    assert data.times_s["encode"] == 8.25 and data.classes == ["hsp60", "ribosome"]


def test_page_counts_escapes_and_embeds_every_preview(run):
    out, evaluation = run
    path = write_report(str(out), evaluation=evaluation)
    assert path.endswith("report.html")
    html = (out / "report.html").read_text(encoding="utf-8")
    page = _parse(out / "report.html")
    text = " ".join(page.text)
    # every preview of a tomogram that worked is embedded, byte for byte, as a data URI
    assert len(page.images) == len(NAMES)
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images}
    assert embedded == {(out / "previews" / f"{n}.png").read_bytes() for n in NAMES}
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    # names and reasons are escaped: the text reads back as written, no markup got through
    assert "TS<&2>" in text and FAILURE in text
    assert "<script>" not in html and "TS<&2>" not in html and "&lt;script&gt;" in html
    # counts per class, labelled as picks
    assert "picks: particles this run found" in text
    cells = re.findall(r"</span>(\w+)</td><td>(\d+)</td>", html)
    expected = [(cls, str(PICKS[n][cls])) for n in sorted(NAMES) for cls in ("hsp60", "ribosome")]
    assert cells == expected
    # stage times, the failure with its reason, the quality table with its legend and match rule
    assert "encode" in text and "8.25" in text
    assert "Failures" in text and FAILED in text
    assert "F4" in text and "R@3x" in text and "precision, TP / (TP + FP)" in text
    assert "0.5 x that particle's radius" in text
    assert page.tags.count("svg") == len(NAMES) + 1  # a histogram per tomogram, one PR curve
    assert "ribosome (no picks)" in text and "hsp60 (AP 0.610)" in text


def test_page_without_evaluation_or_manifest(tmp_path):
    table = picks_table([{"tomogram": "TS_9", "class": "ribosome", "z": 1, "y": 2, "x": 3, "score": 0.5}])
    write_picks(table, str(tmp_path))  # what cryosam segment writes: tables, no run.json, no previews
    write_report(str(tmp_path))
    page = _parse(tmp_path / "report.html")
    text = " ".join(page.text)
    assert "TS_9" in text and "No preview image." in text and "Quality" not in text and page.images == []


def test_truth_adds_counts_and_a_preview_with_truth(run):
    out, evaluation = run
    truth = pa.table({"tomogram": ["TS_01", "TS_01"], "class": ["ribosome", "hsp60"], "instance_id": [1, 2],
                      "z": [5.0, 15.0], "y": [10.0, 20.0], "x": [10.0, 20.0], "radius": [4.0, 4.0]})
    write_report(str(out), evaluation=evaluation, truth=truth)
    assert (out / "previews" / "TS_01_truth.png").exists()
    page = _parse(out / "report.html")
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images}
    assert (out / "previews" / "TS_01_truth.png").read_bytes() in embedded
    assert "true particles" in " ".join(page.text)


def test_evaluation_from_a_file_and_old_results(run, tmp_path):
    _, evaluation = run
    old = {k: v for k, v in evaluation.items() if k not in ("match", "pr_curve")}
    ev = load_evaluation(old)
    assert ev.curves == {} and ev.match == {} and ev.beta == 4.0
    assert [r.scope for r in ev.rows].count("tomogram") == len(NAMES)
    assert ev.row("overall", "all").recall_at == {1: 0.5, 2: 0.66, 3: 0.66}


def test_not_a_run_folder(tmp_path):
    with pytest.raises(CryoSamError, match="no run.json"):
        write_report(str(tmp_path))
