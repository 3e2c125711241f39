"""Heatmaps that scale (issue 14): bounded pixels and memory for any Lq, Lk, thinned labels that
do not overlap, padding hidden by key_lengths/query_lengths, the (H, L, L) hint, titles that fit,
and a quiet `attnext demo --quiet`."""

import struct
import warnings

import numpy as np
import pytest

from conftest import NOT_UNDER_SANITIZERS, peak_rss_growth

pytest.importorskip("matplotlib")

from attnext import demo, plot  # noqa: E402
from attnext.__main__ import main  # noqa: E402


def _weights(rng, *shape):
    w = rng.random(shape)
    return w / w.sum(-1, keepdims=True)


def _png_size(path):
    with open(path, "rb") as f:
        data = f.read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def _rendered(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _visible_tick_labels(fig, ax, axis):
    renderer = _rendered(fig)
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_visible() and t.get_text()]


def _assert_no_overlap(boxes, rotated=False, size_px=None):
    """Neighbouring labels do not overlap. Labels rotated by 45 degrees (anchored at their right
    end): the distance between the parallel text lines, dx * sin 45, is at least the text height."""
    for (a_text, a), (b_text, b) in zip(boxes, boxes[1:]):
        if rotated:
            assert (b.x1 - a.x1) * np.sqrt(0.5) >= size_px, f"tick labels {a_text!r} and {b_text!r} overlap"
        else:
            assert not a.overlaps(b), f"tick labels {a_text!r} and {b_text!r} overlap"


@NOT_UNDER_SANITIZERS
@pytest.mark.parametrize("n", [512, 2048])
def test_large_heatmap_bounded_in_pixels_and_memory(n, tmp_path):
    """A BERT-sized (512) and a 2048-token matrix: no side above MAX_SIDE_PX and a bounded peak
    memory (the unbounded figure needed 10.7 GB for 256 tokens)."""
    path = tmp_path / f"h{n}.png"
    grown, biggest_side = peak_rss_growth(f"""
        import struct
        from attnext import plot
        plot.heatmap(np.eye(3), x_labels=list("abc"), path={str(tmp_path / 'warm.png')!r})  # imports, fonts
        rng = np.random.default_rng(0)
        w = rng.random(({n}, {n}))
        w /= w.sum(-1, keepdims=True)
        labels = [f"tok{{i}}" for i in range({n})]
        def run():
            plot.heatmap(w, x_labels=labels, y_labels=labels, path={str(path)!r}, title="{n} tokens")
            with open({str(path)!r}, "rb") as f:
                return np.array(struct.unpack(">II", f.read(24)[16:24]))
    """, "run()")
    assert biggest_side <= plot.MAX_SIDE_PX <= 2000
    assert max(_png_size(path)) <= plot.MAX_SIDE_PX
    # The input is 32 MiB at n = 2048; the figure's buffers are a few tens of MiB whatever n.
    assert grown < 300 * 2 ** 20, f"peak memory grew by {grown / 2 ** 20:.0f} MiB"


@pytest.mark.parametrize("n", [40, 512, 2048])
def test_tick_labels_are_thinned_and_do_not_overlap(n):
    labels = [f"token{i}" for i in range(n)]
    fig = plot.heatmap(_weights(np.random.default_rng(0), n, n), x_labels=labels, y_labels=labels)
    ax = fig.axes[0]
    for axis in "xy":
        shown = _visible_tick_labels(fig, ax, axis)
        assert 2 <= len(shown) <= min(n, 80)
        rotated = axis == "x" and ax.get_xticklabels()[0].get_rotation() == 45
        size_px = ax.get_xticklabels()[0].get_fontsize() * fig.dpi / 72
        _assert_no_overlap(shown, rotated, size_px)
        texts = [text for text, _ in shown]
        assert texts[0] == "token0" and set(texts) <= set(labels)  # a tick shows its own token
    w, h = fig.get_size_inches() * plot.DPI
    assert max(w, h) <= plot.MAX_SIDE_PX


def test_small_heatmap_keeps_every_label_and_number():
    labels = ["the", "cat", "sat", "on", "the", "mat"]
    fig = plot.heatmap(_weights(np.random.default_rng(0), 6, 6), x_labels=labels, y_labels=labels)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert len(ax.texts) == 36  # the weights written in the cells


def test_long_inputs_are_drawn_reduced_by_block_maximum():
    """More rows and columns than pixels: each pixel shows the largest weight of its block, so a
    single sharp weight stays visible."""
    n = 4096
    w = np.zeros((n, n), dtype=np.float32)
    w[1234, 3001] = 1.0
    fig = plot.heatmap(w)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.shape[0] < n and shown.shape[1] < n
    assert shown.max() == 1.0 and np.count_nonzero(shown) == 1
    assert fig.axes[0].images[0].get_extent() == [-0.5, n - 0.5, n - 0.5, -0.5]  # ticks still index tokens
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][0] == "0"


def test_decoder_step_row_keeps_a_visible_height():
    fig = plot.heatmap(_weights(np.random.default_rng(0), 1, 3000))
    w, h = fig.get_size_inches() * plot.DPI
    assert w <= plot.MAX_SIDE_PX and h >= 200


def test_key_lengths_and_query_lengths_hide_the_padding(tmp_path):
    w = _weights(np.random.default_rng(0), 5, 7)
    tokens = ["a", "b", "c", "d", "<pad>", "<pad>", "<pad>"]
    fig = plot.heatmap(w, x_labels=tokens, y_labels=tokens[:5], key_lengths=4, query_lengths=np.int64(3),
                       path=tmp_path / "p.png")
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), w[:3, :4])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "d"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    # labels for the kept tokens only are accepted too
    fig = plot.heatmap(w, x_labels=tokens[:4], key_lengths=4)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c", "d"]
    fig = plot.heads(np.stack([w, w]), x_labels=tokens, key_lengths=4, query_lengths=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    np.testing.assert_array_equal(panels[1].images[0].get_array(), w[:2, :4])


def test_lengths_errors():
    w = np.eye(4)
    with pytest.raises(ValueError, match=r"key_lengths must be between 1 and 4 for weights of shape \(4, 4\), got 0"):
        plot.heatmap(w, key_lengths=0)
    with pytest.raises(ValueError, match="query_lengths must be between 1 and 4.*got 5"):
        plot.heatmap(w, query_lengths=5)
    with pytest.raises(TypeError, match="key_lengths must be an integer"):
        plot.heatmap(w, key_lengths=[2, 3])
    with pytest.raises(ValueError, match=r"x_labels has 3 labels .* expected 4 \(or 2, the unpadded length\)"):
        plot.heatmap(w, x_labels=list("abc"), key_lengths=2)


def test_empty_weights_raise():
    with pytest.raises(ValueError, match=r"shape \(0, 3\) have no queries or no keys"):
        plot.heatmap(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 0\) have no queries or no keys"):
        plot.heads(np.zeros((2, 3, 0)))


def test_odd_values_plot():
    """NaN and inf weights, integers and bools draw without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in (np.full((3, 3), np.nan), np.eye(2, dtype=int), np.array([[True, False]]), np.eye(1)):
            assert plot.heatmap(w).axes[0].images


def test_head_weights_given_to_heatmap_point_to_heads():
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 3\); for \(H, Lq, Lk\) weights use attnext\.plot\.heads"):
        plot.heatmap(np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, Lq, Lk\) weights pick a batch entry: attnext\.plot\.heads\(weights\[b\]\)"):
        plot.heatmap(np.ones((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"one \(Lq, Lk\) matrix use attnext\.plot\.heatmap"):
        plot.heads(np.eye(3))


def test_heads_grid_is_bounded():
    fig = plot.heads(_weights(np.random.default_rng(0), 12, 256, 256), cols=4, title="12 heads")
    w, h = fig.get_size_inches() * plot.DPI
    assert max(w, h) <= plot.MAX_SIDE_PX
    assert len([ax for ax in fig.axes if ax.images]) == 12


def _inside_figure(fig, artist):
    box = artist.get_window_extent(_rendered(fig))
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_demo_titles_fit_without_a_cjk_font(monkeypatch, tmp_path):
    """Without a CJK font the titles become code points, longer than the figure is wide: they wrap
    instead of being clipped on both sides."""
    monkeypatch.setattr(plot, "_candidate_fonts", lambda: ())
    w_en = demo.self_attention_steps("the cat sat on the mat".split(), say=lambda *a: None)
    w_zh = demo.self_attention_steps(["我", "是", "谁"], seed=1, say=lambda *a: None)
    w_tr, src, words = demo.luong_translation(say=lambda *a: None)
    for path, w, xl, yl, title in demo.heatmap_specs(str(tmp_path), w_en, w_zh, w_tr, src, words):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", plot.MissingGlyphWarning)
            fig = plot.heatmap(w, x_labels=xl, y_labels=yl, title=title)
        t = fig.axes[0].title
        assert _inside_figure(fig, t), f"title {t.get_text()!r} is clipped"
    assert "U+6211 U+662F U+8C01" in t.get_text()  # code points, not letters spaced out


def test_escape_keeps_latin_text_and_marks_cjk():
    assert plot._escape("Luong: who am I → 我 是谁") == "Luong: who am I → U+6211 U+662F U+8C01"


def test_demo_quiet_prints_nothing(monkeypatch, tmp_path, capfd):
    monkeypatch.setattr(plot, "_candidate_fonts", lambda: ())  # the glyph warning's case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--quiet", "--out", str(tmp_path / "d")]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [str(w.message) for w in caught] == []
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "learned_dates.png", "luong_who_am_i.png", "self_attention_en.png", "self_attention_zh.png"]


def test_demo_names_a_missing_font_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plot, "_candidate_fonts", lambda: ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert demo.run(out=str(tmp_path / "d")) == 0
    captured = capsys.readouterr()
    assert captured.out.count("wrote ") == 4
    assert captured.err.count("fonts-noto-cjk") == 1
    assert not [w for w in caught if issubclass(w.category, plot.MissingGlyphWarning)]
