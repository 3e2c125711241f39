"""``attnext demo``: attention step by step on a small sentence, then inside an RNN translator.

Part 1 runs the mechanism on "the cat sat on the mat" and on 我 是 谁 ("who am I"): three
linear maps give queries, keys and values; the scores compare every query with every key;
the softmax turns each row of scores into weights that sum to 1; the weighted sum of the
values is the output.

Part 2 is the attention the mechanism was invented for: an RNN encoder reads "who am I", an
RNN decoder writes 我 是 谁, and at every step Luong's "general" score s_tᵀ W_a h_j picks the
source word to translate; the context c_t and the state s_t are joined as tanh(W_c [c_t; s_t]).
Its weights are built by hand (not trained) so that the mechanism is visible.

Part 3 shows an alignment that was learned: a GRU encoder-decoder with Bahdanau attention,
trained by ``examples/train_seq2seq.py`` to rewrite dates ("wednesday, november 25, 2026" ->
"2026-11-25"), reads a date with the weights shipped in ``attnext/data/dates_bahdanau.npz``;
each output digit's attention lands on the input characters it copies. Regenerate those weights
with ``python examples/train_seq2seq.py --save python/attnext/data/dates_bahdanau.npz`` (see
docs/training-seq2seq.md). The heatmaps go to ``--out`` when matplotlib is installed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

import numpy as np

import attnext
from attnext import reference


def _fmt_matrix(m, row_labels, col_labels, digits=2, sums=False) -> str:
    width = max(6, digits + 4, *(len(c) + 1 for c in col_labels))
    lw = max(len(r) for r in row_labels) + 1
    head = " " * lw + "".join(_pad(c, width) for c in col_labels) + ("   row sum" if sums else "")
    lines = [head]
    for label, row in zip(row_labels, m):
        line = _pad(label, lw, left=True) + "".join(f"{x:{width}.{digits}f}" for x in row)
        if sums:
            line += f"   {row.sum():.6f}"
        lines.append(line)
    return "\n".join(lines)


def _display_width(s: str) -> int:
    return sum(2 if ord(c) >= 0x2E80 else 1 for c in s)  # CJK characters take two columns


def _pad(s: str, width: int, left: bool = False) -> str:
    fill = " " * max(width - _display_width(s), 0)
    return s + fill if left else fill + s


def self_attention_steps(tokens, d_model=8, d_k=4, seed=0, say=print):
    """The three steps on one sentence; returns the (L, L) weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(tokens), d_model))  # one embedding per token
    w_q, w_k, w_v = (rng.standard_normal((d_model, d_k)) / np.sqrt(d_model) for _ in range(3))
    say(f"sentence: {' '.join(tokens)}   ({len(tokens)} tokens, embeddings of size {d_model})")
    say("\n1. three linear maps of the same embeddings X give queries, keys and values:")
    say(f"   Q = X W_q, K = X W_k, V = X W_v      X {x.shape}, W {w_q.shape} -> Q, K, V {(len(tokens), d_k)}")
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    say(_indent(_fmt_matrix(q, [f"q({t})" for t in tokens], [f"d{i}" for i in range(d_k)])))
    scores = attnext.score(q, k, "scaled_dot")
    say(f"\n2. scores: every query against every key, q·k / sqrt({d_k})   (attnext.score(Q, K, 'scaled_dot'))")
    say(_indent(_fmt_matrix(scores, tokens, tokens)))
    weights = attnext.softmax(scores)
    say("\n3. softmax over each row: the attention weights, each row sums to 1   (attnext.softmax)")
    say(_indent(_fmt_matrix(weights, tokens, tokens, sums=True)))
    out = attnext.weighted_sum(weights, v)
    say("\n4. weighted sum of the values: each output row mixes the values by its weights   "
        "(attnext.weighted_sum)")
    say(_indent(_fmt_matrix(out, [f"out({t})" for t in tokens], [f"d{i}" for i in range(d_k)])))
    check = reference.attention(q, k, v)
    say(f"\n   same as the NumPy reference: max |difference| = {np.max(np.abs(out - check)):.1e}")
    return weights


def _indent(text: str, by: str = "   ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def luong_translation(say=print):
    """Encoder-decoder with Luong attention, "who am I" -> 我 是 谁; returns (weights, src, out tokens)."""
    rng = np.random.default_rng(7)
    d = 8
    src = ["who", "am", "I"]
    tgt_vocab = ["我", "是", "谁"]
    translation = {"我": "I", "是": "am", "谁": "who"}  # which source word each target word renders
    # Source embeddings: nearly orthogonal unit vectors.
    emb = {w: v / np.linalg.norm(v) for w, v in zip(src, rng.standard_normal((len(src), d)))}
    # Encoder RNN: h_j = tanh(W_x x_j + W_h h_{j-1}); W_x dominates so h_j mostly says "word j".
    w_x, w_h = 2.0 * np.eye(d), 0.2 * rng.standard_normal((d, d)) / np.sqrt(d)
    h, states = np.zeros(d), []
    for word in src:
        h = np.tanh(w_x @ emb[word] + w_h @ h)
        states.append(h)
    enc = np.stack(states)  # (n, d) encoder states h_1..h_n: the keys and values
    # Decoder RNN: s_t = tanh(D[y_{t-1}] + U s_{t-1}). D (built by hand) makes the state after
    # reading y_{t-1} look like the source word the next target word translates.
    nxt = {"<s>": "我", "我": "是", "是": "谁"}
    dec_in = {y: 2.0 * emb[translation[z]] for y, z in nxt.items()}
    u = 0.2 * rng.standard_normal((d, d)) / np.sqrt(d)
    w_a = 3.0 * np.eye(d)  # Luong "general": score(s, h) = s^T W_a h
    w_c = np.hstack([np.eye(d), 0.5 * np.eye(d)])  # h~ = tanh(W_c [c; s])
    w_out = np.stack([np.tanh(w_x @ emb[translation[y]]) for y in tgt_vocab])  # logits = W_out h~
    say('encoder: an RNN reads "who am I" into states h_1..h_3; decoder: an RNN writes one word per step.')
    say("at step t:  scores = s_t^T W_a h_j   (attnext.score(s_t, H, 'general', weight=W_a))")
    say("            a_t = softmax(scores),   c_t = sum_j a_tj h_j   (attnext.softmax, attnext.weighted_sum)")
    say("            h~_t = tanh(W_c [c_t; s_t]),  next word = argmax W_out h~_t  (greedy decoding)\n")
    s, prev, rows, out = np.zeros(d), "<s>", [], []
    for t in range(len(src)):
        s = np.tanh(dec_in[prev] + u @ s)
        scores = attnext.score(s[None, :], enc, "general", weight=w_a)  # (1, n)
        a = attnext.softmax(scores)
        c = attnext.weighted_sum(a, enc)[0]
        h_tilde = np.tanh(w_c @ np.concatenate([c, s]))
        word = tgt_vocab[int(np.argmax(w_out @ h_tilde))]
        say(f"step {t + 1}: input {_pad(prev, 4, left=True)} weights over (who, am, I) = "
            + ", ".join(f"{x:.2f}" for x in a[0]) + f"   (sum {a[0].sum():.6f})  -> {word}")
        rows.append(a[0])
        out.append(word)
        prev = word
    say(f"\ntranslation: {' '.join(out)}   (the weights are anti-diagonal: Chinese puts 我 = I first)")
    return np.stack(rows), src, out


DATES_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dates_bahdanau.npz")
DATES_EXAMPLE = "wednesday, november 25, 2026"


def _gru_step(x_proj, h, wh):
    """examples/train_seq2seq.py's GRU cell for one sentence: h' = (1 - z) n + z h, gates (z, r, n)."""
    n_h = h.shape[-1]
    zr = 0.5 * (1.0 + np.tanh(0.5 * (x_proj[:2 * n_h] + h @ wh[:, :2 * n_h])))
    z, r = zr[:n_h], zr[n_h:]
    n = np.tanh(x_proj[2 * n_h:] + (r * h) @ wh[:, 2 * n_h:])
    return n + z * (h - n)


def learned_alignment(source=DATES_EXAMPLE, say=print, path=DATES_WEIGHTS):
    """Reads the date ``source`` with the trained encoder-decoder; returns (weights (10, len(source)),
    source characters, output characters). The forward pass of examples/train_seq2seq.py's model
    (bidirectional GRU encoder, GRU decoder, attnext.BahdanauAttention), greedy decoding."""
    with np.load(path) as f:
        meta = json.loads(str(f["config"]))
        p = {k: f[k].astype(np.float32) for k in f.files if k != "config"}
    index = {c: i + 1 for i, c in enumerate(meta["input_chars"])}
    unknown = sorted(set(source) - set(index))
    if unknown:
        raise ValueError(f"the date model does not know the characters {unknown}")
    out_chars, n = meta["output_chars"], len(source)
    x = p["embed_in"][[index[c] for c in source]]
    states = {}
    for name, order in (("enc_fwd", range(n)), ("enc_bwd", range(n - 1, -1, -1))):
        proj = x @ p[name + ".wx"] + p[name + ".b"]
        h, states[name] = np.zeros(meta["encoder"], np.float32), np.zeros((n, meta["encoder"]), np.float32)
        for t in order:
            h = states[name][t] = _gru_step(proj[t], h, p[name + ".wh"])
    keys = np.concatenate([states["enc_fwd"], states["enc_bwd"]], axis=-1)
    s = np.tanh(np.concatenate([states["enc_fwd"][-1], states["enc_bwd"][0]]) @ p["init.w"] + p["init.b"])
    layer = attnext.BahdanauAttention(meta["decoder"], keys.shape[-1], meta["units"])
    layer.load_state_dict({k[len("attention."):]: v for k, v in p.items() if k.startswith("attention.")})
    memory = layer.precompute(keys[None])
    e, prev, rows, chars = meta["embed"], len(out_chars), [], []  # prev: the start symbol
    for _ in range(10):
        context, w = layer(s[None], memory)
        s = _gru_step(p["embed_out"][prev] @ p["dec.wx"][:e] + p["dec.b"] + context[0] @ p["dec.wx"][e:], s,
                      p["dec.wh"])
        prev = int(np.argmax(np.concatenate([s, context[0]]) @ p["out.w"] + p["out.b"]))
        rows.append(w[0])
        chars.append(out_chars[prev])
    weights = np.stack(rows)
    say(f'a GRU encoder-decoder trained to rewrite dates (examples/train_seq2seq.py) reads "{source}"')
    say("and writes one character per step; at each step, the input character with the most attention:\n")
    for char, row in zip(chars, weights):
        j = int(np.argmax(row))
        say(f"   {char}   {source[:j]}[{source[j]}]{source[j + 1:]}   {row[j]:.2f}")
    say(f"\noutput: {''.join(chars)}   (the weights were learned: each digit attends to the digits it copies,"
        " the month's digits to the month's name)")
    return weights, list(source), chars


def heatmap_specs(out, w_en, w_zh, w_tr, src, words, learned=None):
    """(path, weights, x labels, y labels, title) of the demo's heatmaps; ``learned`` is what
    :func:`learned_alignment` returned."""
    en = "the cat sat on the mat".split()
    zh = ["我", "是", "谁"]
    return [
        (os.path.join(out, "self_attention_en.png"), w_en, en, en, "self-attention weights"),
        (os.path.join(out, "self_attention_zh.png"), w_zh, zh, zh, "self-attention weights: 我 是 谁"),
        (os.path.join(out, "luong_who_am_i.png"), w_tr, src, words, "Luong attention: who am I → 我 是 谁"),
    ] + ([] if learned is None else [
        (os.path.join(out, "learned_dates.png"), learned[0], learned[1], learned[2],
         "learned Bahdanau attention: " + "".join(learned[1]) + " → " + "".join(learned[2])),
    ])


def run(out="attnext-demo", show_steps=True) -> int:
    """The demo; ``show_steps=False`` (``--quiet``) prints nothing at all, warnings included."""
    say = print if show_steps else (lambda *a, **k: None)
    say("=" * 78)
    say("attention, step by step")
    say("=" * 78)
    en = "the cat sat on the mat".split()
    w_en = self_attention_steps(en, say=say)
    say("\n" + "-" * 78)
    zh = ["我", "是", "谁"]
    w_zh = self_attention_steps(zh, seed=1, say=say)
    say("\n" + "=" * 78)
    say("Luong attention in an RNN encoder-decoder")
    say("=" * 78)
    w_tr, src, words = luong_translation(say=say)
    say("\n" + "=" * 78)
    say("a learned alignment: Bahdanau attention trained to read dates")
    say("=" * 78)
    learned = learned_alignment(say=say)
    try:  # through sys.modules, not the package attribute, so a removed matplotlib is noticed
        plot = importlib.import_module(__package__ + ".plot")
    except ImportError as exc:
        if show_steps:
            print(f"\nno heatmaps: {exc}", file=sys.stderr)
        return 0
    os.makedirs(out, exist_ok=True)
    say("")
    missing = []
    for path, w, xl, yl, title in heatmap_specs(out, w_en, w_zh, w_tr, src, words, learned):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", plot.MissingGlyphWarning)
            plot.heatmap(w, x_labels=xl, y_labels=yl, path=path, title=title)
        for warning in caught:
            if issubclass(warning.category, plot.MissingGlyphWarning):
                missing.append(path)
            else:  # anything else is re-issued as it came
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        say(f"wrote {path}")
    if missing:
        say("note: no installed font has the Chinese characters, so they are shown as code points (U+6211) in "
            + ", ".join(sorted(set(os.path.basename(p) for p in missing)))
            + "; install a CJK font (Debian/Ubuntu: fonts-noto-cjk) to see them.", file=sys.stderr)
    return 0
