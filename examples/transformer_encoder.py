"""A transformer encoder block in NumPy on attnext: multi-head self-attention, layer norm and a
feed-forward network, the block BERT and the original Transformer stack.

    post-norm (PyTorch's default, BERT):  x = LN1(x + MHA(x));  x = LN2(x + FF(x))
    pre-norm  (norm_first=True, GPT-2):    x = x + MHA(LN1(x));  x = x + FF(LN2(x))
    FF(x) = act(x W1^T + b1) W2^T + b2

Run it (``python examples/transformer_encoder.py``): it runs a block on a padded batch and, when
PyTorch is installed, copies the weights of a ``torch.nn.TransformerEncoderLayer`` and checks
that both give the same output; with Hugging Face ``transformers`` installed too, it does the
same for a layer of a small BERT model built from a config (random weights, no download).

Loading real weights
--------------------
Every weight here uses PyTorch's (out_features, in_features) layout, so most checkpoints load
without transposes.

- ``torch.nn.TransformerEncoderLayer``: ``EncoderBlock.from_torch(layer)`` (below) copies
  ``self_attn`` with ``MultiHeadAttention.from_torch``, ``linear1``/``linear2`` into the
  feed-forward weights and ``norm1``/``norm2`` into the layer norms.
- A Hugging Face BERT layer (``model.encoder.layer[i]``): ``EncoderBlock.from_bert(layer)``
  (below). Its attention comes from ``attnext.transformer.from_bert_attention(layer)``, which
  copies ``attention.self.query/key/value`` and ``attention.output.dense`` into a
  ``MultiHeadAttention``; ``attention.output.LayerNorm`` is norm1 (eps 1e-12),
  ``intermediate.dense`` is (w1, b1) with ``activation="gelu"``, ``output.dense`` is (w2, b2) and
  ``output.LayerNorm`` is norm2. BERT is post-norm. Its ``attention_mask`` (1 = token,
  0 = padding) is ``key_mask=attention_mask.astype(bool)`` (True = may attend; PyTorch's
  ``src_key_padding_mask`` is the negation). For the attention alone:
  ``y, _ = attn(x, key_mask=attention_mask.astype(bool))``, then LayerNorm(x + y) is
  BertAttention's output.
- LLaMA-style models keep separate q/k/v/o projections with fewer key/value heads: build
  ``MultiHeadAttention(E, H, num_kv_heads=Hk, bias=False)`` and use ``load_projections``; they
  also rotate Q and K (rotary embeddings) and use RMSNorm and a gated feed-forward, which this
  block does not do.
"""

from __future__ import annotations

import math

import numpy as np

import attnext

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """Exact GELU, x * Phi(x) (PyTorch's default and BERT's)."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))).astype(x.dtype)


def relu(x):
    return np.maximum(x, 0)


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


class EncoderBlock:
    """One encoder block on (B, L, embed_dim) inputs (batch first)."""

    def __init__(self, embed_dim, num_heads, ff_dim, *, activation="relu", norm_first=False, eps=1e-5,
                 dtype=np.float32, rng=None):
        rng = np.random.default_rng(rng)
        self.attn = attnext.MultiHeadAttention(embed_dim, num_heads, batch_first=True, dtype=dtype, rng=rng)
        bound1, bound2 = 1 / math.sqrt(embed_dim), 1 / math.sqrt(ff_dim)
        self.w1 = rng.uniform(-bound1, bound1, (ff_dim, embed_dim)).astype(dtype)
        self.b1 = np.zeros(ff_dim, dtype)
        self.w2 = rng.uniform(-bound2, bound2, (embed_dim, ff_dim)).astype(dtype)
        self.b2 = np.zeros(embed_dim, dtype)
        self.norm1 = [np.ones(embed_dim, dtype), np.zeros(embed_dim, dtype)]
        self.norm2 = [np.ones(embed_dim, dtype), np.zeros(embed_dim, dtype)]
        self.activation = {"relu": relu, "gelu": gelu}[activation]
        self.norm_first = norm_first
        self.eps = eps

    def feed_forward(self, x):
        return self.activation(x @ self.w1.T + self.b1) @ self.w2.T + self.b2

    def __call__(self, x, *, key_mask=None, is_causal=False):
        """x (B, L, E); key_mask (B, L) bool, True = a real token (may be attended to)."""
        def attend(h):
            return self.attn(h, key_mask=key_mask, is_causal=is_causal)[0]

        if self.norm_first:
            x = x + attend(layer_norm(x, *self.norm1, self.eps))
            return x + self.feed_forward(layer_norm(x, *self.norm2, self.eps))
        x = layer_norm(x + attend(x), *self.norm1, self.eps)
        return layer_norm(x + self.feed_forward(x), *self.norm2, self.eps)

    @classmethod
    def from_torch(cls, layer):
        """The block of a ``torch.nn.TransformerEncoderLayer(batch_first=True)`` (relu or gelu)."""
        import torch.nn.functional as F

        np_ = lambda t: t.detach().cpu().numpy()
        act = "gelu" if layer.activation is F.gelu or getattr(layer, "activation_relu_or_gelu", 1) == 2 else "relu"
        e, ff = layer.linear1.in_features, layer.linear1.out_features
        block = cls(e, layer.self_attn.num_heads, ff, activation=act, norm_first=layer.norm_first, eps=layer.norm1.eps)
        block.attn = attnext.MultiHeadAttention.from_torch(layer.self_attn)
        block.w1, block.b1 = np_(layer.linear1.weight), np_(layer.linear1.bias)
        block.w2, block.b2 = np_(layer.linear2.weight), np_(layer.linear2.bias)
        block.norm1 = [np_(layer.norm1.weight), np_(layer.norm1.bias)]
        block.norm2 = [np_(layer.norm2.weight), np_(layer.norm2.bias)]
        return block

    @classmethod
    def from_bert(cls, layer):
        """The block of a Hugging Face ``BertLayer`` (``model.encoder.layer[i]``): post-norm, GELU."""
        np_ = lambda t: t.detach().cpu().numpy()
        attn = attnext.transformer.from_bert_attention(layer)
        norm1, norm2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
        ff = layer.intermediate.dense
        block = cls(attn.embed_dim, attn.num_heads, ff.out_features, activation="gelu", eps=norm1.eps)
        block.attn = attn
        block.w1, block.b1 = np_(ff.weight), np_(ff.bias)
        block.w2, block.b2 = np_(layer.output.dense.weight), np_(layer.output.dense.bias)
        block.norm1 = [np_(norm1.weight), np_(norm1.bias)]
        block.norm2 = [np_(norm2.weight), np_(norm2.bias)]
        return block


def main():
    rng = np.random.default_rng(0)
    b, l, e, h, ff = 2, 10, 64, 4, 128
    x = rng.standard_normal((b, l, e)).astype(np.float32)
    lengths = np.array([10, 6])
    key_mask = np.arange(l) < lengths[:, None]  # True = real token; the second sequence is padded

    block = EncoderBlock(e, h, ff, rng=1)
    y = block(x, key_mask=key_mask)
    print(f"encoder block output {y.shape}, mean {y.mean():+.4f}, std {y.std():.4f}")

    try:
        import torch
    except ImportError:
        print("PyTorch not installed: skipping the comparison with torch.nn.TransformerEncoderLayer")
        return
    torch.manual_seed(0)
    for activation, norm_first in (("relu", False), ("gelu", True)):
        layer = torch.nn.TransformerEncoderLayer(e, h, ff, dropout=0.0, activation=activation, batch_first=True,
                                                 norm_first=norm_first).eval()
        ours = EncoderBlock.from_torch(layer)(x, key_mask=key_mask)
        with torch.no_grad():
            # dropout=0, so training mode computes the same function; it keeps PyTorch off its
            # inference fast path, which returns zeros at padded positions.
            layer.train()
            theirs = layer(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(~key_mask)).numpy()
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        print(f"torch.nn.TransformerEncoderLayer({activation}, norm_first={norm_first}): "
              f"max relative difference {err:.1e}")
        assert err < 1e-5, err

    try:
        import transformers
    except ImportError:
        print("transformers not installed: skipping the comparison with a BERT layer")
        return
    config = transformers.BertConfig(vocab_size=100, hidden_size=e, num_hidden_layers=2, num_attention_heads=h,
                                     intermediate_size=ff, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()  # random weights from the config, no download
    ids = torch.randint(0, 100, (b, l))
    attention_mask = torch.from_numpy(key_mask.astype(np.int64))  # HF: 1 = token, 0 = padding
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    layer_input, theirs = hidden[1].numpy(), hidden[2].numpy()  # the input and output of layer 1
    ours = EncoderBlock.from_bert(model.encoder.layer[1])(layer_input, key_mask=attention_mask.numpy().astype(bool))
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"BertLayer: max relative difference {err:.1e}")
    assert err < 1e-5, err


if __name__ == "__main__":
    main()
