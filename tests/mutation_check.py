"""Mutation check: do the tests notice deliberate breakages?

Each mutant below is one small, plausible bug (a file, an exact piece of its text, the text that
replaces it) and the test files that should catch it. The script copies the repository (the
files git tracks or would track, as they are in the working tree) into a temporary directory,
then for each mutant applies the replacement there, runs only the named tests with
`pytest -x -q`, and restores the file. A mutant is *killed* when the tests fail, *survived* when
they pass; the kill rate is killed / (killed + survived). The repository itself is never
modified. A mutant whose text is no longer found exactly once is reported as *not applied* (the
code moved on: update the mutant) and left out of the rate.

A baseline run of every named test file on the unmutated copy comes first: a mutant "killed" by
tests that already fail would mean nothing, so a failing baseline stops the check (--no-baseline
skips it).

    python tests/mutation_check.py                      # all mutants, summary printed
    python tests/mutation_check.py --out mutation.json  # ... and written as JSON
    python tests/mutation_check.py --only crop,lr       # mutants whose name contains a pattern
    python tests/mutation_check.py --list

Runtime on 2 CPU cores: about 10 minutes (each mutant runs one or two test files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  file: str  # relative to the repository root
  old: str  # must occur exactly once in the file
  new: str
  tests: tuple[str, ...]  # pytest arguments: test files, file::test ids, or "-k", "expr"
  why: str = ""  # what the mutant breaks


MUTANTS = (
    # -- training, data and serving breakages ---------------------------------------------------
    Mutant("crop_top_left", "flexiq_jax/data/preprocess.py",
           "top, left = (new_h - size) // 2, (new_w - size) // 2", "top, left = 0, 0",
           ("tests/test_data.py",), "eval crop at the top-left corner, not the centre"),
    Mutant("lr_constant_schedule", "flexiq_jax/train.py",
           "    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warmup, 1) if warmup else 0,\n"
           "                                              max(total_steps, warmup + 1), end_value=0.0)",
           "    return optax.constant_schedule(cfg.learning_rate)",
           ("tests/test_train.py",), "a constant learning rate instead of warmup + cosine"),
    Mutant("lr_schedule_unused", "flexiq_jax/train.py",
           "optax.sgd(schedule, momentum=cfg.momentum", "optax.sgd(cfg.learning_rate, momentum=cfg.momentum",
           ("tests/test_train.py",), "SGD ignores the schedule (constant peak rate)"),
    Mutant("decay_every_param", "flexiq_jax/train.py",
           'lambda path, x: getattr(path[-1], "key", "") not in ("bias", "scale") and x.ndim > 1',
           "lambda path, x: True",
           ("tests/test_train.py",), "weight decay on biases and norm scales too"),
    Mutant("decay_mask_dropped_sgd", "flexiq_jax/train.py",
           "optax.add_decayed_weights(cfg.weight_decay, _decay_mask)", "optax.add_decayed_weights(cfg.weight_decay)",
           ("tests/test_train.py",), "SGD decays every parameter (the mask is not passed)"),
    Mutant("decay_mask_by_ndim_only", "flexiq_jax/train.py",
           'getattr(path[-1], "key", "") not in ("bias", "scale") and x.ndim > 1', "x.ndim > 1",
           ("tests/test_train.py",), "a 2-D bias (DenseGeneral heads) is decayed"),
    Mutant("sampler_single_level", "flexiq_jax/finetune/finetune.py",
           "level = levels[jax.random.choice(pick, len(self.levels), p=jnp.asarray(self.level_probs, jnp.float32))]",
           "level = levels[-1]",
           ("tests/test_finetune.py",), "QAT always trains the last level"),
    Mutant("sampler_ignores_probs", "flexiq_jax/finetune/finetune.py",
           "jax.random.choice(pick, len(self.levels), p=jnp.asarray(self.level_probs, jnp.float32))",
           "jax.random.choice(pick, len(self.levels))",
           ("tests/test_finetune.py", "-k", "several_levels"), "levels drawn uniformly whatever finetune.level_probs says"),
    Mutant("qat_same_ratio_every_step", "flexiq_jax/finetune/finetune.py",
           "sampled = sampler(jax.random.fold_in(rng_key, state.step))", "sampled = sampler(rng_key)",
           ("tests/test_finetune.py",), "one ratio drawn for the whole QAT run"),
    Mutant("qat_ignores_every_step_ratios", "flexiq_jax/finetune/finetune.py",
           "  if not sampler.every_step:", "  if True:",
           ("tests/test_finetune.py", "-k", "every_step"), "finetune.every_step_ratios trains only the sampled ratio"),
    Mutant("lowering_ste_through_the_clip", "flexiq_jax/numerics/extraction.py",
           "passed = jnp.where(inside, q, jax.lax.stop_gradient(q))", "passed = q",
           ("tests/test_numerics_extraction.py",), "QAT gradient passes through the 4-bit clip (drifts past it)"),
    Mutant("lsq_checkpoints_not_keyed", "flexiq_jax/compare/harness.py",
           'workdir = os.path.join(ctx.run.workdir, "compare", "lsq_qat", key)',
           'workdir = os.path.join(ctx.run.workdir, "compare", "lsq_qat")',
           ("tests/test_compare.py", "-k", "lsq"), "a finished LSQ run of another recipe is restored and reported"),
    Mutant("serve_ignores_oldest_wait", "flexiq_jax/serve/controller.py",
           "(self.target_s - waited) / batches", "self.target_s / batches",
           ("tests/test_serve.py", "-k", "fluctuating"), "the controller forgets how long the oldest request has waited"),
    Mutant("stage_calibrate_ignores_quant", "flexiq_jax/stage_options.py",
           '  extraction: str = option("fitted", "quant.extraction")\n  bias_correction',
           '  extraction: str = option("fitted", "quant.extraction", result_free=True)\n  bias_correction',
           ("tests/test_stage_cache.py", "tests/test_pipeline.py::test_no_stale_calibration_or_selection_after_a_quant_or_select_change"),
           "a quant change reuses a stale calibration"),
    Mutant("calibrate_reuses_any_output", "flexiq_jax/pipeline.py",
           '  stage = run.stage("calibrate")', '  stage = run.stage("calibrate")\n  stage.is_done = lambda: os.path.exists(stage.file("plan.json"))',
           ("tests/test_pipeline.py::test_no_stale_calibration_or_selection_after_a_quant_or_select_change",),
           "calibrate reuses whatever is in the workdir, whatever its fingerprint"),
    Mutant("select_reuses_any_output", "flexiq_jax/pipeline.py",
           '  stage = run.stage("select")', '  stage = run.stage("select")\n  stage.is_done = lambda: os.path.exists(stage.file("selection.json"))',
           ("tests/test_pipeline.py::test_no_stale_calibration_or_selection_after_a_quant_or_select_change",),
           "select reuses whatever is in the workdir, whatever its fingerprint"),
    Mutant("lowered_count_no_epsilon", "flexiq_jax/cost.py",
           "int(np.floor(ratio * info.in_channels + 1e-9))", "int(np.floor(ratio * info.in_channels))",
           ("tests/test_cost.py",), "0.29 x 100 channels lowers 28"),
    Mutant("lowered_count_rounds", "flexiq_jax/cost.py",
           "int(np.floor(ratio * info.in_channels + 1e-9))", "int(round(ratio * info.in_channels))",
           ("tests/test_cost.py",), "per-layer ratio candidates round instead of floor"),
    Mutant("nonfinite_loss_unchecked", "flexiq_jax/train.py",
           'bad = [k for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])]', "bad = []",
           ("tests/test_reliability.py::test_training_stops_at_the_first_non_finite_step_and_saves_nothing_from_it",),
           "training runs on through NaN losses"),
    Mutant("calibration_nonfinite_accepted", "flexiq_jax/calibrate/statistics.py",
           "    check_finite(new, index)\n", "",
           ("tests/test_reliability.py::test_calibration_rejects_non_finite_activations_naming_layer_and_batch",),
           "an Inf pixel calibrates an infinite scale"),
    Mutant("damaged_checkpoint_not_skipped", "flexiq_jax/checkpoint.py",
           "      damaged.append(step)\n      continue\n", "      raise\n",
           ("tests/test_reliability.py::test_restore_falls_back_to_the_newest_intact_step",),
           "a damaged newest step stops the resume"),
    Mutant("stage_output_replaced_in_place", "flexiq_jax/stage_cache.py",
           'self._final_path, self.path = self.path, self.path + ".partial"', "self._final_path = None",
           ("tests/test_reliability.py::test_a_fresh_stage_output_replaces_the_old_only_when_done",),
           "a fresh stage output overwrites the old before it is complete"),
    Mutant("metrics_replay_kept", "flexiq_jax/train.py",
           "  writer.drop_after(start)", "  pass",
           ("tests/test_reliability.py::test_metrics_after_a_resume_do_not_repeat_replayed_steps",),
           "a resumed run logs the replayed steps twice"),
    Mutant("every_process_reads_the_whole_batch", "flexiq_jax/data/datasets.py",
           "idx = np.asarray(idx)[index * rows:(index + 1) * rows]", "idx = np.asarray(idx)[:rows]",
           ("tests/test_multihost.py",), "every host trains on the same rows"),
    Mutant("idx_magic_unchecked", "flexiq_jax/data/fashion_mnist.py",
           "if magic >> 8 != 0x08:", "if False:",
           ("tests/test_data.py",), "a non-byte IDX file is read as bytes"),
    Mutant("idx_trailing_bytes_accepted", "flexiq_jax/data/fashion_mnist.py",
           "if array.size != int(np.prod(shape)):", "if array.size < int(np.prod(shape)):",
           ("tests/test_data.py",), "an IDX payload longer than its header is silently cut"),
    Mutant("idx_missing_names_every_file", "flexiq_jax/data/fashion_mnist.py",
           "missing = [p for p in paths if not os.path.exists(p)]", "missing = paths if not all(map(os.path.exists, paths)) else []",
           ("tests/test_data.py",), "a missing-file error names files that are there"),
    Mutant("idx_count_mismatch_unchecked", "flexiq_jax/data/fashion_mnist.py",
           "if images.shape[0] != labels.shape[0]:", "if False:",
           ("tests/test_data.py",), "images and labels of different lengths are accepted"),
    Mutant("eval_batch_replicated", "flexiq_jax/parallel.py",
           'return NamedSharding(mesh, P("data"))', "return NamedSharding(mesh, P())",
           ("tests/test_parallel.py",), "batches are copied to every device instead of split"),
    Mutant("eval_last_batch_only", "flexiq_jax/train.py",
           "totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)", "totals = sums",
           ("tests/test_parallel.py",), "evaluation reports the last batch only"),
    Mutant("eval_mask_ignored", "flexiq_jax/train.py",
           '"count": jnp.sum(mask),', '"count": jnp.float32(logits.shape[0]),',
           ("tests/test_parallel.py",), "padded eval rows are counted"),
    Mutant("relative_bops_denominator_no_matmuls", "flexiq_jax/cost.py",
           "          / channelwise_bops(layers, {}, high, low, matmuls))", "          / channelwise_bops(layers, {}, high, low))",
           ("tests/test_cost.py",), "relative BOPs divide by the 8-bit BOPs without the attention matmuls"),
    Mutant("eval_top1_counts_top5", "flexiq_jax/train.py",
           '"top1": 100.0 * float(totals["top1"]) / count', '"top1": 100.0 * float(totals["top5"]) / count',
           ("tests/test_pipeline.py::test_run_until_hands_typed_results_from_stage_to_stage",),
           "the reported top-1 is the top-5 count"),
    Mutant("fmnist_config_full_size", "configs/common.py",
           'config.model.kwargs.update({k: v for k, v in models.small_kwargs(name, 28).items() if k != "image_size"})',
           "pass", ("tests/test_configs.py", "-k", "builds"), "':fmnist' trains the full-size architecture"),
    Mutant("timm_attn_mask_not_dropped", "flexiq_jax/models/timm_import.py",
           '_DROPPED_LEAVES = ("num_batches_tracked", "relative_position_index", "attn_mask")',
           '_DROPPED_LEAVES = ("num_batches_tracked", "relative_position_index")',
           ("tests/test_models_timm_import.py::test_swin_checkpoint_with_stored_buffers_loads",),
           "a Swin checkpoint's stored attention masks are not ignored"),
    # -- numerics -------------------------------------------------------------------------------
    Mutant("lower_codes_floor_int", "flexiq_jax/numerics/extraction.py",
           "half = jnp.right_shift(jnp.left_shift(jnp.int32(1), e), 1)", "half = jnp.int32(0)",
           ("tests/test_numerics_extraction.py",), "integer lowering truncates instead of rounding half up"),
    Mutant("lower_codes_floor_float", "flexiq_jax/numerics/extraction.py",
           "jnp.floor(q.astype(compute) / step + 0.5)", "jnp.floor(q.astype(compute) / step)",
           ("tests/test_numerics_extraction.py",), "float lowering truncates instead of rounding half up"),
    Mutant("lower_codes_half_even", "flexiq_jax/numerics/extraction.py",
           "jnp.floor(q.astype(compute) / step + 0.5)", "jnp.round(q.astype(compute) / step)",
           ("tests/test_numerics_extraction.py",), "float lowering rounds half to even, not half up"),
    Mutant("extraction_tie_largest_e", "flexiq_jax/numerics/extraction.py",
           "return jnp.asarray(cands, jnp.int32)[jnp.argmin(errors, axis=0)]  # argmin: first = smallest e",
           "return jnp.asarray(cands, jnp.int32)[errors.shape[0] - 1 - jnp.argmin(errors[::-1], axis=0)]",
           ("tests/test_numerics_extraction.py",), "histogram fit: ties go to the largest e"),
    Mutant("int_range_signed_off_by_one", "flexiq_jax/numerics/quantizers.py",
           "return (-(half - 1) if narrow else -half), half - 1", "return (-(half - 1) if narrow else -half), half",
           ("tests/test_numerics_quantizers.py",), "signed grid one code too wide"),
    Mutant("int_range_unsigned_off_by_one", "flexiq_jax/numerics/quantizers.py",
           "return 0, 2 ** bits - 1", "return 0, 2 ** bits",
           ("tests/test_numerics_quantizers.py",), "unsigned grid one code too wide"),
    Mutant("weight_scale_wrong_axis", "flexiq_jax/numerics/quantizers.py",
           "absmax = jnp.max(jnp.abs(jax.lax.stop_gradient(w)), axis=tuple(range(w.ndim - 1)))",
           "absmax = jnp.max(jnp.abs(jax.lax.stop_gradient(w)), axis=tuple(range(1, w.ndim)))",
           ("tests/test_numerics_quantizers.py", "tests/test_calibrate.py"),
           "per-channel weight scale reduced over the wrong axes"),
    Mutant("zero_point_sign", "flexiq_jax/numerics/quantizers.py",
           "zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)",
           "zero_point = jnp.clip(jnp.round(qmin + lo / scale), qmin, qmax)",
           ("tests/test_numerics_quantizers.py",), "asymmetric zero point with the wrong sign"),
    Mutant("mse_range_tie_first", "flexiq_jax/numerics/ranges.py",
           "return k - 1 - jnp.argmin(errors[::-1], axis=0)", "return jnp.argmin(errors, axis=0)",
           ("tests/test_numerics_ranges.py",), "MSE range search: ties go to the smallest shrink factor"),
    # -- calibrate ------------------------------------------------------------------------------
    Mutant("act_scale_off_by_one", "flexiq_jax/calibrate/statistics.py",
           "return max(float(clip), numerics.MIN_RANGE) / qmax", "return max(float(clip), numerics.MIN_RANGE) / (qmax + 1)",
           ("tests/test_calibrate.py",), "activation scale divides by 2^b instead of 2^b - 1"),
    Mutant("weight_extraction_unweighted", "flexiq_jax/numerics/weight_grid.py",
           "((q - lower_codes(q, f, signed=True)) ** 2 * scale ** 2)",
           "((q - lower_codes(q, f, signed=True)) ** 2)",
           ("tests/test_calibrate.py",), "weight extraction ignores the output channels' scales"),
    Mutant("calibration_max_merged_as_min", "flexiq_jax/calibrate/statistics.py",
           'merge = {"min": np.minimum, "max": np.maximum,', 'merge = {"min": np.minimum, "max": np.minimum,',
           ("tests/test_calibrate.py",), "per-channel maxima of later batches shrink the range"),
    # -- select ---------------------------------------------------------------------------------
    Mutant("order_error_descending", "flexiq_jax/select/ordering.py",
           "np.lexsort((index, error, range_bins(ranges, rtol)))", "np.lexsort((index, -error, range_bins(ranges, rtol)))",
           ("tests/test_select.py",), "range ties broken by the largest lowering error first"),
    Mutant("order_range_descending", "flexiq_jax/select/ordering.py",
           "np.lexsort((index, error, range_bins(ranges, rtol)))", "np.lexsort((index, error, -range_bins(ranges, rtol)))",
           ("tests/test_select.py",), "channels with the largest range lowered first"),
    Mutant("greedy_normalize_by_mean", "flexiq_jax/select/selectors.py",
           'table = {"max": np.max,', 'table = {"max": np.mean,',
           ("tests/test_select.py",), "greedy's 'max' normalisation uses the mean"),
    Mutant("greedy_first_prefix_over_budget", "flexiq_jax/select/selectors.py",
           "n = n_prev + int(np.argmin(np.abs(cum[n_prev:] - r)))",
           "n = n_prev + int(np.searchsorted(cum[n_prev:], r))",
           ("tests/test_select.py",), "greedy takes the first prefix at or over budget, not the closest"),
    Mutant("uniform_not_nested", "flexiq_jax/select/selectors.py",
           "budget.counts_for_uniform_ratio(r, channels, macs, lower=prev)",
           "budget.counts_for_uniform_ratio(r, channels, macs)",
           ("tests/test_select.py",), "uniform selections of successive levels need not be nested"),
    # -- the serving form of the integer path ---------------------------------------------------
    Mutant("serving_border_inside_strict", "flexiq_jax/quantize/integer.py",
           "return (pos >= 0) & (pos < size)", "return (pos > 0) & (pos < size)",
           ("tests/test_integer.py",), "unsigned-shift border correction counts the first row/column as padding"),
    Mutant("serving_lowering_floor", "flexiq_jax/quantize/integer.py",
           "jnp.floor(q * (1.0 / step) + 0.5)", "jnp.floor(q * (1.0 / step))",
           ("tests/test_integer.py",), "activation lowering rounds down instead of half up"),
    Mutant("serving_float_codes_unbounded", "flexiq_jax/quantize/integer.py",
           "return taps * (128 if signed else 255) * layer_ops.WEIGHT_QMAX <= 2 ** 24",
           "return True", ("tests/test_integer.py",), "float32 convs on codes even where the sums are inexact"),
    Mutant("serving_correction_unmasked", "flexiq_jax/quantize/integer.py",
           "y = y + layer_ops.masked_channel_sum(info, lowered, entry[\"lost\"])",
           "y = y + layer_ops.masked_channel_sum(info, jnp.ones_like(lowered), entry[\"lost\"])",
           ("tests/test_integer.py",), "bias correction of every channel, lowered or not"),
    # -- a run that goes wrong never replaces a good model; the serving contract ----------------
    Mutant("judge_ignores_top1", "flexiq_jax/judge.py",
           'if not math.isfinite(a["kl"]) or a["top1"] < b["top1"] - top1_drop:', "if False:",
           ("tests/test_reliability.py::test_the_judge_refuses_worse_figures_and_any_non_finite_one",),
           "a finetune that lost top-1 is installed"),
    Mutant("divergence_unchecked", "flexiq_jax/train.py",
           'if "loss" in m and float(m["loss"]) > limit:', "if False:",
           ("tests/test_reliability.py::test_a_loss_far_above_its_start_stops_training_without_saving_it",),
           "a finite but exploding loss trains on"),
    Mutant("stale_export_kept", "flexiq_jax/artifacts.py",
           "retire(workdir, (SERVING_DIR, EXPORT_DIR), ", "retire(workdir, (SERVING_DIR,), ",
           ("tests/test_reliability.py::test_an_accepted_finetune_retires_the_old_serving_model_and_its_export",),
           "export/ outlives the serving model it was made from"),
    Mutant("nan_pixels_served", "flexiq_jax/contract.py", "  if not finite:", "  if False:",
           ("tests/test_serving_contract.py::test_predict_refuses_nan_and_inf_pixels_naming_the_image",),
           "NaN images get confident logits"),
    Mutant("non_finite_json_tokens", "flexiq_jax/records.py",
           "tmp.write_text(json.dumps(finite_json(data), indent=2, sort_keys=False, allow_nan=False))",
           "tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))",
           ("tests/test_reliability.py::test_non_finite_figures_are_written_as_valid_json_with_the_reason",),
           "results.json holds -Infinity (not JSON)"),
    Mutant("signal_not_polled", "flexiq_jax/train.py",
           "      interrupted = signals.requested() is not None", "      interrupted = False",
           ("tests/test_reliability.py::test_a_signal_stops_training_at_the_next_step_with_a_checkpoint_there",),
           "SIGTERM during training loses the steps since the last checkpoint"),
)


def repo_files(root: str) -> list[str]:
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                       capture_output=True, check=True)
  return [f for f in out.stdout.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]


def copy_repo(root: str, dest: str) -> None:
  for f in repo_files(root):
    os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
    shutil.copy2(os.path.join(root, f), os.path.join(dest, f))


def run_tests(copy: str, args, timeout: float) -> tuple[str, float, str]:
  """('passed' | 'failed' | 'timeout', seconds, the last lines of pytest's output)."""
  env = dict(os.environ, PYTHONPATH=copy, FLEXIQ_NO_PROGRESS="1")
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
  start = time.time()
  try:
    out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    tail = (e.stdout or b"")[-1500:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-1500:]
    return "timeout", time.time() - start, str(tail)
  status = "passed" if out.returncode == 0 else "failed"
  return status, time.time() - start, (out.stdout + out.stderr)[-1500:]


def without_k(tests) -> list[str]:
  """The test files/ids of a selection, its -k expression dropped (the baseline runs a superset)."""
  out, skip = [], False
  for t in tests:
    if skip:
      skip = False
    elif t == "-k":
      skip = True
    else:
      out.append(t)
  return out


def first_failure(tail: str) -> str:
  for line in tail.splitlines():
    if line.startswith(("FAILED", "ERROR")):
      return line[:200]
  return ""


def apply(copy: str, m: Mutant) -> str | None:
  """Applies the mutant in the copy; returns the original text, or None when `old` is not found
  exactly once."""
  path = os.path.join(copy, m.file)
  if not os.path.exists(path):
    return None
  text = open(path, encoding="utf-8").read()
  if text.count(m.old) != 1:
    return None
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(m.old, m.new))
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the summary as JSON to this path")
  parser.add_argument("--only", default="", help="comma-separated substrings of mutant names")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (a timeout kills)")
  parser.add_argument("--repo", default=ROOT, help="the repository to copy (default: this one)")
  args = parser.parse_args(argv)

  mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only.split(","))]
  if args.list:
    for m in mutants:
      print(f"{m.name:38s} {m.file:38s} {' '.join(m.tests)}\n{'':38s} {m.why}")
    return 0
  if not mutants:
    print("no mutant matches --only", file=sys.stderr)
    return 2

  results, started = [], time.time()
  with tempfile.TemporaryDirectory(prefix="flexiq_mutation_") as copy:
    copy_repo(os.path.abspath(args.repo), copy)
    if not args.no_baseline:
      tests = list(dict.fromkeys(t for m in mutants for t in without_k(m.tests)))
      status, seconds, tail = run_tests(copy, tests, args.timeout * 2)
      print(f"baseline ({len(tests)} test selections): {status} in {seconds:.0f} s", flush=True)
      if status != "passed":
        print(tail, file=sys.stderr)
        print("the unmutated tests fail: fix them before checking mutants", file=sys.stderr)
        return 2
    for m in mutants:
      original = apply(copy, m)
      if original is None:
        row = {"status": "not applied", "seconds": 0.0, "failure": f"text not found exactly once in {m.file}"}
      else:
        try:
          status, seconds, tail = run_tests(copy, m.tests, args.timeout)
        finally:
          with open(os.path.join(copy, m.file), "w", encoding="utf-8") as f:
            f.write(original)
        row = {"status": {"passed": "survived", "failed": "killed", "timeout": "killed (timeout)"}[status],
               "seconds": round(seconds, 1), "failure": first_failure(tail)}
      results.append({"name": m.name, "file": m.file, "tests": list(m.tests), "why": m.why, **row})
      print(f"{m.name:38s} {row['status']:16s} {row['seconds']:6.1f} s  {row['failure']}", flush=True)

  killed = sum(r["status"].startswith("killed") for r in results)
  survived = [r["name"] for r in results if r["status"] == "survived"]
  not_applied = [r["name"] for r in results if r["status"] == "not applied"]
  rate = killed / (killed + len(survived)) if killed + len(survived) else float("nan")
  summary = {"killed": killed, "survived": len(survived), "not_applied": len(not_applied),
             "kill_rate": round(rate, 4), "survivors": survived, "not_applied_names": not_applied,
             "seconds": round(time.time() - started, 1), "mutants": results}
  print(f"\nkill rate: {killed}/{killed + len(survived)} = {100 * rate:.1f}%"
        + (f"; survived: {', '.join(survived)}" if survived else "")
        + (f"; not applied: {', '.join(not_applied)}" if not_applied else "")
        + f" ({summary['seconds']:.0f} s)")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return 0 if not survived and not not_applied else 1


if __name__ == "__main__":
  sys.exit(main())
