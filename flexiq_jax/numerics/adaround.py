"""AdaRound's soft rounding (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020): the rectified sigmoid h(V) that rounds each element down (0) or up (1),
its initial logits, the annealed exponent of its regulariser, the optimisation settings and the
optimisation itself (`learn_logits`). Shared
by the AdaRound baseline (`compare.adaround`) and FlexiQ's extraction-aware rounding
(`finetune.rounding`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper, section 4.2)


@dataclasses.dataclass(frozen=True)
class AdaRoundSettings:
  iterations: int = 500
  batch_size: int = 32
  learning_rate: float = 1e-2
  reg_weight: float = 0.01  # lambda
  warmup: float = 0.2  # share of iterations without the rounding regulariser
  beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second


def rectified_sigmoid(v):
  """The rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1).

  Args:
    v: Rounding logits V, any shape.

  Returns:
    h(V), the soft rounding offset in [0, 1], the shape of `v`.
  """
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(rest):
  """V with h(V) = rest (the fractional part of w / s): AdaRound starts at the float weights.

  Args:
    rest: Fractional part of w / s, any shape; clipped to [1e-4, 1 - 1e-4].

  Returns:
    The logits V, the shape of `rest`.
  """
  rest = jnp.clip(rest, 1e-4, 1 - 1e-4)
  return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def beta_at(step, settings: AdaRoundSettings):
  """The regulariser's exponent beta at `step`: settings.beta[0] until the warm-up ends, then
  annealed linearly to settings.beta[1] at the last iteration.

  Args:
    step: Optimisation step (may be traced).
    settings: The AdaRound settings (iterations, warmup, beta).

  Returns:
    beta as a scalar jax array.
  """
  start = settings.warmup * settings.iterations
  t = jnp.clip((step - start) / max(settings.iterations - start, 1), 0.0, 1.0)
  hi, lo = settings.beta
  return hi + (lo - hi) * t


def regulariser(v, step, settings: AdaRoundSettings, mask=None):
  """AdaRound's rounding regulariser sum(1 - |2 h(V) - 1|^beta) (over `mask` where given): 0 once
  every h(V) is 0 or 1.

  Args:
    v: Rounding logits V.
    step: Optimisation step (may be traced); sets beta (`beta_at`).
    settings: The AdaRound settings.
    mask: Elements that count (broadcast against `v`), or None for all.

  Returns:
    The regulariser as a scalar.
  """
  terms = 1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta_at(step, settings)
  return jnp.sum(terms if mask is None else jnp.where(mask, terms, 0.0))


def learn_logits(reconstruction, v, data, settings: AdaRoundSettings, *, seed: int = 0, mask=None):
  """AdaRound's optimisation of the rounding logits: Adam at settings.learning_rate on
  `reconstruction(v, batch)` plus reg_weight times the regulariser (over `mask`) once the warm-up
  is over, for settings.iterations minibatches of settings.batch_size examples drawn without
  replacement.

  Args:
    reconstruction: (v, batch) -> the scalar reconstruction error on `batch`, a minibatch of `data`.
    v: The initial logits (`initial_logits`).
    data: A pytree of arrays sharing their first axis (the examples).
    settings: The AdaRound settings.
    seed: Seed of the minibatch draws.
    mask: Elements of `v` the regulariser counts, or None for all.

  Returns:
    The learnt logits.
  """
  def loss_fn(v, batch, step):
    use_reg = step >= settings.warmup * settings.iterations
    return reconstruction(v, batch) + jnp.where(use_reg, settings.reg_weight * regulariser(v, step, settings, mask),
                                                0.0)

  tx = optax.adam(settings.learning_rate)

  @jax.jit
  def step_fn(v, opt_state, batch, step):
    grads = jax.grad(loss_fn)(v, batch, step)
    updates, opt_state = tx.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state

  opt_state = tx.init(v)
  rng = np.random.default_rng(seed)
  n = jax.tree_util.tree_leaves(data)[0].shape[0]
  for step in range(settings.iterations):
    idx = rng.choice(n, size=min(settings.batch_size, n), replace=False)
    v, opt_state = step_fn(v, opt_state, jax.tree_util.tree_map(lambda a: a[idx], data), jnp.float32(step))
  return v
