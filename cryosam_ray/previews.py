"""Quick-look PNG previews that show every pick: z slabs of a tomogram, projected, picks marked.

The depth of the tomogram is cut into consecutive slabs along z, each about two particle radii
thick (thicker when that would give more than ``max_slabs`` panels), so every pick's centre lies
in exactly one slab. Each panel is the mean projection of its slab (rows y, columns x): a
particle as thick as the slab keeps its contrast while the noise averages out. Every pick whose
centre lies in the slab is drawn there as a circle of its radius in the colour of its class;
true particles, when given, as a cross of their radius in the same colour; labelled regions
(when given) as one-pixel outlines of their projection over the slab. A title bar names the
tomogram and its shape, and a legend gives the class colours, what is counted (picks, true
particles) and the two markers.

The tomogram is read slab by slab (``tomogram.slab``), never whole; a slab thicker than
``max_slices`` is sampled at that many evenly spaced slices. Coordinates are voxels, ZYX.
"""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cryosam_ray.errors import TableError
from cryosam_ray.storage import write_bytes_atomic

log = logging.getLogger(__name__)

# Okabe & Ito (2008), colour-blind safe, without black (invisible on a dark gray slice).
CLASS_COLOURS: list[tuple[int, int, int]] = [
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
]
UNASSIGNED_COLOUR: tuple[int, int, int] = (255, 255, 255)  # outlines of labels with no known class
DEFAULT_PICK_RADIUS = 6.0  # voxels, for picks with no voxel_count or radius

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_MUTED = (160, 160, 160)
_MARGIN = 10  # pixels around the picture
_GAP = 12  # pixels between panels
_SWATCH = 10  # legend swatch side, pixels
_CLIP_SIGMA = 3.0  # gray scale spans median +- this many robust standard deviations
_READ_BYTES = 64 * 2**20  # at most this much of a slab is read at once


def class_colours(classes) -> dict[str, tuple[int, int, int]]:
    """Colour of each class: :data:`CLASS_COLOURS` cycled over the class names in sorted order."""
    names = sorted({str(c) for c in classes})
    return {name: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, name in enumerate(names)}


def plan_slabs(depth: int, radius: float, *, max_slabs: int = 12) -> list[tuple[int, int]]:
    """Consecutive ``(z0, z1)`` slabs covering ``0..depth``: about ``2 * radius`` thick, at most
    ``max_slabs`` of them (then thicker), as even as integers allow."""
    if depth < 1 or max_slabs < 1:
        raise ValueError(f"need depth >= 1 and max_slabs >= 1; got depth {depth}, max_slabs {max_slabs}")
    thickness = max(1.0, 2.0 * float(radius))
    n = int(min(max_slabs, depth, max(1, round(depth / thickness))))
    edges = np.linspace(0, depth, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def render_preview(tomogram, picks: list[dict], labels=None, *, classes: list[str] | None = None,
                   label_classes: dict[int, str] | None = None, max_side: int = 512,
                   pick_radius: float | None = None, truth: list[dict] | None = None,
                   max_slabs: int = 12, columns: int = 4, max_slices: int = 24) -> Image.Image:
    """Draw z slabs of ``tomogram`` with every pick (and true particle) whose centre lies in them.

    Each panel is standardised with the robust statistics (median, MAD) of all panels together
    and shown in gray from -3 to +3 sigma. A panel's longest side is about ``max_side // 2``
    pixels: an integer nearest-neighbour factor for small volumes, Lanczos resampling for large
    ones. Panels run left to right, ``columns`` to a row, top to bottom in z.

    Args:
        tomogram: a :class:`~cryosam_ray.tomo_io.Tomogram` (anything with ``shape`` (D, H, W),
            ``name`` and ``slab(axis, start, stop)`` returning (n, H, W) float32 for axis 0).
        picks: picks-table rows, dicts with ``class``, ``z``, ``y``, ``x`` (voxels, ZYX) and
            optionally ``voxel_count`` (sphere of that volume), ``radius`` (voxels),
            ``instance_id`` (its id in ``labels``) and ``tomogram`` (rows naming another
            tomogram are skipped).
        labels: optional (D, H, W) integer instance labels, 0 = background: an array or memmap
            (read ``labels[z0:z1]``) or a lazily opened mask with ``slab`` like ``tomogram``.
        classes: every class of the run, so that colours agree between tomograms; classes of
            ``picks`` or ``truth`` missing from it get the next colours.
        label_classes: instance id -> class, for outline colours; the picks' ``instance_id``
            fill in ids it does not give. Outlines of ids with no class are white.
        max_side: about twice a panel's longest side, in pixels (>= 32).
        pick_radius: radius in voxels for picks with neither ``voxel_count`` nor ``radius``
            (default :data:`DEFAULT_PICK_RADIUS`); also the slab thickness's half when there
            are no picks.
        truth: true particles (truth-table rows: ``class``, ``z``, ``y``, ``x``, ``radius``
            in voxels, optional ``tomogram``), drawn as crosses.
        max_slabs: at most this many panels; slabs get thicker to cover the depth.
        columns: panels per row.
        max_slices: a slab thicker than this is projected from this many evenly spaced slices.

    Returns:
        An RGB image. ``image.info["panels"]`` is a list, one dict per slab in z order: ``z0``,
        ``z1`` (the slab is ``z0 <= z < z1``), ``slices`` (how many were projected), ``picks``
        and ``truth`` (markers drawn), ``box`` (left, top, right, bottom) in pixels and ``scale``
        (rows, cols) in pixels per voxel: voxel (y, x) is centred at pixel
        (left + (x + 0.5) * scale[1] - 0.5, top + (y + 0.5) * scale[0] - 0.5).

    Raises:
        TableError: a pick or truth row without ``class``, ``z``, ``y`` or ``x``.
        ValueError: ``labels`` not of the tomogram's shape, or ``max_side`` below 32.
    """
    shape = tuple(int(s) for s in tomogram.shape)
    if int(max_side) < 32:
        raise ValueError(f"max_side must be >= 32 pixels; got {max_side}")
    if labels is not None and tuple(labels.shape) != shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected the tomogram's shape {shape} "
                         f"(D, H, W) for {tomogram.name}")
    default_radius = DEFAULT_PICK_RADIUS if pick_radius is None else float(pick_radius)
    rows = _rows(picks, tomogram.name, default_radius, "picks")
    true_rows = _rows(truth or [], tomogram.name, default_radius, "truth")
    id_class = {r["instance_id"]: r["class"] for r in rows if r["instance_id"] is not None}
    id_class.update({int(k): str(v) for k, v in (label_classes or {}).items()})
    extra = {r["class"] for r in rows + true_rows} | set(id_class.values())
    ordered = sorted(set(classes or ()))
    ordered += sorted(extra - set(ordered))
    colours = {name: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, name in enumerate(ordered)}

    radii = [r["radius"] for r in rows] or [r["radius"] for r in true_rows] or [default_radius]
    slabs = plan_slabs(shape[0], float(np.median(radii)), max_slabs=max_slabs)
    scale = _scale(shape[1:], max(1, int(max_side) // 2))
    grays, outlines = [], []
    for z0, z1 in slabs:
        gray, sampled = _project(tomogram, z0, z1, scale, max_slices)
        grays.append((gray, len(sampled)))
        outlines.append(None if labels is None else _label_projection(labels, sampled))
    centre, spread = _robust(np.concatenate([g.ravel() for g, _ in grays]))
    starts = np.array([z0 for z0, _ in slabs[1:]])
    panels, unassigned = [], False
    for i, ((z0, z1), (gray, n_slices), label_2d) in enumerate(zip(slabs, grays, outlines)):
        mine = [r for r in rows if _slab_of(r, starts) == i]
        theirs = [r for r in true_rows if _slab_of(r, starts) == i]
        rgb = np.repeat(_to_u8((gray - centre) / spread)[:, :, None], 3, axis=2)
        sy, sx = rgb.shape[0] / shape[1], rgb.shape[1] / shape[2]
        if label_2d is not None:
            unassigned |= _outline(rgb, label_2d, id_class, colours)
        panel = Image.fromarray(rgb, "RGB")
        _mark(ImageDraw.Draw(panel), mine, theirs, (sy, sx), colours)
        panels.append((panel, {"z0": z0, "z1": z1, "slices": n_slices, "picks": len(mine),
                               "truth": len(theirs), "scale": (sy, sx)}))
    image = _compose(tomogram, panels, rows, true_rows, colours, unassigned, int(columns))
    log.debug("%s: preview %dx%d px, %d slabs, %d picks", tomogram.name, image.width, image.height, len(slabs),
              len(rows))
    return image


def write_preview(url: str | os.PathLike, image: Image.Image, *, storage_options: dict | None = None) -> str:
    """Save ``image`` as PNG to a local path (parents created; temporary file then rename) or to
    an fsspec URL (one upload). Returns ``url``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes_atomic(str(url), buffer.getvalue(), storage_options=storage_options)


def _rows(picks, name: str, default_radius: float, what: str) -> list[dict]:
    """Rows of this tomogram as dicts: class, centre (3,) ZYX, radius (voxels), instance_id or None."""
    out, other = [], 0
    for i, row in enumerate(picks):
        missing = [k for k in ("class", "z", "y", "x") if k not in row]
        if missing:
            raise TableError(what, f"row {i} has no {', '.join(repr(k) for k in missing)}; preview rows "
                             f"need 'class', 'z', 'y', 'x' (voxels), got keys {sorted(row)}")
        if row.get("tomogram") not in (None, name):
            other += 1
            continue
        centre = np.array([_number(row[k]) for k in ("z", "y", "x")])
        if not np.isfinite(centre).all():
            log.debug("%s: skipping %s row %d at non-finite position %s", name, what, i, centre)
            continue
        count, radius = _number(row.get("voxel_count")), _number(row.get("radius"))
        if count > 0:
            radius = (3.0 * count / (4.0 * math.pi)) ** (1.0 / 3.0)
        elif not radius > 0:
            radius = default_radius
        instance = _number(row.get("instance_id"))
        out.append({"class": str(row["class"]), "centre": centre, "radius": radius,
                    "instance_id": int(instance) if math.isfinite(instance) else None})
    if other:
        log.debug("%s: preview skips %d %s rows of other tomograms", name, other, what)
    return out


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _slab_of(row: dict, starts: np.ndarray) -> int:
    """Index of the slab holding the row's centre (centres outside the volume: the nearest slab)."""
    return int(np.searchsorted(starts, math.floor(row["centre"][0]), side="right"))


def _scale(shape_yx: tuple[int, int], target: int) -> float:
    """Pixels per voxel: an integer >= 1 when the slice fits in ``target``, else target / longest."""
    longest = max(shape_yx)
    return float(max(1, target // longest)) if longest <= target else target / longest


def _sampled_slices(z0: int, z1: int, max_slices: int) -> np.ndarray:
    if z1 - z0 <= max_slices:
        return np.arange(z0, z1)
    return np.unique(np.linspace(z0, z1 - 1, max(1, int(max_slices))).round().astype(int))


def _project(tomogram, z0: int, z1: int, scale: float, max_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the slab's (sampled) z slices at panel size, float32 (rows y, cols x); and the
    slice indices used. Reads at most about :data:`_READ_BYTES` at once."""
    sampled = _sampled_slices(z0, z1, max_slices)
    _, height, width = tomogram.shape
    total = np.zeros((height, width), np.float64)
    if len(sampled) == z1 - z0:  # contiguous: read in chunks
        step = max(1, _READ_BYTES // (height * width * 4))
        for a in range(z0, z1, step):
            total += tomogram.slab(0, a, min(z1, a + step)).sum(axis=0, dtype=np.float64)
    else:
        for z in sampled:
            total += tomogram.slab(0, int(z), int(z) + 1)[0]
    mean = (total / len(sampled)).astype(np.float32)
    if scale >= 1:
        return np.repeat(np.repeat(mean, int(scale), axis=0), int(scale), axis=1), sampled
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (width, height)
    return np.asarray(Image.fromarray(mean, "F").resize(size, Image.LANCZOS)), sampled


def _label_projection(labels, sampled: np.ndarray) -> np.ndarray:
    """(H, W) int64: the largest label over the sampled z slices (0 where none)."""
    out = None
    for z in sampled:
        z = int(z)
        part = labels.slab(0, z, z + 1)[0] if hasattr(labels, "slab") else np.asarray(labels[z])
        part = np.asarray(part).astype(np.int64)
        out = part if out is None else np.maximum(out, part)
    return out


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 MAD; the std when the MAD is 0)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median))) or float(values.std())
    return median, spread if spread > 0 else 1.0


def _to_u8(sigmas: np.ndarray) -> np.ndarray:
    """Standardised values to gray levels, -_CLIP_SIGMA -> 0 and +_CLIP_SIGMA -> 255."""
    scaled = (np.asarray(sigmas, np.float32) + _CLIP_SIGMA) * (255.0 / (2 * _CLIP_SIGMA))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _outline(rgb: np.ndarray, label_slice: np.ndarray, id_class: dict, colours: dict) -> bool:
    """Paint one-pixel boundaries of every label region into ``rgb`` (H', W', 3) in place.

    The (rows, cols) label image is resampled nearest-neighbour to the panel's size first, so
    outlines stay thin at any scale. Returns whether some region had no known class.
    """
    height, width = rgb.shape[:2]
    n_rows, n_cols = label_slice.shape
    ri = np.minimum(((np.arange(height) + 0.5) * n_rows / height).astype(np.intp), n_rows - 1)
    ci = np.minimum(((np.arange(width) + 0.5) * n_cols / width).astype(np.intp), n_cols - 1)
    shown = np.asarray(label_slice)[np.ix_(ri, ci)].astype(np.int64)
    if not shown.any():
        return False
    padded = np.pad(shown, 1)  # outside the slice counts as background: regions at the edge close
    centre = padded[1:-1, 1:-1]
    edge = ((centre != padded[:-2, 1:-1]) | (centre != padded[2:, 1:-1])
            | (centre != padded[1:-1, :-2]) | (centre != padded[1:-1, 2:])) & (centre != 0)
    ids, inverse = np.unique(shown[edge], return_inverse=True)
    table = np.array([colours.get(id_class.get(int(i)), UNASSIGNED_COLOUR) for i in ids], np.uint8).reshape(-1, 3)
    rgb[edge] = table[inverse.ravel()]
    return any(int(i) not in id_class for i in ids)


def _mark(draw: ImageDraw.ImageDraw, picks: list[dict], truth: list[dict], scale: tuple[float, float],
          colours: dict) -> None:
    """Circles for picks and crosses for true particles, at their radius (>= 3 pixels)."""
    sy, sx = scale
    for row, cross in [(r, False) for r in picks] + [(r, True) for r in truth]:
        cy = (row["centre"][1] + 0.5) * sy - 0.5
        cx = (row["centre"][2] + 0.5) * sx - 0.5
        ry, rx = max(3.0, row["radius"] * sy), max(3.0, row["radius"] * sx)  # tiny markers stay visible
        if cross:  # thin, so that the circle of a pick on it stays visible
            draw.line([cx - rx, cy, cx + rx, cy], fill=colours[row["class"]], width=1)
            draw.line([cx, cy - ry, cx, cy + ry], fill=colours[row["class"]], width=1)
        else:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=colours[row["class"]],
                         width=2 if min(rx, ry) >= 8 else 1)


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _legend(rows: list[dict], truth: list[dict], colours: dict, unassigned: bool) -> list[tuple]:
    """(kind, colour, text) entries: a swatch per class with what is counted, then the markers."""
    has_truth = bool(truth)
    entries = []
    for name, colour in colours.items():
        n_picks = sum(r["class"] == name for r in rows)
        n_true = sum(r["class"] == name for r in truth)
        text = f"{name}: {n_picks} pick{'s' * (n_picks != 1)}"
        entries.append(("swatch", colour, text + (f", {n_true} true" if has_truth else "")))
    if unassigned:
        entries.append(("swatch", UNASSIGNED_COLOUR, "mask, no class"))
    entries.append(("circle", _TEXT, "pick (circle: its radius)"))
    if has_truth:
        entries.append(("cross", _TEXT, "true particle"))
    return entries


def _compose(tomogram, panels: list, rows: list[dict], truth: list[dict], colours: dict, unassigned: bool,
             columns: int) -> Image.Image:
    """Title, legend and the slab panels (a grid, z increasing left to right, top to bottom)."""
    font = _font()
    ascent, descent = font.getmetrics()
    line = ascent + descent + 4
    d, h, w = tomogram.shape
    n = len(rows)
    title = (f"{tomogram.name}   {d} x {h} x {w} voxels (z, y, x)   {n} pick{'s' * (n != 1)}"
             + (f", {len(truth)} true particles" if truth else "") + "   panels: z slabs, mean projection")
    columns = max(1, min(columns, len(panels)))
    cell_w = max(p.width for p, _ in panels)
    cell_h = max(p.height for p, _ in panels) + 6 + line
    grid_w = columns * cell_w + _GAP * (columns - 1)
    width = max(grid_w, round(font.getlength(title))) + 2 * _MARGIN
    places, x, y = [], _MARGIN, _MARGIN + line  # legend entries wrap within the width
    for kind, colour, text in _legend(rows, truth, colours, unassigned):
        size = _SWATCH + 5 + round(font.getlength(text)) + 16
        if x + size > width - _MARGIN and x > _MARGIN:
            x, y = _MARGIN, y + line
        places.append((x, y, kind, colour, text))
        x += size
    top = y + line + 6
    n_rows = math.ceil(len(panels) / columns)
    height = top + n_rows * cell_h + (n_rows - 1) * _GAP + _MARGIN
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, _MARGIN), title, fill=_TEXT, font=font)
    for x, y, kind, colour, text in places:
        box = [x, y + (ascent - _SWATCH) // 2 + 2, x + _SWATCH - 1, y + (ascent - _SWATCH) // 2 + 1 + _SWATCH]
        if kind == "swatch":
            draw.rectangle(box, fill=colour)
        elif kind == "circle":
            draw.ellipse(box, outline=colour)
        else:
            mid_x, mid_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            draw.line([box[0], mid_y, box[2], mid_y], fill=colour)
            draw.line([mid_x, box[1], mid_x, box[3]], fill=colour)
        draw.text((x + _SWATCH + 5, y), text, fill=_TEXT, font=font)
    left0 = _MARGIN + (width - 2 * _MARGIN - grid_w) // 2
    info = []
    for i, (panel, meta) in enumerate(panels):
        left = left0 + (i % columns) * (cell_w + _GAP)
        panel_top = top + (i // columns) * (cell_h + _GAP)
        canvas.paste(panel, (left, panel_top))
        caption = f"z {meta['z0']}-{meta['z1'] - 1}"
        hint = f"  {meta['picks']} pick{'s' * (meta['picks'] != 1)}" + (f", {meta['truth']} true" if truth else "")
        draw.text((left, panel_top + panel.height + 6), caption, fill=_TEXT, font=font)
        if font.getlength(caption + hint) <= panel.width:
            draw.text((left + font.getlength(caption), panel_top + panel.height + 6), hint, fill=_MUTED, font=font)
        info.append({**meta, "box": (left, panel_top, left + panel.width, panel_top + panel.height)})
    canvas.info["panels"] = info
    return canvas
