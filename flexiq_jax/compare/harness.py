"""`run.py --mode=compare`: every method x ratio/BOPs point -> top-1 on the eval split and BOPs
relative to all quantized layers at W8A8, as JSON, a Markdown table and one Pareto plot.

Methods (config.compare.methods):
  flexiq          the configured FlexiQ pipeline, swept at config.sweep.ratios (before and, with
                  compare.finetune, after its multi-ratio finetuning)
  flexiq_naive    the same with config.quant.extraction='naive' (sub-workdir compare/flexiq_naive)
  flexiq_random   the same with config.select.channel_order='random' (compare/flexiq_random)
  flexiq_amp      FlexiQ with per-layer ratios chosen by the mixed-precision search, at each of
                  config.select.levels, beside the evolutionary search's selection at that level
  layerwise_amp   the layer-wise mixed-precision search (layerwise package), one point per
                  compare.allowed_drops
  ptq_minmax, ptq_mse   uniform W8A8 and W4A4 post-training quantization
  lsq_qat         uniform W4A4 QAT with LSQ, same budget and recipe as config.finetune
The ablation sub-workdirs are evaluated before finetuning only (their finetuning would cost as
much again as FlexiQ's). Each method's rows are cached in compare/rows.json by a fingerprint of
the config, so a rerun only computes methods that changed.
"""

from __future__ import annotations

import copy
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import config_utils
from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import experiment
from flexiq_jax import reporting
from flexiq_jax import train as train_lib
from flexiq_jax.compare import baselines
from flexiq_jax.layerwise import amp
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.layerwise import driver

ALL_METHODS = ("flexiq", "flexiq_naive", "flexiq_random", "flexiq_amp", "layerwise_amp", "ptq_minmax", "ptq_mse",
               "lsq_qat")


def _as_list(values) -> list:
  """A config tuple; tolerates 'a,b' strings (what a --config.x=a,b override can leave)."""
  if isinstance(values, str):
    values = (values,)
  return [v.strip() if isinstance(v, str) else v for item in values
          for v in (item.split(",") if isinstance(item, str) else [item])]


def _row(method, setting, top1, rel_bops, **extra):
  return {"method": method, "setting": setting, "top1": float(top1), "relative_bops": float(rel_bops), **extra}


def _sweep_rows(method, config, qmodel, qvars, mesh, finetuned: bool):
  rows = []
  for r in experiment.sweep(config, qmodel, qvars, mesh, desc=method):
    rows.append(_row(method, f"ratio {r['ratio']:g}" + (" (finetuned)" if finetuned else ""), r["top1"],
                     r["relative_bops"], ratio=r["ratio"], low_bit_mac_share=r["low_bit_mac_share"],
                     finetuned=finetuned))
  return rows


def _flexiq_variant(config, workdir, model, variables, mesh, name, **overrides):
  """FlexiQ with one config change, in its own sub-workdir (its stage fingerprints differ)."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for dotted, value in overrides.items():
      section, key = dotted.split(".")
      cfg[section][key] = value
  sub = os.path.join(workdir, "compare", name)
  plan, folded, calib = experiment.calibrate_stage(cfg, sub, model, variables)
  orders, counts, levels = experiment.select_stage(cfg, sub, model, variables, plan, folded, calib)
  qmodel, qvars = experiment.quantize_stage(cfg, sub, model, plan, folded, calib, orders, counts, levels)
  return _sweep_rows(name, cfg, qmodel, qvars, mesh, finetuned=False)


def run_compare(config, workdir, model, variables, mesh=None, float_metrics=None) -> dict:
  cc = config.compare
  methods = _as_list(cc.methods)
  unknown = [m for m in methods if m not in ALL_METHODS]
  if unknown:
    raise ValueError(f"unknown compare.methods {unknown}; valid: {list(ALL_METHODS)}")
  eval_ds = data.get_dataset(config.data, config.data.eval_split)
  eval_data = list(experiment.eval_batches(config, eval_ds))
  plan, folded, calib = experiment.calibrate_stage(config, workdir, model, variables)
  calib_batches = experiment.calibration_batches(config)
  cache = amp.JsonCache(os.path.join(workdir, "compare", "rows.json"), config_utils.fingerprint(
      experiment._float_fingerprint(config), config.quant, config.calib, config.select, config.finetune,
      config.layerwise, config.sweep, cc.to_dict(), config.data.get("eval_examples", -1)))
  seconds = {}
  state = {}

  def flexiq_main():
    if "q" not in state:
      orders, counts, levels = experiment.select_stage(config, workdir, model, variables, plan, folded, calib)
      state["q"] = experiment.quantize_stage(config, workdir, model, plan, folded, calib, orders, counts, levels)
    return state["q"]

  def m_flexiq():
    qmodel, qvars = flexiq_main()
    rows = _sweep_rows("flexiq", config, qmodel, qvars, mesh, finetuned=False)
    if cc.finetune:
      tuned = experiment.finetune_stage(config, workdir, model, variables, qmodel, qvars, mesh)
      experiment.save_finetuned(workdir, tuned)
      rows += _sweep_rows("flexiq", config, qmodel, tuned, mesh, finetuned=True)
    return rows

  def m_flexiq_naive():
    return _flexiq_variant(config, workdir, model, variables, mesh, "flexiq_naive", **{"quant.extraction": "naive"})

  def m_flexiq_random():
    return _flexiq_variant(config, workdir, model, variables, mesh, "flexiq_random",
                           **{"select.channel_order": "random"})

  def m_flexiq_amp():
    qmodel, qvars = flexiq_main()
    res = driver.flexiq_search(config, workdir, model, variables, plan, folded, calib, calib_batches, qmodel, qvars,
                               mesh)
    predict = lambda images, qv, counts: qmodel.apply_counts(qv, images, counts)
    layers = {p: plan.layers[p] for p in plan.quantized}
    rows = []
    for level, sel in res["counts_at_level"].items():
      counts = {p: jnp.int32(c) for p, c in sel["counts"].items()}
      top1 = train_lib.evaluate(predict, iter(eval_data), mesh, desc="flexiq_amp", args=(qvars, counts))["top1"]
      rows.append(_row("flexiq_amp", f"ratio {level:g} (AMP per-layer ratios)", top1,
                       cost.relative_bops(layers, sel["counts"]), ratio=level,
                       low_bit_mac_share=cost.low_bit_mac_share(layers, sel["counts"]),
                       lowerable_share=sel["share"]))
    return rows

  def m_layerwise_amp():
    rows = []
    score_data = driver.score_batches(config)
    for drop in _as_list(cc.allowed_drops):
      res = driver.layerwise_search(config, workdir, model, variables, plan, folded, calib, calib_batches, mesh,
                                    allowed_drop=float(drop), score_data=score_data)
      wb, ab = res["bits_of"](res["chosen"]["assignment"])
      top1 = res["evaluator"].top1(eval_data, wb, ab)
      bits = {p: c for p, c in res["chosen_candidates"].items()}
      rows.append(_row("layerwise_amp", f"allowed drop {float(drop):g}", top1, res["chosen"]["relative_cost"],
                       candidates=bits, score_data_top1=res["chosen"]["score"], target=res["target"],
                       target_met=res["target_met"]))
    return rows

  def ptq(method):
    tables = apply_lib.build_tables(model, plan, folded, calib, act_method=method, weight_method=method, bits=(4, 8),
                                    batches=calib_batches)
    ev = driver.LayerwiseEvaluator(model, plan, folded, tables, mesh)
    rows = []
    for bits in ((8, 8), (4, 4)):
      assignment = baselines.uniform_bits(plan, bits, cc.keep_ends)
      wb, ab = apply_lib.bits_arrays(plan, assignment)
      rows.append(_row(f"ptq_{method}", f"W{bits[0]}A{bits[1]}" + (" (ends W8A8)" if cc.keep_ends and bits != (8, 8)
                                                                     else ""),
                       ev.top1(eval_data, wb, ab), baselines.relative_bops(plan, assignment)))
    return rows

  def m_lsq_qat():
    tables = apply_lib.build_tables(model, plan, folded, calib, act_method=cc.lsq_init, weight_method=cc.lsq_init,
                                    bits=(4, 8), batches=calib_batches)
    bits = baselines.uniform_bits(plan, (4, 4), cc.keep_ends)
    out = baselines.lsq_qat(config, model, variables, plan, folded, tables, bits, eval_data, mesh)
    return [_row("lsq_qat", "W4A4" + (" (ends W8A8)" if cc.keep_ends else "") + f", {out['steps']} steps, lr {out['learning_rate']:g}",
                 out["top1"], baselines.relative_bops(plan, bits))]

  fns = {"flexiq": m_flexiq, "flexiq_naive": m_flexiq_naive, "flexiq_random": m_flexiq_random,
         "flexiq_amp": m_flexiq_amp, "layerwise_amp": m_layerwise_amp, "ptq_minmax": lambda: ptq("minmax"),
         "ptq_mse": lambda: ptq("mse"), "lsq_qat": m_lsq_qat}
  rows = []
  for m in methods:
    t0 = time.perf_counter()
    rows += cache.get(m, fns[m])
    seconds[m] = time.perf_counter() - t0
    print(f"compare: {m} done ({seconds[m]:.0f} s)")
  results = {**reporting.run_info(), "model": config.model.name, "dataset": config.data.name,
             "eval_examples": len(eval_data) and int(sum(float(np.sum(b.get("mask", np.ones(len(b["label"])))))
                                                         for b in eval_data)),
             "float_top1": float_metrics["top1"] if float_metrics else None, "rows": rows,
             "seconds_this_run": seconds}
  write_reports(results, workdir, cc.results_prefix)
  return results


def write_reports(results: dict, workdir: str, prefix: str = "") -> str:
  """compare.json, compare_table.md, compare_pareto.png in <workdir>/compare/ (and at `prefix`
  + '.json'/'.md'/'.png' if given)."""
  title = f"Method comparison: {results['model']} on {results['dataset']}"
  text = f"# {title}\n\n" + reporting.provenance_header(results)
  if results.get("float_top1") is not None:
    text += f"Float model top-1: {results['float_top1']:.2f}% ({results['eval_examples']} eval images)\n\n"
  text += ("Relative BOPs: MACs x weight bits x activation bits of the quantized layers, against all of "
           "them at W8A8 (float = 32 x 32 bits would be 16.0). Top-1 on the eval split.\n\n")
  table = [[r["method"], r["setting"], r["top1"], f"{r['relative_bops']:.3f}"] for r in results["rows"]]
  text += reporting.markdown_table(["method", "setting", "top-1 (%)", "relative BOPs"], table)
  amp_rows = {r["ratio"]: r for r in results["rows"] if r["method"] == "flexiq_amp"}
  evo = {r["ratio"]: r for r in results["rows"] if r["method"] == "flexiq" and not r.get("finetuned")}
  both = [lvl for lvl in amp_rows if lvl in evo]
  if both:
    text += ("\nFlexiQ selector at the same global ratio (before finetuning): evolutionary search vs the "
             "mixed-precision search over per-layer ratios (AMP picks the first Pareto point whose 4-bit "
             "MAC share reaches the level).\n\n")
    text += reporting.markdown_table(
        ["ratio", "evolutionary top-1 (%)", "evolutionary rel. BOPs", "AMP top-1 (%)", "AMP rel. BOPs"],
        [[f"{lvl:g}", evo[lvl]["top1"], f"{evo[lvl]['relative_bops']:.3f}", amp_rows[lvl]["top1"],
          f"{amp_rows[lvl]['relative_bops']:.3f}"] for lvl in sorted(both)])
  paths = [os.path.join(workdir, "compare", "compare")]
  if prefix:
    paths.append(prefix)
  for base in paths:
    reporting.write_json_atomic(base + ".json", results)
    with open(base + "_table.md" if base.endswith("compare") else base + ".md", "w") as f:
      f.write(text)
    plot_pareto(results, base + ("_pareto.png" if base.endswith("compare") else ".png"), title)
  return text


def plot_pareto(results: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  groups: dict = {}
  for r in results["rows"]:
    label = r["method"] + (" (finetuned)" if r.get("finetuned") else "")
    groups.setdefault(label, []).append(r)
  for label, rows in groups.items():
    rows = sorted(rows, key=lambda r: r["relative_bops"])
    style = "o-" if len(rows) > 1 else "s"
    ax.plot([r["relative_bops"] for r in rows], [r["top1"] for r in rows], style, ms=4, label=label)
  if results.get("float_top1") is not None:
    ax.axhline(results["float_top1"], color="gray", ls="--", label="float")
  ax.set_xlabel("relative BOPs (W8A8 = 1)")
  ax.set_ylabel("top-1 (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
