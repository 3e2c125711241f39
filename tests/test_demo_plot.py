"""attnext demo and attnext.plot: headless heatmaps, CJK labels, the optional-extra error."""

import importlib
import sys
import warnings

import numpy as np
import pytest

from attnext import demo
from attnext.__main__ import main

PNG = b"\x89PNG\r\n\x1a\n"


def _weights(rng, *shape):
    w = rng.random(shape)
    return w / w.sum(-1, keepdims=True)


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.delitem(sys.modules, "attnext.plot", raising=False)
    with pytest.raises(ImportError, match=r'pip install "attnext\[plot\]"'):
        importlib.import_module("attnext.plot")


def test_bench_plot_without_matplotlib_names_the_extra(monkeypatch):
    from attnext.bench import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"attnext\[plot\]"):
        report.plot({"cases": []}, "x.png")


def test_demo_text_shows_the_steps(capsys):
    w_zh = demo.self_attention_steps(["我", "是", "谁"], say=print)
    out = capsys.readouterr().out
    np.testing.assert_allclose(w_zh.sum(-1), 1.0, rtol=1e-12)
    assert out.count("1.000000") == 3
    for step in ("Q = X W_q", "scores", "softmax", "weighted sum", "same as the NumPy reference"):
        assert step in out
    weights, src, words = demo.luong_translation(say=lambda *a: None)
    assert src == ["who", "am", "I"] and words == ["我", "是", "谁"]
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-12)
    assert list(weights.argmax(-1)) == [2, 1, 0]  # 我 <- I, 是 <- am, 谁 <- who: anti-diagonal


def test_demo_shows_a_learned_alignment(capsys):
    """The shipped weights (trained by examples/train_seq2seq.py) read a date, and each output
    digit's strongest attention is on the input character it copies."""
    source = "wednesday, november 25, 2026"
    weights, chars, out = demo.learned_alignment(source, say=print)
    assert "".join(out) == "2026-11-25" and chars == list(source)
    assert weights.shape == (10, len(source))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-4)
    strongest = weights.argmax(-1)
    year, day, month = source.index("2026"), source.index("25"), source.index("november")
    assert all(year <= j < year + 4 for j in strongest[:4])
    assert list(strongest[2:4]) == [year + 2, year + 3]  # "26" read from "26"
    assert list(strongest[8:]) == [day, day + 1]
    assert all(month <= j < month + len("november") for j in strongest[5:7])
    assert "2026-11-25" in capsys.readouterr().out
    numeric = demo.learned_alignment("25.11.2026", say=lambda *a: None)
    assert "".join(numeric[2]) == "2026-11-25" and list(numeric[0].argmax(-1)[8:]) == [0, 1]


def test_demo_without_matplotlib_still_explains(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "attnext.plot", raising=False)
    assert demo.run(out=str(tmp_path / "d")) == 0
    captured = capsys.readouterr()
    assert "translation: 我 是 谁" in captured.out
    assert "attnext[plot]" in captured.err
    assert not (tmp_path / "d").exists()


# ---- below: matplotlib needed ----------------------------------------------------------------

@pytest.fixture
def plot():
    pytest.importorskip("matplotlib")
    from attnext import plot

    return plot


def test_demo_writes_heatmaps(plot, tmp_path, capsys):
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plot.MissingGlyphWarning)  # fine on machines without CJK fonts
        assert main(["demo", "--out", str(out), "--quiet"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["learned_dates.png", "luong_who_am_i.png", "self_attention_en.png", "self_attention_zh.png"]
    for p in out.iterdir():
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 2000
    assert capsys.readouterr().out == ""  # --quiet prints nothing (issue 14)


def test_heatmap_headless(plot, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    w = _weights(np.random.default_rng(0), 4, 5)
    path = tmp_path / "h.png"
    fig = plot.heatmap(w, x_labels=list("abcde"), y_labels=["w", "x", "y", "z"], path=path, title="t")
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert path.read_bytes()[:8] == PNG
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcde")
    assert ax.images[0].get_array().shape == (4, 5)
    np.testing.assert_allclose(ax.images[0].get_array(), w)


def test_heatmap_into_given_axes(plot):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    assert plot.heatmap(np.eye(3), ax=ax) is fig
    assert len(ax.images) == 1


def test_heatmap_errors(plot):
    with pytest.raises(ValueError, match=r"x_labels has 2 labels but weights have shape \(3, 3\)"):
        plot.heatmap(np.eye(3), x_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"\(Lq, Lk\) matrix, got shape \(2, 3, 3\)"):
        plot.heatmap(np.ones((2, 3, 3)))
    with pytest.raises(TypeError, match="real numbers"):
        plot.heatmap(np.array([["a"]]))
    with pytest.raises(ValueError, match=r"\(H, Lq, Lk\)"):
        plot.heads(np.eye(3))


def test_heads_grid(plot, tmp_path):
    w = _weights(np.random.default_rng(1), 6, 3, 4)
    path = tmp_path / "heads.png"
    fig = plot.heads(w, x_labels=list("abcd"), y_labels=list("xyz"), path=path, title="six heads")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    assert [ax.get_title() for ax in panels] == [f"head {i}" for i in range(6)]
    np.testing.assert_allclose(panels[5].images[0].get_array(), w[5])
    assert path.read_bytes()[:8] == PNG


def test_cjk_labels_render_or_warn(plot, tmp_path):
    """With a CJK font installed the labels are drawn as they are; without one, a warning and
    code points, never silent boxes."""
    labels = ["我", "是", "谁"]
    try:
        family = plot.font_for("".join(labels))
    except LookupError:
        family = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plot.heatmap(np.eye(3), x_labels=labels, y_labels=labels, path=tmp_path / "zh.png")
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    if family is not None:
        assert shown == labels
        assert not [w for w in caught if issubclass(w.category, plot.MissingGlyphWarning)]
    else:
        assert shown == ["U+6211", "U+662F", "U+8C01"]
        assert [w for w in caught if issubclass(w.category, plot.MissingGlyphWarning)]


def test_cjk_fallback_when_no_font_is_found(plot, monkeypatch):
    monkeypatch.setattr(plot, "_candidate_fonts", lambda: ())
    with pytest.warns(plot.MissingGlyphWarning, match="fonts-noto-cjk"):
        fig = plot.heatmap(np.eye(2), x_labels=["我", "a"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["U+6211", "a"]
