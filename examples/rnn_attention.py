"""Encoder-decoder attention end to end: a NumPy GRU encoder and decoder that copy or reverse
a token sequence, attending with attnext's LuongAttention and BahdanauAttention.

No training: the weights are constructed by hand so that the mechanism is visible.

- The encoder GRU keeps a one-hot position counter (coded as +-1) and the current token
  (+-1 code) in its state, so encoder state h_j says "I am position j, holding token x_j".
- The decoder GRU keeps the same kind of counter for its own steps.
- Luong ("general"): W_a maps decoder position t to encoder position t (copy) or n-1-t
  (reverse), so the score s_t W_a h_j is largest at the aligned key.
- Bahdanau (normalize=True): W_q and W_k put positions on the same hidden units and the bias
  makes tanh fire only when both agree, so v . tanh(s_t W_q + h_j W_k + b) peaks at the
  aligned key.

The printed weight matrices (decoder steps x encoder positions) come out diagonal for copy
and anti-diagonal for reverse, and the decoded tokens are the copied / reversed input.

    python examples/rnn_attention.py --task reverse --length 8
"""

from __future__ import annotations

import argparse

import numpy as np

import attnext


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class GRUCell:
    """h' = (1 - z) h + z h~, z = sigma(x W_z + h U_z + b_z), r = sigma(x W_r + h U_r + b_r),
    h~ = tanh(x W_h + (r h) U_h + b_h). Row vectors: x (B, input_dim), h (B, hidden_dim)."""

    def __init__(self, input_dim, hidden_dim, dtype=np.float32):
        def zeros(*shape):
            return np.zeros(shape, dtype)

        self.W_z, self.U_z, self.b_z = zeros(input_dim, hidden_dim), zeros(hidden_dim, hidden_dim), zeros(hidden_dim)
        self.W_r, self.U_r, self.b_r = zeros(input_dim, hidden_dim), zeros(hidden_dim, hidden_dim), zeros(hidden_dim)
        self.W_h, self.U_h, self.b_h = zeros(input_dim, hidden_dim), zeros(hidden_dim, hidden_dim), zeros(hidden_dim)

    def __call__(self, x, h):
        z = sigmoid(x @ self.W_z + h @ self.U_z + self.b_z)
        r = sigmoid(x @ self.W_r + h @ self.U_r + self.b_r)
        h_tilde = np.tanh(x @ self.W_h + (r * h) @ self.U_h + self.b_h)
        return (1 - z) * h + z * h_tilde


def counter_gru(length, vocab, *, carry_token, c=10.0):
    """A GRU whose state is [position code (length), token code (vocab)].

    Gates are held open (z ~ 1, r ~ 1), so h' = tanh(x W_h + h U_h + b_h):
    - position block: p'_0 = tanh(c sum(p) + c/2) is +1 only at the first step (h = 0); p'_i =
      tanh(c p_{i-1} - c/2) shifts the +1 one place on. After step t, p = +1 at t, -1 elsewhere.
    - token block: tanh(c (2 x_a - 1)) = +1 for the input token, -1 for the others
      (left at 0 when carry_token is False).
    """
    hidden = length + vocab
    cell = GRUCell(vocab, hidden)
    cell.b_z[:] = 20.0
    cell.b_r[:] = 20.0
    cell.U_h[:length, 0] = c
    cell.b_h[0] = c / 2
    for i in range(1, length):
        cell.U_h[i - 1, i] = c
        cell.b_h[i] = -c / 2
    if carry_token:
        for a in range(vocab):
            cell.W_h[a, length + a] = 2 * c
            cell.b_h[length + a] = -c
    return cell


def build_layers(length, vocab, task):
    """LuongAttention and BahdanauAttention whose weights align decoder step t with encoder
    position t (copy) or length-1-t (reverse)."""
    hidden = length + vocab
    target = np.arange(length) if task == "copy" else np.arange(length)[::-1]

    luong = attnext.LuongAttention(hidden, hidden, "general", attentional_units=vocab, rng=0)
    w_a = np.zeros((hidden, hidden))
    w_a[np.arange(length), target] = 2.0  # s_t W_a h_j = 2 sum_t d[t] p_j[target(t)]
    luong.w_a = w_a
    w_c = np.zeros((2 * hidden, vocab))  # [c_t; s_t] -> token scores, from the context's token code
    w_c[length + np.arange(vocab), np.arange(vocab)] = 3.0
    luong.w_c = w_c

    beta, gamma = 3.0, 4.0
    bahdanau = attnext.BahdanauAttention(hidden, hidden, length, normalize=True, rng=0)
    w_key = np.zeros((hidden, length))
    w_key[np.arange(length), np.arange(length)] = beta  # unit i sees "key is position i"
    w_query = np.zeros((hidden, length))
    w_query[np.arange(length), target] = beta  # unit target(t) sees "query is step t"
    bahdanau.w_key, bahdanau.w_query = w_key, w_query
    bahdanau.bias = np.full(length, -beta)  # tanh > 0 only where both agree
    bahdanau.v = np.ones(length)
    bahdanau.g = gamma * np.sqrt(length)  # effective v = gamma on every unit
    return luong, bahdanau


def run(tokens, task, vocab):
    """Encodes tokens (B, n) and decodes them step by step with each layer.

    Returns {"luong": (outputs (B, n), weights (B, n, n)), "bahdanau": (...)}.
    """
    batch, length = tokens.shape
    eye = np.eye(vocab, dtype=np.float32)
    encoder = counter_gru(length, vocab, carry_token=True)
    decoder = counter_gru(length, vocab, carry_token=False)
    luong, bahdanau = build_layers(length, vocab, task)

    h = np.zeros((batch, length + vocab), np.float32)
    states = []
    for t in range(length):
        h = encoder(eye[tokens[:, t]], h)
        states.append(h)
    encoded = np.stack(states, axis=1)  # (B, n, hidden): keys and values

    memory = bahdanau.precompute(encoded)  # W_k h_j once per sentence
    results = {}
    for name in ("luong", "bahdanau"):
        s = np.zeros_like(h)
        previous = np.zeros((batch, vocab), np.float32)  # no token before the first step
        outputs, weights = [], []
        for t in range(length):
            s = decoder(previous, s)
            if name == "luong":
                attentional, context, w = luong(s, encoded)
                token = np.argmax(attentional, axis=-1)
            else:
                context, w = bahdanau(s, memory)
                token = np.argmax(context[:, length:], axis=-1)  # the attended token code
            outputs.append(token)
            weights.append(w)
            previous = eye[token]
        results[name] = (np.stack(outputs, axis=1), np.stack(weights, axis=1))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("copy", "reverse"), default="reverse")
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print nothing, just return the results")
    args = parser.parse_args(argv)
    if args.length < 3:
        parser.error("--length must be at least 3")

    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, args.vocab, size=(args.batch, args.length))
    results = run(tokens, args.task, args.vocab)
    if not args.quiet:
        np.set_printoptions(precision=2, suppress=True, linewidth=120)
        expected = tokens if args.task == "copy" else tokens[:, ::-1]
        print(f"task: {args.task}, input (sentence 0): {tokens[0].tolist()}")
        for name, (outputs, weights) in results.items():
            print(f"\n{name}: decoded {outputs[0].tolist()} (expected {expected[0].tolist()})")
            for t in range(args.length):
                print(f"  step {t}: weights {weights[0, t]}  -> attends to position {np.argmax(weights[0, t])}")
    return {"tokens": tokens, **results}


if __name__ == "__main__":
    main()
