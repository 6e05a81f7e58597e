r"""The paper's tables over the sweep's models, from one resumable command.

  python -m experiments.paper_tables                      # every sweep model, every method
  python -m experiments.paper_tables --models=resnet18,deit_s --methods=flexiq,ptq_mse
  python -m experiments.paper_tables --tables_only        # the tables again from the saved sweep

Run from the repository root. For each model config (`configs/<name>.py:fmnist`; `quickstart` is
its own Fashion-MNIST config) and seed, one workdir `<workroot>/<name>[_seed<k>]` holds the whole
pipeline: the float model (trained from scratch), its evaluation, then `run.py --mode=compare`'s
methods (flexiq_jax.compare: FlexiQ swept before and after finetuning, its ablation variants, the
uniform PTQ and QAT baselines, the layer-wise search). Every stage and every method is cached in
the workdir, so a killed sweep continues where it stopped and a rerun reuses finished models.
Each finished (model, seed) writes `<results>/paper_sweep/<name>_seed<k>.json` (its rows and the
command, commit, device and date that made them); the tables are derived from those files only:

  paper_t1_4bit.{json,md}        T1: 4-bit accuracy per model, FlexiQ 100% after finetuning vs the baselines
  paper_t2_ratios.{json,md}      T2: accuracy vs 4-bit ratio before/after finetuning, loss at 50% vs 8-bit
  paper_t3_ablations.{json,md}   T3: extraction, channel order, selector, bias correction (before finetuning);
                                 the 4-bit fixes one at a time (after finetuning)
  paper_f1_pareto.png            F1: accuracy (or KL / SQNR: --pareto_metric) vs relative BOPs, all methods
  paper_f1_pareto_kl.png         F1 with KL(float || quantized) on the y axis
  paper_f2_speed.{json,md,png}   F2: integer-path time vs ratio (benchmarks/results/integer_path_<backend>.json)
  paper_claims.{json,md}         each claim of the paper beside the measured figure

Beside top-1 every point carries agreement with the float model's predictions, KL(float ||
quantized) and the output SQNR (dB), measured on the same test images in the same pass; where
several seeds ran, a table shows mean ± standard deviation over them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

# The sweep's models (their order, configs and labels) live in sweep_models, which the float store reads too.
from experiments.sweep_models import SPECS_BY_CONFIG as _SPECS_BY_CONFIG
from experiments.sweep_models import SWEEP_ORDER, TABLE_ORDER, fmnist_arg, model_config, model_label

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# T3's first part: FlexiQ's choices one at a time, before finetuning.
ABLATIONS = (  # (label, method, what changes against 'flexiq' before finetuning)
    ("fitted extraction (FlexiQ)", "flexiq", "-"),
    ("drop the 4 low bits", "flexiq_naive", "quant.extraction=naive"),
    ("random channel order", "flexiq_random", "select.channel_order=random"),
    ("uniform per-layer counts", "flexiq_uniform", "select.selector=uniform"),
    ("greedy per-layer counts", "flexiq_greedy", "select.selector=greedy"),
    ("no bias correction", "flexiq_no_bias_correction", "quant.bias_correction=False"),
)
# T3's second part: FlexiQ's 4-bit fixes one at a time, after finetuning: (label, method, change).
FINETUNED_ABLATIONS = (
    ("configured FlexiQ", "flexiq", "-"),
    ("configured FlexiQ again, another QAT seed (the control)", "flexiq_reseed", "finetune.seed_offset=1"),
    ("weight grid max|w|/127", "flexiq_max127", "quant.weight_scale=max127"),
    ("weight grid fitted for 8 and 4 bits", "flexiq_joint", "quant.weight_scale=joint"),
    ("sandwich (3 passes per step)", "flexiq_sandwich", "finetune.every_step_ratios=(0, 1)"),
    ("sandwich, 4-bit end weighted 2", "flexiq_sandwich_w4", "every_step_ratios=(0, 1), every_step_weights=(1, 2)"),
    ("3x the steps, no sandwich (the sandwich's passes)", "flexiq_long", "finetune.num_epochs x 3"),
    ("sampler weighted to the ends", "flexiq_ends", "level_probs: ratio 1 0.45, ratio 0 0.25; uniform_prob 0.2"),
    ("sampler weighted to ratio 1", "flexiq_top", "level_probs: ratio 1 0.45, ratio 0 0.125; uniform_prob 0.2"),
    ("ratio-dependent output gain and bias", "flexiq_affine", "finetune.ratio_affine"),
    ("sampler weighted to the ends, with the ratio affine", "flexiq_ends_affine",
     "flexiq_ends' sampler and finetune.ratio_affine"),
    ("learnt scales (LSQ)", "flexiq_lsq", "finetune.lsq, lsq_weights, lsq_grad_scale=lsq_weight_grad_scale=effective"),
    ("refresh from the quantized model", "flexiq_refresh_quantized", "finetune.refresh_source=quantized"),
    ("symmetric activation grid", "flexiq_symmetric", "quant.act_grid=symmetric"),
    ("distillation only (no label loss)", "flexiq_distill", "finetune.distill_weight=1"),
    ("learnt 4-bit rounding (AdaRound's budget) before the QAT", "flexiq_rounding",
     "finetune.rounding_iterations=compare.adaround_iterations, rounding_images=compare.adaround_images"),
    ("the learnt rounding on ratios 0, 0.5 and 1 at once", "flexiq_rounding_joint",
     "flexiq_rounding and finetune.rounding_ratios=(0, 0.5, 1)"),
    ("the same, its own learning rate", "flexiq_rounding_joint_lr",
     "flexiq_rounding_joint, its rate chosen from finetune.lr_grid as the configured pipeline's"),
)
# The sweep's default methods: FlexiQ and T3's variants before finetuning, the baselines, then T3's
# finetuned variants.
METHODS = (tuple(method for _, method, _ in ABLATIONS)
           + ("ptq_minmax", "ptq_mse", "adaround", "lsq_qat", "lsq_adaround", "layerwise_amp", "switchable_qat",
              "flexiq_100only")
           + tuple(method for _, method, _ in FINETUNED_ABLATIONS if method != "flexiq"))
# The 4-bit baselines of T1 (method, the setting prefix of its 4-bit row).
T1_BASELINES = (("ptq_minmax", "W4A4"), ("ptq_mse", "W4A4"), ("adaround", "W4A4"), ("lsq_qat", "W4A4"),
                ("lsq_adaround", "W4A4"), ("layerwise_amp", None))
# Methods of FlexiQ's own kind (one network, switched at run time): their 4-bit point, in T1 beside
# the single-point baselines but not among them (FlexiQ's margin over them is its own line).
T1_SWITCHABLE = (("switchable_qat", "W4A4"),)
FIDELITY = ("agreement", "kl", "sqnr_db")  # = flexiq_jax.train.FIDELITY_METRICS (imported lazily, as all of flexiq_jax here)

_MODELS = flags.DEFINE_list("models", list(SWEEP_ORDER), "Config names (configs/<name>.py), run one after another.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "compare methods (flexiq_jax.compare.METHODS).")
_RATIOS = flags.DEFINE_list("ratios", [], "4-bit ratios of the sweep (default: each config's sweep.ratios).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds of the whole pipeline for every model.")
_EXTRA_SEEDS = flags.DEFINE_list("extra_seeds", ["1", "2"], "More seeds, for --seed_models only (run-to-run noise).")
# One model gets extra seeds: the run-to-run noise that the margins are read against, within
# the sweep's budget (about three hours on 2 CPU cores for everything).
_SEED_MODELS = flags.DEFINE_list("seed_models", ["resnet18"], "Models that get --extra_seeds.")
_SEED_METHODS = flags.DEFINE_list("seed_methods", ["flexiq", "ptq_mse", "adaround", "lsq_qat"],
                                  "The --methods the extra seeds run (T1's and T2's spread; the ablations run "
                                  "on the first seed); empty: all of --methods.")
_WORKROOT = flags.DEFINE_string("workroot", "workdirs/paper", "Parent of the per-model workdirs.")
_OUT = flags.DEFINE_string("out", RESULTS, "Folder for the sweep files (paper_sweep/) and the tables.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The configs' :smoke variants (a few steps of everything; tests).")
_IMAGENET = flags.DEFINE_bool("imagenet", False, "The configs' ImageNet settings (TFDS imagenet2012 and timm's "
                              "weights in weights/, see configs/common.py) in place of :fmnist.")
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Models run side by side in this many processes (each its own workdir). One process leaves "
    "part of a 2-core CPU idle (compilation and the host loop are single-threaded); 2 use it fully.")
_RECOMPUTE = flags.DEFINE_list(
    "recompute", [], "Methods whose rows cached in the workdirs are computed again when another commit made them "
    "(after a code change the cache cannot see: its key is the config); 'flexiq' redoes its finetuning too. The "
    "records name the commit that made each method's rows.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto", "JAX's persistent compilation cache, shared by the jobs and by later runs (each job "
    "is a fresh process: the same model's evaluation, calibration and training steps compile once): a folder, "
    "'auto' = <workroot>/.jax_cache, '' = none. Results do not depend on it.")
_TABLES_ONLY = flags.DEFINE_bool("tables_only", False, "Only regenerate the tables from <out>/paper_sweep/.")
_NEW_FLOAT = flags.DEFINE_bool(
    "new_float", False, "Compute every method again when a model's float weights differ from those its mirrored "
    "rows (paper_sweep/rows/) were computed on; without it the sweep stops there and replaces nothing.")
_PARETO_METRIC = flags.DEFINE_enum("pareto_metric", "top1", ("top1", "kl", "sqnr_db", "agreement"),
                                   "The y axis of F1.")
_BENCHMARK = flags.DEFINE_string("benchmark", "benchmarks/results/integer_path_cpu.json",
                                 "The integer-path benchmark results F2 reads (python -m benchmarks.integer_path).")


# ----------------------------------------------------------------------------------------------
# The sweep.


def run_one(name: str, seed: int, methods, ratios, workroot: str, out: str, smoke: bool, argv,
            imagenet: bool = False, recompute=(), new_float: bool = False) -> dict:
  """The whole pipeline and every method for one model and seed; returns the sweep record. Stops
  with FloatChanged before any method runs when the model's mirrored rows were computed on other
  float weights, unless `new_float`."""
  from experiments import float_store
  from flexiq_jax import checkpoint
  from flexiq_jax import compare
  from flexiq_jax import pipeline
  from flexiq_jax import records
  from flexiq_jax import workdir as workdir_lib
  config = model_config(name, seed, methods, ratios, smoke, imagenet)
  workdir = os.path.join(workroot, name + (f"_seed{seed}" if seed else ""))
  resumed = os.path.isdir(workdir) and bool(os.listdir(workdir))  # earlier work reused: the timer misses it
  run = pipeline.Run(config, workdir)
  mirror = os.path.join(out, "paper_sweep", "rows", f"{name}_seed{seed}.json")
  rows_path = os.path.join(workdir, "compare", "rows.json")
  t0 = time.perf_counter()
  stored_float = float_store.archive_path(name, seed, os.path.join(out, "paper_sweep", "floats"))
  with workdir_lib.locked(workdir):  # one sweep (or run.py) per workdir at a time
    unpacked = float_store.unpack(stored_float, workdir, run.stage("float").fingerprint)
    if unpacked:
      resumed = True
      print(f"{name} seed {seed}: float stage at step {unpacked['step']} taken from {stored_float}", flush=True)
    # The float stage's run record (runs/*.json, as run.py writes one): it names the command,
    # commit and host that trained the float model as soon as it is done.
    with workdir_lib.RunRecord(workdir, config, argv) as run_record:
      result = pipeline.run_until(run, "eval")
      run_record.add("float", result.float_metrics)
    float_store.pack(workdir, stored_float)
    digest = checkpoint.tree_digest(result.float_model.variables)
    adopted = adopt_mirrored_rows(mirror, rows_path, digest, new_float)
    if adopted:
      print(f"{name} seed {seed}: rows of {', '.join(adopted)} taken from {mirror} (same float weights)", flush=True)
    compared = compare.run_compare(run, result.float_model, result.float_metrics, float_logits=result.float_logits,
                                   recompute=recompute,
                                   after_method=lambda m: mirror_rows(rows_path, mirror, digest, name, seed, argv))
  float_done = records.read_json(os.path.join(workdir, "float", "done.json"), {})
  record = {**records.run_info(argv), "model": name, "model_name": config.model.name, "seed": seed,
            "workdir": workdir, "dataset": config.data.name, "float": result.float_metrics, "float_digest": digest,
            "float_train": {"epochs": config.train.num_epochs, "steps": float_done.get("total_steps"),
                            "optimizer": config.train.optimizer, "learning_rate": config.train.learning_rate},
            "finetune_epochs": config.finetune.num_epochs, "eval_examples": compared.get("eval_examples"),
            "methods": list(methods),
            "rows": compared["rows"], "methods_made_by": compared["methods_made_by"],
            "seconds_this_run": time.perf_counter() - t0, "resumed": resumed}
  path = os.path.join(out, "paper_sweep", f"{name}_seed{seed}.json")
  record = carry_forward(records.read_json(path), record)
  if record.get("methods_carried"):
    print(f"{name} seed {seed}: rows of {', '.join(record['methods_carried'])} kept from its earlier record "
          "(not run now; same float weights)", flush=True)
  records.write_json_atomic(path, record)
  return record


class FloatChanged(Exception):
  """A model's float weights differ from those its committed rows were computed on."""


def carry_forward(previous: dict | None, record: dict) -> dict:
  """`record` with the rows of the methods that `previous` (the model's earlier record) has and this
  run did not run, when both were computed on the same float weights: a run of a few methods
  leaves the record of the others as it was. Those methods are listed in 'methods_carried'.

  Args:
    previous: the earlier record of the same model and seed, or None.
    record: this run's record.

  Returns:
    The record to write.
  """
  if not previous or previous.get("float_digest") != record["float_digest"]:
    return record
  carried = [m for m in previous.get("methods", []) if m not in record["methods"]]
  if not carried:
    return record
  made_by = previous.get("methods_made_by", {})
  return {**record, "methods": record["methods"] + carried, "methods_carried": carried,
          "rows": record["rows"] + [r for r in previous.get("rows", []) if r.get("method") in carried],
          "methods_made_by": {**record["methods_made_by"], **{m: made_by[m] for m in carried if m in made_by}}}


def mirror_rows(rows_path: str, mirror: str, digest: str, name: str, seed: int, argv=None) -> None:
  """Copies a workdir's cached compare rows (compare/rows.json) to `mirror`, a file under the
  results folder that is committed as methods finish, with the digest of the float weights they
  were computed on: a workdir lost before its model finished (a new machine) keeps its finished
  methods, which `adopt_mirrored_rows` puts back once the float model is trained again to the same
  weights."""
  from flexiq_jax import records
  saved = records.read_json(rows_path) or {}
  info = {k: v for k, v in records.run_info(argv).items() if k in ("command", "commit", "device", "host", "date")}
  records.write_json_atomic(mirror, {**info, "model": name, "seed": seed, "float_digest": digest,
                                     "note": "per-method rows of an unfinished sweep model (paper_tables.mirror_rows)",
                                     **{k: saved.get(k, {}) for k in ("fingerprints", "data", "made_by")}})


def adopt_mirrored_rows(mirror: str, rows_path: str, digest: str, new_float: bool = False) -> list[str]:
  """Puts the rows of `mirror` (see `mirror_rows`) that the workdir's compare/rows.json lacks into
  it, when they were computed on float weights of digest `digest`; the compare cache then reuses
  each of them while its method's fingerprint is unchanged. Returns the methods taken.

  Raises:
    FloatChanged: `mirror` holds rows computed on other float weights and `new_float` is False
      (going on would compute every method again on the new weights and replace the committed
      rows with them); with `new_float` none of them is reused.
  """
  from flexiq_jax import records
  from flexiq_jax import stage_cache
  saved = records.read_json(mirror)
  if not saved or not saved.get("data"):
    return []
  if saved.get("float_digest") != digest:
    if not new_float:
      raise FloatChanged(
          f"{mirror} holds the rows of {', '.join(sorted(saved['data']))} computed on float weights "
          f"{saved.get('float_digest')}, but the workdir's float model is {digest} (trained again on another "
          "host, or its recipe changed); nothing was replaced. Restore that float stage (paper_sweep/floats/, or "
          "the workdir it was trained in), or pass --new_float to compute every method again on the new weights.")
    print(f"note: {mirror} holds rows computed on other float weights ({saved.get('float_digest')}, now {digest}); "
          f"not reused (--new_float)", flush=True)
    return []
  return stage_cache.KeyedJsonCache.add_missing(rows_path, saved)


def jobs(models, seeds, extra_seeds, seed_models, methods, seed_methods) -> list[tuple[str, int, list[str]]]:
  """(model, seed, methods) in run order: every model at `seeds` with every method, then the
  extra seeds of `seed_models` with the methods of `seed_methods` among `methods` (all if empty)."""
  out = [(m, int(s), list(methods)) for m in models for s in seeds]
  extra = [m for m in methods if not seed_methods or m in seed_methods]
  out += [(m, int(s), extra) for m in models if m in seed_models for s in extra_seeds if str(int(s)) not in
          [str(int(t)) for t in seeds]]
  return out


def _quiet_worker() -> None:
  """A worker process: Orbax's INFO logs off (as in main), and its commit read at its start, as
  the parent's is (records name the code that started the run)."""
  from flexiq_jax import records
  logging.set_verbosity(logging.WARNING)
  records.git_commit()


def run_jobs(todo, run, workers: int):
  """Yields (job, record) for each (model, seed, methods) job as it finishes: in order in this
  process when `workers` is 1, else from `workers` spawned processes, a fresh one per job (a
  process that ran several models kept their compiled executables and once ran out of memory in
  LLVM); a failed job stops the sweep once the running ones end; finished ones keep their
  records and workdirs."""
  if workers <= 1:
    for job in todo:
      yield job, run(*job)
    return
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_quiet_worker, max_tasks_per_child=1)
  try:
    futures = {pool.submit(run, *job): job for job in todo}
    for future in concurrent.futures.as_completed(futures):
      yield futures[future], future.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def log_sweep_run(out: str, entry: dict) -> None:
  """Records one run of the sweep command (its workers, jobs and wall clock) in
  <out>/paper_sweep_runs.json: with several workers the records' own timers overlap, so the
  wall clock of the command is the sweep's time. Called at the start (wall_minutes None: a run
  killed before its end stays so) and again at the end, which updates the entry of the same start."""
  from flexiq_jax import records
  path = os.path.join(out, "paper_sweep_runs.json")
  runs = [r for r in records.read_json(path, []) if r["started"] != entry["started"]]
  records.write_json_atomic(path, runs + [entry])


# ----------------------------------------------------------------------------------------------
# Reading the sweep back.


def load_sweep(out: str) -> dict:
  """{model: [record per seed]} from <out>/paper_sweep/, models in sweep order."""
  folder = os.path.join(out, "paper_sweep")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"no sweep results in {folder}: run `python -m experiments.paper_tables` first")
  by_model: dict = {}
  for file in sorted(os.listdir(folder)):
    if file.endswith(".json"):
      with open(os.path.join(folder, file)) as f:
        record = json.load(f)
      by_model.setdefault(record["model"], []).append(record)
  order = {m: i for i, m in enumerate(("quickstart",) + TABLE_ORDER)}
  return {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in sorted(by_model.items(), key=lambda kv: order.get(kv[0], 99))}


def find_row(record, method, *, ratio=None, finetuned=None, setting_prefix=None):
  for row in record["rows"]:
    if row["method"] != method:
      continue
    if ratio is not None and not np.isclose(row.get("ratio", -1), ratio):
      continue
    if finetuned is not None and bool(row.get("finetuned", False)) != finetuned:
      continue
    if setting_prefix is not None and not row["setting"].startswith(setting_prefix):
      continue
    return row
  return None


def matched_layerwise_row(record, budget: float):
  """The layer-wise search's point with the largest BOPs not above `budget`; None when it has no
  point that cheap (T1 then says it could not match: `cheapest_layerwise_bops`), never a costlier
  point in its place."""
  rows = [r for r in record["rows"] if r["method"] == "layerwise_amp"]
  within = [r for r in rows if r["relative_bops"] <= budget + 1e-9]
  return max(within, key=lambda r: r["relative_bops"]) if within else None


def cheapest_layerwise_bops(record) -> float | None:
  """The relative BOPs of the layer-wise search's cheapest point (None: no layer-wise rows)."""
  bops = [r["relative_bops"] for r in record["rows"] if r["method"] == "layerwise_amp"]
  return min(bops) if bops else None


def baseline_cell(entry: dict) -> str:
  """A T1 baseline cell: its top-1, or for a layer-wise AMP search with no point within FlexiQ's
  BOPs, "could not match" with its cheapest point's and FlexiQ's relative BOPs, or for a QAT
  baseline the judge refused, "refused" with its top-1 in brackets (`t1_entry`)."""
  if entry.get("unmatched"):
    u = entry["unmatched"]
    return (f"could not match (cheapest {u['cheapest_relative_bops']:.3f} BOPs"
            + (f" > {u['budget']:.3f}" if u["budget"] is not None else "") + ")")
  if entry.get("refused"):  # the QAT judge refused it on some seeds (or all): not compared there
    r = entry["refused"]
    if entry["top1"] is None:
      return f"refused ({fmt(r['top1'])})"
    return f"{fmt(entry['top1'])} (refused on seed {', '.join(str(s) for s in r['seeds'])}: {fmt(r['top1'])})"
  return fmt(entry["top1"])


def stat(values) -> dict | None:
  """Mean, standard deviation (n-1) and count of the values that exist."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
          "n": len(values)}


def fmt(s, digits=2) -> str:
  if s is None:
    return "-"
  text = f"{s['mean']:.{digits}f}"
  return text + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "")


def per_seed(records_, pick, field="top1"):
  """stat over seeds of `pick(record)[field]`."""
  values = []
  for record in records_:
    row = pick(record)
    values.append(None if row is None else row.get(field))
  return stat(values)


# ----------------------------------------------------------------------------------------------
# Tables.


def provenance(sweep: dict, runs=()) -> dict:
  """What made the sweep files the tables are built from (the tables add no date of their own, so
  regenerating them from the same files gives the same bytes); `runs`: the sweep commands' own
  log (paper_sweep_runs.json: wall clock and workers of each run)."""
  recs = [r for rs in sweep.values() for r in rs]
  missing = [m for m in SWEEP_ORDER if m not in sweep]
  # The sweep's time as the records measured it (float training + every method of one model and
  # seed); a model with earlier work in its workdir (a killed run, or rows reused from the cache)
  # counts only its last run, and says so.
  minutes = {f"{r['model']}_seed{r['seed']}": round(r["seconds_this_run"] / 60, 1) for r in recs
             if "seconds_this_run" in r}
  # Rows a record took from its workdir's cache, made by an earlier run: {(commit, methods): [runs]}.
  reused: dict[tuple[str, tuple[str, ...]], list[str]] = {}
  for r in recs:
    by_commit: dict[str, list[str]] = {}
    for method, made in r.get("methods_made_by", {}).items():
      if not made["this_run"]:
        by_commit.setdefault(made["commit"][:7] if made["commit"] else "unrecorded", []).append(method)
    for commit, methods in by_commit.items():
      reused.setdefault((commit, tuple(methods)), []).append(f"{r['model']}_seed{r['seed']}")
  return {"models": list(sweep), "missing_models": missing,
          "reused_rows": [{"commit": c, "methods": list(m), "runs": runs} for (c, m), runs in sorted(reused.items())],
          "sweep_commands": sorted({r["command"] for r in recs}), "sweep_commits": sorted({r["commit"] for r in recs}),
          "devices": sorted({r["device"] for r in recs}),
          "dates": [min(r["date"] for r in recs), max(r["date"] for r in recs)],
          "sweep_minutes": {"total": round(sum(minutes.values()), 1), "per_run": minutes,
                            "resumed": sorted(f"{r['model']}_seed{r['seed']}" for r in recs if r.get("resumed"))},
          "sweep_runs": list(runs),
          "table_command": "python -m experiments.paper_tables --tables_only"}


def header(title: str, prov: dict) -> str:
  text = (f"# {title}\n\n- Sweep command(s): {'; '.join(f'`{c}`' for c in prov['sweep_commands'])}\n"
          f"- Commit(s): {', '.join(prov['sweep_commits'])}\n- Device(s): {', '.join(prov['devices'])}\n"
          f"- Dates: {prov['dates'][0]} to {prov['dates'][1]}\n- Tables regenerated by: `{prov['table_command']}`\n")
  spent = prov["sweep_minutes"]
  if spent["per_run"]:
    text += (f"- Time per model and seed (the records' own timers: float training and every method, each in its "
             f"process; several processes side by side overlap, so the runs' wall clock below is the sweep's time): "
             f"{spent['total']:.0f} min in all ({', '.join(f'{k} {v:g}' for k, v in spent['per_run'].items())})"
             + (f"; with earlier work in their workdirs, so counted only from their last run: "
                f"{', '.join(spent['resumed'])}" if spent["resumed"] else "") + "\n")
  for group in prov.get("reused_rows", []):
    made = ("an earlier run whose commit was not recorded (made before cached rows recorded it)"
            if group["commit"] == "unrecorded" else f"an earlier run at {group['commit']}")
    text += f"- Rows reused from the workdirs' cache, made by {made}: {', '.join(group['methods'])} of {', '.join(group['runs'])}\n"
  unfinished = [run for run in prov["sweep_runs"] if run["wall_minutes"] is None and not run.get("failed")]
  for run in prov["sweep_runs"]:
    if run in unfinished:
      continue
    wall = f"failed ({run['failed']})" if run.get("failed") else f"{run['wall_minutes']:g} min wall clock"
    text += (f"- Sweep run `{run['command']}` at {run['commit'][:7]}, started {run['started']}: {wall}, "
             f"{run['workers']} process(es) side by side, {len(run['jobs'])} jobs"
             + (f", recomputing {', '.join(run['recompute'])}" if run.get("recompute") else "") + "\n")
  if unfinished:
    # Their finished methods are in the records (the rows cache); listed in one line, by start.
    text += (f"- {len(unfinished)} sweep run(s) did not finish (killed, or still running when the tables were "
             f"made; what they finished was cached, for the runs after them): "
             + "; ".join(f"{' '.join(run['jobs'])} at {run['commit'][:7]}, started {run['started']}"
                         for run in unfinished) + "\n")
  if prov["missing_models"]:
    text += (f"- **Incomplete sweep**: {len(prov['models'])} of {len(SWEEP_ORDER)} models so far; not yet run: "
             f"{', '.join(prov['missing_models'])}. Averages and claims are over the models present.\n")
  return text + "\n"


def t1_entry(recs, pick) -> dict:
  """A T1 cell's figures over seeds: top-1 and fidelity of `pick(record)` per seed, with the
  relative BOPs and setting of the first seed's row (None where it has none). A row the QAT judge
  refused (worse than its PTQ start) is left out of the figures, so out of the averages and
  margins too; `refused` then gives its seeds, top-1 and reason for the cell."""
  from flexiq_jax.compare import harness  # pylint: disable=g-import-not-at-top
  found = pick(recs[0])
  accepted = lambda r: None if pick(r) is None or harness.row_refusal(pick(r)) else pick(r)
  entry = {"top1": per_seed(recs, accepted), "fidelity": {k: per_seed(recs, accepted, k) for k in FIDELITY},
           "relative_bops": found["relative_bops"] if found else None, "setting": found["setting"] if found else None}
  refused = [(r["seed"], pick(r)) for r in recs if pick(r) is not None and harness.row_refusal(pick(r))]
  if refused:
    entry["refused"] = {"seeds": [seed for seed, _ in refused], "top1": stat([row["top1"] for _, row in refused]),
                        "reason": harness.row_refusal(refused[0][1])}
  return entry


# The QAT methods of T1 and the row of each whose record holds its learning-rate selection.
T1_QAT = (("flexiq", "FlexiQ", lambda r: find_row(r, "flexiq", ratio=1.0, finetuned=True)),
          ("flexiq_100only", "FlexiQ 100%-only", lambda r: find_row(r, "flexiq_100only", ratio=1.0)),
          ("lsq_qat", "LSQ", lambda r: find_row(r, "lsq_qat", setting_prefix="W4A4")),
          ("lsq_adaround", "LSQ from AdaRound", lambda r: find_row(r, "lsq_adaround", setting_prefix="W4A4")),
          ("switchable_qat", "switchable", lambda r: find_row(r, "switchable_qat", setting_prefix="W4A4")),
          ("flexiq_rounding_joint_lr", "FlexiQ + learnt rounding, own rate",
           lambda r: find_row(r, "flexiq_rounding_joint_lr", ratio=1.0, finetuned=True)))


def learning_rates(recs) -> dict:
  """Each QAT method's learning rate as the records give it: {method: {'chosen': [rate or None per
  seed], 'grid', 'num_images', 'criterion'}} for the methods whose rate was chosen on held-out
  training images (the rows' 'lr_selection'); a method without a selection is left out."""
  out = {}
  for method, _, pick in T1_QAT:
    selections = [(pick(r) or {}).get("lr_selection") for r in recs]
    first = next((s for s in selections if s), None)
    if first:
      out[method] = {"chosen": [s["chosen"] if s else None for s in selections], "grid": first["grid"],
                     "num_images": first["num_images"], "criterion": first["criterion"]}
  return out


def learning_rate_note(t1: dict) -> str:
  """T1's paragraph on how the QAT methods' learning rates were set: chosen per model on held-out
  training images (with the chosen rates), or as configured where no record holds a selection."""
  chosen = [r for r in t1["rows"] if r.get("learning_rates")]
  if not chosen:
    return ("\n\nLearning rates as configured, not chosen on held-out images (finetune.lr_grid=()): FlexiQ and "
            "FlexiQ 100%-only at finetune.learning_rate, LSQ and the switchable network at compare.lsq_learning_rate "
            "(the settings above).")
  images = sorted({sel["num_images"] for r in chosen for sel in r["learning_rates"].values()})
  text = ("\n\nLearning rates: each QAT method trained its whole budget at every rate of its model's grid and kept "
          f"the best on {' / '.join(str(n) for n in images)} held-out training images that no QAT method's batches "
          "reach (never the test split): FlexiQ (and FlexiQ + learnt rounding with its own rate) by the mean "
          "held-out top-1 at ratios 0 and 1, FlexiQ 100%-only at "
          "ratio 1, LSQ at W4A4, the switchable network by the mean over W8A8 and W4A4, ties by the lower KL to "
          "float. Chosen rate per model (per seed where several ran); \"-\": not chosen (the configured rate).\n\n")
  rate = lambda sel: "-" if not sel else ", ".join("-" if c is None else f"{c:g}" for c in sel["chosen"])
  grid = lambda r: " / ".join(sorted({"{" + ", ".join(f"{g:g}" for g in sel["grid"]) + "}"
                                      for sel in r["learning_rates"].values()}))
  from flexiq_jax import records  # pylint: disable=g-import-not-at-top
  text += records.markdown_table(["model", "grid", *[label for _, label, _ in T1_QAT]],
                                 [[r["model"], grid(r), *[rate(r["learning_rates"].get(m)) for m, _, _ in T1_QAT]]
                                  for r in chosen])
  return text.rstrip("\n")


def attention_note(sweep: dict) -> str:
  """T1's sentence on attention's q·kᵀ and attn·v: how the T1 baselines' rows of each model with
  attention ran them (their 'attention_matmuls' field; a ViT/DeiT/Swin row without it ran them in
  float while FlexiQ ran them at 8 bits).

  Args:
    sweep: {model: [record per seed]} (`load_sweep`).

  Returns:
    The sentence ('' when no model has attention matmuls).
  """
  methods = {m for m, _ in T1_BASELINES + T1_SWITCHABLE}
  by_kind: dict = {"int8": [], "float": []}
  unrecorded: dict = {}
  for model, recs in sweep.items():
    rows = [row for r in recs for row in r["rows"] if row["method"] in methods]
    spec = _SPECS_BY_CONFIG.get(model)
    if not (spec and spec.transformer) and not any("attention_matmuls" in row for row in rows):
      continue
    missing = sorted({row["method"] for row in rows if "attention_matmuls" not in row})
    if missing:
      unrecorded[model] = missing
    kinds = {row["attention_matmuls"] for row in rows if "attention_matmuls" in row}
    for kind in kinds & set(by_kind):
      by_kind[kind].append(model)
  parts = []
  if by_kind["int8"]:
    parts.append("q·kᵀ and attn·v at 8 bits with FlexiQ's calibrated per-tensor scales in every method "
                 f"({', '.join(by_kind['int8'])})")
  if by_kind["float"]:
    parts.append(f"q·kᵀ and attn·v in float in every method, quant.attention='float' ({', '.join(by_kind['float'])})")
  if unrecorded:
    parts.append("not alike for the rows that do not record it, which ran them in float while FlexiQ ran them "
                 "at 8 bits: " + "; ".join(f"{model} ({', '.join(ms)})" for model, ms in unrecorded.items()))
  return ("Attention: " + "; ".join(parts) + ".\n") if parts else ""


def table1(sweep: dict) -> dict:
  """4-bit accuracy per model: FlexiQ at 100% after finetuning vs each baseline at 4 bits."""
  rows = []
  for model, recs in sweep.items():
    flexiq = lambda r: find_row(r, "flexiq", ratio=1.0, finetuned=True)
    budget = [flexiq(r)["relative_bops"] for r in recs if flexiq(r)]
    row = {"model": model, "seeds": len(recs), "float": stat([r["float"]["top1"] for r in recs]),
           "flexiq_100": per_seed(recs, flexiq),
           "flexiq_100_fidelity": {k: per_seed(recs, flexiq, k) for k in FIDELITY},
           "flexiq_100_relative_bops": budget[0] if budget else None, "baselines": {},
           # FlexiQ's quantized model finetuned for 100 % only (LSQ's setting), the same passes.
           "flexiq_100only": per_seed(recs, lambda r: find_row(r, "flexiq_100only", ratio=1.0)),
           # The candidate default (CANDIDATE), where it ran: one network for every ratio, as FlexiQ.
           "candidate_100": per_seed(recs, lambda r: find_row(r, CANDIDATE[0], ratio=1.0, finetuned=True)),
           # T3's control: the same finetuning at the same rate with another QAT seed (its seed noise).
           "flexiq_100_control": per_seed(recs, lambda r: find_row(r, FINETUNED_ABLATIONS[1][1], ratio=1.0,
                                                                  finetuned=True))}
    for method, prefix in T1_BASELINES:
      if method == "layerwise_amp":
        pick = lambda r: matched_layerwise_row(r, flexiq(r)["relative_bops"] if flexiq(r) else 0.26)
      else:
        pick = lambda r, m=method, p=prefix: find_row(r, m, setting_prefix=p)
      row["baselines"][method] = t1_entry(recs, pick)
      if method == "layerwise_amp" and not pick(recs[0]) and cheapest_layerwise_bops(recs[0]) is not None:
        # No point within FlexiQ's BOPs: the cell says so (no costlier point is compared instead).
        row["baselines"][method]["unmatched"] = {"cheapest_relative_bops": cheapest_layerwise_bops(recs[0]),
                                                 "budget": budget[0] if budget else None}
    row["switchable"] = {m: t1_entry(recs, lambda r, m=m, p=p: find_row(r, m, setting_prefix=p))
                         for m, p in T1_SWITCHABLE}
    row["curve_areas"] = curve_areas(recs[0], budget[0]) if budget else {}
    row["learning_rates"] = learning_rates(recs)
    rows.append(row)
  # Margins as the paper states them: FlexiQ minus each baseline, averaged over the models that
  # have both; and minus the best baseline of each model.
  def over_models(diffs):
    return {"mean": float(np.mean(diffs)), "models": len(diffs)} if diffs else None

  def margin(group, method):
    return over_models([r["flexiq_100"]["mean"] - r[group][method]["top1"]["mean"] for r in rows
                        if r["flexiq_100"] and r[group][method]["top1"]])

  margins = {m: margin("baselines", m) for m, _ in T1_BASELINES}
  margins.update({m: margin("switchable", m) for m, _ in T1_SWITCHABLE})
  best, best_100only, best_candidate = {}, [], {}
  for r in rows:
    tops = [b["top1"]["mean"] for b in r["baselines"].values() if b["top1"]]
    if r["flexiq_100"] and tops:
      best[r["model"]] = r["flexiq_100"]["mean"] - max(tops)
    if r["flexiq_100only"] and tops:
      best_100only.append(r["flexiq_100only"]["mean"] - max(tops))
    if r["candidate_100"] and tops:
      best_candidate[r["model"]] = r["candidate_100"]["mean"] - max(tops)
  average = {"flexiq_100": stat([r["flexiq_100"]["mean"] for r in rows if r["flexiq_100"]]),
             "flexiq_100only": stat([r["flexiq_100only"]["mean"] for r in rows if r["flexiq_100only"]]),
             "candidate_100": stat([r["candidate_100"]["mean"] for r in rows if r["candidate_100"]]),
             **{m: stat([r["switchable"][m]["top1"]["mean"] for r in rows if r["switchable"][m]["top1"]])
                for m, _ in T1_SWITCHABLE},
             **{m: stat([r["baselines"][m]["top1"]["mean"] for r in rows if r["baselines"][m]["top1"]])
                for m, _ in T1_BASELINES}}
  return {"rows": rows, "average": average, "margin_over": margins,
          "margin_over_best": over_models(list(best.values())), "margin_over_best_per_model": best,
          "margin_over_best_100only": over_models(best_100only),
          "margin_over_best_candidate": over_models(list(best_candidate.values())),
          "margin_over_best_candidate_per_model": best_candidate}


# The curves whose area T1 reports: (label, method, which rows). FlexiQ and the switchable network
# are one network each, switched at run time; the others' points are separate models.
CURVES = (("FlexiQ (FT)", "flexiq", {"finetuned": True}), ("switchable_qat", "switchable_qat", {}),
          ("layerwise_amp", "layerwise_amp", {}), ("ptq_minmax", "ptq_minmax", {}), ("ptq_mse", "ptq_mse", {}),
          ("adaround", "adaround", {}), ("lsq_qat", "lsq_qat", {}))


def achievable_area(points, lo: float, hi: float, higher_is_better: bool = True) -> float | None:
  """Mean over budgets B in [lo, hi] of the best figure among the points whose cost is within B.

  The curve a deployer gets from a method's points: at relative BOPs B it runs the best point that
  costs no more than B (a step function, no interpolation between points).

  Args:
    points: (relative BOPs, figure) pairs of one method.
    lo: the lowest budget (relative BOPs) of the range.
    hi: the highest budget (relative BOPs) of the range, above `lo`.
    higher_is_better: True for top-1 or agreement, False for KL.

  Returns:
    The normalised area (the figure's unit), or None where the method has no point within `lo`
    (it cannot run at the range's low end).
  """
  points = sorted((float(b), float(v)) for b, v in points if b is not None and v is not None)
  if not points or points[0][0] > lo + 1e-9 or hi <= lo:
    return None
  better = max if higher_is_better else min
  edges = sorted({lo, hi} | {b for b, _ in points if lo < b < hi})
  area = 0.0
  for start, end in zip(edges[:-1], edges[1:]):
    area += (end - start) * better(v for b, v in points if b <= start + 1e-9)
  return area / (hi - lo)


def curve_areas(record, lo: float) -> dict:
  """Area under each method's achievable top-1 and KL curve over relative BOPs [lo, 1] (`CURVES`);
  a row the QAT judge refused is no point of its curve.

  Args:
    record: one model's sweep record.
    lo: the range's low end (FlexiQ's 100 % point).

  Returns:
    {label: {'top1': area or None, 'kl': area or None, 'points': n}} for the methods with rows.
  """
  from flexiq_jax.compare import harness  # pylint: disable=g-import-not-at-top
  out = {}
  for label, method, where in CURVES:
    rows = [r for r in record["rows"] if r["method"] == method and not harness.row_refusal(r)
            and all(bool(r.get(k, False)) == v for k, v in where.items())]
    if rows:
      out[label] = {"points": len(rows), **{
          field: achievable_area([(r["relative_bops"], r.get(field)) for r in rows], lo, 1.0, field != "kl")
          for field in ("top1", "kl")}}
  return out


# A drop of the 8-bit point by multi-ratio finetuning larger than this is named in T2 and the claims.
FINETUNING_HARM_POINTS = 1.0


def table2(sweep: dict) -> dict:
  rows = []
  for model, recs in sweep.items():
    ratios = sorted({r["ratio"] for r in recs[0]["rows"] if r["method"] == "flexiq"})
    points = []
    for ratio in ratios:
      point = {"ratio": ratio}
      for when, tuned in (("before", False), ("after", True)):
        pick = lambda r, q=ratio, t=tuned: find_row(r, "flexiq", ratio=q, finetuned=t)
        for field in ("top1",) + FIDELITY:
          point[f"{field}_{when}"] = per_seed(recs, pick, field)
      first = find_row(recs[0], "flexiq", ratio=ratio, finetuned=False)
      point["relative_bops"] = first["relative_bops"] if first else None
      points.append(point)
    at = {p["ratio"]: p for p in points}
    loss = loss_vs_ptq = finetuning_change_at_8bit = None
    if 0.0 in at and 0.5 in at and at[0.0]["top1_after"] and at[0.5]["top1_after"]:
      loss = at[0.0]["top1_after"]["mean"] - at[0.5]["top1_after"]["mean"]
      # Multi-ratio finetuning can also move the 8-bit point; against the 8-bit model as
      # calibrated (before finetuning) a finetuning that lowers 8-bit does not pass for a gain.
      if at[0.0]["top1_before"]:
        loss_vs_ptq = at[0.0]["top1_before"]["mean"] - at[0.5]["top1_after"]["mean"]
        finetuning_change_at_8bit = at[0.0]["top1_after"]["mean"] - at[0.0]["top1_before"]["mean"]
    rows.append({"model": model, "seeds": len(recs), "float": stat([r["float"]["top1"] for r in recs]),
                 "points": points, "loss_at_50_vs_8bit_after": loss,
                 "loss_at_50_after_vs_8bit_before": loss_vs_ptq,
                 "finetuning_change_at_8bit": finetuning_change_at_8bit})
  def mean_over_models(key):
    over = stat([r[key] for r in rows])
    return over and over["mean"]
  return {"rows": rows, "average_loss_at_50_vs_8bit_after": mean_over_models("loss_at_50_vs_8bit_after"),
          "average_loss_at_50_after_vs_8bit_before": mean_over_models("loss_at_50_after_vs_8bit_before"),
          "finetuning_lowered_8bit": {r["model"]: r["finetuning_change_at_8bit"] for r in rows
                                      if r["finetuning_change_at_8bit"] is not None
                                      and r["finetuning_change_at_8bit"] < -FINETUNING_HARM_POINTS}}


def _variant_cells(recs, method: str, change: str, ratios, finetuned: bool) -> dict:
  """One T3 cell: a method's top-1 and KL at `ratios` over seeds, before or after finetuning."""
  return {"method": method, "change": change, **{
      f"{field}@{q:g}": per_seed(recs, lambda r, m=method, q=q: find_row(r, m, ratio=q, finetuned=finetuned), field)
      for q in ratios for field in ("top1", "kl")}}


def holdout_key(recs) -> str:
  """Which held-out figures T3 compares a model's variants by: 'holdout_select' (every image of the
  learning-rate selection's held-out set, `harness.selection_figures`) where the configured
  pipeline's rows carry them on every seed, else 'holdout' (the finetune judge's images)."""
  configured = [find_row(r, FINETUNED_ABLATIONS[0][1], finetuned=True) or {} for r in recs]
  return "holdout_select" if configured and all("holdout_select" in c for c in configured) else "holdout"


def _holdout_cells(recs, method: str, key: str = "holdout") -> dict:
  """A finetuned variant's held-out figures over seeds (`key`: 'holdout', the finetune judge's, on
  training images kept out of every training, `harness.holdout_figures`; 'holdout_select', the
  learning-rate selection's, `harness.selection_figures`): top-1 and KL at the judge's ratios, and
  their mean top-1 (the score a choice between variants uses, as the learning-rate grid's does)."""
  held = [(find_row(r, method, finetuned=True) or {}).get(key) for r in recs]  # one per seed, or None
  ratios = sorted({float(k.split("@")[1]) for h in held for k in (h or {}) if k.startswith("top1@")})
  cells = {f"holdout_{field}@{q:g}": stat([h.get(f"{field}@{q:g}") if h else None for h in held])
           for q in ratios for field in ("top1", "kl")}
  cells["holdout_score"] = stat([np.mean([h[f"top1@{q:g}"] for q in ratios]) if h and ratios else None for h in held])
  images = {h.get("images") for h in held if h}
  cells["holdout_images"] = images.pop() if len(images) == 1 else (sorted(images) or None)
  return cells


def _finetuned_variant_cell(cell: dict, ratios) -> str:
  """T3's after-finetuning cell: top-1 at each ratio, 'failed' for a diverged run."""
  if cell.get("failed"):
    return "failed"
  return ("refused: " if cell.get("refused") else "") + " · ".join(fmt(cell[f"top1@{q:g}"]) for q in ratios)


def _holdout_cell(cell: dict) -> str:
  """T3's held-out cell: top-1 at each judge ratio, then their mean."""
  if cell.get("failed"):
    return "failed"
  ratios = sorted(float(k.split("@")[1]) for k in cell if k.startswith("holdout_top1@"))
  if cell.get("holdout_score") is None:
    return "-"
  return " · ".join(fmt(cell[f"holdout_top1@{q:g}"]) for q in ratios) + f" (mean {fmt(cell['holdout_score'])})"


def heldout_threshold(t3_row: dict) -> dict | None:
  """The held-out mean a variant must exceed on this model to count as better than the configured
  pipeline: the configured pipeline's mean plus the seed noise, |configured - control|, where the
  control (the configured pipeline finetuned again at the rate it chose, with another QAT seed) ran;
  None where the configured pipeline has no held-out figures.

  The variants train with the configured pipeline's QAT seed, so their figures and its share the
  batches and ratio draws (a change the refresh then rejects gives exactly its figures). The
  control shows how far another seed moves the same pipeline, which includes the luck of the
  configured pipeline's rate selection on these same images (the grid keeps its best candidate
  there); a variant must beat the configured pipeline by more than that.

  Returns:
    {'base': the configured mean, 'noise': the control's distance (0.0 without a control),
    'threshold': base + noise}, or None.
  """
  variants = t3_row.get("finetuned_variants", {})
  base = (variants.get(FINETUNED_ABLATIONS[0][0]) or {}).get("holdout_score")
  if base is None:
    return None
  control = (variants.get(FINETUNED_ABLATIONS[1][0]) or {}).get("holdout_score")
  noise = abs(base["mean"] - control["mean"]) if control is not None else 0.0
  return {"base": base["mean"], "noise": noise, "threshold": base["mean"] + noise}


def _threshold_cell(threshold: dict | None) -> str:
  if threshold is None:
    return "-"
  return f"{threshold['base']:.2f} + {threshold['noise']:.2f} = {threshold['threshold']:.2f}"


# Held-out means are averages of percentages of a few thousand images: a mean equal to the threshold
# up to float roundoff (92.15 against 91.70 + 0.45 = 92.14999...) is not above it.
WINNER_TOLERANCE = 1e-6


def heldout_winners(t3_row: dict, threshold: dict | None = None) -> list[str]:
  """The finetuned variants (labels) whose held-out mean is above `heldout_threshold` on this
  model: the evidence for making a change the default (never the test split's figures).

  Args:
    t3_row: a T3 row (`table3`).
    threshold: `heldout_threshold(t3_row)` where the caller has it already (None: computed here).

  Returns:
    The labels, in the row's order.
  """
  variants = t3_row.get("finetuned_variants", {})
  threshold = heldout_threshold(t3_row) if threshold is None else threshold
  if threshold is None:
    return []
  controls = {FINETUNED_ABLATIONS[0][0], FINETUNED_ABLATIONS[1][0]}
  return [label for label, cell in variants.items() if label not in controls
          and cell.get("holdout_score") is not None
          and cell["holdout_score"]["mean"] > threshold["threshold"] + WINNER_TOLERANCE]


def table3(sweep: dict, ratios=(0.5, 1.0)) -> dict:
  from flexiq_jax.compare import harness  # pylint: disable=g-import-not-at-top
  finetuned_ratios = harness.FINETUNED_VARIANT_RATIOS
  rows = []
  for model, recs in sweep.items():
    key = holdout_key(recs)
    row = {"model": model, "seeds": len(recs), "variants": {}, "finetuned_variants": {}, "holdout_key": key}
    for label, method, change in ABLATIONS:
      row["variants"][label] = _variant_cells(recs, method, change, ratios, finetuned=False)
    for label, method, change in FINETUNED_ABLATIONS:
      refused = sorted({why for r in recs for x in r["rows"] if x["method"] == method
                        for why in [harness.row_refusal(x)] if why})
      failed = sorted({why for r in recs for x in r["rows"] if x["method"] == method
                       for why in [harness.row_failure(x)] if why})
      row["finetuned_variants"][label] = {**_variant_cells(recs, method, change, finetuned_ratios, finetuned=True),
                                          **_holdout_cells(recs, method, key), "refused": refused, "failed": failed}
    row["heldout_threshold"] = heldout_threshold(row)
    row["heldout_winners"] = heldout_winners(row, row["heldout_threshold"])
    rows.append(row)
  return {"ratios": list(ratios), "finetuned_ratios": list(finetuned_ratios), "rows": rows}


def macs_now(model: str) -> int:
  """MACs per image of the quantized layers of the model the sweep runs (configs/<model>.py at
  :fmnist; the quickstart's own config): a benchmark entry of another variant gives another figure."""
  import jax
  import jax.numpy as jnp
  from flexiq_jax import cost
  from flexiq_jax import pipeline
  from flexiq_jax import quantize
  config = importlib.import_module(f"configs.{model}").get_config(None if model == "quickstart" else fmnist_arg(model))
  net = pipeline.build_model(config, 10)
  shape = pipeline.image_shape(config)
  variables = jax.jit(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), train=False))()
  return cost.total_macs(quantize.build_plan(net, variables, shape).layer_infos())


def speed_figure(benchmark_path: str) -> dict | None:
  """Measured integer-path time per ratio and the modelled 4-bit target, per benchmarked model.
  An entry measured on an earlier variant of a model (other layer MACs than the model the sweep
  runs now) is listed apart, as stale, and used for nothing."""
  if not os.path.exists(benchmark_path):
    return None
  with open(benchmark_path) as f:
    bench = json.load(f)
  modelled = {m["name"]: m for m in bench.get("cost_model", {}).get("models", [])}
  rows, stale = [], []
  for m in bench["models"]:
    model = m["name"].split(" ")[0].split(":")[0]
    from flexiq_jax import cost
    measured_macs, current_macs = cost.recorded_macs(m.get("plan_layers", {})), macs_now(model)
    if measured_macs != current_macs:
      stale.append({"model": model, "benchmark_macs_per_image": measured_macs, "current_macs_per_image": current_macs})
      continue
    times = m["times"].get("512") or m["times"][max(m["times"], key=int)]
    batch = "512" if "512" in m["times"] else max(m["times"], key=int)
    measured = {r: times.get(f"int tuned r={r}") for r in ("0", "0.5", "1")}
    target = modelled.get(m["name"], {}).get("modelled_4bit_target_s", {})
    share = None
    # The share is defined only where 100% is measurably faster than 0% (5% of t0, above the
    # timing noise); elsewhere it divides noise by noise.
    if measured["0"] and measured["1"] and measured["0"] - measured["1"] > 0.05 * measured["0"]:
      share = (measured["0"] - measured["0.5"]) / (measured["0"] - measured["1"])
    rows.append({"model": model, "batch": int(batch), "float32_s": times.get("float32"),
                 "int_tuned_s": measured, "measured_share_of_speedup_at_0.5": share,
                 "measured_time_100_over_0": measured["1"] / measured["0"] if measured["0"] and measured["1"] else None,
                 "modelled_4bit_target_s": target,
                 "modelled_share_of_speedup_at_0.5": modelled.get(m["name"], {}).get("share_of_full_speedup_at_0.5"),
                 "compilations_across_ratio_switches": m.get("ratio_switch", {}).get("compilations")})
  return {"benchmark": benchmark_path, "benchmark_commit": bench.get("info", {}).get("commit"),
          "benchmark_device": bench.get("info", {}).get("device"), "rows": rows, "stale": stale}


def claims(t1: dict, t2: dict, t3: dict, f2: dict | None, models: int) -> list[dict]:
  out = []
  m = t1["margin_over"]
  finetuned_baselines = [k for k in m if m[k]]
  avg = float(np.mean([m[k]["mean"] for k in finetuned_baselines])) if finetuned_baselines else None
  out.append({"claim": "4-bit FlexiQ with finetuning averages +6.6 points over four state-of-the-art 4-bit methods",
              "measured": None if avg is None else f"{avg:+.2f} points over {len(finetuned_baselines)} baselines "
              f"(per baseline: " + ", ".join(f"{k} {v['mean']:+.2f}" for k, v in m.items() if v) + ")"
              + (f"; {t1['margin_over_best']['mean']:+.2f} over the best baseline per model" if t1["margin_over_best"] else ""),
              "reading": _reading(avg, 6.6, models, "Fashion-MNIST from scratch, not ImageNet: the baselines lose "
                                  "less here, so a smaller margin is expected")})
  loss, loss_vs_ptq = t2["average_loss_at_50_vs_8bit_after"], t2["average_loss_at_50_after_vs_8bit_before"]
  measured = None
  if loss is not None:
    measured = f"{loss:.2f} points (ratio 0 minus ratio 0.5, after finetuning, mean over models)"
    if loss_vs_ptq is not None:
      measured += f"; {loss_vs_ptq:.2f} against the 8-bit model before finetuning"
    if t2["finetuning_lowered_8bit"]:
      measured += ("; finetuning lowered the 8-bit point by more than "
                   f"{FINETUNING_HARM_POINTS:g} point on " + ", ".join(f"{k} ({v:+.2f})" for k, v in t2["finetuning_lowered_8bit"].items()))
  held = [x <= 0.6 for x in (loss, loss_vs_ptq) if x is not None]
  if not held:
    reading = "not measured"
  elif not any(held):
    reading = "not confirmed"
  elif not all(held):
    reading = "partly: within 0.6 against one 8-bit reference only"
  elif t2["finetuning_lowered_8bit"]:
    reading = "confirmed on average, not on the models whose 8-bit point finetuning lowered"
  else:
    reading = "confirmed (loss at most 0.6)"
  out.append({"claim": "the 50%-4-bit model loses 0.6 points against 8-bit", "measured": measured, "reading": reading})
  if f2 and f2["rows"]:
    ratio = [r["measured_time_100_over_0"] for r in f2["rows"] if r["measured_time_100_over_0"] is not None]
    modelled = [r["modelled_share_of_speedup_at_0.5"] for r in f2["rows"] if r["modelled_share_of_speedup_at_0.5"] is not None]
    out.append({"claim": "at 50% FlexiQ gets 40% of the 100%-4-bit speed-up",
                "measured": (f"modelled 4-bit target: {np.mean(modelled):.0%} (mean of {len(modelled)} models); "
                             f"measured on {f2['benchmark_device']}: time at 100% / time at 0% = "
                             f"{np.mean(ratio):.2f} (mean of {len(ratio)} models; the lowered channels run as int8 codes, so "
                             "these differences come from the per-layer conv choice and timing noise)"
                             if modelled else "-"),
                "reading": "not measurable here: the benchmark's hardware has no 4-bit arithmetic (lowered channels "
                           "run as int8 codes), so only the modelled target speaks to the claim"})
  wins, total = 0, 0
  for row in t3["rows"]:
    fitted = row["variants"]["fitted extraction (FlexiQ)"]["top1@1"]
    naive = row["variants"]["drop the 4 low bits"]["top1@1"]
    if fitted and naive:
      total += 1
      wins += fitted["mean"] > naive["mean"]
  out.append({"claim": "bit extraction beats dropping the low bits",
              "measured": f"fitted extraction above naive at 100% 4-bit before finetuning on {wins} of {total} models",
              "reading": "confirmed" if total and wins == total else ("partly" if wins else "not confirmed")})
  if f2 and f2["rows"]:
    comp = [r["compilations_across_ratio_switches"] for r in f2["rows"]]
    out.append({"claim": "run-time overhead of switching the ratio is negligible",
                "measured": f"compilations across ratio switches: {comp}",
                "reading": "confirmed (no recompilation)" if all(c == 0 for c in comp) else "not confirmed"})
  return out


# FlexiQ's own 4-bit targets, checked on the sweep's tables: the one network at 100 % after
# finetuning against the best single-point W4A4 baseline per model (mean margin at least this, no
# model more than this below), and the ratio range's other end kept (T2).
TARGET_MARGIN_MEAN, TARGET_MARGIN_WORST = 0.0, -1.0
TARGET_LOSS_AT_50, TARGET_8BIT_KEPT = 0.6, 0.3


# The variant whose rows T1 and the targets show beside the configured pipeline's: the candidate
# default (T3's winner on held-out images) until a sweep runs it as the configured pipeline.
CANDIDATE = ("flexiq_rounding_joint", "FlexiQ + learnt rounding")


def flexiq_figures(sweep: dict, method: str = "flexiq") -> dict:
  """Per model, the mean top-1 over seeds of `method`'s finetuned rows at ratios 0, 0.5 and 1, and of
  the configured pipeline's 8-bit model before finetuning (the model every variant starts from).

  Args:
    sweep: `load_sweep`'s records by model.
    method: 'flexiq' or a finetuned variant.

  Returns:
    {model: {'100', '50', '0', '8bit_before'}}, each a float or None.
  """
  out = {}
  for model, recs in sweep.items():
    mean = lambda pick: (per_seed(recs, pick) or {}).get("mean")
    out[model] = {**{key: mean(lambda r, q=q: find_row(r, method, ratio=q, finetuned=True))
                     for key, q in (("100", 1.0), ("50", 0.5), ("0", 0.0))},
                  "8bit_before": mean(lambda r: find_row(r, "flexiq", ratio=0.0, finetuned=False))}
  return out


def targets(t1: dict, figures: dict, margins: dict, label: str = "FlexiQ") -> list[dict]:
  """FlexiQ's 4-bit targets beside the tables' figures.

  Args:
    t1: `table1`'s result (the switchable network per model).
    figures: `flexiq_figures` of the FlexiQ pipeline judged.
    margins: its 100 % point minus the best single-point baseline, per model (`table1`'s).
    label: its name in the targets.

  Returns:
    [{'target', 'measured', 'met' (True, False or None when not measured)}]: the margin over the
    best single-point baseline per model (mean and worst model), FlexiQ at 100 % against the
    switchable network's 4-bit point on average, and per model ratio 0.5 after finetuning within
    TARGET_LOSS_AT_50 of ratio 0 after finetuning, ratio 0 after finetuning within
    TARGET_8BIT_KEPT of the 8-bit model before finetuning.
  """
  out = []
  if margins:
    mean, (worst_model, worst) = float(np.mean(list(margins.values()))), min(margins.items(), key=lambda kv: kv[1])
    out.append({"target": f"{label} 100% (FT) minus the best single-point W4A4 baseline per model: mean >= "
                          f"{TARGET_MARGIN_MEAN:+g}, every model >= {TARGET_MARGIN_WORST:+g}",
                "measured": f"mean {mean:+.2f} over {len(margins)} models; worst {worst_model} {worst:+.2f}",
                "met": mean >= TARGET_MARGIN_MEAN and worst >= TARGET_MARGIN_WORST})
  else:
    out.append({"target": f"{label} 100% (FT) against the best single-point W4A4 baseline per model",
                "measured": None, "met": None})
  pairs = [(figures[r["model"]]["100"], s["top1"]["mean"]) for r in t1["rows"] for s in r.get("switchable", {}).values()
           if figures.get(r["model"], {}).get("100") is not None and s["top1"]]
  out.append({"target": f"{label} 100% (FT) above the switchable network's W4A4 point on average",
              "measured": (f"{np.mean([f for f, _ in pairs]):.2f} vs {np.mean([w for _, w in pairs]):.2f} "
                           f"({len(pairs)} models)") if pairs else None,
              "met": bool(np.mean([f - w for f, w in pairs]) > 0) if pairs else None})
  # The loss is ratio 0 minus ratio 0.5 (positive when 0.5 is worse); the 8-bit change is after
  # minus before (negative when finetuning lowered it).
  losses = {m: f["0"] - f["50"] for m, f in figures.items() if f["0"] is not None and f["50"] is not None}
  changes = {m: f["0"] - f["8bit_before"] for m, f in figures.items()
             if f["0"] is not None and f["8bit_before"] is not None}
  for values, missed, what in (
      (losses, lambda v: v > TARGET_LOSS_AT_50,
       f"ratio 0.5 (FT) within {TARGET_LOSS_AT_50:g} points of ratio 0 (FT) on every model"),
      (changes, lambda v: v < -TARGET_8BIT_KEPT,
       f"ratio 0 (FT) within {TARGET_8BIT_KEPT:g} points of the 8-bit model before finetuning on every model")):
    misses = {m: v for m, v in values.items() if missed(v)}
    out.append({"target": (f"{label}: " if label != "FlexiQ" else "") + what,
                "measured": (f"{len(values) - len(misses)} of {len(values)} models" + (
                    "; not on " + ", ".join(f"{m} ({v:+.2f})" for m, v in misses.items()) if misses else ""))
                if values else None,
                "met": (not misses) if values else None})
  return out


def _reading(value, target, models, caveat) -> str:
  if value is None:
    return "not measured"
  verdict = "confirmed" if value >= target else "not confirmed at this size"
  return f"{verdict} on {models} models ({caveat})"


def write_tables(out: str, pareto_metric: str = "top1", benchmark: str = _BENCHMARK.default) -> dict:
  from flexiq_jax import records
  sweep = load_sweep(out)
  prov = provenance(sweep, records.read_json(os.path.join(out, "paper_sweep_runs.json"), []))
  t1, t2, t3 = table1(sweep), table2(sweep), table3(sweep)
  f2 = speed_figure(benchmark)
  claim_rows = claims(t1, t2, t3, f2, len(sweep))
  target_rows = targets(t1, flexiq_figures(sweep), t1["margin_over_best_per_model"])
  candidate = flexiq_figures(sweep, CANDIDATE[0])
  candidate_rows = (targets(t1, candidate, t1["margin_over_best_candidate_per_model"], CANDIDATE[1])
                    if any(f["100"] is not None for f in candidate.values()) else [])
  methods_t1 = [m for m, _ in T1_BASELINES]
  switchable_t1 = [m for m, _ in T1_SWITCHABLE]

  sizes = sorted({r.get("eval_examples") for rs in sweep.values() for r in rs if r.get("eval_examples")})
  text = header("T1: 4-bit accuracy per model (Fashion-MNIST, test split"
                + (f", {' / '.join(str(n) for n in sizes)} images" if sizes else "") + ")", prov)
  text += ("FlexiQ: every lowerable channel in 4 bits (ratio 100%) after multi-ratio finetuning; \"100%-only\": "
           "the same quantized model finetuned at ratio 100% only with as many forward+backward passes (LSQ's "
           "setting, one network for one point). Baselines at "
           "W4A4 with the first and last layers at W8A8 as FlexiQ keeps them; layer-wise AMP: its point with the "
           "largest BOPs not above FlexiQ's, or \"could not match\" with its cheapest point's BOPs where it has "
           "none that cheap (left out of the averages and margins). A QAT baseline that ended worse than its "
           "PTQ start on held-out images beyond finetune.judge_top1_drop / judge_kl_rise is \"refused\" (its top-1 "
           "in brackets), left out of the averages and margins as well. lsq_adaround: LSQ's QAT started from "
           "AdaRound's weights, the single-point counterpart of FlexiQ with its learnt rounding. Top-1 (%), mean ± sd "
           "over seeds where "
           "several ran.\n\n")
  note = attention_note(sweep)
  text += note + "\n" if note else ""
  headers = (["model", "seeds", "float", "FlexiQ 100% (FT)", "KL", "FlexiQ 100%-only (FT)",
              f"{CANDIDATE[1]} 100% (FT)"] + methods_t1 + [f"{m} W4A4" for m in switchable_t1])
  table = [[model_label(r["model"]), r["seeds"], fmt(r["float"]), fmt(r["flexiq_100"]), fmt(r["flexiq_100_fidelity"]["kl"], 4),
            fmt(r.get("flexiq_100only")), fmt(r.get("candidate_100"))]
           + [baseline_cell(r["baselines"][m]) for m in methods_t1]
           + [baseline_cell(r["switchable"][m]) if m in r.get("switchable", {}) else "-" for m in switchable_t1]
           for r in t1["rows"]]
  table.append(["average", "", "", fmt(t1["average"]["flexiq_100"]), "", fmt(t1["average"].get("flexiq_100only")),
                fmt(t1["average"].get("candidate_100"))]
               + [fmt(t1["average"][m]) for m in methods_t1]
               + [fmt(t1["average"].get(m)) for m in switchable_t1])
  text += records.markdown_table(headers, table)
  text += ("\nThe switchable column (" + ", ".join(switchable_t1) + ") is one network trained at W8A8 and W4A4 and "
           "switched at run time, FlexiQ's own kind; it is not among the single-point baselines of the best-baseline "
           "margin.\n")
  text += "\nFlexiQ's margin (points, mean over models): " + ", ".join(
      f"over {k} {v['mean']:+.2f} ({v['models']} models)" for k, v in t1["margin_over"].items() if v)
  if t1["margin_over_best"]:
    text += f"; over the best baseline per model {t1['margin_over_best']['mean']:+.2f}"
  if t1.get("margin_over_best_100only"):
    text += (f". FlexiQ finetuned for 100% only (one network for one point, as LSQ; its own column) over the best "
             f"baseline per model: {t1['margin_over_best_100only']['mean']:+.2f} "
             f"({t1['margin_over_best_100only']['models']} models)")
  if t1.get("margin_over_best_candidate"):
    text += (f". {CANDIDATE[1]} (T3's `{CANDIDATE[0]}`, one network for every ratio: the configured pipeline with "
             "each lowerable layer's 4-bit rounding learnt by AdaRound's reconstruction of its output at ratios 0, 0.5 "
             "and 1 at once, at the AdaRound baseline's iterations and images, before the same QAT at the rate the configured pipeline chose; its own column) "
             f"over the best baseline per model: {t1['margin_over_best_candidate']['mean']:+.2f} "
             f"({t1['margin_over_best_candidate']['models']} models: " + ", ".join(
                 f"{model_label(m)} {v:+.2f}" for m, v in t1["margin_over_best_candidate_per_model"].items()) + ")")
  controls = [(r["model"], r["flexiq_100"]["mean"], r["flexiq_100_control"]["mean"]) for r in t1["rows"]
              if r.get("flexiq_100_control") and r["flexiq_100"]]
  if controls:
    text += (".\n\nOne QAT seed per model: FlexiQ's 100% point finetuned again at the same rate with another QAT "
             "seed (T3's control) gives " + ", ".join(f"{model_label(m)} {c:.2f} ({c - f:+.2f})" for m, f, c in controls)
             + f"; mean |difference| {np.mean([abs(c - f) for _, f, c in controls]):.2f} points, the seed noise of "
             "the FlexiQ column (the baselines' is not measured)")
  settings = {}
  for r in t1["rows"]:
    for m in methods_t1:
      if r["baselines"][m]["setting"]:
        settings.setdefault(m, {}).setdefault(r["baselines"][m]["setting"], []).append(r["model"])
  text += "\n\nThe baselines' settings as run (from the records): " + "; ".join(
      f"{m}: " + ", ".join(f"'{k}' ({', '.join(v)})" for k, v in by.items()) for m, by in settings.items()
      if m != "layerwise_amp") + "."
  text += learning_rate_note(t1)
  refusals = [(r["model"], m, cell["refused"]) for r in t1["rows"]
              for m, cell in list(r["baselines"].items()) + list(r.get("switchable", {}).items()) if cell.get("refused")]
  if refusals:
    text += "\n\nRefused by the QAT judge (left out of the averages and margins): " + "; ".join(
        f"{m} on {model} (seed {', '.join(str(s) for s in ref['seeds'])}): {ref['reason']}" for model, m, ref in refusals) + "."
  text += ("\n\nThe same 4-bit points measured against the float model, where top-1 saturates: agreement with its "
           "predictions (%) / KL(float || quantized) / output SQNR (dB), mean over seeds.\n\n")
  fidelity = lambda f: " / ".join(fmt(f[k], d) for k, d in zip(FIDELITY, (2, 4, 1))) if any(f.values()) else "-"
  text += records.markdown_table(
      ["model", "FlexiQ 100% (FT)"] + methods_t1,
      [[model_label(r["model"]), fidelity(r["flexiq_100_fidelity"])] + [fidelity(r["baselines"][m]["fidelity"]) for m in methods_t1]
       for r in t1["rows"]])
  labels = [c[0] for c in CURVES]
  area = lambda a, f, d: "-" if not a else ("cannot reach 100%'s BOPs" if a[f] is None else f"{a[f]:.{d}f}")
  text += ("\n\nWhole curves: the area under each method's achievable curve over relative BOPs from FlexiQ's 100% "
           "point to W8A8 (1.0), divided by the range: at each budget the best of the method's points that costs no "
           "more (a step function). Top-1 (%) / KL(float || quantized). FlexiQ (after finetuning, every swept ratio) "
           "and the switchable network are one network each, switched at run time; the other methods' points are "
           "separate models (a single-point baseline is one flat step). \"cannot reach\": the method has no point that "
           "cheap (layer-wise AMP).\n\n")
  text += records.markdown_table(
      ["model"] + labels,
      [[model_label(r["model"])] + [f"{area(r['curve_areas'].get(l), 'top1', 2)} / {area(r['curve_areas'].get(l), 'kl', 4)}"
                       if r["curve_areas"].get(l) else "-" for l in labels] for r in t1["rows"]])
  _write(out, "paper_t1_4bit", {**prov, **t1}, text + "\n")

  text = header("T2: accuracy vs 4-bit ratio, before and after finetuning", prov)
  text += ("Top-1 (%) and, after finetuning, agreement with the float model's predictions (%), KL(float || "
           "quantized) and output SQNR (dB) on the test split.\n\n")
  for row in t2["rows"]:
    text += f"## {model_label(row['model'])} (float {fmt(row['float'])}, {row['seeds']} seed(s))\n\n"
    text += records.markdown_table(
        ["4-bit ratio", "relative BOPs", "top-1 before", "top-1 after", "agreement after", "KL after", "SQNR after"],
        [[f"{100 * p['ratio']:.0f}%", "-" if p["relative_bops"] is None else f"{p['relative_bops']:.3f}",
          fmt(p["top1_before"]), fmt(p["top1_after"]), fmt(p["agreement_after"]), fmt(p["kl_after"], 4),
          fmt(p["sqnr_db_after"], 1)] for p in row["points"]])
    if row["loss_at_50_vs_8bit_after"] is not None:
      text += f"\nLoss at 50% against 8-bit (after finetuning): {row['loss_at_50_vs_8bit_after']:.2f} points\n"
    if row["loss_at_50_after_vs_8bit_before"] is not None:
      text += (f"Loss at 50% after finetuning against the 8-bit model before finetuning: "
               f"{row['loss_at_50_after_vs_8bit_before']:.2f} points (finetuning moved 8-bit by "
               f"{row['finetuning_change_at_8bit']:+.2f})\n")
    text += "\n"
  if t2["average_loss_at_50_vs_8bit_after"] is not None:
    text += f"Average loss at 50% against 8-bit: {t2['average_loss_at_50_vs_8bit_after']:.2f} points\n"
  if t2["average_loss_at_50_after_vs_8bit_before"] is not None:
    text += (f"Average loss at 50% after finetuning against the 8-bit model before finetuning: "
             f"{t2['average_loss_at_50_after_vs_8bit_before']:.2f} points\n")
  _write(out, "paper_t2_ratios", {**prov, **t2}, text)

  text = header("T3: ablations before finetuning, and the 4-bit fixes after", prov)
  text += "Top-1 (%) / KL(float || quantized) at 50% and 100% 4-bit, no finetuning; each row changes one thing.\n\n"
  labels = [a[0] for a in ABLATIONS]
  text += records.markdown_table(
      ["model"] + [f"{l} @50%" for l in labels] + [f"{l} @100%" for l in labels],
      [[model_label(r["model"])] + [f"{fmt(r['variants'][l]['top1@0.5'])} / {fmt(r['variants'][l]['kl@0.5'], 4)}" for l in labels]
       + [f"{fmt(r['variants'][l]['top1@1'])} / {fmt(r['variants'][l]['kl@1'], 4)}" for l in labels]
       for r in t3["rows"]])
  text += ("\n## The 4-bit fixes, after finetuning\n\nTop-1 (%) at 0% · 50% · 100% 4-bit after finetuning (KL in the .json); "
           "each row changes one thing against the configured pipeline (the first column) and runs the whole "
           "pipeline with it (a weight-grid change its own calibration and selection, a finetuning change the "
           "configured selection), at the learning rate the configured pipeline's finetuning chose (or was "
           "given). The sandwich row makes three forward+backward passes per step, the others one. \"-\": not run in this sweep.\n\n")
  labels = [a[0] for a in FINETUNED_ABLATIONS]
  text += records.markdown_table(
      ["model"] + [f"{l} @0% / @50% / @100%" for l in labels],
      [[model_label(r["model"])] + [_finetuned_variant_cell(r["finetuned_variants"][l], t3["finetuned_ratios"])
                                     for l in labels]
       for r in t3["rows"] if "finetuned_variants" in r])
  refused = [(r["model"], l, v["refused"]) for r in t3["rows"] for l, v in r.get("finetuned_variants", {}).items()
             if v.get("refused")]
  if refused:
    text += ("\n\"refused\": the finetune judge refused the variant's finetuned model (worse than the model it "
             "started from on held-out training images); its figures as trained are shown. "
             + "; ".join(f"{model_label(m)}, {l}: {'; '.join(why)}" for m, l, why in refused) + "\n")
  failed = [(r["model"], l, v["failed"]) for r in t3["rows"] for l, v in r.get("finetuned_variants", {}).items()
            if v.get("failed")]
  if failed:
    text += ("\n\"failed\": the variant's finetuning diverged at the rate the configured pipeline chose (no "
             "figures). " + "; ".join(f"{model_label(m)}, {l}: {'; '.join(why)}" for m, l, why in failed) + "\n")
  text += ("\n## The 4-bit fixes on held-out training images\n\nWhat decides a default: held-out top-1 (%) at 0% · "
           "100% 4-bit after finetuning, and their mean, on training images kept out of every training (never "
           "the test split): every image of the learning-rate selection's held-out set, scored as the "
           "selection scores its candidates, where the configured pipeline's rows carry those figures (the "
           "'images' line below names the set per model); else the finetune judge's images. A change becomes the default when its mean is "
           "above the configured pipeline's by more than the seed noise on every model it ran on: the "
           "control is the configured pipeline finetuned again at the rate it chose with another QAT seed, "
           "and its distance from the configured pipeline (which includes the luck of the configured "
           "pipeline's rate selection on these same images) is the noise; without a control the noise is "
           "taken as 0. The variants share the configured pipeline's QAT seed (its batches and ratio draws). "
           "\"-\": not run, or run before the rows carried held-out figures.\n\n")
  text += records.markdown_table(
      ["model"] + labels + ["to beat: configured + noise", "above it"],
      [[model_label(r["model"])] + [_holdout_cell(r["finetuned_variants"][l]) for l in labels]
       + [_threshold_cell(r.get("heldout_threshold")), ", ".join(r.get("heldout_winners", [])) or "none"]
       for r in t3["rows"] if "finetuned_variants" in r])
  images = {}  # description -> models
  for r in t3["rows"]:
    for v in r.get("finetuned_variants", {}).values():
      if isinstance(v.get("holdout_images"), str) and r["model"] not in images.setdefault(v["holdout_images"], []):
        images[v["holdout_images"]].append(r["model"])
  if images:
    text += "\nHeld-out images: " + "; ".join(f"{d} ({', '.join(model_label(m) for m in ms)})"
                                              for d, ms in sorted(images.items())) + ".\n"
  _write(out, "paper_t3_ablations", {**prov, **t3}, text)

  plot_pareto(sweep, os.path.join(out, "paper_f1_pareto.png"), pareto_metric)
  if pareto_metric != "kl":
    plot_pareto(sweep, os.path.join(out, "paper_f1_pareto_kl.png"), "kl")

  if f2:
    text = header("F2: integer-path time vs 4-bit ratio", prov)
    text += (f"From {f2['benchmark']} (commit {f2['benchmark_commit']}, {f2['benchmark_device']}): measured time "
             "of the integer path with per-layer tuned convolutions, and the time the fitted cost model gives for a "
             "target with 4-bit arithmetic. Share of the 100% speed-up reached at 50% = (t0 - t50) / (t0 - t100), shown only where t100 is at "
             "least 5% below t0.\n\n")
    text += records.markdown_table(
        ["model", "batch", "float32 (ms)", "int r=0 (ms)", "int r=0.5 (ms)", "int r=1 (ms)", "measured share at 50%",
         "modelled share at 50%"],
        [[model_label(r["model"]), r["batch"], 1e3 * r["float32_s"], *(1e3 * r["int_tuned_s"][q] for q in ("0", "0.5", "1")),
          "-" if r["measured_share_of_speedup_at_0.5"] is None else f"{r['measured_share_of_speedup_at_0.5']:.2f}",
          "-" if r["modelled_share_of_speedup_at_0.5"] is None else f"{r['modelled_share_of_speedup_at_0.5']:.2f}"]
         for r in f2["rows"]])
    if f2["stale"]:
      text += ("\nMeasured on an earlier variant of the model (other layer sizes than the sweep's), so left out: "
               + ", ".join(f"{r['model']} ({r['benchmark_macs_per_image']} MACs per image, now "
                           f"{r['current_macs_per_image']})" for r in f2["stale"]) + "\n")
    missing = [m for m in sweep if m not in {r["model"] for r in f2["rows"]} | {r["model"] for r in f2["stale"]}]
    if missing:
      text += f"\nNot in the benchmark file (not measured): {', '.join(missing)}\n"
    _write(out, "paper_f2_speed", {**prov, **f2}, text)
    plot_speed(f2, os.path.join(out, "paper_f2_speed.png"))

  text = header("The paper's claims beside what was measured here", prov)
  text += records.markdown_table(["claim", "measured", "reading"],
                                 [[c["claim"], c["measured"] or "-", c["reading"]] for c in claim_rows])
  text += ("\n## FlexiQ's 4-bit targets\n\nThe one FlexiQ network against the single-point baselines and its own "
           "switchable kind (T1), and both ends of its ratio range kept after finetuning (T2); a miss names the "
           "models and by how much.\n\n")
  targets_table = lambda rows: records.markdown_table(
      ["target", "measured", "met"],
      [[t["target"], t["measured"] or "-", "not measured" if t["met"] is None else ("yes" if t["met"] else "no")]
       for t in rows])
  text += targets_table(target_rows)
  if candidate_rows:
    text += (f"\nThe same targets for {CANDIDATE[1]} (T3's `{CANDIDATE[0]}`: the configured pipeline with the "
             "4-bit rounding learnt at ratios 0, 0.5 and 1 before its QAT, finetuned at the rate the configured "
             "pipeline chose), on the models where it ran:\n\n")
    text += targets_table(candidate_rows)
  _write(out, "paper_claims", {**prov, "claims": claim_rows, "targets": target_rows,
                               "candidate_targets": candidate_rows}, text)
  return {"t1": t1, "t2": t2, "t3": t3, "f2": f2, "claims": claim_rows, "targets": target_rows,
          "candidate_targets": candidate_rows}


def _write(out: str, stem: str, data: dict, text: str) -> None:
  from flexiq_jax import records
  records.write_json_atomic(os.path.join(out, stem + ".json"), data)
  with open(os.path.join(out, stem + ".md"), "w") as f:
    f.write(text)


def plot_pareto(sweep: dict, path: str, metric: str) -> None:
  from flexiq_jax.compare import harness
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(sweep)
  cols = min(4, n)
  fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)),
                           squeeze=False)
  for ax, (model, recs) in zip(axes.flat, sweep.items()):
    harness.draw_pareto(ax, recs[0]["rows"], metric, recs[0]["float"]["top1"], finetuned_suffix=" (FT)", ms=3, lw=1,
                        float_label=None)
    ax.set_title(model_label(model), fontsize=9)
    ax.set_xlabel("relative BOPs (W8A8 = 1)", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110, metadata={"Software": None})
  plt.close(fig)


def plot_speed(f2: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for row in f2["rows"]:
    line, = ax.plot([0, 50, 100], [row["int_tuned_s"][q] / row["float32_s"] for q in ("0", "0.5", "1")], "o-",
                    label=f"{row['model']} measured")
    target = row["modelled_4bit_target_s"]
    if target:
      ratios = sorted(target, key=float)
      ax.plot([100 * float(r) for r in ratios], [target[r] / row["float32_s"] for r in ratios], "--",
              color=line.get_color(), lw=0.8)
  ax.set_xlabel("4-bit channel ratio (%)")
  ax.set_ylabel("time / float32 time (dashed: modelled 4-bit target)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110, metadata={"Software": None})
  plt.close(fig)


# ----------------------------------------------------------------------------------------------


def use_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache at `path` for this process and the worker
  processes it spawns (they inherit JAX_COMPILATION_CACHE_DIR). A compiled program is keyed by its
  HLO, compile options and the jax version, so a cache hit runs exactly what a compilation would.

  Args:
    path: the cache folder (created when missing).
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  jax.config.update("jax_compilation_cache_dir", path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  from flexiq_jax import cli
  from flexiq_jax import compare
  from flexiq_jax import records
  out = _OUT.value
  if not _TABLES_ONLY.value:
    unknown = [m for m in _METHODS.value + _SEED_METHODS.value + _RECOMPUTE.value if m not in compare.METHODS]
    if unknown:
      raise app.UsageError(f"unknown --methods, --seed_methods or --recompute {unknown}; known: "
                           f"{', '.join(compare.METHODS)}")
    for name in _MODELS.value:
      cli.resolve_config(name)  # every name checked before the first model starts
    if _WORKERS.value < 1:
      raise app.UsageError(f"--workers must be at least 1, got {_WORKERS.value}")
    for r in _RATIOS.value:
      if not 0 <= float(r) <= 1:
        raise app.UsageError(f"--ratios must lie in [0, 1], got {r}")
    todo = jobs(_MODELS.value, _SEEDS.value, _EXTRA_SEEDS.value, _SEED_MODELS.value, _METHODS.value,
                _SEED_METHODS.value)
    cache = os.path.join(_WORKROOT.value, ".jax_cache") if _COMPILATION_CACHE.value == "auto" else _COMPILATION_CACHE.value
    if cache:
      use_compilation_cache(cache)
    argv_record = records.command_argv()
    info = records.run_info(argv_record)  # the code that runs is the code at start
    run = functools.partial(run_one, ratios=_RATIOS.value, workroot=_WORKROOT.value, out=out, smoke=_SMOKE.value,
                            argv=argv_record, imagenet=_IMAGENET.value, recompute=tuple(_RECOMPUTE.value),
                            new_float=_NEW_FLOAT.value)
    workers = max(1, min(_WORKERS.value, len(todo)))
    print(f"{len(todo)} jobs ({', '.join(f'{n} seed {s}' for n, s, _ in todo)}), {workers} at a time", flush=True)
    t_start = time.perf_counter()
    run_entry = {"command": info["command"], "commit": info["commit"], "device": info["device"],
                 "started": info["date"], "wall_minutes": None, "workers": workers,
                 "jobs": [f"{n}_seed{s}" for n, s, _ in todo], "recompute": list(_RECOMPUTE.value)}
    log_sweep_run(out, run_entry)
    try:
      for k, ((name, seed, _), record) in enumerate(run_jobs(todo, run, workers), 1):
        elapsed = time.perf_counter() - t_start
        eta = elapsed / k * (len(todo) - k)  # the mean pace so far, workers included
        flexiq = find_row(record, "flexiq", ratio=1.0, finetuned=True)
        print(f"[{k}/{len(todo)}] {name} seed {seed}: done ({record['seconds_this_run'] / 60:.1f} min in its "
              f"process); float top-1 {record['float']['top1']:.2f}%"
              + (f", FlexiQ 100% after finetuning {flexiq['top1']:.2f}%" if flexiq else "")
              + f"; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.0f} min", flush=True)
    except Exception as e:  # the runs log says it failed and why, not "killed or still running"
      first_line = (str(e).splitlines() or [""])[0][:200]
      log_sweep_run(out, {**run_entry, "failed": f"{type(e).__name__}: {first_line}"})
      if isinstance(e, FloatChanged):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
      raise
    log_sweep_run(out, {**run_entry, "wall_minutes": round((time.perf_counter() - t_start) / 60, 1)})
  write_tables(out, _PARETO_METRIC.value, _BENCHMARK.value)
  print(f"tables: {os.path.join(out, 'paper_*.md')}")


if __name__ == "__main__":
  from flexiq_jax import host_memory
  host_memory.rerun_with_tcmalloc()  # the command only (not a caller of main): the workers inherit the preload
  app.run(main)
