r"""The quantized model following a fluctuating load: the ratio chosen per batch at run time.

  python -m experiments.load_following --config=configs/quickstart.py [--workdir=workdirs/quickstart]

Run from the repository root. Reuses (or runs) the pipeline in --workdir (default
workdirs/<config name>[_<args>], as run.py) up to the finetuned quantized model, then simulates a
server with Poisson arrivals whose rate swings between 0.25x and 2.25x what the 8-bit model can
serve. Three policies serve the same arrivals: the controller (flexiq_jax.serve.RatioController,
latency target = `--target_batches` 8-bit batch times), always 8-bit (ratio 0) and always the
lowest precision (ratio 1). Every served batch runs the real model at its ratio on the next test
images, so accuracy is measured; batch *times* come from cost.BopsLatencyModel with t_8bit measured
on this device, i.e. they model a target with 4-bit arithmetic (here the lowered channels run in
the int8 kernels and the measured time is the same at every ratio; both timings are recorded).
Checks that the whole run used one compilation. Writes experiments/results/load_following_<model>
.md/.json/.png (command, commit, device, date).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from flexiq_jax import cli
from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import pipeline
from flexiq_jax import quantize
from flexiq_jax import records
from flexiq_jax import serve

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the pipeline, reused or filled "
                               "(default: workdirs/<config name>[_<args>]).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Requests per served batch.")
_PERIODS = flags.DEFINE_float("periods", 1.0, "Simulated time, in periods of the load.")
_TARGET = flags.DEFINE_float("target_batches", 4.0, "Latency target, in 8-bit batch times.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")
flags.mark_flags_as_required(["config"])


def _median_time(fn, repeats=20):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  config, batch = _CONFIG.value, _BATCH.value
  workdir = cli.start(argv, _WORKDIR.value)
  info = records.run_info(cli.command_argv(__spec__))  # the code that runs is the code at start
  run = pipeline.Run(config, workdir)
  tuned = pipeline.run_until(run, "finetune", evaluate=False).finetuned
  qmodel, qvars = tuned.qmodel, tuned.qvars

  predict = quantize.make_predict(qmodel, qvars)
  test = data.get_dataset(config.data, config.data.eval_split)
  images_all = test.load(np.arange(test.num_examples), None)
  images, labels = images_all["image"], images_all["label"]
  probe = jax.numpy.asarray(images[:batch])
  t8 = _median_time(lambda: predict(probe, 0.0))
  t4_measured = _median_time(lambda: predict(probe, 1.0))
  latency = cost.BopsLatencyModel(t8, lambda r: quantize.relative_bops_at(qmodel, qvars, r))
  capacity8 = batch / t8
  period = 200 * t8
  rate = lambda t: capacity8 * (1.25 + 1.0 * np.sin(2 * np.pi * t / period))
  arrivals = serve.poisson_arrivals(rate, _PERIODS.value * period, max_rate=2.25 * capacity8, seed=config.seed)
  controller = serve.RatioController(latency, target_s=_TARGET.value * t8, batch_size=batch)
  policies = {"controller": controller.choose, "fixed ratio 0 (8-bit)": lambda q, w: 0.0,
              "fixed ratio 1": lambda q, w: 1.0}

  runs = {}
  for name, policy in policies.items():
    correct = np.zeros(len(arrivals), bool)

    def serve_batch(ratio, ids):
      # Request i is test image i (mod the split); always a full batch: one compilation.
      idx = (ids[0] + np.arange(batch)) % len(labels)
      logits = np.asarray(predict(jax.numpy.asarray(images[idx]), ratio))
      correct[ids] = logits[:len(ids)].argmax(-1) == labels[idx[:len(ids)]]

    sim = serve.simulate_load(policy, latency, arrivals, batch, serve=serve_batch)
    runs[name] = {"sim": sim, "top1": 100.0 * float(correct.mean())}
    print(f"{name}: top-1 {runs[name]['top1']:.2f}% on {len(arrivals)} requests, mean ratio "
          f"{sim['ratio'].mean():.2f}, wait p50/p99/max {np.percentile(sim['wait'], 50) / t8:.1f}/"
          f"{np.percentile(sim['wait'], 99) / t8:.1f}/{sim['wait'].max() / t8:.1f} batch times")
  compilations = predict.jitted._cache_size()  # pylint: disable=protected-access

  target = _TARGET.value * t8
  headers = ["policy", "top-1 (%)", "mean ratio", "mean relative batch time", "wait p50 (ms)", "wait p99 (ms)",
             "wait max (ms)", "requests over target (%)"]
  table = []
  for name, r in runs.items():
    s = r["sim"]
    table.append([name, r["top1"], float(s["ratio"].mean()),
                  float(np.mean([latency(x) / t8 for x in s["ratio"]])),
                  1e3 * float(np.percentile(s["wait"], 50)), 1e3 * float(np.percentile(s["wait"], 99)),
                  1e3 * float(s["wait"].max()), 100.0 * float(np.mean(s["wait"] > target))])
  text = (f"# Following a fluctuating load: {config.model.name} on {config.data.name}\n\n"
          + records.provenance_header(info)
          + f"Batch {batch}; 8-bit batch time t8 = {1e3 * t8:.2f} ms measured here (at ratio 1: "
            f"{1e3 * t4_measured:.2f} ms measured, {1e3 * latency(1.0):.2f} ms modelled: batch times in the "
            f"simulation are modelled as t8 x relative BOPs, for a target with 4-bit arithmetic). Arrivals: Poisson, "
            f"rate 0.25x-2.25x the 8-bit capacity ({capacity8:.0f} req/s), period {period:.2f} s. Latency target "
            f"{_TARGET.value:g} x t8 = {1e3 * target:.1f} ms (arrival to answer). "
            f"The same {len(arrivals)} requests ({_PERIODS.value:g} periods) for every policy; request i is "
            f"{config.data.eval_split} image i (mod the split size). Compilations of the quantized apply over all runs: {compilations}.\n\n"
          + records.markdown_table(headers, table))
  print(text)
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"load_following_{config.model.name}")
  with open(stem + ".md", "w") as f:
    f.write(text)
  with open(stem + ".json", "w") as f:
    json.dump({**info, "t8_s": t8, "t_ratio1_measured_s": t4_measured, "target_s": target, "batch_size": batch,
               "num_requests": len(arrivals), "compilations": compilations, "table": dict(headers=headers, rows=table),
               "runs": {n: {"top1": r["top1"], **{k: v.tolist() for k, v in r["sim"].items() if k != "wait"}}
                        for n, r in runs.items()}}, f)
  _plot(runs, rate, target, stem + ".png")
  if compilations != 1:
    raise SystemExit(f"expected one compilation of the quantized apply, got {compilations}")


def _plot(runs, rate, target, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
  sim = runs["controller"]["sim"]
  axes[0].plot(sim["time"], [rate(t) for t in sim["time"]], color="gray")
  axes[0].set_ylabel("arrival rate (req/s)")
  axes[1].step(sim["time"], sim["ratio"], where="post")
  axes[1].set_ylabel("4-bit ratio (controller)")
  for name, r in runs.items():
    axes[2].plot(r["sim"]["time"], 1e3 * r["sim"]["oldest_wait"], label=f"{name} (top-1 {r['top1']:.2f}%)", lw=1)
  axes[2].axhline(1e3 * target, color="k", ls="--", lw=1, label="target")
  axes[2].set_yscale("log")
  axes[2].set_ylabel("wait of oldest (ms)")
  axes[2].set_xlabel("time (s)")
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main)
