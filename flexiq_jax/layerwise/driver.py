"""The mixed-precision search wired to a model: layer-wise bit widths (the paper's algorithm) and
FlexiQ per-layer 4-bit ratios (the same procedure as a FlexiQ selector).

Data (config.layerwise):
  phase 1: the first `sensitivity_images` calibration images (unlabelled), SQNR (dB) of the
           logits against the reference: in the layer-wise search the layer-wise apply with
           every layer float, i.e. the float model with attention's quantized matmuls at 8 bits
           as every evaluation runs them (the float model itself where the plan quantizes no
           matmul), so that a group's SQNR measures its own error; in the FlexiQ search the
           float model.
  float score: the float model's top-1 (matmuls float), which the allowed drop is taken from.
  baseline, phases 2/3: top-1 on the last `score_examples` labelled images of `score_split` (a
           validation slice of the training split by default), so that the allowed drop is
           honoured on data distinct from the reported test split; reports show both the drop
           on the score images and the measured drop on the test split.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import records
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax import train as train_lib
from flexiq_jax.layerwise import amp
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.layerwise import plots
from flexiq_jax.layerwise.candidates import parse_candidate, parse_candidates, quantizer_groups
from flexiq_jax.stage_results import Calibration, FloatModel, Quantized


def sensitivity_images(config, calib_batches):
  """The first `config.layerwise.sensitivity_images` calibration images, the phase-1 data.

  Args:
    config: The run config (reads config.layerwise.sensitivity_images).
    calib_batches: Sequence of calibration image batches.

  Returns:
    A jax array of the images, concatenated along the batch axis.
  """
  n = config.layerwise.sensitivity_images
  images = jnp.concatenate(list(calib_batches))
  return images[:n]


def score_batches(config):
  """The last `score_examples` images of `score_split`, in eval batches (the last one padded,
  with `mask` 0 on the padding).

  Args:
    config: The run config (reads config.layerwise.score_split and score_examples, config.data and
      config.eval_batch_size).

  Returns:
    A list of batch dicts of numpy arrays (the dataset's fields plus 'mask'), each of
    config.eval_batch_size examples.
  """
  lw = config.layerwise
  ds = data.get_dataset(config.data, lw.score_split)
  n = min(lw.score_examples, ds.num_examples)
  idx = np.arange(ds.num_examples - n, ds.num_examples)
  bs = config.eval_batch_size
  batches = []
  for i in range(0, n, bs):
    part = idx[i:i + bs]
    batch = ds.load(part, None)
    pad = bs - len(part)
    batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    batches.append({**batch, "mask": np.concatenate([np.ones(len(part), np.float32), np.zeros(pad, np.float32)])})
  return batches


PHASE3_KEYS = ("allowed_drop", "search", "phase2_full")  # change the choice, not the cached phases


def _fingerprint(config, plan, *extra) -> str:
  lw = {k: v for k, v in config.layerwise.to_dict().items() if k not in PHASE3_KEYS}
  return stage_cache.fingerprint([stage_options.fingerprint_fields(config, "calibrate"), lw, plan.quantized, *map(str, extra)])


class LayerwiseEvaluator:
  """One jitted layer-wise apply, evaluated at any (weight bits, act bits) arrays and tables."""

  def __init__(self, model, plan, folded, tables, mesh=None):
    self.plan, self.folded, self.tables, self.mesh = plan, folded, tables, mesh
    apply = apply_lib.make_apply(model, plan)
    self.logits = jax.jit(apply)
    # A stable predict function: train.evaluate caches its compiled step per function.
    self.predict = lambda images, tables, wb, ab: apply(folded, tables, wb, ab, images)

  def top1(self, batches, wb, ab, tables=None) -> float:
    return self.metrics(batches, wb, ab, tables=tables)["top1"]

  def metrics(self, batches, wb, ab, reference_logits=None, tables=None) -> dict:
    """train.evaluate's metrics (with agreement / KL / SQNR against `reference_logits` if given)."""
    return train_lib.evaluate(self.predict, iter(batches), self.mesh, desc="layerwise eval",
                              args=(self.tables if tables is None else tables, wb, ab),
                              reference_logits=reference_logits)


@dataclasses.dataclass(frozen=True)
class LayerwiseSearch:
  """The layer-wise search's outcome: amp.run's JSON summary, the clipping tables of the chosen
  configuration (recalibrated where config.layerwise.recalibrate) and the chosen per-layer bits
  (over plan.quantized) — data only, evaluated with LayerwiseEvaluator."""

  summary: dict
  tables: dict
  weight_bits: np.ndarray
  act_bits: np.ndarray


@dataclasses.dataclass(frozen=True)
class LayerwiseProblem:
  """The search wired to a model, before it runs: `problem` for amp.run, the groups' layers,
  the candidates, and `tables_for(kind, k)` (the clipping tables each evaluation uses)."""

  problem: amp.AmpProblem
  members: list  # [tuple of layer paths] per group
  candidates: list
  tables_for: object  # (kind 'uniform' | 'phase1', candidate index) -> tables
  bits_of: object  # assignment (G,) -> (weight_bits, act_bits) over plan.quantized
  warmup: object  # () -> None: compiles every function the phases call (timed apart)


def layerwise_problem(config, float_model: FloatModel, calibration: Calibration, calib_batches, mesh=None,
                      *, score_data=None) -> LayerwiseProblem:
  """Groups, candidates, cost table and the phase callbacks of the layer-wise search.

  Phase 1 (`sensitivity_fn(g, k)`): group g at candidate k, every other group float, SQNR (dB)
  of the logits against every group float on the sensitivity images; the plan's quantized
  matmuls (attention's q·kᵀ, attn·v) run at 8 bits in both, as in every evaluation here, so
  the reference is the float model only where the plan quantizes no matmul. The float score
  (the allowed drop's reference) is the float model's. With `recalibrate` the
  activation ranges are recomputed once per candidate with every activation at that candidate
  and the weights float (AIMET's phase 1); uniform candidates get ranges recomputed at that
  candidate, and every Pareto point the ranges of its baseline (AIMET keeps its encodings
  across the Pareto points). Recalibration recomputes min-max ranges only: with
  act_range='mse' the tables stay the calibrated ones.

  Args:
    config: The run config (reads config.layerwise).
    float_model: The float model and its variables.
    calibration: The calibration stage result (plan, folded variables, statistics).
    calib_batches: Calibration image batches.
    mesh: Optional device mesh for evaluation.
    score_data: Scoring batches; default `score_batches(config)`.

  Returns:
    The LayerwiseProblem.

  Raises:
    ValueError: If a candidate or the grouping in config.layerwise is invalid.
  """
  model, variables = float_model.model, float_model.variables
  plan, folded, calib = calibration.plan, calibration.folded, calibration.stats
  lw = config.layerwise
  cands = parse_candidates(lw.candidates)
  widths = sorted(({c.act_bits for c in cands} | {c.weight_bits for c in cands}) - {0})
  tables = apply_lib.build_tables(model, plan, folded, calib, act_method=lw.act_range, weight_method=lw.weight_range,
                                  bits=widths, batches=calib_batches)
  ev = LayerwiseEvaluator(model, plan, folded, tables, mesh)
  images = sensitivity_images(config, calib_batches)
  # Every group float; the matmuls' scales are the calibrated ones in every table.
  ref = ev.logits(folded, tables, *apply_lib.bits_arrays(plan, {}), images)
  image_shape = tuple(np.asarray(calib_batches[0]).shape[1:])
  groups = quantizer_groups(plan, lw.get("grouping", "shared_input"), model, folded, image_shape)
  members = [g.layers for g in groups]
  layer_cost = cost.layerwise_bops_table(plan.layer_infos(), [c.cost_bits for c in cands])
  row = {p: i for i, p in enumerate(plan.quantized)}
  group_cost = np.stack([layer_cost[[row[p] for p in m]].sum(0) for m in members])
  recalibrate = bool(lw.get("recalibrate", True)) and lw.act_range == "minmax"
  recal = jax.jit(apply_lib.make_recalibrate(model, plan))
  recalibrated = {}

  def bits_for(assignment: dict):
    return apply_lib.bits_arrays(plan, assignment)

  def bits_of(assignment):
    return bits_for({p: cands[k] for m, k in zip(members, assignment) for p in m})

  def tables_for(kind, k):
    if not recalibrate:
      return tables
    if (kind, k) not in recalibrated:
      c = cands[k]
      wb, ab = bits_for({p: (c.weight_bits if kind == "uniform" else 0, c.act_bits) for p in plan.quantized})
      absmax = np.max([np.asarray(recal(folded, tables, wb, ab, jnp.asarray(b))) for b in calib_batches], axis=0)
      recalibrated[(kind, k)] = apply_lib.with_act_ranges(tables, plan, absmax)
    return recalibrated[(kind, k)]

  def sensitivity(g, k):
    wb, ab = bits_for({p: cands[k] for p in members[g]})  # every other group float, as AIMET
    return apply_lib.sqnr_db(ref, ev.logits(folded, tables_for("phase1", k), wb, ab, images))

  score_data = score_batches(config) if score_data is None else score_data
  float_predict = lambda im, v: model.apply(v, im, train=False)

  def float_score():
    return train_lib.evaluate(float_predict, iter(score_data), mesh, desc="float score", args=(variables,))["top1"]

  def evaluate(assignment, baseline):
    uniform = len(set(int(a) for a in assignment)) == 1
    t = tables_for("uniform", int(assignment[0]) if uniform else baseline)
    return ev.top1(score_data, *bits_of(assignment), tables=t)

  def warmup():
    wb, ab = bits_of(np.zeros(len(members), np.int64))
    jax.block_until_ready(ev.logits(folded, tables, wb, ab, images))
    jax.block_until_ready(recal(folded, tables, wb, ab, jnp.asarray(calib_batches[0])))
    ev.top1(score_data[:1], wb, ab)
    train_lib.evaluate(float_predict, iter(score_data[:1]), mesh, desc="warm-up", args=(variables,))

  baseline = None if lw.baseline == "auto" else cands.index(parse_candidate(lw.baseline))
  tie_rank = [sum(c.cost_bits) for c in cands]  # AIMET: the larger bit-width sum first
  problem = amp.AmpProblem(["+".join(m) for m in members], [c.name for c in cands], group_cost, sensitivity,
                           evaluate, float_score, baseline=baseline, tie_rank=tie_rank)
  return LayerwiseProblem(problem, members, cands, tables_for, bits_of, warmup)


def layerwise_search(config, workdir, float_model: FloatModel, calibration: Calibration, calib_batches, mesh=None,
                     *, allowed_drop=None, search=None, stage_name="layerwise", score_data=None,
                     early_exit: bool = True, max_cost=None) -> LayerwiseSearch | None:
  """The baseline step and phases 1-3 over group bit widths; cached under <workdir>/<stage_name>/.
  The summary's 'seconds' has 'compile' (the warm-up that compiles every function the phases
  call) apart from the phases. early_exit=False runs phases 1-3 even where the baseline step
  would end the search (amp.run). With `max_cost` the configuration returned is instead the
  Pareto point of largest cost not above a budget (a comparison at matched cost).

  Args:
    config: The run config (reads config.layerwise).
    workdir: The run's working directory.
    float_model: The float model and its variables.
    calibration: The calibration stage result.
    calib_batches: Calibration image batches.
    mesh: Optional device mesh for evaluation.
    allowed_drop: Allowed top-1 drop; default config.layerwise.allowed_drop.
    search: Phase-3 search name; default config.layerwise.search.
    stage_name: Subdirectory of `workdir` for the cached phases and plots.
    score_data: Scoring batches; default `score_batches(config)`.
    early_exit: Whether the baseline step may end the search early.
    max_cost: None, or (cost_fn, budget): `cost_fn(weight_bits, act_bits)` of a configuration (the
      caller's cost measure) and the most it may be; the summary's 'chosen' is then that Pareto
      point (or the search's own choice where that one fits and costs more), 'chosen_by' says so.

  Returns:
    A LayerwiseSearch with the summary (plus 'members' and 'recalibrated'), the chosen
    configuration's tables and its weight and activation bits; None when `max_cost` is given and
    no configuration the search reached fits the budget.
  """
  lw = config.layerwise
  t0 = time.perf_counter()
  lp = layerwise_problem(config, float_model, calibration, calib_batches, mesh, score_data=score_data)
  t1 = time.perf_counter()
  lp.warmup()
  t2 = time.perf_counter()
  stage = os.path.join(workdir, stage_name)
  fp = _fingerprint(config, calibration.plan, "layerwise", *apply_lib.matmul_fingerprint(calibration.plan).values(),
                    *apply_lib.act_grid_fingerprint(calibration.plan).values())
  result = amp.run(lp.problem, stage, fp,
                   allowed_drop=lw.allowed_drop if allowed_drop is None else allowed_drop,
                   search=search or lw.search, phase2_full=lw.phase2_full, early_exit=early_exit)
  result["seconds"] = {"setup": t1 - t0, "compile": t2 - t1, **result["seconds"]}
  result["members"] = {"+".join(m): list(m) for m in lp.members}
  result["recalibrated"] = bool(lw.get("recalibrate", True)) and lw.act_range == "minmax"
  if result["phases_run"]:
    plots.plot_sensitivity(result, os.path.join(stage, "sensitivity.png"), "Layer-wise sensitivity (SQNR, dB)")
    plots.plot_pareto(result, os.path.join(stage, "pareto.png"), "Layer-wise Pareto front")
  if max_cost is not None:
    cost_fn, budget = max_cost
    points = [result["chosen"]] + list(result.get("pareto") or [])
    fitting = [(cost_fn(*lp.bits_of(p["assignment"])), i) for i, p in enumerate(points)]
    fitting = [(c, i) for c, i in fitting if c <= budget * (1 + 1e-9)]
    if not fitting:
      return None
    cost, i = max(fitting, key=lambda t: (t[0], -t[1]))
    chosen = points[i]
    result = {**result, "chosen": chosen, "chosen_candidates": {lp.problem.groups[g]: lp.problem.candidates[k]
                                                         for g, k in enumerate(chosen["assignment"])},
              "chosen_by": f"the largest cost not above {budget:.6g} ({cost:.6g})"}
  assignment = result["chosen"]["assignment"]
  uniform = len(set(assignment)) == 1
  baseline = lp.candidates.index(parse_candidate(result["baseline"]))
  tables = lp.tables_for("uniform", assignment[0] if uniform else baseline)
  wb, ab = lp.bits_of(assignment)
  return LayerwiseSearch(result, tables, np.asarray(wb), np.asarray(ab))


def flexiq_search(config, workdir, float_model: FloatModel, calibration: Calibration, calib_batches,
                  quantized: Quantized, mesh=None, *, score_data=None) -> dict:
  """Phases 1-2 over FlexiQ per-layer 4-bit ratios (config.layerwise.flexiq_ratios), on the
  quantized model's stored channel orders; groups = the lowerable layers. Phase 1 leaves every
  other layer at 8 bits (ratio 0): the FlexiQ model has no float option. Returns the amp summary
  with 'counts_at_level' {level: {path: count}}: for each select.levels value, the first
  Pareto point whose 4-bit MAC share (of the lowerable layers) reaches it.

  Args:
    config: The run config (reads config.layerwise and config.select.levels).
    workdir: The run's working directory; results go to <workdir>/layerwise_flexiq/.
    float_model: The float model and its variables.
    calibration: The calibration stage result.
    calib_batches: Calibration image batches (the sensitivity images).
    quantized: The quantized stage result (qmodel and qvars).
    mesh: Optional device mesh for evaluation.
    score_data: Scoring batches; default `score_batches(config)`.

  Returns:
    The amp.run summary dict with 'counts_at_level': {level: {'counts', 'share', 'relative_cost'}}.

  Raises:
    ValueError: If config.layerwise.flexiq_ratios does not start at 0.
  """
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
  # The FlexiQ model has one set of weights and ranges: the baseline is fixed at ratio 0 and the
  # whole Pareto list is needed for the levels, so there is no early exit.
  problem = amp.AmpProblem(groups, names, group_cost, sensitivity, lambda a, _: top1(a), float_score, baseline=0,
                           tie_rank=[-r for r in ratios])
  stage = os.path.join(workdir, "layerwise_flexiq")
  fp = _fingerprint(config, plan, "flexiq", config.select)
  result = amp.run(problem, stage, fp, allowed_drop=lw.allowed_drop, search=lw.search, phase2_full=lw.phase2_full,
                   early_exit=False)
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
