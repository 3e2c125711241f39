"""The three steps of attention, one function each, on a toy "sentence".

Run: python examples/three_steps.py
"""

import numpy as np

import attnext

tokens = ["the", "cat", "sat", "on", "the", "mat"]
rng = np.random.default_rng(7)
embed = rng.standard_normal((len(tokens), 16)).astype(np.float32)
# The two occurrences of "the" share an embedding, so they attend alike.
embed[4] = embed[0]

# Self-attention: queries, keys and values from the same input by three linear maps.
w_q, w_k, w_v = (rng.standard_normal((16, 16)).astype(np.float32) / 4 for _ in range(3))
q, k, v = embed @ w_q, embed @ w_k, embed @ w_v

scores = attnext.score(q, k, "scaled_dot")  # 1. compare every query with every key
weights = attnext.softmax(scores, mask=attnext.reference.causal_mask(6, 6, True))  # 2. normalise (causal)
context = attnext.weighted_sum(weights, v)  # 3. mix the values

print("attention weights (row = query, causal):")
print("       " + " ".join(f"{t:>5}" for t in tokens))
for t, row in zip(tokens, weights):
    print(f"{t:>6} " + " ".join(f"{x:5.2f}" for x in row))
assert np.allclose(weights.sum(axis=1), 1)

# The same three steps in one call; the fused path gives the same numbers.
fused = attnext.attention(q, k, v, is_causal=True)
print("max |three steps - attention()| =", float(np.abs(fused - context).max()))

# Bahdanau's additive score uses learned projections and never builds the (Lq, Lk, U) tensor.
units = 8
additive = attnext.score(q, k, "additive", w_query=rng.standard_normal((16, units)).astype(np.float32),
                         w_key=rng.standard_normal((16, units)).astype(np.float32),
                         v=rng.standard_normal(units).astype(np.float32))
print("additive scores shape:", additive.shape)
