"""The run report: one self-contained ``DIR/report.html`` for a ``cryosam run`` (or ``segment``).

Per tomogram: its preview images, counts per class (picks found by the run; true particles when
a truth table is given), the scores' distribution per class, and its status (with the reason of
a failure); for the run: per-stage times and, given ``cryosam evaluate --json`` results, the
quality table with a legend and the precision-recall curves. The page has no script and loads
nothing: images are base64 data URIs, charts inline SVG, so it opens from a file with no server
and no network.

What a run wrote is read in one place, :func:`load_run`, into the dataclasses below; adapting
the report to a change of the run's outputs means changing that function only.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from html import escape

import fsspec
import numpy as np
import pyarrow as pa

from cryosam_ray.errors import CryoSamError
from cryosam_ray.previews import class_colours, render_preview, write_preview
from cryosam_ray.report_charts import hex_colour, histogram_svg, pr_curve_svg
from cryosam_ray.storage import filesystem, join, write_bytes_atomic
from cryosam_ray.tables import read_picks
from cryosam_ray.tomo_io import open_tomogram

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


@dataclass
class TomogramEntry:
    """One tomogram of the run: ``status`` done | skipped | failed, ``error`` why it failed,
    ``picks`` particles found, ``proposals`` candidates per class before the cut, ``previews``
    URLs of its PNG previews (may be absent on disk)."""

    name: str
    url: str = ""
    status: str = "done"
    error: str = ""
    picks: int = 0
    proposals: dict[str, int] = field(default_factory=dict)
    previews: list[str] = field(default_factory=list)


@dataclass
class RunData:
    """What a run wrote, as the report needs it. ``picks``: the picks table (``tomogram``,
    ``class``, ``score`` ...); ``times_s``: seconds per stage; ``manifest``: whether a
    ``run.json`` was found (``cryosam segment`` writes none)."""

    out_dir: str
    classes: list[str]
    tomograms: list[TomogramEntry]
    picks: pa.Table
    times_s: dict[str, float] = field(default_factory=dict)
    executor: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    manifest: bool = True


def load_run(out_dir: str, *, storage_options: dict | None = None) -> RunData:
    """Read ``out_dir/run.json`` (optional), ``out_dir/picks.parquet`` (or ``picks.csv``) and
    find ``out_dir/previews/<tomogram>.png``.

    Raises:
        CryoSamError: neither a run manifest nor a picks table in ``out_dir``.
    """
    base = str(out_dir).rstrip("/")
    fs, root = filesystem(base, storage_options)
    manifest = _read_json(fs, join(root, "run.json"))
    picks = None
    for name in ("picks.parquet", "picks.csv"):
        if fs.exists(join(root, name)):
            picks = read_picks(join(base, name))
            break
    if manifest is None and picks is None:
        raise CryoSamError(f"{base}: no run.json and no picks.parquet / picks.csv; is this a cryosam output folder?")
    if picks is None:
        picks = pa.table({"tomogram": pa.array([], pa.string()), "class": pa.array([], pa.string()),
                          "score": pa.array([], pa.float64())})
    names = picks.column("tomogram").to_pylist()
    if manifest is None:  # cryosam segment: one done tomogram per name in the table
        manifest = {"tomograms": {n: {"status": "done", "picks": names.count(n)} for n in sorted(set(names))},
                    "classes": sorted(set(picks.column("class").to_pylist()))}
    tomograms = []
    for name, rec in sorted(manifest.get("tomograms", {}).items()):
        tomograms.append(TomogramEntry(
            name=name, url=str(rec.get("url") or ""), status=str(rec.get("status") or "done"),
            error=str(rec.get("error") or ""), picks=int(rec.get("picks") or names.count(name)),
            proposals={str(k): int(v) for k, v in (rec.get("proposals") or {}).items()},
            previews=[join(base, "previews", f"{name}.png")]))
    return RunData(out_dir=base, classes=[str(c) for c in manifest.get("classes", [])], tomograms=tomograms,
                   picks=picks, times_s={str(k): float(v) for k, v in (manifest.get("times_s") or {}).items()},
                   executor=str(manifest.get("executor") or ""), versions=dict(manifest.get("versions") or {}),
                   manifest="executor" in manifest or "times_s" in manifest)


@dataclass
class QualityRow:
    """One row of ``cryosam evaluate``: counts, precision, recall, F1, F-beta, AP, recall@kx."""

    scope: str  # class | tomogram | overall
    name: str
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    fbeta: float
    ap: float | None
    recall_at: dict[int, float]


@dataclass
class Evaluation:
    """``cryosam evaluate --json`` results: rows, match rule, beta, PR curves per class."""

    rows: list[QualityRow]
    match: dict[str, float]
    beta: float
    ranked_by: str
    curves: dict[str, tuple[list[float], list[float]]]

    def row(self, scope: str, name: str) -> QualityRow | None:
        return next((r for r in self.rows if r.scope == scope and r.name == name), None)


def load_evaluation(data: dict | str) -> Evaluation:
    """An :class:`Evaluation` from the dict ``cryosam evaluate --json`` writes, or its file."""
    if not isinstance(data, dict):
        with fsspec.open(str(data), "r") as handle:
            data = json.load(handle)
    rows = []
    scopes = [("class", data.get("per_class", {})), ("tomogram", data.get("per_tomogram", {})),
              ("overall", {"all": data["overall"]} if "overall" in data else {})]
    for scope, items in scopes:
        for name, m in items.items():
            recall_at = {int(k[len("recall_at_"):-1]): float(v) for k, v in m.items()
                         if k.startswith("recall_at_") and v is not None}
            rows.append(QualityRow(scope, str(name), int(m["tp"]), int(m["fp"]), int(m["fn"]), float(m["precision"]),
                                   float(m["recall"]), float(m["f1"]), float(m["fbeta"]),
                                   None if m.get("ap") is None else float(m["ap"]), recall_at))
    match = dict(data.get("match") or {})
    beta = float(match.pop("beta", 4.0))
    curves = {str(c): (list(v["recall"]), list(v["precision"])) for c, v in (data.get("pr_curve") or {}).items()}
    return Evaluation(rows, match, beta, str(data.get("ranked_by", "")), curves)


def write_report(out_dir: str, *, evaluation: dict | str | None = None, truth: pa.Table | None = None,
                 title: str | None = None, storage_options: dict | None = None) -> str:
    """Write ``out_dir/report.html`` for the run in ``out_dir``; returns its URL.

    Args:
        out_dir: the run's output folder (local path or fsspec URL).
        evaluation: ``cryosam evaluate --json`` output (its dict or file) for the quality table and
            precision-recall curves.
        truth: the truth table; gives the true particles per class and previews with the truth
            overlaid (``previews/<tomogram>_truth.png``, read slab by slab from the tomogram).
        title: the page's heading (default: the folder).

    Raises:
        CryoSamError: ``out_dir`` holds no run outputs.
    """
    run = load_run(out_dir, storage_options=storage_options)
    ev = load_evaluation(evaluation) if evaluation is not None else None
    if truth is not None:
        _truth_previews(run, truth, storage_options)
    page = render_html(run, ev, truth, title=title, storage_options=storage_options)
    url = write_bytes_atomic(join(run.out_dir, REPORT_NAME), page.encode("utf-8"), storage_options=storage_options)
    log.info("wrote %s", url)
    return url


def _truth_previews(run: RunData, truth: pa.Table, storage_options: dict | None) -> None:
    """Previews with the truth overlaid, for every done tomogram whose data can be opened."""
    truth_rows, pick_rows = truth.to_pylist(), run.picks.to_pylist()
    for entry in run.tomograms:
        if entry.status == "failed" or not entry.url:
            continue
        try:
            tomo = open_tomogram(entry.url, storage_options=storage_options)
            mask_url = join(run.out_dir, "masks", f"{entry.name}_instances.mrc")
            fs, mask_path = filesystem(mask_url, storage_options)
            labels = open_tomogram(mask_url, storage_options=storage_options) if fs.exists(mask_path) else None
            mine = [r for r in pick_rows if r["tomogram"] == entry.name]
            image = render_preview(tomo, mine, labels, classes=_classes(run, truth), truth=truth_rows,
                                   label_classes={int(r["instance_id"]): r["class"] for r in mine})
        except (CryoSamError, OSError) as exc:
            log.warning("%s: no preview with truth: %s", entry.name, exc)
            continue
        url = join(run.out_dir, "previews", f"{entry.name}_truth.png")
        entry.previews.insert(0, write_preview(url, image, storage_options=storage_options))


_LEGEND = [
    ("TP / FP / FN", "picks matched to a true particle / picks matched to none / true particles no pick matched "
                     "(one-to-one matching within the match distance)"),
    ("P", "precision, TP / (TP + FP)"), ("R", "recall, TP / (TP + FN)"),
    ("F1", "harmonic mean of P and R"),
    ("F{beta}", "F-beta with beta = {beta}: (1 + b²) P R / (b² P + R); recall weighs b² times more "
                "(the CZII benchmark's F4)"),
    ("AP", "average precision of the picks ranked by score (non-interpolated; mean over classes for tomograms "
           "and overall)"),
    ("R@kx", "recall of the k x N(true) best-scored picks of each tomogram and class"),
]

_CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
td.l,th.l{text-align:left}.ok{color:#070}.failed{color:#b00;font-weight:bold}.skipped{color:#666}
.muted{color:#666;font-size:.9em}img{max-width:100%;display:block;margin:.5em 0}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.3em;vertical-align:middle}
.bar{display:inline-block;height:.8em;background:#4a7;vertical-align:middle}dl{font-size:.9em}
dt{font-weight:bold;float:left;clear:left;width:7em}dd{margin-left:7.5em}"""


def render_html(run: RunData, ev: Evaluation | None = None, truth: pa.Table | None = None, *,
                title: str | None = None, storage_options: dict | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
    classes = _classes(run, truth)
    colours = {c: hex_colour(rgb) for c, rgb in class_colours(classes).items()}
    heading = title or f"CryoSAM run report: {run.out_dir}"
    done = sum(t.status != "failed" for t in run.tomograms)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(heading)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{escape(heading)}</h1>",
             f"<p class=\"muted\">written {escape(dt.datetime.now().isoformat(timespec='seconds'))}"
             + (f"; executor {escape(run.executor)}" if run.executor else "")
             + "".join(f"; {escape(k)} {escape(str(v))}" for k, v in run.versions.items() if v) + "</p>",
             f"<p>{len(run.tomograms)} tomograms: {done} done, {len(run.tomograms) - done} failed; "
             f"<b>{run.picks.num_rows} picks</b> in all (particles this run found; "
             "<code>picks.parquet</code>).</p>", _times(run.times_s), _failures(run)]
    if ev is not None:
        parts.append(_quality(ev, colours))
    for entry in run.tomograms:
        parts.append(_tomogram(entry, run, classes, colours, ev, truth, storage_options))
    parts.append("</body></html>")
    return "\n".join(parts)


def _times(times: dict[str, float]) -> str:
    if not times:
        return ""
    longest = max(times.values()) or 1.0
    rows = "".join(f"<tr><td class=\"l\">{escape(k)}</td><td>{v:.2f}</td><td class=\"l\"><span class=\"bar\" "
                   f"style=\"width:{200 * v / longest:.0f}px\"></span></td></tr>" for k, v in times.items())
    return (f"<h2>Time per stage</h2><table><tr><th class=\"l\">stage</th><th>seconds</th><th></th></tr>{rows}"
            "</table><p class=\"muted\">Summed over tomograms; on Ray, stages of different tomograms overlap.</p>")


def _failures(run: RunData) -> str:
    failed = [t for t in run.tomograms if t.status == "failed"]
    if not failed:
        return "<p class=\"ok\">No tomogram failed.</p>"
    rows = "".join(f"<tr><td class=\"l\"><a href=\"#t-{escape(t.name)}\">{escape(t.name)}</a></td>"
                   f"<td class=\"l\">{escape(t.url)}</td><td class=\"l failed\">{escape(t.error)}</td></tr>"
                   for t in failed)
    return (f"<h2>Failures</h2><table><tr><th class=\"l\">tomogram</th><th class=\"l\">input</th>"
            f"<th class=\"l\">reason</th></tr>{rows}</table>")


def _quality_table(rows: list[QualityRow], ev: Evaluation) -> str:
    ks = sorted({k for r in rows for k in r.recall_at})
    head = ("<tr><th class=\"l\">scope</th><th class=\"l\">name</th><th>TP</th><th>FP</th><th>FN</th><th>P</th>"
            f"<th>R</th><th>F1</th><th>F{ev.beta:g}</th><th>AP</th>"
            + "".join(f"<th>R@{k}x</th>" for k in ks) + "</tr>")
    body = "".join(
        f"<tr><td class=\"l\">{escape(r.scope)}</td><td class=\"l\">{escape(r.name)}</td><td>{r.tp}</td>"
        f"<td>{r.fp}</td><td>{r.fn}</td><td>{r.precision:.3f}</td><td>{r.recall:.3f}</td><td>{r.f1:.3f}</td>"
        f"<td>{r.fbeta:.3f}</td><td>{'-' if r.ap is None else f'{r.ap:.3f}'}</td>"
        + "".join(f"<td>{r.recall_at[k]:.3f}</td>" if k in r.recall_at else "<td>-</td>" for k in ks) + "</tr>"
        for r in rows)
    return f"<table>{head}{body}</table>"


def _match_text(ev: Evaluation) -> str:
    if "distance_vox" in ev.match:
        return f"a pick matches a true particle within {ev.match['distance_vox']:g} voxels of its centre"
    if "distance_a" in ev.match:
        return f"a pick matches a true particle within {ev.match['distance_a']:g} Å of its centre"
    if "radius_fraction" in ev.match:
        return (f"a pick matches a true particle within {ev.match['radius_fraction']:g} x that particle's radius "
                "of its centre")
    return "match distance not recorded (rerun cryosam evaluate --json to record it)"


def _quality(ev: Evaluation, colours: dict[str, str]) -> str:
    legend = "".join(f"<dt>{escape(k.format(beta=f'{ev.beta:g}'))}</dt><dd>{escape(v.format(beta=f'{ev.beta:g}'))}</dd>"
                     for k, v in _LEGEND)
    notes = {r.name: f"(AP {r.ap:.3f})" for r in ev.rows if r.scope == "class" and r.ap is not None}
    curve = (pr_curve_svg(ev.curves, colours, notes=notes) if ev.curves
             else "<p class=\"muted\">No precision-recall curve in these results.</p>")
    ranked = f" Picks ranked by {escape(ev.ranked_by)}." if ev.ranked_by else ""
    return (f"<h2>Quality against the truth</h2><p>Match distance: {escape(_match_text(ev))}.{ranked}</p>"
            f"{_quality_table(ev.rows, ev)}<dl>{legend}</dl><h3>Precision-recall, per class</h3>{curve}")


def _tomogram(entry: TomogramEntry, run: RunData, classes: list[str], colours: dict[str, str],
              ev: Evaluation | None, truth: pa.Table | None, storage_options: dict | None) -> str:
    status = {"done": "<span class=\"ok\">done</span>", "skipped": "<span class=\"skipped\">done by an earlier "
              "run (skipped)</span>"}.get(entry.status, f"<span class=\"failed\">{escape(entry.status.upper())}: "
                                                        f"{escape(entry.error)}</span>")
    parts = [f"<h2 id=\"t-{escape(entry.name)}\">{escape(entry.name)}</h2>",
             f"<p>{status}" + (f" <span class=\"muted\">{escape(entry.url)}</span>" if entry.url else "") + "</p>"]
    if entry.status == "failed":
        return "\n".join(parts)
    mask = np.asarray(run.picks.column("tomogram").to_pylist(), dtype=object) == entry.name
    mine = run.picks.filter(pa.array(mask, pa.bool_())) if len(mask) else run.picks
    pick_classes = mine.column("class").to_pylist()
    true_classes = []
    if truth is not None:
        true_classes = [c for t, c in zip(truth.column("tomogram").to_pylist(), truth.column("class").to_pylist())
                        if t == entry.name]
    head = "<tr><th class=\"l\">class</th><th>picks</th>" + ("<th>true particles</th>" if truth is not None else "")
    head += "<th>proposals</th></tr>" if entry.proposals else "</tr>"
    rows = ""
    for cls in classes:
        rows += (f"<tr><td class=\"l\"><span class=\"sw\" style=\"background:{colours[cls]}\"></span>"
                 f"{escape(cls)}</td><td>{pick_classes.count(cls)}</td>"
                 + (f"<td>{true_classes.count(cls)}</td>" if truth is not None else "")
                 + (f"<td>{entry.proposals.get(cls, 0)}</td>" if entry.proposals else "") + "</tr>")
    parts.append(f"<table>{head}{rows}</table><p class=\"muted\">picks: particles this run found; "
                 + ("true particles: in the truth table; " if truth is not None else "")
                 + ("proposals: candidates of feature matching before the score cut; " if entry.proposals else "")
                 + "colours as in the previews.</p>")
    if ev is not None and (row := ev.row("tomogram", entry.name)) is not None:
        parts.append(_quality_table([row], ev))
    if mine.num_rows and "score" in mine.column_names:
        scores = np.asarray(mine.column("score").to_numpy(zero_copy_only=False), np.float64)
        by_class = {c: scores[np.asarray(pick_classes) == c] for c in classes if c in pick_classes}
        parts.append("<h3>Scores of the picks, per class</h3>" + histogram_svg(by_class, colours))
    for url in entry.previews:
        data = _read_bytes(url, storage_options)
        if data is None:
            continue
        parts.append(f"<img src=\"data:image/png;base64,{base64.b64encode(data).decode('ascii')}\" "
                     f"alt=\"preview of {escape(entry.name)}\">")
        break
    else:
        parts.append("<p class=\"muted\">No preview image.</p>")
    return "\n".join(parts)


def _classes(run: RunData, truth: pa.Table | None) -> list[str]:
    """Every class of the run, its picks and the truth, sorted: the previews' colour order."""
    return sorted(set(run.classes) | set(run.picks.column("class").to_pylist())
                  | (set(truth.column("class").to_pylist()) if truth is not None else set()))


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise CryoSamError(f"{path}: not valid JSON ({exc})") from exc


def _read_bytes(url: str, storage_options: dict | None) -> bytes | None:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


__all__ = ["Evaluation", "QualityRow", "RunData", "TomogramEntry", "load_evaluation", "load_run", "render_html",
           "write_report"]
