"""AdaRound's per-layer rounding (compare.adaround): starts at the float weights, ends on the grid,
and reconstructs the float layer at least as well as rounding to nearest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax.compare import adaround
from flexiq_jax.numerics import adaround as soft_rounding


class _DenseCall:
  """The part of interception.LayerCall that round_layer uses, for a dense layer."""

  def __init__(self, kernel):
    self.kernel = kernel

  def float_forward(self, x, kernel=None):
    return x @ (self.kernel if kernel is None else kernel)


def test_initial_logits_reproduce_the_fractional_part():
  rest = jnp.linspace(0.01, 0.99, 11)
  np.testing.assert_allclose(soft_rounding.rectified_sigmoid(soft_rounding.initial_logits(rest)), rest, atol=1e-5)


def test_beta_is_annealed_after_the_warmup():
  s = soft_rounding.AdaRoundSettings(iterations=100, warmup=0.2, beta=(20.0, 2.0))
  assert float(soft_rounding.beta_at(0, s)) == 20.0 and float(soft_rounding.beta_at(20, s)) == 20.0
  assert float(soft_rounding.beta_at(60, s)) == pytest.approx(11.0) and float(soft_rounding.beta_at(100, s)) == 2.0


def test_learned_rounding_beats_nearest_on_the_layer_output():
  rng = np.random.default_rng(0)
  # Correlated inputs: rounding errors of different weights then interact, which is where
  # choosing up or down per weight pays (the paper's argument against rounding to nearest).
  mixing = rng.normal(size=(16, 16))
  x = jnp.asarray(rng.normal(size=(256, 16)) @ mixing, jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  qmax = 7
  scale = jnp.max(jnp.abs(w), axis=0) / qmax
  call = _DenseCall(w)
  targets = x @ w
  settings = adaround.AdaRoundSettings(iterations=500, batch_size=64, learning_rate=1e-2)
  codes = adaround.round_layer(call, x, targets, w, scale, qmax, settings)
  assert np.all(np.asarray(codes) == np.round(np.asarray(codes)))  # on the integer grid
  assert np.all(np.abs(np.asarray(codes)) <= qmax)
  floor = np.floor(np.asarray(w / scale))
  assert np.all((np.asarray(codes) == floor) | (np.asarray(codes) == floor + 1))  # up or down only
  nearest = jnp.clip(jnp.round(w / scale), -qmax, qmax)
  mse = lambda c: float(jnp.mean((x @ (c * scale) - targets) ** 2))
  assert mse(codes) < 0.9 * mse(nearest)
  assert 0 < float(jnp.mean(codes != nearest)) < 0.5
