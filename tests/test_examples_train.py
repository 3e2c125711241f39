"""examples/train_numpy.py trains Bahdanau attention with attnext.vjp and NumPy SGD: the loss
falls and the learned alignment is the reversal's anti-diagonal (a short run, about a second)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_numpy.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("attnext_example_train_numpy", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_training_lowers_the_loss_and_learns_the_alignment(example):
    losses, accuracy, weights = example.train(60, quiet=True)
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert losses[0] > np.log(4)  # starts near chance: the 8 positions look alike
    assert np.mean(losses[-10:]) < 0.25 * losses[0]
    assert accuracy > 0.9
    length = weights.shape[1]
    assert weights.shape == (length, length)
    assert np.array_equal(weights.argmax(axis=1), np.arange(length)[::-1])


def test_the_gradient_step_matches_finite_differences(example):
    """The example's hand-written cross-entropy gradient and attnext's pullback together give the
    loss's true gradient (checked on the queries, in float64 by central differences)."""
    rng = np.random.default_rng(1)
    p = example.init_params(rng, 4, 6, 4, 3, 5)
    keys, values, targets = example.make_batch(rng, 3, 6, 4)
    import attnext

    def loss_of(queries):
        context = attnext.additive_attention(queries, keys.astype(np.float64), values.astype(np.float64),
                                             p.w_query.astype(np.float64), p.w_key.astype(np.float64),
                                             p.v.astype(np.float64))
        return example.cross_entropy(context, targets)

    q = p.queries.astype(np.float64)
    context, pullback = attnext.vjp(attnext.additive_attention, q, keys.astype(np.float64),
                                    values.astype(np.float64), p.w_query.astype(np.float64),
                                    p.w_key.astype(np.float64), p.v.astype(np.float64))
    _, d_context = example.cross_entropy(context, targets)
    d_q = pullback(d_context)[0]
    assert d_q.shape == q.shape
    h = 1e-6
    numeric = np.zeros_like(q)
    for idx in np.ndindex(q.shape):
        up, down = q.copy(), q.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss_of(up)[0] - loss_of(down)[0]) / (2 * h)
    np.testing.assert_allclose(d_q, numeric, rtol=1e-5, atol=1e-8)


def test_the_script_prints_the_loss_and_the_alignment(example, capsys):
    assert example.main(["--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "step    0  loss" in out and "step   29  loss" in out
    assert "attention weights after training" in out
    assert "steps attend most to position L-1-t" in out
