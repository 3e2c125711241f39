"""Encoder-decoder (RNN) attention layers: Bahdanau (additive) and Luong (dot, general, concat).

A decoder state s_t (the query) attends over the encoder states h_1..h_n (keys, and values
unless given separately) at every output step. Both layers hold their weights as NumPy arrays
of one dtype (float32 by default, float64, or float16 / ``ml_dtypes.bfloat16`` for inference),
readable and assignable as attributes in the textbook (in, out) orientation (an assignment is
checked for shape and converted to the layer's dtype; ``set_weights`` sets several at once),
and round-trip through ``state_dict()`` / ``load_state_dict()`` with PyTorch's names and
(out, in) layout, so the equivalent PyTorch module's state dict loads as it is. Inputs of
another floating dtype are converted to the layer's dtype.

16-bit layers (float16, bfloat16) follow the functions' precision rules (docs/precision.md):
products read from the 16-bit arrays, accumulation, tanh and softmax in float32, the context
(and Luong's attentional state) in the layer's type unless the call asks for
``out_dtype=np.float32``, the attention weights in float32. Each class docstring lists where
it rounds to 16 bits. ``vjp`` of a bfloat16 layer raises TypeError (bfloat16 training is not
supported); a float16 layer's gradients are computed in float32 and returned as float16, as
the backward functions do.

Both layers take one decoder step, query (B, D), or many steps at once, query (B, T, D), with
the same results; any number of leading batch axes may stand in for B.

Training: ``out, pullback = layer.vjp(...)`` takes what the call takes;
``pullback(cotangent)`` gives ``(input_grads, param_grads)``, param_grads keyed like
``state_dict()``. A Bahdanau decoder loop keeps the key projection once per sentence:
``memory, pre = layer.precompute_vjp(keys)``, every step's ``vjp(s_t, memory)`` returns a
:class:`BahdanauMemoryGrad` for the memory, and ``pre(sum of them)`` gives the gradients of the
encoder states and of ``w_key``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from ._layers import (LayerPullback, checked_weight, glorot_uniform, input_grad, layer_dtype, layer_input, linear_grads,
                      make_rng, output_cotangents, owned, positive_int)
from ._masks import prepare_mask
from ._validation import (FLOAT32, accumulation_dtype, check_key_lengths, check_state_keys, is_low_precision,
                          out_kwargs, refuse_bfloat16_backward, shape_str, to_array)
from .functional import (ArrayLike, ProjectedKeys, _additive_kernel, _mask_alias, additive_attention,
                         scaled_dot_product_attention)
from .grad import additive_attention_backward, scaled_dot_product_attention_backward
from .transformer import _linear

__all__ = ["BahdanauAttention", "BahdanauMemory", "BahdanauMemoryGrad", "LuongAttention"]


class _Weights:
    """Named NumPy parameters of fixed shapes, checked on assignment.

    Subclasses list their parameters in ``self._shapes`` (name -> shape) before assigning them.
    """

    _shapes: dict

    def __setattr__(self, name, value):
        shapes = self.__dict__.get("_shapes")
        if shapes is not None and name in shapes:
            value = self._checked(name, value)
            object.__setattr__(self, "_" + name, value)
            self._weights_changed(name)
            return
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        shapes = self.__dict__.get("_shapes")
        if shapes is not None and name in shapes:
            return self.__dict__["_" + name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def _checked(self, name, value):
        return np.array(checked_weight(value, name, self._shapes[name], self.dtype), order="C", copy=True)

    def _weights_changed(self, name):
        pass

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _torch_shape(self, name):
        attr, kind = self._torch[name]
        shape = self._shapes[attr]
        return {"T": shape[::-1], "row": (1,) + shape, "one": (1,)}.get(kind, shape)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, named and laid out as in the equivalent PyTorch module
        (``nn.Linear`` weights (out_features, in_features)); see the class docstring."""
        out = {}
        for name, (attr, kind) in self._torch.items():
            value = self.__dict__["_" + attr]
            out[name] = np.array(value.T if kind == "T" else value.reshape(self._torch_shape(name)), order="C",
                                 copy=True)
        return out

    def load_state_dict(self, state: Mapping[str, ArrayLike]) -> None:
        """Sets every parameter from ``state``, named and shaped as :meth:`state_dict` returns
        them (PyTorch's layout: ``{k: v.numpy() for k, v in module.state_dict().items()}`` of the
        equivalent module); the names must match exactly and each array must have its shape.
        Nothing changes when it raises. A dict of exactly the textbook attribute names (the
        layout before the PyTorch names) is still accepted and goes to :meth:`set_weights`."""
        if set(state) == set(self._shapes) and set(state) != set(self._torch):
            self.set_weights(**state)
            return
        try:
            check_state_keys(state, self._torch, type(self).__name__)
        except ValueError as e:
            textbook = sorted(set(state) & (set(self._shapes) - set(self._torch)))
            if textbook:
                raise ValueError(f"{e}; {textbook} are attribute names in the textbook (in, out) orientation: "
                                 "set those with set_weights()") from None
            raise
        checked = {}
        for name, (attr, kind) in self._torch.items():
            a = checked_weight(state[name], name, self._torch_shape(name), self._dtype)
            checked[attr] = self._checked(attr, a.T if kind == "T" else a.reshape(self._shapes[attr]))
        self._assign(checked)

    def set_weights(self, **weights: ArrayLike) -> None:
        """Sets the named parameters in the textbook (in, out) orientation, by attribute name
        (``w_query=``, ``w_key=``, ...; see the class docstring); the rest stay. The alias of
        :meth:`load_state_dict` kept for existing code, as is assigning one attribute
        (``layer.w_query = W``). Nothing changes when it raises."""
        unknown = sorted(set(weights) - set(self._shapes))
        if unknown:
            raise TypeError(f"{type(self).__name__}.set_weights got unexpected names {unknown}; "
                            f"it takes {list(self._shapes)}")
        self._assign({name: self._checked(name, value) for name, value in weights.items()})

    def _assign(self, checked):
        for name, value in checked.items():
            object.__setattr__(self, "_" + name, value)
        for name in checked:
            self._weights_changed(name)

    def _input(self, x, name):
        return layer_input(x, name, self._dtype)

    def _refuse_bfloat16_backward(self) -> None:
        """vjp's first step: a bfloat16 layer has no backward (the functions' one rule)."""
        refuse_bfloat16_backward({f"{type(self).__name__}.dtype": np.empty(0, self._dtype)})

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({config}, dtype={self._dtype.name})"


def _lengths(key_lengths, batch_shape, lk):
    """key_lengths as a contiguous int64 array of exactly the batch shape (values checked),
    owned by the caller of this function (never a view of the user's array)."""
    if key_lengths is None:
        return None
    return np.array(check_key_lengths(key_lengths, batch_shape, lk), dtype=np.int64, order="C")


class BahdanauMemory:
    """Encoder states prepared once per sentence by :meth:`BahdanauAttention.precompute`.

    Holds the projected keys ``keys @ w_key`` (a :class:`ProjectedKeys`), the values and the
    key lengths; every decoder step reuses them. It owns all of them: the values and lengths
    are copies, so reusing the encoder's buffers for the next sentence cannot change a memory
    already made. Attributes: ``keys`` (the ProjectedKeys), ``projected`` (..., Lk, U),
    ``values`` (..., Lk, Dv), ``key_lengths`` ((...,) int64 or None), ``batch_shape``,
    ``num_keys``. A memory belongs to the layer that made it and to its weights at the time:
    assigning ``w_key`` makes it stale (using it then raises).
    """

    __slots__ = ("_layer", "_version", "keys", "values", "key_lengths")

    def __init__(self, layer: "BahdanauAttention", version: int, keys: ProjectedKeys, values: np.ndarray,
                 key_lengths: np.ndarray | None) -> None:
        self._layer, self._version = layer, version
        self.keys, self.values, self.key_lengths = keys, values, key_lengths

    @property
    def projected(self) -> np.ndarray:
        return self.keys.projected

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.keys.batch_shape

    @property
    def num_keys(self) -> int:
        return self.keys.num_keys

    def __repr__(self) -> str:
        return (f"BahdanauMemory(batch_shape={shape_str(self.batch_shape)}, num_keys={self.num_keys}, "
                f"values={shape_str(self.values.shape)}, key_lengths={self.key_lengths is not None})")


class BahdanauMemoryGrad:
    """The gradient of a :class:`BahdanauMemory`, from a decoder step's ``vjp``.

    ``projected`` (..., Lk, U) is the gradient of the projected keys ``keys @ w_key`` and
    ``values`` (..., Lk, Dv) that of the memory's values. The steps that read one memory add
    their gradients with ``+`` (``sum(grads)`` works too); the pullback of
    :meth:`BahdanauAttention.precompute_vjp` turns the total into the gradients of the keys,
    the values and ``w_key``.
    """

    __slots__ = ("projected", "values")

    def __init__(self, projected: np.ndarray, values: np.ndarray) -> None:
        self.projected, self.values = projected, values

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum() starts from 0
            return self
        if type(other) is not BahdanauMemoryGrad:
            return NotImplemented
        if other.projected.shape != self.projected.shape or other.values.shape != self.values.shape:
            raise ValueError(f"cannot add gradients of different memories: {self!r} and {other!r}")
        return BahdanauMemoryGrad(self.projected + other.projected, self.values + other.values)

    __radd__ = __add__

    def __repr__(self) -> str:
        return (f"BahdanauMemoryGrad(projected={shape_str(self.projected.shape)}, "
                f"values={shape_str(self.values.shape)})")


class BahdanauAttention(_Weights):
    """Bahdanau's additive attention: e_tj = v . tanh(s_t W_q + h_j W_k), a_t = softmax(e_t),
    c_t = sum_j a_tj value_j.

    :meth:`state_dict` / :meth:`load_state_dict` use the names and the (out_features,
    in_features) layout of the PyTorch module with ``query_proj = nn.Linear(query_dim, units)``,
    ``key_proj = nn.Linear(key_dim, units)`` and ``v = nn.Linear(units, 1)``, whose scores are
    ``v(tanh(query_proj(s)[..., None, :] + key_proj(h)[..., None, :, :])).squeeze(-1)``:

    - ``query_proj.weight`` (units, query_dim), ``key_proj.weight`` (units, key_dim),
      ``v.weight`` (1, units);
    - with ``bias=True``: ``query_proj.bias`` (units,), ``key_proj.bias`` (units,), ``v.bias``
      (1,) (initialised to zeros; ``v.bias`` shifts every score alike, so it never changes
      the output, but it is kept so that such a module loads as it is);
    - with ``normalize=True`` (the weight-normalised variant, as TF Addons'
      ``BahdanauAttention(normalize=True)``): the scores use g v / ||v|| instead of v, with a
      scalar ``g`` (shape (), initialised to sqrt(1 / units)), and ``query_proj.bias`` (units,)
      (initialised to zeros) is added inside the tanh:
      e_tj = (g v / ||v||) . tanh(s_t W_q + h_j W_k + bias). (From
      ``torch.nn.utils.weight_norm(v)``: ``v.weight`` is its ``v.weight_v`` and ``g`` its
      ``v.weight_g`` as a scalar.)

    The same parameters as attributes, in the textbook (in, out) orientation, assignable one at
    a time or together with :meth:`set_weights` (the older form, kept): ``w_query``
    (query_dim, units), ``w_key`` (key_dim, units), ``v`` (units,), ``g`` (), ``bias`` (units,)
    (``query_proj.bias``), ``key_bias`` (units,), ``v_bias`` ().

    Args:
        query_dim: size of the decoder state s_t.
        key_dim: size of the encoder states h_j.
        units: size of the hidden layer of the score.
        normalize: the weight-normalised form above.
        bias: biases in the three projections, as ``nn.Linear``'s default.
        dtype: float32 (default) or float64, for the weights and the computation; or float16 /
            ``ml_dtypes.bfloat16`` for inference (weights and state_dict in that type).
        rng: seed or ``np.random.Generator`` for the initialisation (Glorot-uniform weights).

    Precision (16-bit layers, docs/precision.md): the projections ``s_t W_q``, ``h_j W_k``
    (the memory keeps ``h_j W_k`` in float32), the tanh, the scores and the softmax are
    float32, as in :func:`attnext.additive_attention`. Rounded to the layer's type: with
    ``normalize=True`` the vector g v / ||v|| (computed in float32, once per change of v or
    g), with ``bias=True`` the sum ``query_proj.bias + key_proj.bias`` (one bias inside the
    tanh), and the context at its store unless ``out_dtype=np.float32``. The weights are
    float32.

    Use: ``memory = layer.precompute(encoder_states)`` once per sentence, then
    ``context, weights = layer(s_t, memory)`` at every step. Training:
    ``memory, pre = layer.precompute_vjp(encoder_states)``, at every step
    ``(context, weights), pb = layer.vjp(s_t, memory)`` and
    ``(ds_t, memory_grad), param_grads = pb((grad_context, None))``; then
    ``(d_encoder_states,), more_param_grads = pre(sum(memory_grads))``.
    """

    def __init__(self, query_dim: int, key_dim: int, units: int, *, normalize: bool = False, bias: bool = False,
                 dtype: npt.DTypeLike = np.float32, rng: int | np.random.Generator | None = None) -> None:
        for name, n in (("query_dim", query_dim), ("key_dim", key_dim), ("units", units)):
            positive_int(n, name)
        self._dtype = layer_dtype(dtype)
        self.query_dim, self.key_dim, self.units, self.normalize = int(query_dim), int(key_dim), int(units), bool(
            normalize)
        self._version = 0
        self._v_eff = None
        self.use_bias = bool(bias)
        shapes = {"w_query": (self.query_dim, self.units), "w_key": (self.key_dim, self.units), "v": (self.units,)}
        torch = {"query_proj.weight": ("w_query", "T")}
        if self.normalize or self.use_bias:
            shapes["bias"] = (self.units,)
            torch["query_proj.bias"] = ("bias", None)
        torch["key_proj.weight"] = ("w_key", "T")
        if self.use_bias:
            shapes.update({"key_bias": (self.units,), "v_bias": ()})
            torch["key_proj.bias"] = ("key_bias", None)
        torch["v.weight"] = ("v", "row")
        if self.use_bias:
            torch["v.bias"] = ("v_bias", "one")
        if self.normalize:
            shapes["g"] = ()
            torch["g"] = ("g", None)
        self._shapes, self._torch = shapes, torch
        gen = make_rng(rng)
        state = {name: glorot_uniform(gen, shapes[name], self._dtype) for name in ("w_query", "w_key", "v")}
        state.update({name: np.zeros(shapes[name]) for name in ("bias", "key_bias", "v_bias") if name in shapes})
        if self.normalize:
            state["g"] = np.asarray(np.sqrt(1.0 / self.units))
        self.set_weights(**state)

    def _weights_changed(self, name):
        if name == "w_key":
            self._version += 1  # precomputed memories now hold stale projections
        if name in ("v", "g"):
            v = self.__dict__.get("_v")
            if v is None or (self.normalize and "_g" not in self.__dict__):
                return
            if self.normalize:
                # In the accumulation type (float32 for a 16-bit layer, whose sum of squares
                # could overflow float16), rounded once to the layer's type.
                acc = accumulation_dtype(self._dtype)
                wide = v.astype(acc)
                norm = np.sqrt(np.sum(wide * wide))
                # Only a zero v is special-cased; a NaN or inf norm (non-finite v) must reach the scores.
                self._v_eff = np.zeros_like(v) if norm == 0 else (self._g.astype(acc) * wide / norm).astype(
                    self._dtype)
            else:
                self._v_eff = v

    @property
    def effective_v(self) -> np.ndarray:
        """The vector the scores use: v, or g v / ||v|| with normalize=True."""
        return self._v_eff

    def _config(self) -> dict:
        return {"query_dim": self.query_dim, "key_dim": self.key_dim, "units": self.units,
                "normalize": self.normalize, "bias": self.use_bias}

    def precompute(self, keys: ArrayLike, values: ArrayLike | None = None,
                   key_lengths: ArrayLike | None = None) -> BahdanauMemory:
        """Projects the encoder states once for every decoder step.

        Args:
            keys: (B, Lk, key_dim) encoder states (any leading batch axes).
            values: (B, Lk, Dv); default: the keys.
            key_lengths: ints broadcastable to (B,); keys at positions >= length are hidden.

        Returns:
            A :class:`BahdanauMemory` for :meth:`__call__`.
        """
        return self._precompute(keys, values, key_lengths)[0]

    def _precompute(self, keys, values, key_lengths):
        """(memory, keys as the layer's dtype) for precompute and precompute_vjp."""
        k = self._input(keys, "keys")
        if k.ndim < 2 or k.shape[-1] != self.key_dim:
            raise ValueError(f"keys must have shape (..., Lk, {self.key_dim}), got {shape_str(k.shape)}")
        val = k if values is None else self._input(values, "values")
        if val.ndim < 2 or val.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"keys have shape {shape_str(k.shape)} but values have {shape_str(val.shape)}: "
                             "all but the last dimension must match")
        lengths = _lengths(key_lengths, k.shape[:-2], k.shape[-2])
        # np.array copies: the memory must not follow later writes to the caller's buffer.
        memory = BahdanauMemory(self, self._version, ProjectedKeys._project(k, self._w_key), np.array(val, order="C"),
                                lengths)
        return memory, k

    def precompute_vjp(self, keys: ArrayLike, values: ArrayLike | None = None,
                       key_lengths: ArrayLike | None = None) -> tuple[BahdanauMemory, LayerPullback]:
        """:meth:`precompute` for training: ``memory, pullback``.

        Every decoder step's ``vjp(s_t, memory)`` gives a :class:`BahdanauMemoryGrad` for the
        memory; ``pullback(total)`` with their sum returns ``(input_grads, param_grads)``:
        input_grads (dkeys,), or (dkeys, dvalues) when values were given; param_grads keyed
        like :meth:`state_dict`, zero except ``key_proj.weight`` (the steps' param_grads hold
        the rest, ``key_proj.bias`` included).
        """
        self._refuse_bfloat16_backward()
        memory, k = self._precompute(keys, values, key_lengths)
        k = owned(k, keys)
        w_key = self._w_key.copy()

        def backward(grad):
            if type(grad) is not BahdanauMemoryGrad:
                raise TypeError(f"the precompute pullback takes a BahdanauMemoryGrad (the sum of the steps' memory "
                                f"gradients), got {type(grad).__name__}")
            if grad.projected.shape != memory.projected.shape or grad.values.shape != memory.values.shape:
                raise ValueError(f"{grad!r} is not the gradient of {memory!r}")
            dkeys, d_key_proj, _ = linear_grads(np.ascontiguousarray(grad.projected, dtype=self._dtype), k, w_key.T,
                                                None)
            params = self._zero_grads()
            params["key_proj.weight"] = d_key_proj.astype(self._dtype, copy=False)
            if values is None:  # the keys were the values too
                return (input_grad(dkeys + grad.values, keys),), params
            return (input_grad(dkeys, keys), input_grad(np.array(grad.values, dtype=self._dtype), values)), params

        return memory, LayerPullback(backward)

    def _zero_grads(self) -> dict:
        return {name: np.zeros(self._torch_shape(name), dtype=self._dtype) for name in self._torch}

    def __call__(self, query: ArrayLike, memory: BahdanauMemory, *, return_weights: bool = True,
                 out_dtype: npt.DTypeLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """One decoder step (query (B, query_dim)) or many (query (B, T, query_dim)).

        out_dtype: None (the layer's dtype) or np.float32 for a float16/bfloat16 layer (the
        kernel writes the context from its float32 accumulators).

        Returns:
            (context, weights): (B, Dv) and (B, Lk) for one step, (B, T, Dv) and (B, T, Lk)
            for many; only the context if ``return_weights=False``. The weights of a 16-bit
            layer are float32.
        """
        out = out_kwargs(out_dtype, self._dtype)
        q, single = self._step_query(query, memory)
        result = _additive_kernel(q[..., None, :] if single else q, self._w_query, self._step_bias(), memory.keys,
                                  memory.values, self._v_eff, None, memory.key_lengths, bool(return_weights), out)
        if not single:
            return result
        if return_weights:
            return result[0][..., 0, :], result[1][..., 0, :]
        return result[..., 0, :]

    def _step_query(self, query, memory) -> tuple[np.ndarray, bool]:
        """(query as the layer's dtype, whether it is one step) after checking it against memory."""
        q = self._input(query, "query")
        if type(memory) is not BahdanauMemory:
            raise TypeError(f"memory must be a BahdanauMemory from precompute(), got {type(memory).__name__}")
        if memory._layer is not self or memory._version != self._version:
            raise ValueError("memory was precomputed by another layer or before w_key changed; call precompute() again")
        nb = len(memory.batch_shape)
        single = q.ndim == nb + 1
        if (not single and q.ndim != nb + 2) or q.shape[:nb] != memory.batch_shape or q.shape[-1] != self.query_dim:
            raise ValueError(f"query has shape {shape_str(q.shape)} but the memory's batch shape is "
                             f"{shape_str(memory.batch_shape)}: expected (..., {self.query_dim}) for one step or "
                             f"(..., T, {self.query_dim}) for many")
        return q, single

    def _step_bias(self) -> np.ndarray | None:
        """The bias inside the tanh in the layer's dtype: query_proj.bias, plus key_proj.bias
        with bias=True (their sum, computed in the accumulation type, is a rounding point of a
        16-bit layer)."""
        bias = self.__dict__.get("_bias")
        if self.use_bias:  # q W_q + b_q + k W_k + b_k: the key bias joins the query's (no re-projection)
            acc = accumulation_dtype(self._dtype)
            bias = (np.asarray(bias, dtype=acc) + np.asarray(self._key_bias, dtype=acc)).astype(self._dtype)
        return bias

    def vjp(self, query: ArrayLike, memory: BahdanauMemory | ArrayLike, values: ArrayLike | None = None, *,
            key_lengths: ArrayLike | None = None, return_weights: bool = True):
        """A training step's forward pass and its pullback: ``result, pullback``, result as
        :meth:`__call__` returns it.

        ``memory`` is a :class:`BahdanauMemory` (from :meth:`precompute` or
        :meth:`precompute_vjp`), or the encoder states themselves (B, Lk, key_dim) with
        optional ``values`` and ``key_lengths`` as :meth:`precompute` takes them; then the key
        projection is part of this step.

        ``pullback(grad_context)``, or ``pullback((grad_context, grad_weights))`` with
        return_weights (None for an output not differentiated), returns
        ``(input_grads, param_grads)``: input_grads is (dquery, memory_grad) for a memory,
        memory_grad a :class:`BahdanauMemoryGrad` (sum it over the steps and pass it to the
        precompute_vjp pullback), or (dquery, dkeys[, dvalues]) for encoder states;
        param_grads is keyed like :meth:`state_dict` (``key_proj.weight`` is zero for a memory:
        its gradient comes from the precompute pullback). With ``normalize=True`` and v = 0 the
        gradients of v and g are zero (g v / ||v|| has none there).
        """
        self._refuse_bfloat16_backward()
        if type(memory) is BahdanauMemory:
            if values is not None or key_lengths is not None:
                raise TypeError("values and key_lengths belong to the memory: pass them to precompute(), or pass "
                                "the encoder states instead of a memory")
            return self._step_vjp(query, memory, return_weights)
        if isinstance(memory, (BahdanauMemoryGrad, ProjectedKeys)):
            raise TypeError(f"memory must be a BahdanauMemory or the encoder states, got {type(memory).__name__}")
        mem, pre_pullback = self.precompute_vjp(memory, values, key_lengths)
        result, step_pullback = self._step_vjp(query, mem, return_weights)

        def backward(cotangent):
            (dq, memory_grad), params = step_pullback(cotangent)
            encoder_grads, pre_params = pre_pullback(memory_grad)
            return (dq,) + encoder_grads, {name: params[name] + pre_params[name] for name in params}

        return result, LayerPullback(backward)

    def _step_vjp(self, query, memory: BahdanauMemory, return_weights: bool):
        """vjp of one call on a memory: (result, pullback)."""
        q, single = self._step_query(query, memory)
        q3 = owned(q[..., None, :] if single else q, query)
        w_query, v_eff, bias = self._w_query.copy(), np.array(self._v_eff), self._step_bias()
        bias = None if bias is None else np.array(bias)
        v, g = self._v.copy(), self.__dict__.get("_g")
        context, weights = additive_attention(q3, memory.keys, memory.values, w_query, None, v_eff, bias=bias,
                                              key_lengths=memory.key_lengths, return_weights=True, warn=False)
        squeeze = (lambda a: a[..., 0, :]) if single else (lambda a: a)
        result = (squeeze(context), squeeze(weights)) if return_weights else squeeze(context)

        def backward(cotangent):
            cts = output_cotangents(cotangent, result, self._dtype)
            grad_context, grad_weights = cts[0], (cts[1] if return_weights else None)
            unsqueeze = (lambda a: None if a is None else a[..., None, :]) if single else (lambda a: a)
            grad_context = np.zeros_like(context) if grad_context is None else unsqueeze(grad_context)
            grads = additive_attention_backward(grad_context, q3, memory.keys, memory.values, w_query, None, v_eff,
                                                context, None, bias=bias, key_lengths=memory.key_lengths,
                                                grad_weights=unsqueeze(grad_weights))
            memory_grad = BahdanauMemoryGrad(grads["key"], grads["value"])
            dq = grads["query"][..., 0, :] if single else grads["query"]
            return (input_grad(dq, query), memory_grad), self._step_params(grads, v, g)

        return result, LayerPullback(backward)

    def _step_params(self, grads: dict, v: np.ndarray, g) -> dict:
        """param_grads (state_dict's keys) from the additive backward's gradients of w_query,
        the bias and the effective v (v, or g v / ||v||, taken apart here)."""
        params = self._zero_grads()
        params["query_proj.weight"] = grads["w_query"].T
        if "query_proj.bias" in params:
            params["query_proj.bias"] = grads["bias"]
        if self.use_bias:  # the key bias is added where the query's is
            params["key_proj.bias"] = grads["bias"]
        d_v_eff = grads["v"]
        if self.normalize:
            acc = accumulation_dtype(self._dtype)  # float16's sums in float32, as the forward's
            v, d_v_eff, g = v.astype(acc), d_v_eff.astype(acc), g.astype(acc)
            norm = np.sqrt(np.sum(v * v))
            if norm != 0:
                unit = v / norm
                along = np.sum(d_v_eff * unit)
                params["g"] = np.asarray(along)
                params["v.weight"] = (g / norm * (d_v_eff - along * unit)).reshape(1, -1)
        else:
            params["v.weight"] = d_v_eff.reshape(1, -1)
        return {name: np.array(a, dtype=self._dtype, order="C") for name, a in params.items()}


_LUONG_METHODS = ("dot", "general", "concat")


class LuongAttention(_Weights):
    """Luong's global attention: scores, softmax, context, then the attentional hidden state
    h~_t = tanh([c_t; s_t] W_c).

    Scores (s_t the decoder state, h_j the encoder states):

    - ``dot``:     e_tj = s_t . h_j                         (query_dim == key_dim)
    - ``general``: e_tj = s_t W_a h_j,  ``w_a`` (query_dim, key_dim)
    - ``concat``:  e_tj = v . tanh(s_t W_q + h_j W_k) (Luong's v_a . tanh(W_a [s_t; h_j]) with
      W_a split into ``w_query`` (query_dim, units) and ``w_key`` (key_dim, units); ``v`` (units,))

    With ``scale=True`` the scores are multiplied by a scalar ``g`` (initialised to 1), as in
    TF Addons' ``LuongAttention(scale=True)`` and Keras' ``Attention(use_scale=True)``.
    ``w_c`` (value_dim + query_dim, attentional_units) joins context and state; no bias, as in
    the paper.

    :meth:`state_dict` / :meth:`load_state_dict` use the names and the (out_features,
    in_features) layout of the equivalent PyTorch module (``nn.Linear(..., bias=False)``):

    - ``general``: ``key_proj.weight`` (query_dim, key_dim), of
      ``key_proj = nn.Linear(key_dim, query_dim, bias=False)``; e_tj = s_t . key_proj(h_j)
      (its weight is W_a itself);
    - ``concat``: ``query_proj.weight`` (units, query_dim), ``key_proj.weight`` (units,
      key_dim), ``v.weight`` (1, units), as in :class:`BahdanauAttention` (Luong's single
      W_a (units, query_dim + key_dim) on [s_t; h_j] is ``[query_proj.weight, key_proj.weight]``
      side by side);
    - ``g`` (shape ()) with ``scale=True``;
    - ``out_proj.weight`` (attentional_units, value_dim + query_dim), of
      ``out_proj = nn.Linear(value_dim + query_dim, attentional_units, bias=False)`` on
      [c_t; s_t]: h~_t = tanh(out_proj([c_t; s_t])) (OpenNMT's ``linear_out``).

    The attributes above (``w_a``, ``w_query``, ``w_key``, ``v``, ``g``, ``w_c``) are the same
    parameters in the textbook (in, out) orientation, assignable one at a time or together with
    :meth:`set_weights` (the older form, kept).

    Args:
        query_dim: size of s_t.
        key_dim: size of h_j (default query_dim).
        method: ``"dot"``, ``"general"`` or ``"concat"``.
        attentional_units: size of h~_t (default query_dim).
        units: hidden size of the ``concat`` score (default query_dim).
        value_dim: size of the values (default key_dim; values default to the keys).
        scale: learnable scalar on the scores.
        dtype: float32 (default) or float64; or float16 / ``ml_dtypes.bfloat16`` for inference
            (weights and state_dict in that type).
        rng: seed or ``np.random.Generator`` for the initialisation (Glorot-uniform).

    Precision (16-bit layers, docs/precision.md): the scores go through
    :func:`attnext.scaled_dot_product_attention` (``dot``, ``general``) or
    :func:`attnext.additive_attention` (``concat``) with their own rounding points, and
    h~_t = tanh([c_t; s_t] W_c) is one GEMM accumulated in float32, tanh in float32. Rounded
    to the layer's type: ``general``'s s_t W_a; ``concat``'s v g (with scale=True); the
    context, at its store, which is also what W_c reads (with ``out_dtype=np.float32`` the
    context is returned unrounded, W_c still reads it rounded); and h~_t at its store unless
    ``out_dtype=np.float32``. The weights are float32.
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, method: str = "dot", *,
                 attentional_units: int | None = None, units: int | None = None, value_dim: int | None = None,
                 scale: bool = False, dtype: npt.DTypeLike = np.float32,
                 rng: int | np.random.Generator | None = None) -> None:
        if method not in _LUONG_METHODS:
            raise ValueError(f"method must be one of {_LUONG_METHODS}, got {method!r}")
        key_dim = query_dim if key_dim is None else key_dim
        value_dim = key_dim if value_dim is None else value_dim
        attentional_units = query_dim if attentional_units is None else attentional_units
        units = query_dim if units is None else units
        for name, n in (("query_dim", query_dim), ("key_dim", key_dim), ("value_dim", value_dim),
                        ("attentional_units", attentional_units), ("units", units)):
            positive_int(n, name)
        if method == "dot" and key_dim != query_dim:
            raise ValueError(f"method='dot' needs key_dim == query_dim, got {key_dim} and {query_dim}")
        self._dtype = layer_dtype(dtype)
        self.query_dim, self.key_dim, self.value_dim = int(query_dim), int(key_dim), int(value_dim)
        self.attentional_units, self.method, self.scale = int(attentional_units), method, bool(scale)
        self.units = int(units) if method == "concat" else None
        shapes, torch = {}, {}
        if method == "general":
            shapes["w_a"] = (self.query_dim, self.key_dim)
            torch["key_proj.weight"] = ("w_a", None)
        elif method == "concat":
            shapes.update({"w_query": (self.query_dim, self.units), "w_key": (self.key_dim, self.units),
                           "v": (self.units,)})
            torch.update({"query_proj.weight": ("w_query", "T"), "key_proj.weight": ("w_key", "T"),
                          "v.weight": ("v", "row")})
        if self.scale:
            shapes["g"] = ()
            torch["g"] = ("g", None)
        shapes["w_c"] = (self.value_dim + self.query_dim, self.attentional_units)
        torch["out_proj.weight"] = ("w_c", "T")
        self._shapes, self._torch = shapes, torch
        gen = make_rng(rng)
        state = {name: glorot_uniform(gen, shape, self._dtype) for name, shape in shapes.items() if name != "g"}
        if self.scale:
            state["g"] = np.asarray(1.0)
        self.set_weights(**state)

    # w_a and w_c go through the linear kernel, which reads a weight as (out, in) rows: they are
    # kept in Fortran order, so their transpose is those rows, C-contiguous, read in place (a
    # transposed C array would put the kernel on a path whose result can depend on where its
    # output is allocated). The attributes stay the same arrays, so writes into them count.
    _LINEAR = ("w_a", "w_c")

    def _checked(self, name, value):
        checked = super()._checked(name, value)
        return np.asfortranarray(checked) if name in self._LINEAR else checked

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in self._LINEAR:  # pickled when they were kept in C order
            if "_" + name in state:
                self.__dict__["_" + name] = np.asfortranarray(state["_" + name])

    def _config(self) -> dict:
        config = {"query_dim": self.query_dim, "key_dim": self.key_dim, "method": self.method,
                  "attentional_units": self.attentional_units, "value_dim": self.value_dim, "scale": self.scale}
        if self.units is not None:
            config["units"] = self.units
        return config

    def __call__(self, query: ArrayLike, keys: ArrayLike, values: ArrayLike | None = None, *,
                 attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None, warn: bool = True,
                 mask: ArrayLike | None = None, out_dtype: npt.DTypeLike | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step (query (B, query_dim)) or many (query (B, T, query_dim)).

        Args:
            keys: (B, Lk, key_dim) encoder states.
            values: (B, Lk, value_dim); default: the keys.
            attn_mask: broadcastable to the weights' shape ((B, Lk) for one step, (B, T, Lk)
                for many); bool True = may attend, float added to the scores. ``mask`` is its
                older name, still accepted.
            key_lengths: ints broadcastable to (B,); keys at positions >= length are hidden.
            warn: check attn_mask for the usual mistakes (:class:`attnext.MaskWarning`: a bool
                mask hiding every key of a batch entry, a float mask of only 0 and 1).
            out_dtype: None (the layer's dtype) or np.float32 for a float16/bfloat16 layer:
                the attentional state and the context as float32 (see the class docstring).

        There is no ``window``: a decoder step is not a position among the encoder's keys.

        Returns:
            (attentional_hidden, context, weights): (B, attentional_units), (B, value_dim),
            (B, Lk) for one step; with a T axis before the last for many steps. The weights of
            a 16-bit layer are float32.
        """
        return self._forward(query, keys, values, attn_mask, key_lengths, warn, mask, out_dtype=out_dtype)[0]

    def _forward(self, query, keys, values, attn_mask, key_lengths, warn, mask, keep: bool = False,
                 out_dtype=None):
        """The forward pass of __call__ and vjp: (result, saved), saved (only with keep) holding
        what the backward needs."""
        wide = bool(out_kwargs(out_dtype, self._dtype))  # float32 outputs of a 16-bit layer
        given_mask = mask = _mask_alias(attn_mask, mask, "LuongAttention()")
        q = self._input(query, "query")
        k = self._input(keys, "keys")
        val = k if values is None else self._input(values, "values")
        if k.ndim < 2 or k.shape[-1] != self.key_dim:
            raise ValueError(f"keys must have shape (..., Lk, {self.key_dim}), got {shape_str(k.shape)}")
        if val.ndim != k.ndim or val.shape[:-1] != k.shape[:-1] or val.shape[-1] != self.value_dim:
            raise ValueError(f"keys have shape {shape_str(k.shape)} but values have {shape_str(val.shape)}: "
                             f"expected (..., Lk, {self.value_dim}) with the keys' leading dimensions")
        batch, lk = k.shape[:-2], k.shape[-2]
        nb = len(batch)
        single = q.ndim == nb + 1
        if (not single and q.ndim != nb + 2) or q.shape[:nb] != batch or q.shape[-1] != self.query_dim:
            raise ValueError(f"query has shape {shape_str(q.shape)} but keys have {shape_str(k.shape)}: expected "
                             f"(..., {self.query_dim}) for one step or (..., T, {self.query_dim}) for many")
        q3 = q[..., None, :] if single else q
        score_shape = q3.shape[:-1] + (lk,)
        m = self._mask(mask, single, score_shape, warn)
        lengths = _lengths(key_lengths, batch, lk)
        g = float(self._g) if self.scale else 1.0  # exact: a Python float holds any stored g
        lse = qa = None  # (the additive backward recomputes its lse)
        out_dtype = FLOAT32 if wide else None  # the attention kernel's output
        if self.method == "concat":
            context, weights = additive_attention(q3, k, val, self._w_query, self._w_key, self._scaled_v(self._v, g),
                                                  attn_mask=m, key_lengths=lengths, return_weights=True, warn=False,
                                                  out_dtype=out_dtype)
        else:
            # s_t W_a h_j = (s_t W_a) . h_j: scaled-dot attention of s_t W_a with scale g, on the
            # fused kernel (keys past key_lengths are skipped, not masked). s_t W_a is one GEMM
            # stored in the layer's dtype (a rounding point of a 16-bit layer).
            # A head axis of 1 before (T, D), so the batch axes stay batch axes for key_lengths.
            qa = (q3 if self.method == "dot" else _linear(q3, self._w_a.T, None))[..., None, :, :]
            results = scaled_dot_product_attention(
                qa, k[..., None, :, :], val[..., None, :, :], None if m is None else m[..., None, :, :], scale=g,
                key_lengths=lengths, return_weights=True, return_lse=keep, warn=False, out_dtype=out_dtype)
            context, weights = results[0][..., 0, :, :], results[1][..., 0, :, :]
            lse = results[2] if keep else None
        # W_c reads the context in the layer's dtype: as the kernel stored it, or (out_dtype
        # float32) rounded here from the float32 the kernel wrote, the same value.
        hidden, read = self._attentional(context, q3, wide)
        saved = None
        if keep:
            saved = dict(q3=owned(q3, query), k=owned(k, keys), val=owned(val, keys if values is None else values),
                         mask=None if m is None else owned(m, given_mask), lengths=lengths, qa=qa, context=read,
                         lse=lse, hidden=hidden, g=g,
                         weights={name: np.array(self.__dict__["_" + name]) for name in self._shapes})
        if single:
            return (hidden[..., 0, :], context[..., 0, :], weights[..., 0, :]), saved
        return (hidden, context, weights), saved

    def _scaled_v(self, v: np.ndarray, g: float) -> np.ndarray:
        """concat's v times the learnable scale g (scale=True), in the layer's dtype: computed
        in the accumulation type, so a 16-bit layer rounds it once (as attention's
        method="additive" rounds v * scale)."""
        if not self.scale:
            return v
        acc = accumulation_dtype(self._dtype)
        return (v.astype(acc) * acc.type(g)).astype(self._dtype)

    def _attentional(self, context: np.ndarray, q3: np.ndarray, wide: bool) -> tuple[np.ndarray, np.ndarray]:
        """(h~ = tanh([c; s] W_c), the context c as W_c reads it: in the layer's dtype). One GEMM
        on [c; s]; a 16-bit layer accumulates it in float32, takes the tanh in float32 and
        stores h~ in its type (float32 when ``wide``, out_dtype=np.float32)."""
        read = context.astype(self._dtype, copy=False)
        joined = np.concatenate([read, q3], axis=-1)
        low = is_low_precision(self._dtype)
        pre = _linear(joined, self._w_c.T, None, {"out_float32": True} if low else None)
        hidden = np.tanh(pre)
        return (hidden if wide else hidden.astype(self._dtype, copy=False)), read

    def vjp(self, query: ArrayLike, keys: ArrayLike, values: ArrayLike | None = None, *,
            attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None, warn: bool = True,
            mask: ArrayLike | None = None):
        """A training step's forward pass and its pullback: ``(hidden, context, weights), pullback``.

        Takes what :meth:`__call__` takes. ``pullback((grad_hidden, grad_context,
        grad_weights))`` (None for an output not differentiated) returns
        ``(input_grads, param_grads)``: input_grads (dquery, dkeys) (dkeys including the
        gradient through the values, which default to the keys) or (dquery, dkeys, dvalues)
        when values were given; param_grads keyed like :meth:`state_dict`, summed over the
        batch. Masks and key lengths get no gradient.
        """
        self._refuse_bfloat16_backward()
        result, saved = self._forward(query, keys, values, attn_mask, key_lengths, warn, mask, keep=True)
        given = (query, keys) if values is None else (query, keys, values)

        def backward(cotangent):
            cts = output_cotangents(cotangent, result, self._dtype)
            if result[0].ndim < saved["hidden"].ndim:  # one step: the T axis of 1 back
                cts = [None if c is None else c[..., None, :] for c in cts]
            grads, params = self._backward(saved, *cts)
            if values is None:
                grads = (grads[0], grads[1] + grads[2])
            if result[0].ndim < saved["hidden"].ndim:
                grads = (grads[0][..., 0, :],) + grads[1:]
            return tuple(input_grad(d, a) for d, a in zip(grads, given)), params

        return result, LayerPullback(backward)

    def _backward(self, s: dict, grad_hidden, grad_context, grad_weights):
        """((dquery, dkeys, dvalues), param_grads) of the T-axis form from what _forward saved."""
        w, q3, context, dv = s["weights"], s["q3"], s["context"], self.value_dim
        params = {name: np.zeros(self._torch_shape(name), dtype=self._dtype) for name in self._torch}
        # Gradients summed in the accumulation type (float32 for a float16 layer, as the
        # backward functions compute), cast to the layer's dtype at the end.
        acc = accumulation_dtype(self._dtype)
        d_q3 = np.zeros(q3.shape, dtype=acc)
        if grad_context is None:
            grad_context = np.zeros_like(context)
        if grad_hidden is not None:  # hidden = tanh([c; s] W_c): the attentional layer, nn.Linear without bias
            hidden = np.asarray(s["hidden"], dtype=acc)
            d_pre = grad_hidden.astype(acc, copy=False) * (1 - hidden * hidden)
            joined = np.concatenate([context, q3], axis=-1)
            d_joined, d_out_proj, _ = linear_grads(d_pre, joined, w["w_c"].T, None)
            grad_context = grad_context + d_joined[..., :dv]
            d_q3 += d_joined[..., dv:]
            params["out_proj.weight"] = d_out_proj
        g = s["g"]
        if self.method == "concat":
            grads = additive_attention_backward(grad_context, q3, s["k"], s["val"], w["w_query"], w["w_key"],
                                                self._scaled_v(w["v"], g),
                                                context, s["lse"], attn_mask=s["mask"], key_lengths=s["lengths"],
                                                grad_weights=grad_weights)
            d_q3 += grads["query"]
            d_keys, d_values = grads["key"], grads["value"]
            params["query_proj.weight"] = grads["w_query"].T
            params["key_proj.weight"] = grads["w_key"].T
            params["v.weight"] = (grads["v"] * g).reshape(1, -1)
            if self.scale:
                params["g"] = np.asarray(np.sum(grads["v"] * w["v"]))
        else:
            # The scale g joins the query (scale 1), so the backward's query gradient gives g's too.
            qa, m = s["qa"], s["mask"]
            scaled = qa * self._dtype.type(g) if self.scale else qa
            d_scaled, d_keys, d_values, _ = scaled_dot_product_attention_backward(
                grad_context[..., None, :, :], scaled, s["k"][..., None, :, :], s["val"][..., None, :, :],
                context[..., None, :, :], s["lse"], None if m is None else m[..., None, :, :], scale=1.0,
                key_lengths=s["lengths"], grad_weights=None if grad_weights is None else grad_weights[..., None, :, :])
            d_scaled, d_keys, d_values = d_scaled[..., 0, :, :], d_keys[..., 0, :, :], d_values[..., 0, :, :]
            d_qa = d_scaled
            if self.scale:
                params["g"] = np.asarray(np.sum(d_scaled * qa[..., 0, :, :]))
                d_qa = d_scaled * self._dtype.type(g)
            if self.method == "general":
                d_from_qa, d_w_a_t, _ = linear_grads(d_qa, q3, w["w_a"].T, None)
                d_q3 += d_from_qa
                params["key_proj.weight"] = d_w_a_t.T
            else:
                d_q3 += d_qa
        params = {name: np.array(a, dtype=self._dtype, order="C") for name, a in params.items()}
        return tuple(np.asarray(d, dtype=self._dtype) for d in (d_q3, d_keys, d_values)), params

    def _mask(self, mask, single, score_shape, warn=True):
        if mask is None:
            return None
        m = to_array(mask, "mask")
        if single and m.ndim >= 2:
            m = m[..., None, :]  # a one-step mask (B, Lk) gains the query axis
        return prepare_mask(m, score_shape, self._dtype, check_core=2 if warn else 0)
