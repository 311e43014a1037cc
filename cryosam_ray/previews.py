"""Quick-look PNG previews: three central slices of a tomogram with its picks and mask outlines.

The picture has a title bar (tomogram name, shape, picks per class as a colour legend) over
three panels side by side: the central slice along z (rows y, columns x), along y (rows z,
columns x) and along x (rows z, columns y). Only those three slices are read. Every pick whose
sphere crosses a panel's slice is drawn there as a circle of the sphere's cross-section, and
every labelled region as a one-pixel outline, both in the colour of their class.

Coordinates are voxels, ZYX. All three panels share one scale, so a voxel has the same size on
each of them.
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

_AXES = ("z", "y", "x")
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_MUTED = (160, 160, 160)
_MARGIN = 10  # pixels around the picture
_GAP = 12  # pixels between panels
_SWATCH = 10  # legend swatch side, pixels
_CLIP_SIGMA = 3.0  # gray scale spans mean +- this many robust standard deviations


def class_colours(classes) -> dict[str, tuple[int, int, int]]:
    """Colour of each class: :data:`CLASS_COLOURS` cycled over the class names in sorted order."""
    names = sorted({str(c) for c in classes})
    return {name: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, name in enumerate(names)}


def render_preview(tomogram, picks: list[dict], labels: np.ndarray | None = None, *,
                   classes: list[str] | None = None, label_classes: dict[int, str] | None = None,
                   max_side: int = 512, pick_radius: float | None = None) -> Image.Image:
    """Draw the central z, y and x slices of ``tomogram`` with ``picks`` and ``labels`` outlines.

    Each slice is standardised with the tomogram's robust statistics (:meth:`Tomogram.normalize`)
    and shown in gray from -3 to +3 sigma. The panels share one scale: the volume's longest side
    becomes about ``max_side // 2`` pixels, by an integer nearest-neighbour factor for small
    volumes and by Lanczos resampling for large ones. Reads exactly three slices
    (``tomogram.slice`` once per axis); the robust statistics take one pass over the volume in
    slabs the first time a tomogram needs them (they are cached on it).

    Args:
        tomogram: a :class:`~cryosam_ray.tomo_io.Tomogram` (anything with ``shape`` (D, H, W),
            ``name``, ``slice(axis, index)`` and ``normalize(block, clip_sigma=...)``).
        picks: picks-table rows, dicts with ``class``, ``z``, ``y``, ``x`` (voxels, ZYX) and
            optionally ``voxel_count`` (sphere of that volume), ``radius`` (voxels),
            ``instance_id`` (its id in ``labels``) and ``tomogram`` (rows naming another
            tomogram are skipped).
        labels: optional (D, H, W) integer instance labels, 0 = background; may be a memmap.
        classes: every class of the run, so that colours agree between tomograms; classes of
            ``picks`` missing from it get the next colours. Default: the classes seen here.
        label_classes: instance id -> class, for outline colours; the picks' ``instance_id``
            fill in ids it does not give. Outlines of ids with no class are white.
        max_side: about twice a panel's longest side, in pixels (>= 32). The picture is about
            ``1.5 * max_side + 50`` pixels wide at most (wider only for a very long title).
        pick_radius: circle radius in voxels for picks with neither ``voxel_count`` nor
            ``radius``; default :data:`DEFAULT_PICK_RADIUS`.

    Returns:
        An RGB image. ``image.info["panels"]`` maps "z", "y", "x" to a dict with the slice
        ``index``, the panel ``box`` (left, top, right, bottom) in pixels and its ``scale``
        (rows, cols) in pixels per voxel: voxel (r, c) of that slice is centred at pixel
        (left + (c + 0.5) * scale[1] - 0.5, top + (r + 0.5) * scale[0] - 0.5).

    Raises:
        TableError: a pick without ``class``, ``z``, ``y`` or ``x``.
        ValueError: ``labels`` not of the tomogram's shape, or ``max_side`` below 32.
    """
    shape = tuple(int(s) for s in tomogram.shape)
    if int(max_side) < 32:
        raise ValueError(f"max_side must be >= 32 pixels; got {max_side}")
    if labels is not None and tuple(labels.shape) != shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected the tomogram's shape {shape} "
                         f"(D, H, W) for {tomogram.name}")
    rows = _pick_rows(picks, tomogram.name, DEFAULT_PICK_RADIUS if pick_radius is None else float(pick_radius))
    id_class = {r["instance_id"]: r["class"] for r in rows if r["instance_id"] is not None}
    id_class.update({int(k): str(v) for k, v in (label_classes or {}).items()})
    extra = {r["class"] for r in rows} | set(id_class.values())
    ordered = sorted(set(classes or ()))
    ordered += sorted(extra - set(ordered))
    colours = {name: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, name in enumerate(ordered)}

    scale = _scale(shape, max(1, int(max_side) // 2))
    panels, unassigned = [], False
    for axis in range(3):
        index = shape[axis] // 2
        panel, scales, missing = _panel(tomogram, axis, index, scale, rows, labels, id_class, colours)
        panels.append((axis, index, panel, scales))
        unassigned |= missing
    counts = {name: sum(r["class"] == name for r in rows) for name in ordered}
    image = _compose(tomogram, panels, counts, colours, unassigned, len(rows))
    log.debug("%s: preview %dx%d px, %d picks", tomogram.name, image.width, image.height, len(rows))
    return image


def write_preview(url: str | os.PathLike, image: Image.Image, *, storage_options: dict | None = None) -> str:
    """Save ``image`` as PNG to a local path (parents created; temporary file then rename) or to
    an fsspec URL (one upload). Returns ``url``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes_atomic(str(url), buffer.getvalue(), storage_options=storage_options)


def _pick_rows(picks, name: str, default_radius: float) -> list[dict]:
    """Picks of this tomogram as dicts: class, centre (3,) ZYX, radius (voxels), instance_id or None."""
    out, other = [], 0
    for i, row in enumerate(picks):
        missing = [k for k in ("class", "z", "y", "x") if k not in row]
        if missing:
            raise TableError("picks", f"row {i} has no {', '.join(repr(k) for k in missing)}; preview rows "
                             f"need 'class', 'z', 'y', 'x' (voxels), got keys {sorted(row)}")
        if row.get("tomogram") not in (None, name):
            other += 1
            continue
        centre = np.array([_number(row[k]) for k in ("z", "y", "x")])
        if not np.isfinite(centre).all():
            log.debug("%s: skipping pick %d at non-finite position %s", name, i, centre)
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
        log.info("%s: preview skips %d picks of other tomograms", name, other)
    return out


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scale(shape: tuple[int, int, int], target: int) -> float:
    """Pixels per voxel: an integer >= 1 when the volume fits in ``target``, else target / longest."""
    longest = max(shape)
    return float(max(1, target // longest)) if longest <= target else target / longest


def _panel(tomogram, axis: int, index: int, scale: float, rows: list[dict], labels, id_class: dict,
           colours: dict) -> tuple[Image.Image, tuple[float, float], bool]:
    """One slice as an RGB panel with outlines and circles; returns (image, (sy, sx), any unassigned)."""
    gray = tomogram.normalize(tomogram.slice(axis, index), clip_sigma=_CLIP_SIGMA)
    n_rows, n_cols = gray.shape
    size = (max(1, round(n_cols * scale)), max(1, round(n_rows * scale)))  # PIL: (width, height)
    if scale >= 1:
        u8 = _to_u8(gray)
        u8 = np.repeat(np.repeat(u8, int(scale), axis=0), int(scale), axis=1)
    else:
        u8 = _to_u8(np.asarray(Image.fromarray(gray.astype(np.float32), "F").resize(size, Image.LANCZOS)))
    rgb = np.repeat(u8[:, :, None], 3, axis=2)
    sy, sx = u8.shape[0] / n_rows, u8.shape[1] / n_cols
    unassigned = False
    if labels is not None:
        unassigned = _outline(rgb, np.take(labels, index, axis=axis), id_class, colours)
    panel = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(panel)
    others = [a for a in range(3) if a != axis]
    for row in rows:
        offset = row["centre"][axis] - index
        if abs(offset) >= row["radius"]:
            continue
        r_vox = math.sqrt(row["radius"] ** 2 - offset ** 2)
        cy = (row["centre"][others[0]] + 0.5) * sy - 0.5
        cx = (row["centre"][others[1]] + 0.5) * sx - 0.5
        ry, rx = max(3.0, r_vox * sy), max(3.0, r_vox * sx)  # tiny circles stay visible
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=colours[row["class"]],
                     width=2 if min(rx, ry) >= 8 else 1)
    return panel, (sy, sx), unassigned


def _to_u8(sigmas: np.ndarray) -> np.ndarray:
    """Standardised values to gray levels, -_CLIP_SIGMA -> 0 and +_CLIP_SIGMA -> 255."""
    scaled = (np.asarray(sigmas, np.float32) + _CLIP_SIGMA) * (255.0 / (2 * _CLIP_SIGMA))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _outline(rgb: np.ndarray, label_slice: np.ndarray, id_class: dict, colours: dict) -> bool:
    """Paint one-pixel boundaries of every label region into ``rgb`` (H', W', 3) in place.

    The (rows, cols) label slice is resampled nearest-neighbour to the panel's size first, so
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


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _compose(tomogram, panels: list, counts: dict, colours: dict, unassigned: bool, n_picks: int) -> Image.Image:
    """Title, legend and the three panels (top-aligned, left to right) on one canvas."""
    font = _font()
    ascent, descent = font.getmetrics()
    line = ascent + descent + 4
    d, h, w = tomogram.shape
    title = f"{tomogram.name}   {d} x {h} x {w} voxels (z, y, x)   {n_picks} pick{'s' * (n_picks != 1)}"
    entries = [(colours[name], f"{name}: {count}") for name, count in counts.items()]
    if unassigned:
        entries.append((UNASSIGNED_COLOUR, "mask, no class"))
    panels_width = sum(p.width for _, _, p, _ in panels) + _GAP * (len(panels) - 1)
    width = max(panels_width, round(font.getlength(title))) + 2 * _MARGIN
    places, x, y = [], _MARGIN, _MARGIN + line  # legend entries wrap within the width
    for colour, text in entries:
        size = _SWATCH + 5 + round(font.getlength(text)) + 16
        if x + size > width - _MARGIN and x > _MARGIN:
            x, y = _MARGIN, y + line
        places.append((x, y, colour, text))
        x += size
    top = (y + line if entries else y) + 6
    panels_height = max(p.height for _, _, p, _ in panels)
    height = top + panels_height + 6 + line + _MARGIN
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, _MARGIN), title, fill=_TEXT, font=font)
    for x, y, colour, text in places:
        box_top = y + (ascent - _SWATCH) // 2 + 2
        draw.rectangle([x, box_top, x + _SWATCH - 1, box_top + _SWATCH - 1], fill=colour)
        draw.text((x + _SWATCH + 5, y), text, fill=_TEXT, font=font)
    left, info = _MARGIN + (width - 2 * _MARGIN - panels_width) // 2, {}
    for axis, index, panel, scales in panels:
        canvas.paste(panel, (left, top))
        others = [_AXES[a] for a in range(3) if a != axis]
        caption = f"{_AXES[axis]} = {index}"
        hint = f"  (rows {others[0]}, cols {others[1]})"
        draw.text((left, top + panel.height + 6), caption, fill=_TEXT, font=font)
        if font.getlength(caption + hint) <= panel.width:
            draw.text((left + font.getlength(caption), top + panel.height + 6), hint, fill=_MUTED, font=font)
        info[_AXES[axis]] = {"index": index, "box": (left, top, left + panel.width, top + panel.height),
                             "scale": scales}
        left += panel.width + _GAP
    canvas.info["panels"] = info
    return canvas
