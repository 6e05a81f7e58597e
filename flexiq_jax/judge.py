"""A finetuned model is judged before it replaces anything.

`judge_finetune` measures the finetuned model and the model it started from on the same
held-out images, at ratios 0 and 1 (the two ends the run-time controller may pick): top-1 and
KL(float || quantized). A finetune that lowers top-1 by more than `finetune.judge_top1_drop`
points or raises the KL by more than `finetune.judge_kl_rise` nats at either end it trains is
refused (`FinetuneRefused`): the caller keeps it for inspection and leaves the serving model as it
was. A finetune for ratio 1 only (FlexiQ 100%-only) is judged at ratio 1: it gives up ratio 0 by
design, and its figures there are reported, not judged.

Held-out images: those of `data.holdout_split` where set (training images kept out of every
training, `holdout_images`), else training images the finetune never saw
(`unseen_train_indices`: the batches of its steps are known from the seed,
`data.train_batches`), preprocessed with the eval transform.
When the finetune saw (nearly) every training image, the first images of the eval split are used
instead, and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import data
from flexiq_jax import records

JUDGE_RATIOS = (0.0, 1.0)
REPORT_FILE = "judge.json"  # in the finetune stage's folder
# Fewer held-out training images than this (or than judge_images, if smaller): the eval split.
MIN_HELD_OUT = 128


class FinetuneRefused(RuntimeError):
  """A finetuned model measured worse than the model it started from by more than the margins."""


@dataclasses.dataclass(frozen=True)
class JudgeImages:
  images: np.ndarray
  labels: np.ndarray
  source: str  # what the images are, for the report


def unseen_train_indices(num_examples: int, batch_size: int, total_steps: int, seed: int, limit: int) -> np.ndarray:
  """Up to `limit` indices of training examples that `data.train_batches(..., seed=seed,
  num_steps=total_steps)` never yields (the same shuffled order: a step's batch is the next
  `batch_size` indices of it), sorted.

  Args:
    num_examples: size of the training split.
    batch_size: the finetune's global batch size.
    total_steps: the finetune's steps.
    seed: the seed given to `train_batches`.
    limit: the most indices returned.

  Returns:
    int64 array (possibly empty: every example was seen).
  """
  seen = total_steps * batch_size
  if seen >= num_examples or limit <= 0:
    return np.zeros((0,), np.int64)
  order = grain.MapDataset.range(num_examples).shuffle(seed=seed)
  return np.sort(np.asarray([order[i] for i in range(seen, min(num_examples, seen + limit))], np.int64))


def holdout_images(config, n: int) -> JudgeImages:
  """The first `n` images of `data.holdout_split` (training images kept out of every training),
  preprocessed with the eval transform.

  Args:
    config: The run config, with `data.holdout_split` set.
    n: How many images.

  Returns:
    The JudgeImages, with a description of the source.

  Raises:
    ValueError: the split is not disjoint from `data.train_split` in the obvious way (the same
      split's name unsliced on both sides).
  """
  split = config.data.holdout_split
  if "[" not in split and split == config.data.train_split.partition("[")[0]:
    raise ValueError(f"data.holdout_split {split!r} is the whole of the training split "
                     f"{config.data.train_split!r}; slice them apart, e.g. 'train[:-5000]' and 'train[-5000:]'")
  ds = data.get_dataset(config.data, split)
  idx = np.arange(min(n, ds.num_examples))
  batch = ds.load(idx, None)
  return JudgeImages(batch["image"], batch["label"],
                     f"the first {len(idx)} images of {split} (kept out of every training)")


def judge_images(config, total_steps: int, train_seed: int) -> JudgeImages:
  """The held-out images of a finetune of `total_steps` steps (module docstring).

  Args:
    config: The run config (reads config.data and finetune.judge_images, default 1000, and
      finetune.batch_size).
    total_steps: The finetune's steps.
    train_seed: The seed of its training batches.

  Returns:
    The JudgeImages: the first finetune.judge_images images of data.holdout_split where it is
    set; else up to finetune.judge_images unseen training images, or, when fewer than
    min(judge_images, MIN_HELD_OUT) are unseen, the first images of the eval split; with a
    description of the source.
  """
  n = int(config.finetune.get("judge_images", 1000))
  if config.data.get("holdout_split"):
    return holdout_images(config, n)
  train_ds = data.get_dataset(config.data, config.data.train_split)
  idx = unseen_train_indices(train_ds.num_examples, config.finetune.batch_size, total_steps, train_seed, n)
  if len(idx) >= min(n, MIN_HELD_OUT):
    batch = train_ds.load(idx, None)
    return JudgeImages(batch["image"], batch["label"],
                       f"{len(idx)} training images the finetune never saw ({config.data.train_split} split)")
  eval_ds = data.get_dataset(config.data, config.data.eval_split)
  idx = np.arange(min(n, eval_ds.num_examples))
  batch = eval_ds.load(idx, None)
  return JudgeImages(batch["image"], batch["label"],
                     f"the first {len(idx)} images of the {config.data.eval_split} split (the finetune saw "
                     f"all but {train_ds.num_examples - min(train_ds.num_examples, total_steps * config.finetune.batch_size)}"
                     f" training images)")


def measure(qmodel, qvars, float_logits_fn, images: np.ndarray, labels: np.ndarray, ratios=JUDGE_RATIOS,
            batch_size: int = 256) -> dict:
  """{f'{ratio:g}': {'top1': %, 'kl': mean KL(float || quantized)}} of the integer path.

  Args:
    qmodel: a `quantize.QuantizedModel` (its integer path is measured).
    qvars: its quantized variables.
    float_logits_fn: images -> the float model's logits.
    images: normalised images (N, H, W, C).
    labels: (N,) labels.
    ratios: the ratios measured.
    batch_size: images per forward pass.

  Returns:
    A dict keyed by the formatted ratio, each {'top1': float %, 'kl': float}.
  """
  qmodel = qmodel.with_mode("int")
  svars = jax.jit(qmodel.prepare)(qvars)

  @jax.jit
  def sums(svars, x, y, r):
    ref = jax.nn.log_softmax(float_logits_fn(x).astype(jnp.float32))
    out = qmodel.apply(svars, x, r).astype(jnp.float32)
    kl = jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(out)), axis=-1)
    return jnp.sum(jnp.argmax(out, -1) == y), jnp.sum(kl)

  out = {}
  for ratio in ratios:
    hits = kl = 0.0
    for i in range(0, len(images), batch_size):
      h, k = sums(svars, jnp.asarray(images[i:i + batch_size]), jnp.asarray(labels[i:i + batch_size]),
                  jnp.float32(ratio))
      hits, kl = hits + float(h), kl + float(k)
    out[f"{ratio:g}"] = {"top1": 100.0 * hits / len(images), "kl": kl / len(images)}
  return out


def failures(before: dict, after: dict, top1_drop: float, kl_rise: float, ratios=None) -> list[str]:
  """What makes `after` worse than `before` beyond the margins (empty: accepted). A non-finite
  figure after finetuning is a failure whatever the margins.

  Args:
    before: {ratio key: {'top1', 'kl'}} of the starting model.
    after: The same keys for the trained model.
    top1_drop: Allowed top-1 drop in points.
    kl_rise: Allowed KL rise in nats.
    ratios: the ratio keys judged (None: every key of `before`).

  Returns:
    A list of failure labels 'ratio <r> top-1' / 'ratio <r> KL'; a non-finite KL after training
    adds both labels of that ratio.
  """
  out = []
  for ratio, b in before.items():
    if ratios is not None and ratio not in ratios:
      continue
    a = after[ratio]
    if not math.isfinite(a["kl"]) or a["top1"] < b["top1"] - top1_drop:
      out.append(f"ratio {ratio} top-1")
    if not math.isfinite(a["kl"]) or a["kl"] > b["kl"] + kl_rise:
      out.append(f"ratio {ratio} KL")
  return out


def summary_line(before: dict, after: dict) -> str:
  """One line of the before -> after top-1 and KL at every ratio.

  Args:
    before: {ratio key: {'top1', 'kl'}} of the starting model.
    after: The same keys for the trained model.

  Returns:
    The summary string, ratios separated by '; '.
  """
  return "; ".join(f"ratio {r}: top-1 {before[r]['top1']:.2f}% -> {after[r]['top1']:.2f}%, KL {before[r]['kl']:.4g} "
                   f"-> {after[r]['kl']:.4g}" for r in before)


def judge_finetune(config, float_logits_fn, start, tuned, *, total_steps: int, train_seed: int,
                   judged_ratios=JUDGE_RATIOS) -> dict:
  """Measures `tuned` (the finetuned `stage_results.Quantized`) against `start` (the model it
  started from) on held-out images and returns the report (written by the caller to
  finetune/judge.json); report['accepted'] says whether it passes the margins
  finetune.judge_top1_drop (points) and finetune.judge_kl_rise (nats). finetune.judge_images=0
  skips the judgement (accepted, with the reason).

  Args:
    config: the run config.
    float_logits_fn: images -> float logits.
    start: the quantized model before finetuning.
    tuned: the finetuned model.
    total_steps: the finetune's steps (which training images it saw).
    train_seed: the seed of its batches.
    judged_ratios: the ratios of JUDGE_RATIOS whose margins decide (those the finetune trains);
      every ratio of JUDGE_RATIOS is measured and reported.

  Returns:
    The report dict: 'accepted', 'failed', 'images', 'num_images', 'metric',
    'before_finetuning', 'after_finetuning', 'judged_ratios', 'margins' and 'summary' (only
    'accepted', 'reason' and 'margins' when not judged).
  """
  cfg = config.finetune
  top1_drop, kl_rise = float(cfg.get("judge_top1_drop", 2.0)), float(cfg.get("judge_kl_rise", 0.1))
  margins = {"judge_top1_drop": top1_drop, "judge_kl_rise": kl_rise}
  if int(cfg.get("judge_images", 1000)) <= 0:
    return {"accepted": True, "reason": "finetune.judge_images=0: not judged", "margins": margins}
  held = judge_images(config, total_steps, train_seed)
  bs = int(config.eval_batch_size)
  before = measure(start.qmodel, start.qvars, float_logits_fn, held.images, held.labels, batch_size=bs)
  after = measure(tuned.qmodel, tuned.qvars, float_logits_fn, held.images, held.labels, batch_size=bs)
  judged = [f"{r:g}" for r in JUDGE_RATIOS if r in tuple(judged_ratios)]
  failed = failures(before, after, top1_drop, kl_rise, ratios=judged)
  return {"accepted": not failed, "failed": failed, "images": held.source, "num_images": int(len(held.labels)),
          "metric": "top-1 (%) and mean KL(float || quantized) of the integer path",
          "before_finetuning": before, "after_finetuning": after, "judged_ratios": [float(r) for r in judged],
          "margins": margins,
          "summary": summary_line(before, after)}


def refusal_message(report: dict, kept_at: str) -> str:
  """The one-line message of a refused finetune: the figures, where it is kept, the knobs.

  Args:
    report: A refused report of `judge_finetune` (reads 'failed', 'images', 'summary', 'margins').
    kept_at: Where the refused finetune was moved.

  Returns:
    The message string.
  """
  return (f"the finetuned model is worse than the model it started from ({', '.join(report['failed'])}) on "
          f"{report['images']}: {report['summary']} (allowed: top-1 drop <= {report['margins']['judge_top1_drop']} "
          f"points, KL rise <= {report['margins']['judge_kl_rise']}). It was not installed: serving/ and export/ "
          f"still hold the previous model, and the refused finetune is kept in {kept_at} for inspection. Lower "
          f"finetune.learning_rate, set finetune.grad_clip_norm or change finetune.num_epochs, then rerun with "
          f"--force_from=finetune; or widen finetune.judge_top1_drop / finetune.judge_kl_rise to accept it.")


def accept_or_refuse(run, float_logits_fn, start, tuned, stage, *, total_steps: int, train_seed: int,
                     judged_ratios=JUDGE_RATIOS) -> dict:
  """Judges a finished finetune (`judge_finetune`), writes the report to <stage>/judge.json and
  prints its summary. A refused finetune's stage directory is moved to
  <workdir>/replaced/<timestamp>/ and `FinetuneRefused` raised (one line: figures and knobs);
  nothing else in the workdir changes.

  Args:
    run: the pipeline.Run (config, workdir).
    float_logits_fn: images -> float logits.
    start: the quantized model before finetuning.
    tuned: the finetuned model.
    stage: the finetune's stage_cache.Stage.
    total_steps: the finetune's steps.
    train_seed: the seed of its batches.
    judged_ratios: the ratios whose margins decide (`judge_finetune`).

  Returns:
    The report of an accepted finetune.

  Raises:
    FinetuneRefused: If the finetune fails the judge's margins.
  """
  report = judge_finetune(run.config, float_logits_fn, start, tuned, total_steps=total_steps,
                          train_seed=train_seed, judged_ratios=judged_ratios)
  report = {**records.run_info(), **report}
  records.write_json_atomic(stage.file(REPORT_FILE), report)
  if report["accepted"]:
    if "summary" in report:
      print(f"finetune accepted (against the model it started from, on {report['images']}): {report['summary']}")
    return report
  target = os.path.join(run.workdir, "replaced", records.utc_now().replace(":", ""))
  if jax.process_index() == 0:
    os.makedirs(target, exist_ok=True)
    os.replace(stage.path, os.path.join(target, os.path.basename(stage.path)))
  raise FinetuneRefused(refusal_message(report, os.path.join(target, os.path.basename(stage.path))))


def judge_uniform_qat(config, float_logits_fn, logits_fn, start, end, *, total_steps: int, train_seed: int,
                      label: str = "W4A4") -> dict:
  """The judgement of a uniform QAT baseline (one bit width, no ratio): `logits_fn(params,
  images)` at its starting parameters `start` (its PTQ initialisation) and at the trained `end`,
  on the held-out images (`judge_images`), with the finetune's margins. A comparison reports
  the trained figures either way; report['accepted'] says whether they pass.

  Args:
    config: the run config (finetune.judge_* margins).
    float_logits_fn: images -> float logits.
    logits_fn: (params, images) -> the baseline's logits.
    start: its parameters before QAT.
    end: after QAT.
    total_steps: its QAT steps.
    train_seed: the seed of its batches.
    label: the precision named in the failures (e.g. 'W4A4', 'W8A8').

  Returns:
    The report dict: 'accepted', 'failed', 'images', 'before_qat', 'after_qat' ({'top1', 'kl'}
    each) and 'margins' (only 'accepted' and 'reason' when not judged).
  """
  cfg = config.finetune
  top1_drop, kl_rise = float(cfg.get("judge_top1_drop", 2.0)), float(cfg.get("judge_kl_rise", 0.1))
  if int(cfg.get("judge_images", 1000)) <= 0:
    return {"accepted": True, "reason": "finetune.judge_images=0: not judged"}
  held = judge_images(config, total_steps, train_seed)
  bs = int(config.eval_batch_size)

  @jax.jit
  def sums(params, x, y):
    ref = jax.nn.log_softmax(float_logits_fn(x).astype(jnp.float32))
    out = logits_fn(params, x).astype(jnp.float32)
    return jnp.sum(jnp.argmax(out, -1) == y), jnp.sum(jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(out)), -1))

  def figures(params):
    hits = kl = 0.0
    for i in range(0, len(held.images), bs):
      h, k = sums(params, jnp.asarray(held.images[i:i + bs]), jnp.asarray(held.labels[i:i + bs]))
      hits, kl = hits + float(h), kl + float(k)
    return {"uniform": {"top1": 100.0 * hits / len(held.images), "kl": kl / len(held.images)}}

  before, after = figures(start), figures(end)
  failed = [f.replace("ratio uniform", label) for f in failures(before, after, top1_drop, kl_rise)]
  return {"accepted": not failed, "failed": failed, "images": held.source, "before_qat": before["uniform"],
          "after_qat": after["uniform"], "margins": {"judge_top1_drop": top1_drop, "judge_kl_rise": kl_rise}}
