"""Numeric core used by the Flax layer (no Flax import): integer grids, STE rounding, LSQ,
bit extraction and histogram-based range fits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
  if signed:
    hi = 2 ** (bits - 1) - 1
    return (-hi if narrow else -hi - 1), hi
  return 0, 2 ** bits - 1


def round_ste(x):
  """Round half to even forward; identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def lower_codes(q, e, signed: bool, low_bits: int = 4):
  """Keeps `low_bits` bits of 8-bit codes starting at bit e: clip(floor(q/2^e + 1/2)) * 2^e.

  Rounds half up (an add and an arithmetic shift in hardware). The result is still in 8-bit
  code units, so lowered channels can share an int8 GEMM with the others.
  """
  lo, hi = int_range(low_bits, signed)
  step = jnp.exp2(jnp.asarray(e, jnp.float32))
  return jnp.clip(jnp.floor(q / step + 0.5), lo, hi) * step


def lower_codes_ste(q, e, signed: bool, low_bits: int = 4):
  """lower_codes with a straight-through (identity) gradient."""
  return q + jax.lax.stop_gradient(lower_codes(q, e, signed, low_bits) - q)


def lsq_fake_quant(x, scale, qmin, qmax, grad_scale=None):
  """LSQ (Esser et al. 2020): symmetric fake quantization with a learnable step `scale`.

  d/dx: 1 inside [qmin, qmax]·scale, else 0. d/dscale: -x/s + round(x/s) inside, qmin or qmax
  outside, times grad_scale (default 1/sqrt(numel / numel(scale) * qmax)).
  """
  if grad_scale is None:
    grad_scale = 1.0 / np.sqrt(x.size / max(np.size(scale), 1) * qmax)
  s = scale * grad_scale + jax.lax.stop_gradient(scale - scale * grad_scale)  # scaled gradient
  v = x / s
  return jnp.clip(round_ste(v), qmin, qmax) * s


def code_histogram(q, axis: int, signed: bool, bits: int = 8):
  """Per-channel histogram of integer codes along `axis`: (C, 2^bits), bin k <-> code qmin + k."""
  qmin, qmax = int_range(bits, signed)
  q = jnp.moveaxis(q, axis, -1)
  c = q.shape[-1]
  idx = (jnp.clip(q, qmin, qmax) - qmin).astype(jnp.int32).reshape(-1, c)
  flat = idx + jnp.arange(c)[None, :] * (qmax - qmin + 1)
  return jnp.bincount(flat.reshape(-1), length=c * (qmax - qmin + 1)).reshape(c, qmax - qmin + 1)


def extraction_errors_from_histogram(hist, signed: bool, candidates=(0, 1, 2, 3, 4), bits: int = 8):
  """(len(candidates), C): Σ_code count · (code - lower_codes(code, e))² per channel."""
  qmin, _ = int_range(bits, signed)
  codes = jnp.arange(hist.shape[-1], dtype=jnp.float32) + qmin
  errs = [jnp.sum(jnp.asarray(hist, jnp.float32) * (codes - lower_codes(codes, e, signed)) ** 2, axis=-1)
          for e in candidates]
  return jnp.stack(errs)


def fit_extraction_from_histogram(hist, signed: bool, candidates=(0, 1, 2, 3, 4), bits: int = 8):
  """Per channel, the extraction position with the least squared error (ties: the smaller e)."""
  errs = extraction_errors_from_histogram(hist, signed, candidates, bits)
  return jnp.asarray(candidates, jnp.int32)[jnp.argmin(errs, axis=0)]


def percentile_range_from_histogram(counts, edges, percentile: float):
  """(lo, hi) = (edges[0], the value below which `percentile` % of the mass lies)."""
  counts = np.asarray(counts, np.float64)
  cdf = np.cumsum(counts) / max(counts.sum(), 1.0)
  idx = int(np.searchsorted(cdf, percentile / 100.0))
  return float(edges[0]), float(edges[min(idx + 1, len(edges) - 1)])


def mse_range_from_histogram(counts, edges, bits: int, symmetric: bool, signed: bool, num_candidates: int = 100):
  """(lo, hi) minimising the histogram-weighted squared quantization error (bin centres), over
  clip values shrinking the histogram's range (symmetric, zero-based grids)."""
  del symmetric  # the |x| histograms used here start at zero
  counts = np.asarray(counts, np.float64)
  centres = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
  _, qmax = int_range(bits, signed)
  best, best_err = float(edges[-1]), np.inf
  for frac in np.linspace(1.0 / num_candidates, 1.0, num_candidates):
    clip = frac * float(edges[-1])
    s = max(clip, 1e-12) / qmax
    err = np.sum(counts * (np.clip(np.round(centres / s), 0, qmax) * s - centres) ** 2)
    if err < best_err:
      best, best_err = clip, err
  return float(edges[0]), best
