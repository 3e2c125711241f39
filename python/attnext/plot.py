"""Attention-weight heatmaps (matplotlib is the optional extra: ``pip install "attnext[plot]"``).

- :func:`heatmap` draws one (Lq, Lk) weight matrix, rows = queries, columns = keys.
- :func:`heads` draws (H, Lq, Lk) weights as a grid, one panel per head.

Both run headless: when they create the figure themselves they use matplotlib's Agg canvas
(no display needed) and, given ``path``, write the image there.

Any size plots: the figure grows with the number of tokens up to a cap (no side above
``MAX_SIDE_PX`` = 1600 pixels at the saved ``DPI`` = 120, whatever Lq and Lk), tick labels are
thinned to every 2nd, 5th, 10th, ... token when they would not fit side by side, and a matrix
with more rows or columns than the axes have pixels is drawn reduced by block maximum (each
pixel shows the largest weight of the tokens it covers, so one sharp weight stays visible).
A 2048 x 2048 matrix plots in about a second. ``key_lengths``/``query_lengths`` hide padding:
only the first that many keys/queries are drawn.

Labels are drawn in their own script. When a label holds characters the default font lacks
(Chinese, Japanese, Korean, ...), a font that has them is looked up among the installed ones
(matplotlib's font list, and ``fc-list :lang=zh`` where fontconfig exists). If none is found a
:class:`MissingGlyphWarning` is issued and those labels are shown as code points (``U+6211``)
rather than as empty boxes; installing e.g. Noto Sans CJK (Debian/Ubuntu: ``fonts-noto-cjk``)
makes them render.
"""

from __future__ import annotations

import functools
import math
import operator
import re
import shutil
import subprocess
import warnings

from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import os

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["heatmap", "heads", "MissingGlyphWarning", "font_for", "DPI", "MAX_SIDE_PX"]

_EXTRA_HINT = 'attnext.plot needs matplotlib, the optional extra: pip install "attnext[plot]"'

# Families known to cover CJK ideographs; the actual glyph coverage is checked before use.
_CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Serif CJK SC",
    "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN", "SimHei", "Microsoft YaHei", "PingFang SC",
    "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS", "Unifont",
)


class MissingGlyphWarning(UserWarning):
    """No installed font has the glyphs a label needs; the label is shown as code points."""


try:
    import matplotlib as _matplotlib  # noqa: F401  (only to fail early with the extra's name)
except ImportError as _exc:
    raise ImportError(_EXTRA_HINT) from _exc


def _mpl():
    import matplotlib

    return matplotlib


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except Exception:  # unreadable or collection entry FT2Font cannot open
        return frozenset()


@functools.lru_cache(maxsize=1)
def _candidate_fonts() -> tuple:
    """(family, path) of installed fonts that may cover CJK: fontconfig's zh list first, then
    matplotlib's font list filtered by known family names."""
    from matplotlib import font_manager

    found = []
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", ":lang=zh", "family", "file"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        # Regular weights first, so labels are not drawn in bold.
        for line in sorted(out.splitlines(), key=lambda x: ("Regular" not in x, x)):
            path, _, family = line.partition(":")
            family = family.strip().split(",")[0]
            if path and family:
                found.append((family, path.strip()))
    known = {name.lower() for name in _CJK_FAMILIES}
    for entry in font_manager.fontManager.ttflist:
        if entry.name.lower() in known or "cjk" in entry.name.lower():
            found.append((entry.name, entry.fname))
    return tuple(found)


def _default_font_path() -> str:
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties(), fallback_to_default=True)


def font_for(text: str) -> Optional[str]:
    """The family name of an installed font that has every glyph of ``text`` (None when the
    default font has them all); raises LookupError when no installed font has them."""
    _mpl()
    needed = {ord(c) for c in text if not c.isspace()}
    if needed <= _charmap(_default_font_path()):
        return None
    from matplotlib import font_manager

    for _, path in _candidate_fonts():
        if needed <= _charmap(path):
            try:  # make sure matplotlib can resolve the family (fonts added after its cache was built)
                font_manager.fontManager.addfont(path)
                return font_manager.get_font(path).family_name
            except Exception:
                continue
    raise LookupError(f"no installed font has the glyphs of {text!r}")


def _escape(label: str) -> str:
    """Each character from the CJK blocks on as its code point (``我 是`` -> ``U+6211 U+662F``)."""
    return re.sub("[\u2e80-\U0010ffff]+", lambda m: " ".join(f"U+{ord(c):04X}" for c in m.group()), label)


def _prepare_labels(labels):
    """(labels, fontfamily list or None) so every label renders; warns and escapes otherwise."""
    if labels is None:
        return None, None
    labels = [str(x) for x in labels]
    try:
        family = font_for("".join(labels))
    except LookupError:
        warnings.warn(
            "no installed font has the glyphs of the labels " + repr(labels) + "; showing them as code points. "
            "Install a CJK font (e.g. fonts-noto-cjk) to see them.",
            MissingGlyphWarning, stacklevel=4,
        )
        return [_escape(x) for x in labels], None
    if family is None:
        return labels, None
    from matplotlib import font_manager

    return labels, [family, font_manager.get_font(_default_font_path()).family_name]


DPI = 120
"""Dots per inch of the saved images."""
MAX_SIDE_PX = 1600
"""No side of a figure made here is larger, in pixels at ``DPI``, whatever Lq and Lk."""
_MAX_SIDE_IN = MAX_SIDE_PX / DPI
# Inches per key column / query row while the figure is below the cap: room for a 4-letter token.
_CELL_W, _CELL_H = 0.55, 0.5
# Space a tick label needs along its axis, in units of its font size: rotated (or short) x labels
# and y labels stacked one above the other.
_X_SPACING, _Y_SPACING = 1.8, 1.5


def _new_figure(figsize):
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = (min(max(float(s), 1.0), _MAX_SIDE_IN) for s in figsize)
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _nice_step(k: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least k."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= k:
                return step * m
        step *= 10


def _label_size_pt(which: str) -> float:
    from matplotlib import rcParams
    from matplotlib.font_manager import FontProperties

    return FontProperties(size=rcParams[f"{which}tick.labelsize"]).get_size_in_points()


def _axes_size_pt(ax, colorbar: bool):
    """The axes' (width, height) in points, estimated before layout (a little on the small side:
    the colorbar and the labels take their share of the figure when it is laid out)."""
    fig = ax.figure
    pos = ax.get_position()
    width = pos.width * fig.get_figwidth() * 72 * (0.85 if colorbar else 1.0)
    return max(width, 1.0), max(pos.height * fig.get_figheight() * 72, 1.0)


def _display_width(label: str) -> int:
    return sum(2 if ord(c) >= 0x1100 else 1 for c in label)


def _ticks(n: int, length_pt: float, spacing_pt: float):
    """Tick positions 0, step, 2 step, ... with the step such that labels stay spacing_pt apart."""
    fits = max(int(length_pt // spacing_pt), 1)
    return list(range(0, n, _nice_step(math.ceil(n / fits)))) if n else []


def _reduce(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """w shrunk by block maximum to at most (rows, cols) (NaN only where a whole block is NaN)."""
    fq, fk = max(1, math.ceil(w.shape[0] / max(rows, 1))), max(1, math.ceil(w.shape[1] / max(cols, 1)))
    if fq == 1 and fk == 1:
        return w
    lq, lk = -(-w.shape[0] // fq) * fq, -(-w.shape[1] // fk) * fk
    padded = np.full((lq, lk), np.nan)
    padded[: w.shape[0], : w.shape[1]] = w
    return np.fmax.reduce(padded.reshape(lq // fq, fq, lk // fk, fk), axis=(1, 3))


def _draw(ax, w, x_labels, y_labels, title, annotate, vmax, colorbar=True):
    lq, lk = w.shape
    xl, xf = _prepare_labels(x_labels)
    yl, yf = _prepare_labels(y_labels)
    width_pt, height_pt = _axes_size_pt(ax, colorbar)
    dpi = max(ax.figure.dpi, DPI)
    shown = _reduce(w, int(height_pt / 72 * dpi), int(width_pt / 72 * dpi))
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest",
                      extent=(-0.5, lk - 0.5, lq - 0.5, -0.5))
    ax.set_xlim(-0.5, lk - 0.5)
    ax.set_ylim(lq - 0.5, -0.5)
    x_size, y_size = _label_size_pt("x"), _label_size_pt("y")
    rotate = xl is not None and max(map(_display_width, xl), default=0) > 3
    x_spacing = x_size * (_X_SPACING if rotate or xl is None else max(_X_SPACING, 0.65 * max(
        map(_display_width, xl), default=1) + 0.6))
    xt = _ticks(lk, width_pt, x_spacing if xl is not None else max(x_spacing, 0.65 * x_size * len(str(lk)) + x_size))
    yt = _ticks(lq, height_pt, y_size * _Y_SPACING)
    ax.set_xticks(xt, [xl[i] for i in xt] if xl is not None else [str(i) for i in xt],
                  rotation=45 if rotate else 0, ha="right" if rotate else "center", fontfamily=xf)
    ax.set_yticks(yt, [yl[i] for i in yt] if yl is not None else [str(i) for i in yt], fontfamily=yf)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is not None:
        (text,), family = _prepare_labels([title])
        ax.set_title(text, fontfamily=family, wrap=True)
    # Numbers in the cells only while every cell shows (no reduction) and has room for "0.00".
    if annotate and w.size <= 400 and shown is w and width_pt / lk >= 20 and height_pt / lq >= 9:
        for i in range(lq):
            for j in range(lk):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if w[i, j] < 0.6 * vmax else "black")
    return image


def _save(fig, path, own: bool):
    """Saves at DPI. A PNG of a figure made here is drawn once (savefig draws twice under a
    layout engine, resampling every image twice) and compressed at zlib level 1: a heatmap of
    noisy weights barely compresses, so the default level costs time for little size (figures in
    docs/benchmarks.md)."""
    if own and str(path).lower().endswith(".png"):
        fig.canvas.print_png(path, pil_kwargs={"compress_level": 1})
    else:
        fig.savefig(path, dpi=DPI)


def _as_weights(weights, ndim: int, what: str) -> np.ndarray:
    w = np.asarray(weights)
    if w.dtype.kind not in "fiub":
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    if w.ndim != ndim:
        hint = ""
        if ndim == 2 and w.ndim == 3:
            hint = ("; for (H, Lq, Lk) weights use attnext.plot.heads(weights) (one panel per head), "
                    "or pick one head: heatmap(weights[h])")
        elif w.ndim == 4:
            hint = "; for (B, H, Lq, Lk) weights pick a batch entry: attnext.plot.heads(weights[b])"
        elif ndim == 3 and w.ndim == 2:
            hint = "; for one (Lq, Lk) matrix use attnext.plot.heatmap(weights)"
        raise ValueError(f"weights must be {what}, got shape {tuple(w.shape)}{hint}")
    if w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"weights of shape {tuple(w.shape)} have no queries or no keys: nothing to draw")
    return np.asarray(w, dtype=np.float64)


def _length(value, n: int, name: str, shape):
    """The number of rows/columns to keep: `value` (an int in [1, n]) or all n."""
    if value is None:
        return n
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer (one matrix's length), got {value!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be between 1 and {n} for weights of shape {tuple(shape)}, got {k}")
    return k


def _fit_labels(labels, n: int, kept: int, name: str, shape):
    """Labels for the `kept` drawn tokens: given for all n tokens (padding's cut off) or for the kept."""
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) not in (n, kept):
        expect = f"{n}" if n == kept else f"{n} (or {kept}, the unpadded length)"
        raise ValueError(f"{name} has {len(labels)} labels but weights have shape {tuple(shape)}: expected {expect}")
    return labels[:kept]


def _vmax(w) -> float:
    finite = w[np.isfinite(w)]
    return max(float(finite.max()) if finite.size else 1.0, 1e-12)


def heatmap(weights: npt.ArrayLike, *, x_labels: Optional[Sequence[object]] = None,
            y_labels: Optional[Sequence[object]] = None, ax: Optional[Axes] = None,
            path: Union[str, os.PathLike, None] = None, title: Optional[str] = None, annotate: bool = True,
            key_lengths: Optional[int] = None, query_lengths: Optional[int] = None) -> Figure:
    """Draws attention weights as a heatmap.

    Args:
        weights: (Lq, Lk) weights, rows = queries (y axis), columns = keys (x axis). For
            (H, Lq, Lk) weights use :func:`heads`.
        x_labels: Lk key labels (tokens); y_labels: Lq query labels. Thinned to every 2nd, 5th,
            10th, ... when there are more than fit.
        ax: a matplotlib Axes to draw into; default a new figure (Agg canvas, headless), sized
            with the tokens up to ``MAX_SIDE_PX`` pixels a side.
        path: where to save the figure (any format matplotlib writes, e.g. ``.png``), at ``DPI``.
        title: the axes title (wrapped to fit the figure).
        annotate: write each weight in its cell (matrices up to 400 cells, when the cells have room).
        key_lengths: hide the padding keys: draw only the first ``key_lengths`` columns (an int;
            the same number you pass to the attention). Labels may be given for all Lk keys.
        query_lengths: likewise for the rows (queries).

    Returns:
        The matplotlib Figure.
    """
    w = _as_weights(weights, 2, "a (Lq, Lk) matrix")
    shape = w.shape
    kq = _length(query_lengths, shape[0], "query_lengths", shape)
    kk = _length(key_lengths, shape[1], "key_lengths", shape)
    x_labels = _fit_labels(x_labels, shape[1], kk, "x_labels", shape)
    y_labels = _fit_labels(y_labels, shape[0], kq, "y_labels", shape)
    w = w[:kq, :kk]
    if ax is None:
        fig = _new_figure((1.2 + _CELL_W * max(w.shape[1], 4), 1.0 + _CELL_H * max(w.shape[0], 4)))
        ax, own = fig.add_subplot(), True
    else:
        _mpl()
        fig, own = ax.figure, False
    image = _draw(ax, w, x_labels, y_labels, title, annotate, _vmax(w))
    fig.colorbar(image, ax=ax, shrink=0.8)
    if path is not None:
        _save(fig, path, own=own)
    return fig


def heads(weights: npt.ArrayLike, *, x_labels: Optional[Sequence[object]] = None,
          y_labels: Optional[Sequence[object]] = None, path: Union[str, os.PathLike, None] = None,
          title: Optional[str] = None, cols: Optional[int] = None, annotate: bool = False,
          key_lengths: Optional[int] = None, query_lengths: Optional[int] = None) -> Figure:
    """Draws (H, Lq, Lk) attention weights as a grid, one panel per head.

    Args:
        weights: (H, Lq, Lk), e.g. one batch entry of multi-head weights (``weights[b]``).
        x_labels, y_labels: key and query labels shared by every panel (thinned as in :func:`heatmap`).
        path: where to save the figure (at ``DPI``; no side above ``MAX_SIDE_PX`` pixels).
        title: the figure title.
        cols: panels per row (default up to 4).
        annotate: write each weight in its cell.
        key_lengths, query_lengths: hide the padding, as in :func:`heatmap`.

    Returns:
        The matplotlib Figure.
    """
    w = _as_weights(weights, 3, "(H, Lq, Lk)")
    h, lq, lk = w.shape
    kq = _length(query_lengths, lq, "query_lengths", w.shape)
    kk = _length(key_lengths, lk, "key_lengths", w.shape)
    x_labels = _fit_labels(x_labels, lk, kk, "x_labels", w.shape)
    y_labels = _fit_labels(y_labels, lq, kq, "y_labels", w.shape)
    if h == 0:
        raise ValueError("weights have no heads: shape (0, Lq, Lk)")
    w = w[:, :kq, :kk]
    cols = min(h, 4) if cols is None else int(cols)
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    rows = -(-h // cols)
    fig = _new_figure((0.8 + cols * (0.9 + 0.35 * max(kk, 4)), 0.4 + rows * (0.8 + 0.35 * max(kq, 4))))
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = _vmax(w)
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= h:
            ax.set_axis_off()
            continue
        image = _draw(ax, w[index], x_labels, y_labels, f"head {index}", annotate, vmax, colorbar=False)
    fig.colorbar(image, ax=axes, shrink=0.8, fraction=0.03, aspect=40)  # a slim bar beside the whole grid
    if title is not None:
        (text,), family = _prepare_labels([title])
        fig.suptitle(text, fontfamily=family, wrap=True)
    if path is not None:
        _save(fig, path, own=True)
    return fig
