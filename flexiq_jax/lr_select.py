"""One procedure that chooses the learning rate of every QAT method on held-out training images.

With `finetune.lr_grid` set, a QAT method (FlexiQ's multi-ratio finetuning, FlexiQ finetuned
for 100 % only, LSQ, the switchable-precision network) trains its whole budget once per rate of
the grid (the same passes, seed and batches; only the rate differs), each candidate in its own
sub-directory `lr_<rate>` of the method's directory (`stage_cache.Stage`: resumable, and a
finished candidate is reused with its recorded scores, not retrained). Each candidate is scored
on the same held-out training images (`held_out`: the images that no QAT method's batches reach,
so every method is scored on the same ones; the eval split is never read), and the best by
`criterion` is the method's result. The record (`choose`'s second return value) holds the grid,
every candidate's held-out scores, the criterion and the chosen rate. With
`finetune.lr_grid_extend` > 0 a grid whose edge wins grows past that edge, one rate at a time,
by the same rule for every method, so that no method is compared at a rate its grid cut short.

`finetune.lr_grid = ()` (the default) is the configured rate, trained once where it always was.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import data
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import judge
from flexiq_jax import records
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax import train as train_lib

# The file of a method's directory that holds its selection record.
RECORD_FILE = "lr_selection.json"


def grid(config) -> tuple[float, ...]:
  """The configured learning-rate grid (`finetune.lr_grid`; empty: no selection).

  Args:
    config: a run.py config.

  Returns:
    The rates as floats, in the configured order.

  Raises:
    ValueError: the grid holds something other than distinct positive rates.
  """
  return stage_options.check_lr_grid(config.finetune.get("lr_grid", ()))


def config_fields(config) -> dict:
  """The selection's fields for a fingerprint: none without a grid (so that a cache made before
  the grid existed keeps its fingerprint), else the grid and the held-out image count.

  Args:
    config: a run.py config.

  Returns:
    {} or {'finetune.lr_grid': [...], 'finetune.lr_select_images': n}.
  """
  if not grid(config):
    return {}
  fields = {"finetune.lr_grid": list(grid(config)), "finetune.lr_select_images": int(config.finetune.lr_select_images)}
  if extension(config):
    fields["finetune.lr_grid_extend"] = extension(config)
  if config.data.get("holdout_split"):
    fields["data.holdout_split"] = config.data.holdout_split
  return fields


def extension(config) -> int:
  """How many rates `choose` may add beyond the grid's edges (`finetune.lr_grid_extend`; 0: none)."""
  return int(config.finetune.get("lr_grid_extend", 0) or 0)


def next_rate(rates, upward: bool) -> float:
  """The rate one step beyond an edge of the ascending `rates`, at the ratio of the step that
  mirrors it (the pattern of a half-decade grid continues: 3e-4, 1e-3, 3e-3 -> 1e-2, 3e-2 upward,
  1e-4 downward).

  Args:
    rates: two or more ascending rates.
    upward: beyond the largest rate (else below the smallest).

  Returns:
    The new rate, rounded to 6 significant digits.
  """
  r = list(rates)
  if upward:
    step = r[-2] / r[-3] if len(r) >= 3 else r[-1] / r[-2]
    return float(f"{r[-1] * step:.6g}")
  step = r[2] / r[1] if len(r) >= 3 else r[1] / r[0]
  return float(f"{r[0] / step:.6g}")


def candidate_name(rate: float) -> str:
  """The sub-directory of the candidate trained at `rate` (e.g. 'lr_0.001')."""
  return f"lr_{rate:g}"


def unseen_by_all(num_examples: int, batch_size: int, total_steps: int, seeds, limit: int) -> np.ndarray:
  """Up to `limit` indices of training examples that none of the batch streams
  `data.train_batches(..., seed=s, num_steps=total_steps)`, s in `seeds`, yields, sorted: the
  first seed's shuffled order after what it yields, less what the other seeds' yield.

  Args:
    num_examples: size of the training split.
    batch_size: the global batch size of every stream.
    total_steps: the longest stream's steps (a shorter stream yields a prefix of it).
    seeds: the streams' seeds (at least one).
    limit: the most indices returned.

  Returns:
    int64 array (empty when every example is reached).
  """
  seen = total_steps * batch_size
  if seen >= num_examples or limit <= 0:
    return np.zeros((0,), np.int64)
  first, *others = [grain.MapDataset.range(num_examples).shuffle(seed=int(s)) for s in seeds]
  taken = set()
  for order in others:
    taken.update(int(order[i]) for i in range(seen))
  out = []
  for i in range(seen, num_examples):
    index = int(first[i])
    if index not in taken:
      out.append(index)
      if len(out) == limit:
        break
  return np.sort(np.asarray(out, np.int64))


def held_out(config) -> judge.JudgeImages:
  """The held-out training images every method's candidates are scored on: the first
  `finetune.lr_select_images` images of `data.holdout_split` where it is set (kept out of every
  training, the float one included), else up to that many training images that no QAT method's
  batches reach. FlexiQ's
  finetunings draw their batches with seed + FLEXIQ_SEED_OFFSET and the QAT baselines with seed +
  BASELINE_SEED_OFFSET, and no method runs more steps than the pass-matched budget at one pass a
  step (`finetune.pass_matched_steps`), so the images beyond that budget in both streams are seen
  by none. Preprocessed with the eval transform, as the judge's.

  Args:
    config: a run.py config.

  Returns:
    The JudgeImages (images, labels, a description of the source).

  Raises:
    ValueError: fewer than min(lr_select_images, judge.MIN_HELD_OUT) training images are unseen
      (the eval split is never used instead).
  """
  n = int(config.finetune.lr_select_images)
  if config.data.get("holdout_split"):
    return judge.holdout_images(config, n)
  train_ds = data.get_dataset(config.data, config.data.train_split)
  steps = finetune_lib.pass_matched_steps(config.finetune, train_ds.num_examples, passes=1)
  seeds = (config.seed + finetune_lib.FLEXIQ_SEED_OFFSET, config.seed + finetune_lib.BASELINE_SEED_OFFSET)
  idx = unseen_by_all(train_ds.num_examples, config.finetune.batch_size, steps, seeds, n)
  if len(idx) < min(n, judge.MIN_HELD_OUT):
    raise ValueError(f"finetune.lr_grid needs held-out training images, but the QAT methods' {steps} steps of "
                     f"{config.finetune.batch_size} images reach all but {len(idx)} of the "
                     f"{train_ds.num_examples} training images; lower finetune.num_epochs or set finetune.lr_grid=()")
  batch = train_ds.load(idx, None)
  source = f"{len(idx)} training images no QAT method's batches reach ({config.data.train_split} split)"
  return judge.JudgeImages(batch["image"], batch["label"], source)


def score(points: dict, float_logits_fn: Callable, held: judge.JudgeImages, batch_size: int) -> dict:
  """Top-1 and KL to float of a trained candidate on the held-out images, at each of its points.

  Args:
    points: {name: (logits_fn, args)}: the point's logits are `logits_fn(images, *args)` (each
      distinct function is compiled once).
    float_logits_fn: images -> the float model's logits.
    held: the held-out images (`held_out`).
    batch_size: images per forward pass.

  Returns:
    {name: {'top1': %, 'kl': mean KL(float || candidate)}}.
  """
  compiled = {}
  out = {}
  for name, (logits_fn, args) in points.items():
    if id(logits_fn) not in compiled:
      def sums(x, y, *args, logits_fn=logits_fn):
        ref = jax.nn.log_softmax(float_logits_fn(x).astype(jnp.float32))
        z = jax.nn.log_softmax(logits_fn(x, *args).astype(jnp.float32))
        return jnp.sum(jnp.argmax(z, -1) == y), jnp.sum(jnp.exp(ref) * (ref - z))
      compiled[id(logits_fn)] = jax.jit(sums)
    hits = kl = 0.0
    for i in range(0, len(held.labels), batch_size):
      h, k = compiled[id(logits_fn)](jnp.asarray(held.images[i:i + batch_size]),
                                     jnp.asarray(held.labels[i:i + batch_size]), *args)
      hits, kl = hits + float(h), kl + float(k)
    out[name] = {"top1": 100.0 * hits / len(held.labels), "kl": kl / len(held.labels)}
  return out


def criterion(scores: dict, points) -> tuple[float, float]:
  """The sort key of a candidate (higher is better): mean held-out top-1 over `points`, then the
  lower mean KL to float; a non-finite KL ranks last.

  Args:
    scores: {point: {'top1', 'kl'}} of `score`.
    points: the points the criterion averages over.

  Returns:
    (mean top-1, -mean KL), or (-inf, -inf) for a non-finite figure.
  """
  top1 = float(np.mean([scores[p]["top1"] for p in points]))
  kl = float(np.mean([scores[p]["kl"] for p in points]))
  if not (math.isfinite(top1) and math.isfinite(kl)):
    return (-math.inf, -math.inf)
  return (top1, -kl)


def describe(points) -> str:
  """The criterion in words, for the records and tables."""
  where = " and ".join(str(p) for p in points)
  mean = "mean " if len(points) > 1 else ""
  return f"{mean}held-out top-1 at {where}, ties by the lower {mean}KL to float"


def choose(config, directory: str, points, train_and_score: Callable) -> tuple[float, str, dict]:
  """Trains and scores a candidate per rate of the grid (or reuses a finished one) and picks the
  best by `criterion` (the lowest rate on a tie). While the best is the smallest or largest rate
  tried, up to `finetune.lr_grid_extend` rates are added one step beyond that edge (`next_rate`).

  Args:
    config: a run.py config with a non-empty `finetune.lr_grid`.
    directory: the method's directory; candidate r lives in <directory>/lr_<r>.
    points: the names of the scores `criterion` averages over (e.g. ('1',)); None: every point scored.
    train_and_score: `(rate, candidate_dir, held) -> scores` ({point: {'top1', 'kl'}}, every
      point of `points` among them): trains (or resumes) the method at `rate` in `candidate_dir`,
      keeps its result there and scores it with `score` on `held`.

  Returns:
    (the chosen rate, its candidate directory, the selection record: 'grid' (every rate tried,
    ascending), 'configured_grid', 'added', 'criterion', 'points', 'images', 'num_images',
    'candidates' [{'learning_rate', 'scores', 'top1', 'kl'}], 'chosen'). A candidate whose training
    failed (`train.NonFiniteError`: NaN, or a loss that diverged) has scores, top-1 and KL None and
    'failed' (the reason); it is not eligible, and it ends the growth of the grid past its edge.

  Raises:
    train.NonFiniteError: every candidate failed.
  """
  configured = grid(config)
  held = held_out(config)
  found = {}  # rate -> (candidate, path)

  def run(rate):
    stage = stage_cache.Stage(directory, candidate_name(rate), {"learning_rate": rate, **config_fields(config)})
    stage.begin(resumable=True)
    if stage.is_done():
      done = records.read_json(stage.file("done.json"))
      outcome = {k: done[k] for k in ("scores", "failed") if k in done}
      print(f"lr selection: reusing the finished candidate at lr {rate:g} in {stage.path}"
            + (" (its training failed)" if outcome.get("failed") else ""))
    else:
      try:
        outcome = {"scores": train_and_score(rate, stage.path, held)}
      except train_lib.NonFiniteError as e:  # diverged or NaN: this rate loses, the others still count
        outcome = {"scores": None, "failed": str(e)}
        print(f"lr selection: the candidate at lr {rate:g} failed and is not eligible: {e}")
      stage.mark_done(**outcome)
    found[rate] = ({"learning_rate": rate, **outcome}, stage.path)

  def best_rate():
    rates = sorted(found)
    ok = [r for r in rates if found[r][0]["scores"] is not None]
    if not ok:
      raise train_lib.NonFiniteError(
          f"every learning-rate candidate in {directory} failed ({', '.join(f'{r:g}' for r in rates)}): "
          + found[rates[0]][0]["failed"] + " Lower finetune.lr_grid.")
    return rates, max(ok, key=lambda r: criterion(found[r][0]["scores"], points))  # ties: the lowest rate

  for rate in configured:
    run(rate)
  scored = [found[r][0]["scores"] for r in configured if found[r][0]["scores"] is not None]
  points = tuple(points or (scored[0] if scored else ()))
  added = []
  rates, best = best_rate()
  # An edge that wins says the grid stopped short: one more rate beyond it, while extensions remain.
  while len(added) < extension(config) and best in (rates[0], rates[-1]) and len(rates) >= 2:
    rate = next_rate(rates, upward=best == rates[-1])
    print(f"lr selection: lr {best:g} at the grid's edge won; trying lr {rate:g}")
    run(rate)
    added.append(rate)
    rates, best = best_rate()
  candidates = [found[r][0] for r in rates]
  for c in candidates:
    if c["scores"] is None:
      c.update(top1=None, kl=None)
      continue
    top1, neg_kl = criterion(c["scores"], points)
    c.update(top1=top1, kl=-neg_kl)
  record = {"grid": rates, "configured_grid": list(configured), "added": added, "criterion": describe(points),
            "points": [str(p) for p in points], "images": held.source, "num_images": int(len(held.labels)),
            "candidates": candidates, "chosen": best}
  records.write_json_atomic(os.path.join(directory, RECORD_FILE), {**records.run_info(), **record})
  print(f"lr selection in {directory}: chose lr {best:g} of {', '.join(f'{r:g}' for r in rates)} ("
        + "; ".join(f"{c['learning_rate']:g}: " + (f"top-1 {c['top1']:.2f}%, KL {c['kl']:.4g}" if c["scores"] is not None
                                                    else "failed") for c in candidates)
        + f"; {record['criterion']} on {held.source})")
  return best, found[best][1], record


def summary(record: dict | None) -> str:
  """One phrase for a row's setting or a table note: 'lr 0.001 chosen on 1000 held-out training
  images from {0.0003, 0.001, 0.003}' ('' without a record).

  Args:
    record: a selection record of `choose`, or None.

  Returns:
    The phrase.
  """
  if not record:
    return ""
  added = record.get("added") or []
  failed = [c["learning_rate"] for c in record.get("candidates", ()) if c.get("failed")]
  return (f"lr {record['chosen']:g} chosen on {record['num_images']} held-out training images from "
          "{" + ", ".join(f"{r:g}" for r in record["grid"]) + "}"
          + (f" ({', '.join(f'{r:g}' for r in added)} added beyond an edge that won)" if added else "")
          + (f" ({', '.join(f'{r:g}' for r in failed)} diverged)" if failed else ""))
