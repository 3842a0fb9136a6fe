"""Figures of attributions (any matplotlib backend: inline in notebooks; the command line selects Agg).

Every map is drawn over the ORIGINAL image the user gave: the map lives in the model's input frame
(after resize + centre crop), so it is put back through the inverse of that geometry
(m2ib.core.geometry.InputFrame.to_original) and the part of the image the model never saw is hatched.
Ground-truth boxes are drawn where the sample knows them; caption tokens are shaded by their scores,
each word in black or white, whichever contrasts more with its shade (WCAG 2 contrast ratio).
The figure context (original images, input frame, hyperparameters) comes with every Attribution made
by m2ib.api.explain or the pipeline; for any other, pass image= (and frame=).
"""
from __future__ import annotations

import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw

from m2ib.core.errors import InputError
from m2ib.core.geometry import InputFrame
from m2ib.core.images import as_pil

#: Colour map of every attribution figure (the M2IB paper's figures use jet).
CMAP = "jet"
#: Longest side, in pixels, of a map put back on a large original (enough for any figure).
MAX_OVERLAY_SIDE = 1024
COLOURBAR_LABEL = "attribution (min-max per map / per caption)"
UNSEEN_NOTE = "hatched: cropped away by the model's preprocessing (never seen)"


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Write a matplotlib figure (parent folders created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---- colour rules ---------------------------------------------------------------------------------
def relative_luminance(rgb) -> float:
    """WCAG 2 relative luminance of an sRGB colour with channels in [0, 1]."""
    c = np.asarray(rgb, dtype=float)[:3]
    linear = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(linear @ [0.2126, 0.7152, 0.0722])


def text_colour(background) -> str:
    """'black' or 'white', whichever has the higher WCAG contrast ratio on `background` (RGB in [0, 1])."""
    lum = relative_luminance(background)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def _minmax(values: np.ndarray) -> np.ndarray:
    """Min-max over the finite entries (NaN kept); a constant map becomes 0."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return values
    lo, hi = values[finite].min(), values[finite].max()
    return (values - lo) / (hi - lo) if hi > lo else np.where(finite, 0.0, np.nan)


# ---- what a row needs ----------------------------------------------------------------------------
class PairView:
    """One pair as figures draw it: original image, boxes, caption, id, input frame, map (or None) and
    min-max word scores."""

    def __init__(self, image, boxes=(), caption=None, id="", frame=None, heat=None, words=(), scores=()):
        self.image = as_pil(image, "image")
        self.boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
        self.caption, self.id, self.frame, self.heat = caption, id, frame, heat
        self.words, self.scores = list(words), np.asarray(scores, dtype=float)

    @classmethod
    def of_sample(cls, sample, frame=None) -> "PairView":
        """The sample alone (no map): its image, boxes and caption."""
        return cls(sample.image, sample.boxes, sample.caption, sample.id, frame)

    @classmethod
    def of(cls, att, row: int, image=None, boxes=None, frame=None) -> "PairView":
        """Row `row` of an Attribution; image / boxes / frame override what it carries."""
        if not 0 <= row < len(att):
            raise InputError(f"row {row} is out of range: this Attribution has {len(att)} rows")
        sample = att.samples[row] if att.samples is not None else None
        if image is None and sample is None:
            raise InputError(f"{att.method}: this Attribution carries no source images; pass the original image "
                             f"(plot(row, image=<path or PIL image>, frame=adapter)), or make it with "
                             f"m2ib.api.explain / the pipeline, which attach them")
        if frame is not None and not isinstance(frame, InputFrame):
            frame = InputFrame.of(frame)                 # an adapter
        frame = frame or att.frame
        heat = None if att.image is None else att.image[row].detach().cpu().float().numpy()
        if heat is not None and frame is None:
            raise InputError(f"{att.method}: the model's input frame is unknown; pass frame=<the adapter> "
                             f"(or an m2ib.core.geometry.InputFrame)")
        words, scores = [], []
        if att.text is not None:
            pairs = att.word_scores(row)
            words, scores = [w for w, _ in pairs], _minmax(np.array([s for _, s in pairs]))
        return cls(image if image is not None else sample.image,
                   boxes if boxes is not None else (sample.boxes if sample is not None and image is None else ()),
                   sample.caption if sample is not None else None, sample.id if sample is not None else str(row),
                   frame, heat, words, scores)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def overlay(self, out_size) -> Optional[np.ndarray]:
        """The map over the original at out_size (w, h), min-max normalised, NaN where unseen."""
        if self.heat is None:
            return None
        return _minmax(self.frame.to_original(self.heat, self.size, out_size))

    def unseen(self) -> list[tuple[float, float, float, float]]:
        """(x, y, w, h) rectangles of the original that the model never saw (at most four strips)."""
        if self.frame is None:
            return []
        w, h = self.size
        x0, y0, x1, y1 = self.frame.visible_rect(self.size)
        strips = [(0, 0, x0, h), (x1, 0, w - x1, h), (x0, 0, x1 - x0, y0), (x0, y1, x1 - x0, h - y1)]
        return [s for s in strips if s[2] > 1e-6 and s[3] > 1e-6]


# ---- matplotlib drawing --------------------------------------------------------------------------
def hparam_text(hparams: Optional[dict], width: int = 60) -> str:
    """'key=value, ...' of the hyperparameters that were set (None = the model's default is left out)."""
    if not hparams:
        return ""
    parts = []
    for key, value in hparams.items():
        if value is None or key == "progress" or (key == "modalities" and len(value) == 2):
            continue
        value = f"{value:g}" if isinstance(value, float) else ("+".join(map(str, value)) if isinstance(value, (list, tuple))
                                                                else value)
        parts.append(f"{key}={value}")
    return "\n".join(textwrap.wrap(", ".join(parts), width))


def draw_image(ax, pair: PairView, cmap=CMAP, alpha: float = 0.5, with_map: bool = True) -> None:
    """The original image, the map over it (if any and with_map), the unseen part hatched, true boxes."""
    w, h = pair.size
    ax.imshow(np.asarray(pair.image), extent=(0, w, h, 0))
    if with_map and pair.heat is not None:
        scale = min(1.0, MAX_OVERLAY_SIDE / max(w, h))
        heat = pair.overlay((max(1, round(w * scale)), max(1, round(h * scale))))
        ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, alpha=alpha, vmin=0, vmax=1, extent=(0, w, h, 0),
                  interpolation="bilinear")
    for x, y, bw, bh in pair.unseen():
        ax.add_patch(plt.Rectangle((x, y), bw, bh, facecolor=(0.35, 0.35, 0.35, 0.6), edgecolor=(1, 1, 1, 0.7),
                                   hatch="///", linewidth=0))
    for x, y, bw, bh in pair.boxes:
        for colour, lw in (("black", 3.0), ("white", 1.5)):
            ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, edgecolor=colour, linewidth=lw))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_tokens(ax, words: Sequence[str], scores: Optional[Sequence[float]], cmap=CMAP, fontsize: float = 9) -> None:
    """Words left to right, wrapped to the axes' width, each on its score's colour (scores None: plain).
    Call after the figure's layout is final: positions are measured in the axes' current size."""
    ax.axis("off")
    if not words:
        return
    cmap = plt.get_cmap(cmap)
    renderer = ax.figure.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    pad_px = fontsize * 0.3 * ax.figure.dpi / 72
    x, y = 0.0, 1.0
    for i, word in enumerate(words):
        style = {}
        if scores is not None:
            shade = cmap(float(scores[i]))
            style = dict(color=text_colour(shade), bbox=dict(facecolor=shade, edgecolor="none", pad=fontsize * 0.3))
        t = ax.text(x, y, word, transform=ax.transAxes, fontsize=fontsize, va="top", ha="left", **style)
        ext = t.get_window_extent(renderer)
        step = (ext.width + 3 * pad_px) / box.width
        if x > 0 and x + step > 1.0:                    # wrap to the next line
            x, y = 0.0, y - (ext.height + 3 * pad_px) / box.height
            t.set_position((x, y))
        x += step


def _colourbar(fig, cax, cmap=CMAP):
    mappable = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label(COLOURBAR_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return bar


def plot_attribution(att, row: int = 0, *, image=None, boxes=None, frame=None, cmap=CMAP, alpha: float = 0.5,
                     width: float = 5.0):
    """One pair as a figure: the map over the original image (unseen part hatched, true boxes), the
    caption's words shaded by their scores, a colour bar, method + hyperparameters in the title.

    image / boxes / frame override (or, for an Attribution made elsewhere, supply) the original image,
    its (K, 4) x, y, w, h boxes and the model's input frame (an adapter or an InputFrame).
    Returns the matplotlib Figure (close it, or use Attribution.save_figure)."""
    pair = PairView.of(att, row, image, boxes, frame)
    w, h = pair.size
    extra = hparam_text(att.hparams, width=80)
    img_h = (width - 0.8) * h / w
    fig = plt.figure(figsize=(width, img_h + 0.85 + 0.13 * (extra.count("\n") + 1)))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 0.035], height_ratios=[img_h, 0.45])
    ax_img, cax, ax_txt = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    draw_image(ax_img, pair, cmap, alpha)
    _colourbar(fig, cax, cmap)
    fig.suptitle(f"{att.method}: pair {pair.id}" + (f"\n{extra}" if extra else ""), fontsize=7.5)
    if pair.unseen():
        fig.text(0.01, 0.005, UNSEEN_NOTE, fontsize=6, color="0.3", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    words = pair.words or (pair.caption.split() if pair.caption else [])
    draw_tokens(ax_txt, words, pair.scores if pair.words else None)
    return fig


def method_grid(attributions, rows: Optional[Sequence[int]] = None, *, cmap=CMAP, alpha: float = 0.5,
                cell: float = 1.9):
    """Pairs (rows) x methods (columns), the layout of Figure 1 of Wang et al. 2023 (M2IB): the first
    column is the original image with its true boxes and caption, then per method the map over the
    image and the caption's words shaded by the method's token scores; the hyperparameters are listed
    under the grid. attributions: a dict name -> Attribution or a list of Attributions over the SAME
    pairs. Returns the Figure."""
    if not isinstance(attributions, dict):
        attributions = {a.method: a for a in attributions}
    if not attributions:
        raise InputError("method_grid needs at least one Attribution")
    lengths = {name: len(a) for name, a in attributions.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"the Attributions cover different numbers of pairs: {lengths}")
    rows = list(range(min(4, next(iter(lengths.values()))))) if rows is None else list(rows)
    pairs = {name: [PairView.of(a, r) for r in rows] for name, a in attributions.items()}
    ids = {name: [p.id for p in ps] for name, ps in pairs.items()}
    if len({tuple(v) for v in ids.values()}) != 1:
        raise InputError(f"the Attributions are not over the same pairs: {ids}")
    inputs = next(iter(pairs.values()))
    aspect = max(p.size[1] / p.size[0] for p in inputs)
    ncols = len(attributions) + 1
    notes = [f"{name}: {hparam_text(a.hparams, width=10 ** 6) or 'defaults'}" for name, a in attributions.items()]
    notes = [line for note in notes for line in textwrap.wrap(note, int(cell * ncols * 16))]
    if any(p.unseen() for p in inputs):
        notes.append(UNSEEN_NOTE)
    footer = 0.13 * len(notes) + 0.1
    fig = plt.figure(figsize=(cell * ncols + 1.0, len(rows) * cell * (aspect + 0.25) + 0.3 + footer))
    grid = fig.add_gridspec(2 * len(rows), ncols, height_ratios=[aspect, 0.25] * len(rows))
    token_axes = []
    for r, base in enumerate(inputs):
        ax = fig.add_subplot(grid[2 * r, 0])
        draw_image(ax, base, cmap, alpha, with_map=False)
        ax.set_ylabel(base.id, fontsize=7)
        if r == 0:
            ax.set_title("input", fontsize=8)
        token_axes.append((fig.add_subplot(grid[2 * r + 1, 0]), base.caption.split() if base.caption else [], None))
        for c, name in enumerate(attributions, start=1):
            pair = pairs[name][r]
            ax = fig.add_subplot(grid[2 * r, c])
            draw_image(ax, pair, cmap, alpha)
            if r == 0:
                ax.set_title(name, fontsize=8)
            token_axes.append((fig.add_subplot(grid[2 * r + 1, c]), pair.words, pair.scores if pair.words else None))
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, footer / height, 1 - 0.9 / fig.get_figwidth(), 1), h_pad=0.2, w_pad=0.4)
    _colourbar(fig, fig.add_axes((1 - 0.8 / fig.get_figwidth(), 0.3, 0.1 / fig.get_figwidth(), 0.5)), cmap)
    fig.text(0.01, 0.005, "\n".join(notes), fontsize=6, color="0.25", va="bottom")
    for ax, words, scores in token_axes:
        draw_tokens(ax, words, scores, fontsize=6.5)
    return fig


# ---- fast thumbnails (no matplotlib: the HTML report draws thousands) ------------------------------
def thumbnail_of(pair: PairView, size: int, cmap=CMAP, alpha: float = 0.5, with_map: bool = True) -> Image.Image:
    w, h = pair.size
    scale = size / max(w, h)
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(pair.image.resize(out, Image.BILINEAR), dtype=np.float32) / 255.0
    heat = pair.overlay(out) if with_map else None
    if heat is not None:
        seen = np.isfinite(heat)
        colours = _lookup(cmap)[np.round(np.nan_to_num(heat) * 255).astype(int)]
        rgb[seen] = (1 - alpha) * rgb[seen] + alpha * colours[seen]
    unseen = np.zeros(rgb.shape[:2], dtype=bool)
    for x, y, bw, bh in pair.unseen():
        unseen[int(round(y * scale)):int(round((y + bh) * scale)), int(round(x * scale)):int(round((x + bw) * scale))] = True
    if unseen.any():
        stripes = (np.add.outer(np.arange(out[1]), np.arange(out[0])) // 3) % 2 == 0
        rgb[unseen] = 0.45 * rgb[unseen] + 0.55 * 0.35
        rgb[unseen & stripes] = 0.5 * rgb[unseen & stripes] + 0.5
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for x, y, bw, bh in pair.boxes * scale:
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], outline=(255, 255, 255), width=max(1, size // 96))
    return img


@lru_cache(maxsize=8)
def _lookup(cmap) -> np.ndarray:
    """(256, 3) RGB table of a colour map (built once: matplotlib rebuilds it on every get_cmap)."""
    return plt.get_cmap(cmap)(np.linspace(0, 1, 256))[:, :3].astype(np.float32)


def colour_table(cmap=CMAP) -> list[str]:
    """The colour map's 256 colours as hex (the HTML report shades tokens with them)."""
    return [matplotlib.colors.to_hex(c) for c in _lookup(cmap)]
