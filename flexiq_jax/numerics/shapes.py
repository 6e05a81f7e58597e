"""Axis helpers shared by the quantizers, the calibrators and the extraction code.

Convention everywhere in `flexiq_jax.numerics`: `axis` names the *channel axis that is kept*
(per-channel statistics have one entry per index along it); `axis=None` means per-tensor.
Per-channel parameters are 1-D arrays of length C, reshaped here to broadcast against the data.
"""

from __future__ import annotations

import jax.numpy as jnp


def normalize_axis(axis: int, ndim: int) -> int:
  """A non-negative axis index; raises ValueError when out of range.

  Args:
    axis: an axis index, possibly negative.
    ndim: the array's rank.

  Returns:
    axis % ndim, in [0, ndim).

  Raises:
    ValueError: `axis` is outside [-ndim, ndim).
  """
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} out of range for an array of rank {ndim}")
  return axis % ndim


def channels_first(x, axis: int | None):
  """Reshapes `x` to (C, N): C = size along `axis`, N = everything else (in order).

  `axis=None` treats the whole tensor as one channel: (1, x.size).

  Args:
    x: an array.
    axis: the channel axis, or None.

  Returns:
    The (C, N) (or (1, x.size)) array.

  Raises:
    ValueError: `axis` is out of range.
  """
  x = jnp.asarray(x)
  if axis is None:
    return x.reshape(1, -1)
  axis = normalize_axis(axis, x.ndim)
  return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def expand_to_axis(v, ndim: int, axis: int | None):
  """Reshapes a per-channel vector (C,) so it broadcasts along `axis` of a rank-`ndim` array.

  Scalars (and `axis=None`) are returned unchanged: they broadcast already.

  Args:
    v: a scalar or (C,) vector.
    ndim: rank of the array it will broadcast against.
    axis: the channel axis of that array, or None.

  Returns:
    `v` reshaped to 1s everywhere but C at `axis`, or `v` unchanged for a scalar or axis None.

  Raises:
    ValueError: `v` is neither a scalar nor 1-D, or `axis` is out of range.
  """
  v = jnp.asarray(v)
  if axis is None or v.ndim == 0:
    return v
  if v.ndim != 1:
    raise ValueError(f"per-channel values must be 1-D to expand along an axis, got shape {v.shape}")
  axis = normalize_axis(axis, ndim)
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)
