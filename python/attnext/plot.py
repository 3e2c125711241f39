"""Attention-weight heatmaps (matplotlib is the optional extra: ``pip install "attnext[plot]"``).

- :func:`heatmap` draws one (Lq, Lk) weight matrix, rows = queries, columns = keys.
- :func:`heads` draws (H, Lq, Lk) weights as a grid, one panel per head.

Both run headless: when they create the figure themselves they use matplotlib's Agg canvas
(no display needed) and, given ``path``, write the image there.

Labels are drawn in their own script. When a label holds characters the default font lacks
(Chinese, Japanese, Korean, ...), a font that has them is looked up among the installed ones
(matplotlib's font list, and ``fc-list :lang=zh`` where fontconfig exists). If none is found a
:class:`MissingGlyphWarning` is issued and those labels are shown as code points (``U+6211``)
rather than as empty boxes; installing e.g. Noto Sans CJK (Debian/Ubuntu: ``fonts-noto-cjk``)
makes them render.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import warnings

import numpy as np

__all__ = ["heatmap", "heads", "MissingGlyphWarning", "font_for"]

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


def font_for(text: str):
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
    return " ".join(c if ord(c) < 0x2E80 else f"U+{ord(c):04X}" for c in label)


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


def _new_figure(figsize):
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw(ax, w, x_labels, y_labels, title, annotate, vmax):
    xl, xf = _prepare_labels(x_labels)
    yl, yf = _prepare_labels(y_labels)
    image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(w.shape[1]))
    ax.set_yticks(range(w.shape[0]))
    if xl is not None:
        ax.set_xticklabels(xl, rotation=45 if max(map(len, xl), default=0) > 3 else 0, ha="right" if
                           max(map(len, xl), default=0) > 3 else "center", fontfamily=xf)
    if yl is not None:
        ax.set_yticklabels(yl, fontfamily=yf)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is not None:
        (text,), family = _prepare_labels([title])
        ax.set_title(text, fontfamily=family)
    if annotate and w.size <= 400:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if w[i, j] < 0.6 * vmax else "black")
    return image


def _as_weights(weights, ndim: int, what: str) -> np.ndarray:
    w = np.asarray(weights)
    if w.dtype.kind not in "fiub":
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    if w.ndim != ndim:
        raise ValueError(f"weights must be {what}, got shape {tuple(w.shape)}")
    return w.astype(np.float64)


def _check_labels(labels, n: int, name: str, shape):
    if labels is not None and len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels but weights have shape {tuple(shape)}")


def heatmap(weights, *, x_labels=None, y_labels=None, ax=None, path=None, title=None, annotate=True):
    """Draws attention weights as a heatmap.

    Args:
        weights: (Lq, Lk) weights, rows = queries (y axis), columns = keys (x axis).
        x_labels: Lk key labels (tokens); y_labels: Lq query labels.
        ax: a matplotlib Axes to draw into; default a new figure (Agg canvas, headless).
        path: where to save the figure (any format matplotlib writes, e.g. ``.png``).
        title: the axes title.
        annotate: write each weight in its cell (matrices up to 400 cells).

    Returns:
        The matplotlib Figure.
    """
    w = _as_weights(weights, 2, "a (Lq, Lk) matrix")
    _check_labels(x_labels, w.shape[1], "x_labels", w.shape)
    _check_labels(y_labels, w.shape[0], "y_labels", w.shape)
    if ax is None:
        fig = _new_figure((1.2 + 0.55 * max(w.shape[1], 4), 1.0 + 0.5 * max(w.shape[0], 4)))
        ax = fig.add_subplot()
    else:
        _mpl()
        fig = ax.figure
    vmax = max(float(np.nanmax(w)) if w.size else 1.0, 1e-12)
    image = _draw(ax, w, x_labels, y_labels, title, annotate, vmax)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def heads(weights, *, x_labels=None, y_labels=None, path=None, title=None, cols=None, annotate=False):
    """Draws (H, Lq, Lk) attention weights as a grid, one panel per head.

    Args:
        weights: (H, Lq, Lk), e.g. one batch row of multi-head weights.
        x_labels, y_labels: key and query labels shared by every panel.
        path: where to save the figure.
        title: the figure title.
        cols: panels per row (default up to 4).
        annotate: write each weight in its cell.

    Returns:
        The matplotlib Figure.
    """
    w = _as_weights(weights, 3, "(H, Lq, Lk)")
    h, lq, lk = w.shape
    _check_labels(x_labels, lk, "x_labels", w.shape)
    _check_labels(y_labels, lq, "y_labels", w.shape)
    if h == 0:
        raise ValueError("weights have no heads: shape (0, Lq, Lk)")
    cols = min(h, 4) if cols is None else int(cols)
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    rows = -(-h // cols)
    fig = _new_figure((cols * (0.9 + 0.35 * max(lk, 4)), rows * (0.8 + 0.35 * max(lq, 4))))
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(float(np.nanmax(w)) if w.size else 1.0, 1e-12)
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= h:
            ax.set_axis_off()
            continue
        image = _draw(ax, w[index], x_labels, y_labels, f"head {index}", annotate, vmax)
    fig.colorbar(image, ax=axes, shrink=0.8)
    if title is not None:
        (text,), family = _prepare_labels([title])
        fig.suptitle(text, fontfamily=family)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
