"""``nn.Module`` layers on attnext's fused kernels."""

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ._functions import AdditiveMemory, additive_attention, check_tensors, project_keys


class BahdanauMemory(NamedTuple):
    """Encoder states prepared once per sentence by :meth:`BahdanauAttention.precompute`, for
    every decoder step: ``keys`` (an :class:`AdditiveMemory`, the projected keys, which carry
    the gradient back to the keys and ``key_proj``), ``values`` (B, Lk, Dv), and ``padding``
    ((B, 1, Lk) bool, True = may attend, or None). Made from the layer's weights at the time:
    make a new one after an optimizer step."""

    keys: AdditiveMemory
    values: Tensor
    padding: Optional[Tensor]


def _padding(key_lengths: Optional[Tensor], keys: Tensor) -> Optional[Tensor]:
    """(B, 1, Lk) bool, True for the keys at positions below each entry's length, or None."""
    if key_lengths is None:
        return None
    positions = torch.arange(keys.shape[-2], device=keys.device)
    return (positions < torch.as_tensor(key_lengths, device=keys.device)[..., None]).unsqueeze(-2)


def _hide(mask: Optional[Tensor], padding: Optional[Tensor]) -> Optional[Tensor]:
    """mask restricted to the keys padding allows (bool: and; float: -inf elsewhere)."""
    if padding is None or mask is None:
        return padding if mask is None else mask
    return mask & padding if mask.dtype == torch.bool else mask.masked_fill(~padding, float("-inf"))


class BahdanauAttention(nn.Module):
    """Bahdanau's additive attention as an ``nn.Module`` (PyTorch has none), forward and
    backward on attnext's fused kernels: e_tj = v . tanh(s_t W_q + h_j W_k [+ biases]),
    a_t = softmax(e_t), c_t = sum_j a_tj value_j.

    Parameters and ``state_dict`` names are those of :class:`attnext.BahdanauAttention` (so one
    loads the other's ``state_dict``): ``query_proj = nn.Linear(query_dim, units)``,
    ``key_proj = nn.Linear(key_dim, units)``, ``v = nn.Linear(units, 1)``, biases only with
    ``bias=True`` (``query_proj.bias`` also with ``normalize=True``), and with ``normalize=True``
    a scalar ``g``: the scores use g v / ||v|| and ``query_proj.bias`` inside the tanh.
    ``v.bias`` shifts every score alike, so it never changes the output (kept so that such
    modules load as they are; it gets no gradient).

    Args:
        query_dim, key_dim, units: sizes of s_t, h_j and the score's hidden layer.
        normalize: the weight-normalised form. bias: biases in the three projections.
        dtype: torch.float32 (default) or torch.float64.
    """

    def __init__(self, query_dim: int, key_dim: int, units: int, *, normalize: bool = False, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"BahdanauAttention: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.query_dim, self.key_dim, self.units = int(query_dim), int(key_dim), int(units)
        self.normalize, self.use_bias = bool(normalize), bool(bias)
        self.query_proj = nn.Linear(query_dim, units, bias=self.use_bias or self.normalize, dtype=dtype)
        self.key_proj = nn.Linear(key_dim, units, bias=self.use_bias, dtype=dtype)
        self.v = nn.Linear(units, 1, bias=self.use_bias, dtype=dtype)
        if self.normalize:
            self.g = nn.Parameter(torch.tensor(math.sqrt(1.0 / units), dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases, as :class:`attnext.BahdanauAttention`."""
        for layer in (self.query_proj, self.key_proj, self.v):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if self.normalize:
            with torch.no_grad():
                self.g.fill_(math.sqrt(1.0 / self.units))

    def effective_v(self) -> Tensor:
        """The (units,) vector the scores use: v, or g v / ||v|| with normalize=True."""
        v = self.v.weight[0]
        return self.g * v / v.norm() if self.normalize else v

    def _tanh_bias(self) -> Optional[Tensor]:
        biases = [b for b in (self.query_proj.bias, self.key_proj.bias) if b is not None]
        return None if not biases else biases[0] if len(biases) == 1 else biases[0] + biases[1]

    def precompute(self, keys: Tensor, values: Optional[Tensor] = None, *,
                   key_lengths: Optional[Tensor] = None) -> BahdanauMemory:
        """Projects the encoder states once for every decoder step (with autograd: each step's
        gradient of the projected keys is added by torch, and the projection's backward runs
        once per sentence).

        Args:
            keys: (B, Lk, key_dim) encoder states; values: (B, Lk, Dv), default the keys.
            key_lengths: (B,) ints; keys at positions >= length are hidden.

        Returns:
            A :class:`BahdanauMemory` to pass as ``keys`` to :meth:`forward`.
        """
        memory = project_keys(keys, self.key_proj.weight.t())
        return BahdanauMemory(memory, keys if values is None else values, _padding(key_lengths, keys))

    def forward(self, query: Tensor, keys: Union[Tensor, BahdanauMemory], values: Optional[Tensor] = None, *,
                key_lengths: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                return_weights: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """One decoder step (query (B, query_dim)) or many (query (B, T, query_dim)).

        Args:
            keys: (B, Lk, key_dim) encoder states, or a :class:`BahdanauMemory` from
                :meth:`precompute` (then values and key_lengths come from it).
            values: (B, Lk, Dv), default the keys.
            key_lengths: (B,) ints; keys at positions >= length are hidden.
            attn_mask: broadcastable to (B, T, Lk) (or (B, Lk) for one step): bool True = may
                attend, or float added to the scores.

        Returns:
            (context, weights): (B, Dv) and (B, Lk) for one step, (B, T, Dv) and (B, T, Lk) for
            many; only the context with ``return_weights=False``.
        """
        check_tensors("BahdanauAttention", query=query,
                      keys=keys.keys.projected if isinstance(keys, BahdanauMemory) else keys, values=values)
        if isinstance(keys, BahdanauMemory):
            if values is not None or key_lengths is not None:
                raise ValueError("BahdanauAttention: values and key_lengths come from the memory; pass neither")
            memory, w_key, values, padding = keys.keys, None, keys.values, keys.padding
            single = query.dim() == memory.projected.dim() - 1
        else:
            memory, w_key, padding = keys, self.key_proj.weight.t(), _padding(key_lengths, keys)
            values = keys if values is None else values
            single = query.dim() == keys.dim() - 1
        q = query.unsqueeze(-2) if single else query
        mask = _hide(attn_mask.unsqueeze(-2) if single and attn_mask is not None else attn_mask, padding)
        result = additive_attention(q, memory, values, self.query_proj.weight.t(), w_key, self.effective_v(),
                                    bias=self._tanh_bias(), attn_mask=mask, return_weights=return_weights)
        if not single:
            return result
        if return_weights:
            return result[0].squeeze(-2), result[1].squeeze(-2)
        return result.squeeze(-2)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, units={self.units}, "
                f"normalize={self.normalize}, bias={self.use_bias}")
