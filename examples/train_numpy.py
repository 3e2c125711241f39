"""Training attention with plain NumPy SGD: Bahdanau attention learns to reverse a sequence.

Every sentence is a row of distinct tokens x_0 .. x_{L-1}. Its encoder states (the keys) are
fixed codes [one-hot token; one-hot position], and the values are the one-hot tokens, so the
context vector of a decoder step is directly a distribution over tokens: the sum of the
attention weights on the positions holding each token. Decoder step t has a learned query q_t
and must output x_{L-1-t}: it can only do that by attending to position L-1-t. Nothing tells
the model where to look; the gradients do.

Trained: the queries q_t and Bahdanau's W_q, W_k and v, by
``out, pullback = attnext.vjp(attnext.additive_attention, ...)`` and ``pullback(d_out)``,
which returns the gradient of each argument. The loss is the cross-entropy of the context
vectors (its gradient is written by hand below); the update is plain SGD.

The printout shows the loss falling, the accuracy rising and, at the end, one sentence's
attention weights: the learned alignment is the anti-diagonal.

    python examples/train_numpy.py            # a second or two
    python examples/train_numpy.py --steps 5  # too few steps: the alignment is still blurred
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

import attnext

Array = npt.NDArray[np.float32]


@dataclass
class Params:
    """The trainable arrays: per-step queries (T, Dq), W_q (Dq, U), W_k (Dk, U), v (U,)."""

    queries: Array
    w_query: Array
    w_key: Array
    v: Array


def init_params(rng: np.random.Generator, steps: int, vocab: int, length: int, query_dim: int,
                units: int) -> Params:
    def normal(*shape: int, std: float) -> Array:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    key_dim = vocab + length
    return Params(queries=normal(steps, query_dim, std=1.0), w_query=normal(query_dim, units, std=query_dim ** -0.5),
                  w_key=normal(key_dim, units, std=1.0), v=normal(units, std=units ** -0.5))


def make_batch(rng: np.random.Generator, batch: int, vocab: int, length: int) -> tuple[Array, Array, npt.NDArray[np.int64]]:
    """keys (B, L, vocab + L) = [one-hot token; one-hot position], values (B, L, vocab) = the
    one-hot tokens, targets (B, L): the tokens reversed."""
    tokens = rng.permuted(np.tile(np.arange(vocab), (batch, 1)), axis=1)[:, :length]  # distinct per row
    one_hot = np.eye(vocab, dtype=np.float32)[tokens]
    positions = np.broadcast_to(np.eye(length, dtype=np.float32), (batch, length, length))
    keys = np.concatenate([one_hot, positions], axis=-1)
    return keys, one_hot, tokens[:, ::-1].copy()


def cross_entropy(context: Array, targets: npt.NDArray[np.int64]) -> tuple[float, Array]:
    """Mean -log p(target) of the context distributions (B, T, vocab), and its gradient."""
    picked = np.take_along_axis(context, targets[..., None], axis=-1)[..., 0] + 1e-6  # log 0 guard
    grad = np.zeros_like(context)
    np.put_along_axis(grad, targets[..., None], (-1.0 / (picked * picked.size))[..., None].astype(context.dtype),
                      axis=-1)
    return float(-np.mean(np.log(picked))), grad


def train_step(p: Params, keys: Array, values: Array, targets: npt.NDArray[np.int64], lr: float
               ) -> tuple[float, float, Array]:
    """One SGD step; returns the loss and accuracy before the step, and the weights (B, T, L)."""
    # The queries (T, Dq) broadcast against the batch of keys (B, L, Dk): every sentence uses
    # the same query per decoder step, and the gradient comes back summed over the batch, (T, Dq).
    (context, weights), pullback = attnext.vjp(attnext.additive_attention, p.queries, keys, values, p.w_query,
                                               p.w_key, p.v, return_weights=True)
    loss, d_context = cross_entropy(context, targets)
    grads = pullback((d_context, None))  # no cotangent for the weights
    d_query, _, _, d_w_query, d_w_key, d_v = grads
    p.queries -= lr * d_query
    p.w_query -= lr * d_w_query
    p.w_key -= lr * d_w_key
    p.v -= lr * d_v
    accuracy = float(np.mean(context.argmax(axis=-1) == targets))
    return loss, accuracy, weights


def train(steps: int = 200, *, batch: int = 32, vocab: int = 10, length: int = 8, query_dim: int = 8,
          units: int = 16, lr: float = 1.0, seed: int = 0, report_every: int = 20, quiet: bool = False
          ) -> tuple[list[float], float, Array]:
    """Trains the reversal; returns the losses per step, the final accuracy and one sentence's
    (T, L) attention weights after training."""
    rng = np.random.default_rng(seed)
    p = init_params(rng, length, vocab, length, query_dim, units)
    losses: list[float] = []
    accuracy = 0.0
    for step in range(steps):
        keys, values, targets = make_batch(rng, batch, vocab, length)
        loss, accuracy, _ = train_step(p, keys, values, targets, lr)
        losses.append(loss)
        if not quiet and (step % report_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  accuracy {accuracy:.2f}")
    keys, values, _ = make_batch(rng, 1, vocab, length)
    _, weights = attnext.additive_attention(p.queries, keys, values, p.w_query, p.w_key, p.v, return_weights=True)
    return losses, accuracy, weights[0]


def show_alignment(weights: Array) -> None:
    print("attention weights after training (row = decoder step t, column = encoder position j):")
    print("      " + " ".join(f"{j:>5}" for j in range(weights.shape[1])))
    for t, row in enumerate(weights):
        print(f"t={t:<3} " + " ".join(f"{x:5.2f}" for x in row))
    hits = int(np.sum(weights.argmax(axis=1) == np.arange(weights.shape[1])[::-1]))
    print(f"{hits} of {weights.shape[0]} steps attend most to position L-1-t (the reversal's alignment)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="SGD steps (default 200)")
    parser.add_argument("--lr", type=float, default=1.0, help="learning rate (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    losses, accuracy, weights = train(args.steps, lr=args.lr, seed=args.seed)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, accuracy {accuracy:.2f}")
    show_alignment(weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
