"""Train a GRU encoder-decoder with attention, in NumPy, to read dates: a model that learns to align.

The task, generated on the fly: a date written by a human in one of four unambiguous formats
becomes its ISO form, character by character::

    25 Nov 2026                    ->  2026-11-25
    wednesday, november 25, 2026   ->  2026-11-25
    25.11.2026                     ->  2026-11-25      (numeric forms: day first)
    2026/11/25                     ->  2026-11-25

The model (everything but the attention is plain NumPy here; attnext stays an attention library):

- a bidirectional GRU encoder over the input characters; its states h_j (forward and backward
  joined) are the keys and values;
- a GRU decoder that writes the 10 output characters one at a time, teacher-forced in training
  and greedy at evaluation; at every step it attends over h_1..h_n with attnext's
  :class:`attnext.BahdanauAttention` (default; e = v . tanh(s W_q + h W_k), the keys projected
  once per batch with ``precompute_vjp``) or :class:`attnext.LuongAttention` ("general",
  ``--attention luong``, with input feeding of the attentional state h~);
- the attention's gradients come from the layers' ``vjp``; the GRUs, embeddings and the output
  layer are back-propagated through time by hand below, and Adam updates everything.

Run ``python examples/train_seq2seq.py`` (about 5 minutes on 2 cores; ``--seconds``/``--steps``
shorten it). It prints the loss, the exact-match accuracy on held-out dates and the elapsed
time as it trains, then the accuracy on 1,000 held-out dates (dates never drawn for training).
``--save weights.npz`` keeps the weights, ``--heatmaps DIR`` draws the learned alignments (one
per format; needs matplotlib), ``--json PATH`` writes ``{"exact_match", "seconds",
"attention", "steps", ...}``. See docs/training-seq2seq.md.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # One BLAS thread (set before NumPy loads): the matrices are small, and a second BLAS thread
    # spinning beside attnext's kernels only steals the core they need.
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

import attnext  # noqa: E402

Array = np.ndarray
Params = Dict[str, Array]

# ---- the task ----------------------------------------------------------------------------------

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")  # date.weekday() order
FORMATS = ("d Mon yyyy", "weekday month d yyyy", "dd.mm.yyyy", "yyyy/mm/dd")
FIRST_DAY, LAST_DAY = datetime.date(1950, 1, 1).toordinal(), datetime.date(2049, 12, 31).toordinal()

PAD = 0
INPUT_CHARS = "".join(sorted(set("".join(MONTHS + WEEKDAYS) + "".join(m[:3].title() for m in MONTHS)
                                 + "0123456789 ,./")))
INPUT_INDEX = {c: i + 1 for i, c in enumerate(INPUT_CHARS)}  # 0 is padding
OUTPUT_CHARS = "0123456789-"
OUTPUT_INDEX = {c: i for i, c in enumerate(OUTPUT_CHARS)}
START = len(OUTPUT_CHARS)  # the decoder's first input (never an output)
OUTPUT_LEN = 10


def render(date: datetime.date, fmt: str) -> str:
    """The date as a human writes it in format ``fmt`` (one of FORMATS)."""
    month = MONTHS[date.month - 1]
    if fmt == "d Mon yyyy":
        return f"{date.day} {month[:3].title()} {date.year}"
    if fmt == "weekday month d yyyy":
        return f"{WEEKDAYS[date.weekday()]}, {month} {date.day}, {date.year}"
    if fmt == "dd.mm.yyyy":
        return f"{date.day:02d}.{date.month:02d}.{date.year}"
    if fmt == "yyyy/mm/dd":
        return f"{date.year}/{date.month:02d}/{date.day:02d}"
    raise ValueError(f"unknown format {fmt!r}; FORMATS has {FORMATS}")


class Dates:
    """Dates between 1950 and 2049 in ``formats``; ``held_out`` dates (by day) are set aside for
    evaluation and never drawn for training. ``validation`` (for early stopping) and ``test``
    (the reported accuracy) are lists of (source, target), each date in one random format."""

    def __init__(self, formats: Sequence[str], held_out: int, seed: int) -> None:
        self.formats = tuple(formats)
        for fmt in self.formats:
            render(datetime.date(2026, 11, 25), fmt)  # raises for an unknown format
        rng = np.random.default_rng(seed)
        days = rng.choice(LAST_DAY - FIRST_DAY + 1, size=2 * held_out, replace=False) + FIRST_DAY
        self._held_out = np.sort(days)
        pairs = self._pairs(days, rng.integers(len(self.formats), size=days.size))
        self.validation, self.test = pairs[:held_out], pairs[held_out:]

    def _pairs(self, days: Array, formats: Array) -> List[Tuple[str, str]]:
        dates = [datetime.date.fromordinal(int(d)) for d in days]
        return [(render(d, self.formats[f]), d.isoformat()) for d, f in zip(dates, formats)]

    def sample(self, rng: np.random.Generator, n: int) -> List[Tuple[str, str]]:
        """n training pairs, none of them a held-out date."""
        days = rng.integers(FIRST_DAY, LAST_DAY + 1, size=n)
        while True:
            taken = np.isin(days, self._held_out)
            if not taken.any():
                break
            days[taken] = rng.integers(FIRST_DAY, LAST_DAY + 1, size=int(taken.sum()))
        return self._pairs(days, rng.integers(len(self.formats), size=n))


def encode_sources(sources: Sequence[str]) -> Tuple[Array, Array]:
    """(B, Lmax) character ids padded with 0, and the (B,) lengths."""
    lengths = np.array([len(s) for s in sources], dtype=np.int64)
    ids = np.zeros((len(sources), int(lengths.max())), dtype=np.int64)
    for row, s in enumerate(sources):
        ids[row, :len(s)] = [INPUT_INDEX[c] for c in s]
    return ids, lengths


def encode_targets(targets: Sequence[str]) -> Array:
    return np.array([[OUTPUT_INDEX[c] for c in t] for t in targets], dtype=np.int64)


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class Config:
    attention: str = "bahdanau"
    embed: int = 16  # character embeddings (input and output)
    encoder: int = 32  # per direction: keys are 2 * encoder wide
    decoder: int = 64  # decoder state s_t (the query)
    units: int = 32  # Bahdanau's score units


def _uniform(rng: np.random.Generator, shape: Tuple[int, ...], fan_in: int) -> Array:
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def _gru_params(rng: np.random.Generator, prefix: str, inputs: int, hidden: int) -> Params:
    """x W (inputs, 3 hidden) and h U (hidden, 3 hidden), gate order (update z, reset r, new n)."""
    return {f"{prefix}.wx": _uniform(rng, (inputs, 3 * hidden), hidden),
            f"{prefix}.wh": _uniform(rng, (hidden, 3 * hidden), hidden),
            f"{prefix}.b": np.zeros(3 * hidden, np.float32)}


def init_model(config: Config, seed: int) -> Tuple[Params, Any]:
    """(NumPy parameters, attention layer), float32."""
    rng = np.random.default_rng(seed)
    e, h, s = config.embed, config.encoder, config.decoder
    keys = 2 * h
    feed = keys if config.attention == "bahdanau" else s  # what joins y_{t-1} as decoder input
    out_in = s + keys if config.attention == "bahdanau" else s
    params: Params = {"embed_in": rng.normal(0, 0.3, (len(INPUT_CHARS) + 1, e)).astype(np.float32),
                      "embed_out": rng.normal(0, 0.3, (START + 1, e)).astype(np.float32),
                      "init.w": _uniform(rng, (keys, s), keys), "init.b": np.zeros(s, np.float32),
                      "out.w": _uniform(rng, (out_in, len(OUTPUT_CHARS)), out_in),
                      "out.b": np.zeros(len(OUTPUT_CHARS), np.float32)}
    params.update(_gru_params(rng, "enc_fwd", e, h))
    params.update(_gru_params(rng, "enc_bwd", e, h))
    params.update(_gru_params(rng, "dec", e + feed, s))
    layer: Any
    if config.attention == "bahdanau":
        layer = attnext.BahdanauAttention(s, keys, config.units, rng=rng)
    elif config.attention == "luong":
        layer = attnext.LuongAttention(s, keys, "general", attentional_units=s, rng=rng)
    else:
        raise ValueError(f"attention must be 'bahdanau' or 'luong', got {config.attention!r}")
    return params, layer


def sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


GruCache = Tuple[Array, Array, Array, Array, Array]


def gru_step(x_proj: Array, h: Array, wh: Array) -> Tuple[Array, GruCache]:
    """h' = (1 - z) n + z h; x_proj = x W + b (B, 3H) computed by the caller."""
    hidden = h.shape[-1]
    zr = sigmoid(x_proj[:, :2 * hidden] + h @ wh[:, :2 * hidden])
    z, r = zr[:, :hidden], zr[:, hidden:]
    rh = r * h
    n = np.tanh(x_proj[:, 2 * hidden:] + rh @ wh[:, 2 * hidden:])
    return n + z * (h - n), (h, z, r, rh, n)


def gru_step_backward(dh_new: Array, cache: GruCache, wh: Array, dwh: Array) -> Tuple[Array, Array]:
    """(dh, dx_proj) of :func:`gru_step`; adds the gradient of wh into dwh."""
    h, z, r, rh, n = cache
    hidden = h.shape[-1]
    dn = dh_new * (1 - z) * (1 - n * n)
    dz = dh_new * (h - n) * z * (1 - z)
    drh = dn @ wh[:, 2 * hidden:].T
    dwh[:, 2 * hidden:] += rh.T @ dn
    dzr = np.concatenate([dz, drh * h * r * (1 - r)], axis=1)
    dwh[:, :2 * hidden] += h.T @ dzr
    dh = dh_new * z + drh * r + dzr @ wh[:, :2 * hidden].T
    return dh, np.concatenate([dzr, dn], axis=1)


def run_gru(x_proj: Array, mask: Array, wh: Array, reverse: bool) -> Tuple[Array, List[GruCache]]:
    """States (B, T, H) over x_proj (B, T, 3H); where mask (B, T) is 0 (padding) the state is
    carried unchanged, so the backward direction starts at each sentence's last character."""
    batch, steps = x_proj.shape[:2]
    h: Array = np.zeros((batch, wh.shape[0]), np.float32)
    states = np.zeros((batch, steps, wh.shape[0]), np.float32)
    caches: List[GruCache] = [None] * steps  # type: ignore[list-item]
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        new, caches[t] = gru_step(x_proj[:, t], h, wh)
        m = mask[:, t, None]
        h = h + m * (new - h)
        states[:, t] = h
    return states, caches


def run_gru_backward(d_states: Array, mask: Array, caches: List[GruCache], wh: Array, dwh: Array,
                     reverse: bool) -> Array:
    """d x_proj (B, T, 3H) of :func:`run_gru` from the gradient of its states."""
    batch, steps, hidden = d_states.shape
    dx = np.zeros((batch, steps, 3 * hidden), np.float32)
    dh = np.zeros((batch, hidden), np.float32)
    for t in (range(steps) if reverse else range(steps - 1, -1, -1)):
        dh = dh + d_states[:, t]
        m = mask[:, t, None]
        d_prev, dx[:, t] = gru_step_backward(m * dh, caches[t], wh, dwh)
        dh = d_prev + (1 - m) * dh
    return dx


@dataclass
class Encoded:
    """The encoder's forward pass: keys (B, L, 2H), lengths (B,), s0 (B, S), and what the
    backward needs."""
    ids: Array
    lengths: Array
    mask: Array
    embedded: Array
    keys: Array
    joined: Array
    s0: Array
    caches: Dict[str, List[GruCache]] = field(default_factory=dict)


def encode(params: Params, ids: Array, lengths: Array) -> Encoded:
    mask = (ids != PAD).astype(np.float32)
    x = params["embed_in"][ids]
    states = []
    caches = {}
    for name, reverse in (("enc_fwd", False), ("enc_bwd", True)):
        x_proj = x @ params[f"{name}.wx"] + params[f"{name}.b"]
        states_dir, caches[name] = run_gru(x_proj, mask, params[f"{name}.wh"], reverse)
        states.append(states_dir)
    keys = np.concatenate(states, axis=-1)
    # The decoder starts from both directions' summaries: the forward state after the last
    # character (carried through the padding) and the backward state at the first.
    joined = np.concatenate([states[0][:, -1], states[1][:, 0]], axis=-1)
    s0 = np.tanh(joined @ params["init.w"] + params["init.b"])
    return Encoded(ids, lengths, mask, x, keys, joined, s0, caches)


def encode_backward(params: Params, enc: Encoded, d_keys: Array, d_s0: Array, grads: Params) -> None:
    d_pre = d_s0 * (1 - enc.s0 * enc.s0)
    grads["init.w"] += enc.joined.T @ d_pre
    grads["init.b"] += d_pre.sum(0)
    d_joined = d_pre @ params["init.w"].T
    hidden = d_keys.shape[-1] // 2
    d_fwd, d_bwd = d_keys[..., :hidden].copy(), d_keys[..., hidden:].copy()
    d_fwd[:, -1] += d_joined[:, :hidden]
    d_bwd[:, 0] += d_joined[:, hidden:]
    d_x = np.zeros_like(enc.embedded)
    for name, d_states, reverse in (("enc_fwd", d_fwd, False), ("enc_bwd", d_bwd, True)):
        dx_proj = run_gru_backward(d_states, enc.mask, enc.caches[name], params[f"{name}.wh"], grads[f"{name}.wh"],
                                   reverse)
        flat = dx_proj.reshape(-1, dx_proj.shape[-1])
        grads[f"{name}.wx"] += enc.embedded.reshape(-1, enc.embedded.shape[-1]).T @ flat
        grads[f"{name}.b"] += flat.sum(0)
        d_x += dx_proj @ params[f"{name}.wx"].T
    np.add.at(grads["embed_in"], enc.ids, d_x)


def loss_and_grads(params: Params, layer: Any, sources: Sequence[str], targets: Sequence[str]
                   ) -> Tuple[float, Params, Dict[str, Array]]:
    """Teacher-forced cross-entropy (mean over characters) and the gradients of every
    parameter: (loss, NumPy parameter grads, attention grads keyed like its state_dict)."""
    ids, lengths = encode_sources(sources)
    y = encode_targets(targets)
    y_in = np.concatenate([np.full((len(targets), 1), START), y[:, :-1]], axis=1)
    enc = encode(params, ids, lengths)
    step = _bahdanau_decoder if isinstance(layer, attnext.BahdanauAttention) else _luong_decoder
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    outputs, backward = step(params, layer, enc, y_in, grads)
    batch, steps, width = outputs.shape
    flat = outputs.reshape(-1, width)
    logits = flat @ params["out.w"] + params["out.b"]
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    gold = y.reshape(-1)
    loss = -float(log_p[np.arange(gold.size), gold].mean())
    d_logits = np.exp(log_p)
    d_logits[np.arange(gold.size), gold] -= 1
    d_logits /= gold.size
    grads["out.w"] += flat.T @ d_logits
    grads["out.b"] += d_logits.sum(0)
    d_outputs = (d_logits @ params["out.w"].T).reshape(batch, steps, width)
    d_keys, d_s0, attention_grads = backward(d_outputs)
    encode_backward(params, enc, d_keys, d_s0, grads)
    return loss, grads, attention_grads


Backward = Callable[[Array], Tuple[Array, Array, Dict[str, Array]]]


def _decoder_inputs(params: Params, y_in: Array) -> Tuple[Array, Array]:
    """(embedded y_{t-1} (B, T, E), their share of the decoder GRU's input projection + bias)."""
    embedded = params["embed_out"][y_in]
    e = embedded.shape[-1]
    return embedded, embedded @ params["dec.wx"][:e] + params["dec.b"]


def _finish_decoder_grads(params: Params, grads: Params, y_in: Array, embedded: Array, dx_proj: Array) -> None:
    e = embedded.shape[-1]
    flat = dx_proj.reshape(-1, dx_proj.shape[-1])
    grads["dec.wx"][:e] += embedded.reshape(-1, e).T @ flat
    grads["dec.b"] += flat.sum(0)
    np.add.at(grads["embed_out"], y_in, dx_proj @ params["dec.wx"][:e].T)


def _bahdanau_decoder(params: Params, layer: Any, enc: Encoded, y_in: Array, grads: Params
                      ) -> Tuple[Array, Backward]:
    """Bahdanau: c_t = attend(s_{t-1}), s_t = GRU([y_{t-1}; c_t], s_{t-1}), output [s_t; c_t]."""
    embedded, x_proj = _decoder_inputs(params, y_in)
    e = embedded.shape[-1]
    wx_c, wh = params["dec.wx"][e:], params["dec.wh"]
    memory, pre_pullback = layer.precompute_vjp(enc.keys, key_lengths=enc.lengths)
    s = enc.s0
    saved = []
    outputs = []
    for t in range(y_in.shape[1]):
        (context, _), pullback = layer.vjp(s, memory)
        s_new, cache = gru_step(x_proj[:, t] + context @ wx_c, s, wh)
        saved.append((pullback, context, cache))
        outputs.append(np.concatenate([s_new, context], axis=-1))
        s = s_new

    def backward(d_outputs: Array) -> Tuple[Array, Array, Dict[str, Array]]:
        hidden = s.shape[-1]
        d_s = np.zeros_like(s)
        dx_proj = np.zeros_like(x_proj)
        memory_grads = []
        attention_grads = None
        for t in range(y_in.shape[1] - 1, -1, -1):
            pullback, context, cache = saved[t]
            d_s, dx_proj[:, t] = gru_step_backward(d_s + d_outputs[:, t, :hidden], cache, wh, grads["dec.wh"])
            grads["dec.wx"][e:] += context.T @ dx_proj[:, t]
            d_context = d_outputs[:, t, hidden:] + dx_proj[:, t] @ wx_c.T
            (d_query, memory_grad), step_grads = pullback((d_context, None))
            d_s = d_s + d_query
            memory_grads.append(memory_grad)
            attention_grads = _add(attention_grads, step_grads)
        (d_keys,), pre_grads = pre_pullback(sum(memory_grads))
        _finish_decoder_grads(params, grads, y_in, embedded, dx_proj)
        return d_keys, d_s, _add(attention_grads, pre_grads)

    return np.stack(outputs, axis=1), backward


def _luong_decoder(params: Params, layer: Any, enc: Encoded, y_in: Array, grads: Params
                   ) -> Tuple[Array, Backward]:
    """Luong: s_t = GRU([y_{t-1}; h~_{t-1}], s_{t-1}), (h~_t, c_t) = attend(s_t), output h~_t."""
    embedded, x_proj = _decoder_inputs(params, y_in)
    e = embedded.shape[-1]
    wx_f, wh = params["dec.wx"][e:], params["dec.wh"]
    s = enc.s0
    feed = np.zeros((s.shape[0], wx_f.shape[0]), np.float32)
    saved = []
    outputs = []
    for t in range(y_in.shape[1]):
        s_new, cache = gru_step(x_proj[:, t] + feed @ wx_f, s, wh)
        (attentional, _, _), pullback = layer.vjp(s_new, enc.keys, key_lengths=enc.lengths)
        saved.append((pullback, feed, cache))
        outputs.append(attentional)
        s, feed = s_new, attentional

    def backward(d_outputs: Array) -> Tuple[Array, Array, Dict[str, Array]]:
        d_s = np.zeros_like(s)
        d_feed = np.zeros_like(feed)
        d_keys = np.zeros_like(enc.keys)
        dx_proj = np.zeros_like(x_proj)
        attention_grads = None
        for t in range(y_in.shape[1] - 1, -1, -1):
            pullback, feed_in, cache = saved[t]
            (d_query, d_keys_t), step_grads = pullback((d_outputs[:, t] + d_feed, None, None))
            d_keys += d_keys_t
            attention_grads = _add(attention_grads, step_grads)
            d_s, dx_proj[:, t] = gru_step_backward(d_s + d_query, cache, wh, grads["dec.wh"])
            grads["dec.wx"][e:] += feed_in.T @ dx_proj[:, t]
            d_feed = dx_proj[:, t] @ wx_f.T
        _finish_decoder_grads(params, grads, y_in, embedded, dx_proj)
        assert attention_grads is not None
        return d_keys, d_s, attention_grads

    return np.stack(outputs, axis=1), backward


def _add(total: Optional[Dict[str, Array]], more: Dict[str, Array]) -> Dict[str, Array]:
    return dict(more) if total is None else {name: total[name] + more[name] for name in total}


def translate(params: Params, layer: Any, sources: Sequence[str]) -> Tuple[List[str], Array, Array]:
    """Greedy decoding: (ISO strings, attention weights (B, 10, Lmax), source lengths (B,))."""
    ids, lengths = encode_sources(sources)
    enc = encode(params, ids, lengths)
    e = params["embed_out"].shape[-1]
    wx, wh, b = params["dec.wx"], params["dec.wh"], params["dec.b"]
    bahdanau = isinstance(layer, attnext.BahdanauAttention)
    memory = layer.precompute(enc.keys, key_lengths=lengths) if bahdanau else None
    s = enc.s0
    feed = np.zeros((len(sources), wx.shape[0] - e), np.float32)
    prev = np.full(len(sources), START)
    tokens, weights = [], []
    for _ in range(OUTPUT_LEN):
        x_head = params["embed_out"][prev] @ wx[:e] + b
        if bahdanau:
            context, w = layer(s, memory)
            s, _ = gru_step(x_head + context @ wx[e:], s, wh)
            out = np.concatenate([s, context], axis=-1)
        else:
            s, _ = gru_step(x_head + feed @ wx[e:], s, wh)
            out, _, w = layer(s, enc.keys, key_lengths=lengths)
            feed = out
        prev = np.argmax(out @ params["out.w"] + params["out.b"], axis=-1)
        tokens.append(prev)
        weights.append(w)
    chars = np.array(list(OUTPUT_CHARS))[np.stack(tokens, axis=1)]
    return ["".join(row) for row in chars], np.stack(weights, axis=1), lengths


def exact_match(params: Params, layer: Any, pairs: Sequence[Tuple[str, str]]) -> float:
    predicted, _, _ = translate(params, layer, [s for s, _ in pairs])
    return float(np.mean([p == t for p, (_, t) in zip(predicted, pairs)]))


# ---- training ----------------------------------------------------------------------------------

class Adam:
    """Adam (Kingma and Ba) over a dict of arrays, with the gradients' global norm clipped."""

    def __init__(self, lr: float, clip: float = 5.0, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.clip, self.betas, self.eps = lr, clip, betas, eps
        self.m: Dict[str, Array] = {}
        self.v: Dict[str, Array] = {}
        self.t = 0

    def step(self, params: Dict[str, Array], grads: Dict[str, Array]) -> None:
        self.t += 1
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        scale = min(1.0, self.clip / (norm + 1e-12))
        b1, b2 = self.betas
        lr = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for name, g in grads.items():
            g = g * scale
            m = self.m[name] = b1 * self.m.get(name, 0) + (1 - b1) * g
            v = self.v[name] = b2 * self.v.get(name, 0) + (1 - b2) * g * g
            params[name] -= (lr * m / (np.sqrt(v) + self.eps)).astype(params[name].dtype)


@dataclass
class Result:
    params: Params
    layer: Any
    losses: List[float]
    steps: int
    seconds: float
    exact_match: float
    data: Dates


def train(config: Config, *, seconds: float = 280.0, steps: Optional[int] = None, batch: int = 64, lr: float = 5e-3,
          seed: int = 0, formats: Sequence[str] = FORMATS, held_out: int = 1000, stop_at: float = 0.995,
          report_every: float = 10.0, say: Callable[..., None] = print) -> Result:
    """Trains until ``seconds`` (wall time) or ``steps`` run out, or the held-out validation
    dates reach ``stop_at`` exact match (checked at every report); then measures the exact
    match on the ``held_out`` test dates (other dates than the validation ones)."""
    start = time.perf_counter()
    data = Dates(formats, held_out, seed)
    params, layer = init_model(config, seed)
    # One dict for the optimiser: the NumPy parameters (updated in place) and the attention
    # layer's, under an "attention." prefix, loaded back into the layer after every step.
    state = dict(params, **{ATT + k: v for k, v in layer.state_dict().items()})
    optimiser = Adam(lr)
    rng = np.random.default_rng(seed + 1)
    losses: List[float] = []
    step, next_report = 0, report_every
    while steps is None or step < steps:
        pairs = data.sample(rng, batch)
        loss, grads, attention_grads = loss_and_grads(params, layer, [s for s, _ in pairs], [t for _, t in pairs])
        optimiser.step(state, dict(grads, **{ATT + k: g for k, g in attention_grads.items()}))
        layer.load_state_dict({k[len(ATT):]: v for k, v in state.items() if k.startswith(ATT)})
        losses.append(loss)
        step += 1
        elapsed = time.perf_counter() - start
        last = elapsed >= seconds or (steps is not None and step >= steps)
        if elapsed >= next_report or last:
            next_report = elapsed + report_every
            accuracy = exact_match(params, layer, data.validation[:200])
            say(f"step {step:5d}  loss {np.mean(losses[-20:]):.4f}  held-out exact match {accuracy:6.1%}  "
                f"{elapsed:6.1f} s", flush=True)
            if accuracy >= stop_at and exact_match(params, layer, data.validation) >= stop_at:
                break
        if last:
            break
    accuracy = exact_match(params, layer, data.test)
    return Result(params, layer, losses, step, time.perf_counter() - start, accuracy, data)


ATT = "attention."


# ---- saving, heatmaps, the command line --------------------------------------------------------

def save(path: str, config: Config, params: Params, layer: Any) -> None:
    """Weights as float16 (the model is small and float16 keeps the file small; they are read
    back as float32), the attention's under "attention." + its state_dict names, and the
    configuration as JSON."""
    arrays: Dict[str, Any] = {k: v.astype(np.float16) for k, v in params.items()}
    arrays.update({ATT + k: v.astype(np.float16) for k, v in layer.state_dict().items()})
    meta = dict(vars(config), input_chars=INPUT_CHARS, output_chars=OUTPUT_CHARS)
    np.savez_compressed(path, config=np.array(json.dumps(meta)), **arrays)


def load(path: str) -> Tuple[Config, Params, Any]:
    with np.load(path) as f:
        meta = json.loads(str(f["config"]))
        arrays = {k: f[k].astype(np.float32) for k in f.files if k != "config"}
    if meta.pop("input_chars") != INPUT_CHARS or meta.pop("output_chars") != OUTPUT_CHARS:
        raise ValueError(f"{path} was trained with another character set")
    config = Config(**meta)
    params, layer = init_model(config, 0)
    params.update({k: v for k, v in arrays.items() if not k.startswith(ATT)})
    layer.load_state_dict({k[len(ATT):]: v for k, v in arrays.items() if k.startswith(ATT)})
    return config, params, layer


def write_heatmaps(directory: str, params: Params, layer: Any, pairs: Sequence[Tuple[str, str]],
                   say: Callable[..., None] = print) -> List[str]:
    """One heatmap per format (the first held-out date of each), output characters down,
    input characters across."""
    from attnext import plot  # matplotlib: the optional extra

    os.makedirs(directory, exist_ok=True)
    chosen: Dict[str, Tuple[str, str]] = {}
    for source, target in pairs:
        fmt = format_of(source)
        chosen.setdefault(fmt, (source, target))
    paths = []
    for i, (fmt, (source, _)) in enumerate(sorted(chosen.items())):
        predicted, weights, _ = translate(params, layer, [source])
        path = os.path.join(directory, f"alignment_{i}.png")
        plot.heatmap(weights[0][:, :len(source)], x_labels=list(source), y_labels=list(predicted[0]), path=path,
                     title=f"{type(layer).__name__}: {source} -> {predicted[0]}")
        say(f"wrote {path}")
        paths.append(path)
    return paths


def format_of(source: str) -> str:
    """Which of FORMATS a rendered date is in."""
    if "/" in source:
        return "yyyy/mm/dd"
    if "." in source:
        return "dd.mm.yyyy"
    return "weekday month d yyyy" if "," in source else "d Mon yyyy"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=("bahdanau", "luong"), default="bahdanau")
    parser.add_argument("--seconds", type=float, default=280.0,
                        help="wall-time budget for training (default 280: with the final evaluation, under 5 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at", type=float, default=0.995,
                        help="stop early once the validation dates reach this exact match")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated subset of the input formats (default all: {','.join(FORMATS)})")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out dates for the final exact match")
    parser.add_argument("--threads", type=int, default=1, help="attnext's threads (default 1: the matrices are small)")
    parser.add_argument("--save", metavar="PATH", help="write the weights here (.npz)")
    parser.add_argument("--heatmaps", metavar="DIR", help="write the learned alignments here (needs matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON here")
    args = parser.parse_args(argv)
    attnext.set_num_threads(args.threads)
    config = Config(attention=args.attention)
    formats = [f.strip() for f in args.formats.split(",")]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"--formats: unknown {unknown}; choose from {','.join(FORMATS)}")
    print(f"training a GRU encoder-decoder with {args.attention} attention on dates "
          f"({'; '.join(formats)} -> yyyy-mm-dd)", flush=True)
    result = train(config, seconds=args.seconds, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                   formats=formats, held_out=args.held_out, stop_at=args.stop_at)
    print(f"exact match on {len(result.data.test)} held-out dates: {result.exact_match:.1%} "
          f"after {result.steps} steps, {result.seconds:.1f} s")
    examples = result.data.test[:4]
    predicted, _, _ = translate(result.params, result.layer, [s for s, _ in examples])
    for (source, target), guess in zip(examples, predicted):
        print(f"  {source!r:34} -> {guess}  {'ok' if guess == target else 'expected ' + target}")
    if args.save:
        save(args.save, config, result.params, result.layer)
        print(f"saved the weights to {args.save}")
    if args.heatmaps:
        try:
            write_heatmaps(args.heatmaps, result.params, result.layer, result.data.test)
        except ImportError as exc:
            print(f"no heatmaps: {exc}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exact_match": result.exact_match, "seconds": result.seconds, "attention": args.attention,
                       "steps": result.steps, "held_out": len(result.data.test), "batch": args.batch,
                       "seed": args.seed, "formats": formats,
                       "first_loss": float(np.mean(result.losses[:10])),
                       "final_loss": float(np.mean(result.losses[-10:]))}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
