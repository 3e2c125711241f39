"""PyTorch integration (``pip install "attnext[torch]"``): attnext's CPU kernels as PyTorch
custom operators with autograd, an ``nn.Module`` for Bahdanau attention, and a switch that
routes existing models' ``scaled_dot_product_attention`` calls to attnext.

- :func:`scaled_dot_product_attention`: PyTorch's signature and semantics for CPU
  float32/float64 tensors (operator ``torch.ops.attnext.sdpa``).
- :func:`additive_attention` and :class:`BahdanauAttention`: the fused additive forward and
  backward (operators ``torch.ops.attnext.additive_keys`` and ``additive_attention``);
  :func:`project_keys` / :meth:`BahdanauAttention.precompute` project a decoder's memory once
  per sentence.
- ``with enabled() as stats:`` / :func:`enable` / :func:`disable`: routing (see docs/torch.md).

Threads: every call through this module runs attnext's kernels on ``torch.get_num_threads()``
threads (attnext's own setting, :func:`attnext.set_num_threads`, is restored afterwards and
governs attnext's NumPy API only), so ``torch.set_num_threads`` is the one knob of a torch model.
"""
from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (only to say what is missing)
except ImportError as exc:
    raise ImportError('attnext.torch needs PyTorch (2.4 or newer): pip install "attnext[torch]"') from exc

from ._functions import AdditiveMemory, additive_attention, project_keys, scaled_dot_product_attention
from ._routing import RoutingStats, disable, enable, enabled, is_enabled
from .modules import BahdanauAttention, BahdanauMemory

__all__ = [
    "scaled_dot_product_attention",
    "additive_attention",
    "project_keys",
    "AdditiveMemory",
    "BahdanauAttention",
    "BahdanauMemory",
    "enabled",
    "enable",
    "disable",
    "is_enabled",
    "RoutingStats",
]
