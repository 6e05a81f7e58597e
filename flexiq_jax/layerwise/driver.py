"""The mixed-precision search wired to a model: layer-wise bit widths (the paper's algorithm) and
FlexiQ per-layer 4-bit ratios (the same procedure as a FlexiQ selector).

Data (config.layerwise):
  phase 1: the first `sensitivity_images` calibration images (unlabelled), SQNR (dB) of the
           logits against the float model's.
  phases 2/3: top-1 on the first `score_examples` labelled images of `score_split` (default the
           training split, so that the test split stays for the final report).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import records
from flexiq_jax import stage_cache
from flexiq_jax import train as train_lib
from flexiq_jax.layerwise import amp
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.layerwise import plots
from flexiq_jax.layerwise.candidates import parse_candidate, parse_candidates
from flexiq_jax.stage_results import Calibration, FloatModel, Quantized


def sensitivity_images(config, calib_batches):
  n = config.layerwise.sensitivity_images
  images = jnp.concatenate(list(calib_batches))
  return images[:n]


def score_batches(config):
  lw = config.layerwise
  ds = data.get_dataset(config.data, lw.score_split)
  return list(data.eval_batches(ds, config.eval_batch_size, num_examples=lw.score_examples,
                                num_threads=config.data.num_threads))


PHASE3_KEYS = ("allowed_drop", "search", "phase2_full")  # change the choice, not the cached phases


def _fingerprint(config, plan, *extra) -> str:
  lw = {k: v for k, v in config.layerwise.to_dict().items() if k not in PHASE3_KEYS}
  return stage_cache.fingerprint([stage_cache.stage_fields(config, "calibrate"), lw, plan.quantized, *map(str, extra)])


class LayerwiseEvaluator:
  """One jitted layer-wise apply, evaluated at any (weight bits, act bits) arrays."""

  def __init__(self, model, plan, folded, tables, mesh=None):
    self.plan, self.folded, self.tables, self.mesh = plan, folded, tables, mesh
    apply = apply_lib.make_apply(model, plan)
    self.logits = jax.jit(apply)
    # A stable predict function: train.evaluate caches its compiled step per function.
    self.predict = lambda images, wb, ab: apply(folded, tables, wb, ab, images)

  def top1(self, batches, wb, ab) -> float:
    return self.metrics(batches, wb, ab)["top1"]

  def metrics(self, batches, wb, ab, reference_logits=None) -> dict:
    """train.evaluate's metrics (with agreement / KL / SQNR against `reference_logits` if given)."""
    return train_lib.evaluate(self.predict, iter(batches), self.mesh, desc="layerwise eval", args=(wb, ab),
                              reference_logits=reference_logits)


@dataclasses.dataclass(frozen=True)
class LayerwiseSearch:
  """The layer-wise search's outcome: amp.run's JSON summary, the clipping tables it used and the
  chosen per-layer bits (over plan.quantized) — data only, evaluated with LayerwiseEvaluator."""

  summary: dict
  tables: dict
  weight_bits: np.ndarray
  act_bits: np.ndarray


def layerwise_search(config, workdir, float_model: FloatModel, calibration: Calibration, calib_batches, mesh=None,
                     *, allowed_drop=None, search=None, stage_name="layerwise", score_data=None) -> LayerwiseSearch:
  """Phases 1-3 over layer bit widths; cached under <workdir>/<stage_name>/."""
  model, variables = float_model.model, float_model.variables
  plan, folded, calib = calibration.plan, calibration.folded, calibration.stats
  lw = config.layerwise
  cands = parse_candidates(lw.candidates)
  baseline = cands.index(parse_candidate(lw.baseline))
  tables = apply_lib.build_tables(model, plan, folded, calib, act_method=lw.act_range,
                                  weight_method=lw.weight_range,
                                  bits=sorted({c.act_bits for c in cands} | {c.weight_bits for c in cands} - {0}),
                                  batches=calib_batches)
  ev = LayerwiseEvaluator(model, plan, folded, tables, mesh)
  images = sensitivity_images(config, calib_batches)
  ref = model.apply(variables, images, train=False)
  groups = list(plan.quantized)
  group_cost = cost.layerwise_bops_table(plan.layer_infos(), [c.cost_bits for c in cands])

  def bits_of(assignment):
    return apply_lib.bits_arrays(plan, {p: cands[k] for p, k in zip(groups, assignment)})

  def sensitivity(g, k):
    assignment = {groups[g]: cands[k]}  # every other group float, as AIMET
    wb, ab = apply_lib.bits_arrays(plan, assignment)
    return apply_lib.sqnr_db(ref, ev.logits(folded, tables, wb, ab, images))

  score_data = score_batches(config) if score_data is None else score_data

  def float_score():
    return train_lib.evaluate(lambda im, v: model.apply(v, im, train=False), iter(score_data), mesh,
                              desc="float score", args=(variables,))["top1"]

  problem = amp.AmpProblem(groups, [c.name for c in cands], baseline, group_cost, sensitivity,
                           lambda a: ev.top1(score_data, *bits_of(a)), float_score)
  stage = os.path.join(workdir, stage_name)
  result = amp.run(problem, stage, _fingerprint(config, plan, "layerwise"),
                   allowed_drop=lw.allowed_drop if allowed_drop is None else allowed_drop,
                   search=search or lw.search, phase2_full=lw.phase2_full)
  plots.plot_sensitivity(result, os.path.join(stage, "sensitivity.png"), "Layer-wise sensitivity (SQNR, dB)")
  plots.plot_pareto(result, os.path.join(stage, "pareto.png"), "Layer-wise Pareto front")
  wb, ab = bits_of(result["chosen"]["assignment"])
  return LayerwiseSearch(result, tables, np.asarray(wb), np.asarray(ab))


def flexiq_search(config, workdir, float_model: FloatModel, calibration: Calibration, calib_batches,
                  quantized: Quantized, mesh=None, *, score_data=None) -> dict:
  """Phases 1-2 over FlexiQ per-layer 4-bit ratios (config.layerwise.flexiq_ratios), on the
  quantized model's stored channel orders; groups = the lowerable layers. Phase 1 leaves every
  other layer at 8 bits (ratio 0): the FlexiQ model has no float option. Returns the amp summary
  with 'counts_at_level' {level: {path: count}}: for each select.levels value, the first
  Pareto point whose 4-bit MAC share (of the lowerable layers) reaches it."""
  model, variables, plan = float_model.model, float_model.variables, calibration.plan
  qmodel, qvars = quantized.qmodel, quantized.qvars
  lw = config.layerwise
  ratios = [float(r) for r in lw.flexiq_ratios]
  if ratios[0] != 0.0:
    raise ValueError(f"layerwise.flexiq_ratios must start at 0 (the 8-bit baseline), got {ratios}")
  groups = list(plan.lowerable)
  layers = plan.layer_infos(groups)
  group_cost = cost.channelwise_bops_table(layers, ratios)
  images = sensitivity_images(config, calib_batches)
  ref = model.apply(variables, images, train=False)
  logits = jax.jit(qmodel.apply_counts)

  def counts_of(assignment):
    return {p: jnp.int32(cost.lowered_count(layers[p], ratios[k])) for p, k in zip(groups, assignment)}

  def sensitivity(g, k):
    a = np.zeros(len(groups), np.int64)
    a[g] = k
    return apply_lib.sqnr_db(ref, logits(qvars, images, counts_of(a)))

  predict = lambda images, qv, counts: qmodel.apply_counts(qv, images, counts)
  score_data = score_batches(config) if score_data is None else score_data

  def top1(assignment):
    return train_lib.evaluate(predict, iter(score_data), mesh, desc="flexiq amp eval",
                              args=(qvars, counts_of(assignment)))["top1"]

  def float_score():
    return train_lib.evaluate(lambda im, v: model.apply(v, im, train=False), iter(score_data), mesh,
                              desc="float score", args=(variables,))["top1"]

  names = [f"r={r:g}" for r in ratios]
  problem = amp.AmpProblem(groups, names, 0, group_cost, sensitivity, top1, float_score)
  stage = os.path.join(workdir, "layerwise_flexiq")
  fp = _fingerprint(config, plan, "flexiq", config.select)
  result = amp.run(problem, stage, fp, allowed_drop=lw.allowed_drop, search=lw.search, phase2_full=lw.phase2_full)
  plots.plot_sensitivity(result, os.path.join(stage, "sensitivity.png"), "FlexiQ per-layer ratio sensitivity (SQNR, dB)")
  plots.plot_pareto(result, os.path.join(stage, "pareto.png"), "FlexiQ per-layer-ratio Pareto front")
  macs = np.array([layers[p].macs for p in groups], np.float64)
  channels = np.array([layers[p].in_channels for p in groups], np.int64)
  at_level = {}
  for level in config.select.levels:
    for point in result["pareto"]:
      counts = np.array([cost.lowered_count(layers[p], ratios[k]) for p, k in zip(groups, point["assignment"])])
      share = cost.lowered_mac_share(counts, channels, macs)
      if share >= float(level) - 1e-9:
        at_level[float(level)] = {"counts": dict(zip(groups, counts.tolist())), "share": share,
                                  "relative_cost": point["relative_cost"]}
        break
  result["counts_at_level"] = at_level
  records.write_json_atomic(os.path.join(stage, "counts_at_level.json"), at_level)
  return result
