"""The evolutionary search's fitness: how far the quantized model at a per-layer count vector is
from the float model on calibration images.

It runs the integer-path quantized apply, so it sits above the quantize and finetune packages
and is handed to the (quantization-free) selectors of `select` as a plain callable."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import quantize as quantize_lib
from flexiq_jax import train as train_lib
from flexiq_jax.finetune import kl_divergence


@dataclasses.dataclass(frozen=True)
class SelectionFitness:
  """fitness(counts (L,)) of the evolutionary search on calibration images (lower is better),
  one compilation for every candidate.

  select.fitness: 'kl' = KL(float || quantized); 'ce' = cross-entropy of the quantized model
  against the float model's predicted labels (the calibration images are unlabelled)."""

  score: object  # jitted (qvars, images, teacher, counts_vector) -> fitness
  qvars: dict
  images: jax.Array
  teacher: jax.Array

  @classmethod
  def build(cls, float_model, calibration, orders, levels, images, *, kind: str = "kl",
            bias_correction: bool = True) -> "SelectionFitness":
    """On `images` (unlabelled calibration images), against `float_model`'s logits."""
    if kind not in ("kl", "ce"):
      raise ValueError(f"unknown select.fitness {kind!r}; use 'kl' or 'ce'")
    plan = calibration.plan
    qmodel = quantize_lib.QuantizedModel(float_model.model, plan, mode="int")
    no_counts = {p: np.zeros(len(levels), np.int32) for p in plan.lowerable}
    qvars = quantize_lib.build_qvars(plan, calibration.folded, calibration.stats, orders, no_counts, levels,
                                     bias_correction=bias_correction)
    # Data are arguments, not closed-over constants: XLA would otherwise constant-fold the convs.
    score = jax.jit(functools.partial(_fitness_score, qmodel, kind))
    return cls(score, qvars, images, float_model.logits(images))

  def __call__(self, counts) -> float:
    return float(self.score(self.qvars, self.images, self.teacher, jnp.asarray(counts, jnp.int32)))


def _fitness_score(qmodel, kind, qvars, images, teacher, counts_vector):
  counts = {p: counts_vector[i] for i, p in enumerate(qmodel.plan.lowerable)}
  logits = qmodel.apply_counts(qvars, images, counts)
  if kind == "ce":
    return train_lib.cross_entropy(logits, jnp.argmax(teacher, -1))
  return kl_divergence(teacher, logits)
