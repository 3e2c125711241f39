"""attnext.torch.BahdanauAttention: parameters and state_dict as attnext's layer, outputs and
gradients as the usual PyTorch formula, key padding, one step and many."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attnext  # noqa: E402
import attnext.torch as at  # noqa: E402

F64 = torch.float64
CONFIGS = [{}, {"bias": True}, {"normalize": True}, {"normalize": True, "bias": True}]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny tensors: see conftest


def _usual(module: at.BahdanauAttention, query, keys, values, mask=None):
    """The textbook formula through torch autograd (the (B, T, Lk, U) tensor and all)."""
    hidden = torch.tanh(module.query_proj(query)[..., :, None, :] + module.key_proj(keys)[..., None, :, :])
    if module.normalize:
        scores = hidden @ module.effective_v()
    else:
        scores = module.v(hidden).squeeze(-1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return weights @ values, weights


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_names_and_shapes_match_attnexts_layer(config):
    ours = at.BahdanauAttention(5, 6, 8, **config)
    theirs = attnext.BahdanauAttention(5, 6, 8, **config, rng=0)
    expected = {name: np.shape(a) for name, a in theirs.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == expected
    ours.load_state_dict({name: torch.as_tensor(np.asarray(a)).float() for name, a in theirs.state_dict().items()})
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, generator=gen), torch.randn(2, 7, 6, generator=gen)
    context, weights = ours(q, k)
    memory = theirs.precompute(k.numpy())
    context_np, weights_np = theirs(q.numpy(), memory)
    np.testing.assert_allclose(context.detach().numpy(), context_np, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(weights.detach().numpy(), weights_np, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_outputs_and_gradients_match_the_usual_formula(config):
    torch.manual_seed(1)
    module = at.BahdanauAttention(5, 6, 8, dtype=F64, **config)
    with torch.no_grad():  # non-zero biases so that they matter
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 5, dtype=F64, generator=gen, requires_grad=True)
    k = torch.randn(3, 7, 6, dtype=F64, generator=gen, requires_grad=True)
    values = torch.randn(3, 7, 2, dtype=F64, generator=gen, requires_grad=True)
    lengths = torch.tensor([7, 3, 5])
    mask = (torch.arange(7) < lengths[:, None])[:, None, :]
    context, weights = module(q, k, values, key_lengths=lengths)
    ref_context, ref_weights = _usual(module, q, k, values, mask)
    torch.testing.assert_close(context, ref_context, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights, ref_weights, atol=1e-12, rtol=1e-10)
    gc, gw = torch.randn_like(context), torch.randn_like(weights)
    wanted = [q, k, values] + [p for name, p in module.named_parameters() if name != "v.bias"]
    ours = torch.autograd.grad((context * gc).sum() + (weights * gw).sum(), wanted)
    theirs = torch.autograd.grad((ref_context * gc).sum() + (ref_weights * gw).sum(), wanted)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_one_step_and_padding():
    module = at.BahdanauAttention(4, 4, 6)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    context, weights = module(q, k, key_lengths=torch.tensor([5, 2]))
    assert context.shape == (2, 4) and weights.shape == (2, 5)
    assert torch.all(weights[1, 2:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    many = module(q[:, None, :].expand(2, 3, 4), k, return_weights=False)
    assert many.shape == (2, 3, 4)


def test_trains_with_an_optimizer():
    torch.manual_seed(4)
    module = at.BahdanauAttention(4, 4, 8)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(8, 3, 4, generator=gen), torch.randn(8, 6, 4, generator=gen)
    target = torch.zeros(8, 3, 6)
    target[..., 2] = 1.0  # learn to look at key 2
    losses = []
    for _ in range(30):
        opt.zero_grad()
        _, weights = module(q, k)
        loss = ((weights - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
