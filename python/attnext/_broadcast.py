"""Batch broadcasting, the one rule every public function follows, and its inverse.

The leading axes of every array argument are batch axes: they broadcast against each other
as NumPy's do, while the trailing axes (a matrix's two, a grouped-query tensor's three) belong
to the argument itself. :func:`broadcast_batch` is the only place that rule is applied; it
returns stride-0 views, so a key shared by every batch entry is never copied.

:func:`reduce_to_shape` undoes it for a gradient: the cotangent of a broadcast argument is
the cotangent of its broadcast view summed over every axis broadcasting added or stretched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

__all__ = ["Batched", "broadcast_batch", "reduce_to_shape"]


def _shape_str(shape) -> str:
    return str(tuple(int(d) for d in shape))


@runtime_checkable
class Batched(Protocol):
    """An object that is not an array but has batch axes (a :class:`ProjectedKeys`): it says
    its batch shape and returns a view of itself broadcast to a larger one."""

    @property
    def batch_shape(self) -> tuple[int, ...]: ...

    def broadcast_to(self, batch_shape: tuple[int, ...]) -> Any: ...


Operand = Union[np.ndarray, Batched]


def _batch_of(x: Operand, trailing: int) -> tuple[int, ...]:
    if isinstance(x, np.ndarray):
        return tuple(x.shape[: x.ndim - trailing])
    return tuple(x.batch_shape)


def _expand(x: Operand, batch: tuple[int, ...], trailing: int) -> Operand:
    if isinstance(x, np.ndarray):
        tail = x.shape[x.ndim - trailing:] if trailing else ()
        return x if x.shape[: x.ndim - trailing] == batch else np.broadcast_to(x, batch + tail)
    return x if tuple(x.batch_shape) == batch else x.broadcast_to(batch)


def broadcast_batch(arrays: Mapping[str, Operand], trailing: Mapping[str, int] | int = 2, *,
                    to: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], dict[str, Operand]]:
    """Broadcasts the batch (leading) axes of several arguments against each other.

    Args:
        arrays: name -> ndarray, or a :class:`Batched` object; the names appear in errors.
        trailing: how many trailing axes of each argument are its own (not batch axes): one
            int for all, or name -> int.
        to: broadcast to exactly this batch shape (which must contain every argument's).

    Returns:
        (batch shape, {name: the argument with that batch shape}): an argument that already
        has it is returned as itself, the others as read-only stride-0 views.

    Raises:
        ValueError naming every argument and its shape when the batch axes do not broadcast.
    """
    counts = {name: trailing if isinstance(trailing, int) else trailing[name] for name in arrays}
    batches = {name: _batch_of(x, counts[name]) for name, x in arrays.items()}
    try:
        batch = np.broadcast_shapes(*batches.values(), *(() if to is None else (tuple(to),)))
        if to is not None and batch != tuple(to):
            raise ValueError
    except ValueError:
        described = ", ".join(
            f"{name} has shape {_shape_str(x.shape)}" if isinstance(x, np.ndarray)
            else f"{name} has batch shape {_shape_str(batches[name])}" for name, x in arrays.items())
        target = "" if to is None else f" to {_shape_str(to)}"
        raise ValueError(f"batch dimensions do not broadcast{target}: {described}") from None
    return batch, {name: _expand(x, batch, counts[name]) for name, x in arrays.items()}


def reduce_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of broadcasting for a gradient: ``grad`` (the cotangent of an argument of
    ``shape`` after it was broadcast) summed over the axes broadcasting added (leading) or
    stretched (size 1 in ``shape``), so the result has exactly ``shape`` and grad's dtype.

    Returns grad itself when nothing was broadcast. Raises ValueError when ``grad``'s shape is
    not a broadcast of ``shape``.
    """
    grad = np.asarray(grad)
    shape = tuple(int(d) for d in shape)
    try:
        if np.broadcast_shapes(shape, grad.shape) != grad.shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"a gradient of shape {_shape_str(grad.shape)} cannot come from broadcasting an "
                         f"argument of shape {_shape_str(shape)}") from None
    added = grad.ndim - len(shape)
    stretched = tuple(added + i for i, d in enumerate(shape) if d == 1 and grad.shape[added + i] != 1)
    if not (added or stretched):
        return grad
    return grad.sum(axis=tuple(range(added)) + stretched, keepdims=True, dtype=grad.dtype).reshape(shape)
