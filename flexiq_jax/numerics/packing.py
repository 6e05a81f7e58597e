"""4-bit values packed two per byte: how lowered weight rows (k * 2^e, k in [-8, 7]) can be stored
at half the bytes. `pack_int4` keeps k of rows 2i and 2i+1 in the low and high nibble of byte row i."""

from __future__ import annotations

import jax.numpy as jnp


def pack_int4(values):
  """(R, ...) int8 values in [-8, 7] -> (ceil(R / 2), ...) int8, rows paired along axis 0 (an odd
  last row is paired with zeros). Values outside [-8, 7] are not checked (they would wrap).

  Args:
    values: (R, ...) integer array of 4-bit values (cast to int8).

  Returns:
    (ceil(R / 2), ...) int8 array: row 2i in the low nibble and row 2i+1 in the high nibble of row i.
  """
  values = jnp.asarray(values, jnp.int8)
  if values.shape[0] % 2:
    values = jnp.concatenate([values, jnp.zeros((1,) + values.shape[1:], jnp.int8)])
  low, high = values[0::2], values[1::2]
  return (jnp.bitwise_and(low, 0x0F) | jnp.left_shift(high, 4)).astype(jnp.int8)


def unpack_int4(packed, rows: int | None = None):
  """Inverse of `pack_int4`: (P, ...) int8 -> (rows or 2P, ...) int8 in [-8, 7] (arithmetic shifts
  sign-extend each nibble).

  Args:
    packed: (P, ...) packed int8 array.
    rows: number of rows to keep (R of the packed array, dropping the zero row an odd R added), or None
      for all 2P.

  Returns:
    (rows or 2P, ...) int8 array of values in [-8, 7].
  """
  packed = jnp.asarray(packed, jnp.int8)
  low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
  high = jnp.right_shift(packed, 4)
  out = jnp.stack([low, high], axis=1).reshape((-1,) + packed.shape[1:])
  return out if rows is None else out[:rows]
