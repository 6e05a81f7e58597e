r"""AIMET's Automatic Mixed Precision (aimet-torch, CPU) and flexiq_jax.layerwise side by side on the
same small float CNN, calibration images and scoring images (real Fashion-MNIST).

aimet-torch is not a project requirement. It was installed outside the venv, without letting pip
touch torch (torch 2.13 CPU stays):
  pip install --no-deps --target /tmp/aimet_site aimet-torch==2.42.0 <its missing deps, see the .md>
The venv's torchvision (a CUDA-linked PyPI wheel) cannot load its C ops under CPU torch, and
aimet_torch imports torchvision at import time (datasets/transforms, and two op types in an ONNX
name table), so this script installs a minimal pure-Python `torchvision` stand-in before importing
aimet (nothing here uses torchvision).

  PYTHONPATH=/tmp/aimet_site python -m experiments.aimet_side_by_side [--out=PATH] [--data_dir=DIR]

(from the repository root). Writes experiments/results/aimet_side_by_side.{json,md} (--out: the
path without extension): both chosen configurations, accuracies and wall times, or the exact error
if aimet cannot run. The flexiq_jax side is `flexiq_jax.layerwise.driver.layerwise_search` on the
Flax twin's typed float model and calibration, in a fresh temporary directory.
"""

import argparse
import os
import sys
import time
import traceback
import types

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aimet_side_by_side")
DATA_DIR = "/usr/share/datasets/fashion-mnist"
CANDIDATES = ("W8A8", "W4A8", "W4A4")
ALLOWED_DROP = 1.0  # top-1 points below float on the scoring images
NUM_CALIB, NUM_SCORE, NUM_TEST = 256, 1000, 10000


def stub_torchvision():
  tv = types.ModuleType("torchvision")
  for name in ("datasets", "transforms", "ops"):
    sub = types.ModuleType(f"torchvision.{name}")
    setattr(tv, name, sub)
    sys.modules[f"torchvision.{name}"] = sub
  tv.transforms.Resize = type("Resize", (), {})
  tv.ops.RoIPool = type("RoIPool", (), {})
  sys.modules["torchvision"] = tv


def load_data(d=DATA_DIR):
  from flexiq_jax.data import fashion_mnist
  (xtr, ytr), (xte, yte) = fashion_mnist.load("train", d), fashion_mnist.load("test", d)
  norm = lambda x: ((x.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[..., None]  # NHWC
  return norm(xtr), ytr.astype(np.int64), norm(xte), yte.astype(np.int64)


def torch_model():
  import torch.nn as tnn
  return tnn.Sequential(tnn.Conv2d(1, 16, 3, 2, 1), tnn.ReLU(), tnn.Conv2d(16, 32, 3, 2, 1), tnn.ReLU(),
                        tnn.Conv2d(32, 32, 3, 1, 1), tnn.ReLU(), tnn.Flatten(), tnn.Linear(32 * 7 * 7, 10))


def train_torch(model, x, y, steps=600, batch=128):
  import torch
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
  rng = np.random.default_rng(0)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(y)
  for _ in range(steps):
    idx = torch.from_numpy(rng.integers(0, len(x), batch))
    loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
  return model.eval()


def flax_twin(tmodel):
  """The same network in Flax (NHWC; the flatten is done in NCHW order to match torch)."""
  import flax.linen as nn
  import jax.numpy as jnp

  class Twin(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Conv(16, (3, 3), 2, padding=((1, 1), (1, 1)), name="c0")(x))
      x = nn.relu(nn.Conv(32, (3, 3), 2, padding=((1, 1), (1, 1)), name="c1")(x))
      x = nn.relu(nn.Conv(32, (3, 3), 1, padding=((1, 1), (1, 1)), name="c2")(x))
      x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
      return nn.Dense(10, name="fc")(x)

  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  conv = lambda i: {"kernel": sd[f"{i}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"{i}.bias"]}
  params = {"c0": conv(0), "c1": conv(2), "c2": conv(4), "fc": {"kernel": sd["7.weight"].T, "bias": sd["7.bias"]}}
  return Twin(), {"params": params}


def top1_np(logits, y):
  return float(100.0 * np.mean(np.argmax(np.asarray(logits), -1) == y))


def layerwise_config():
  """The settings of the search, as the config section `driver.layerwise_search` reads (phase 1:
  SQNR on 128 calibration images; phases 2/3: top-1 on the scoring images, binary search, only the
  Pareto points phase 3 probes are scored)."""
  import ml_collections
  config = ml_collections.ConfigDict()
  config.layerwise = ml_collections.ConfigDict({
      "candidates": CANDIDATES, "baseline": "W8A8", "act_range": "minmax", "weight_range": "minmax",
      "sensitivity_images": 128, "score_split": "train", "score_examples": NUM_SCORE,
      "allowed_drop": ALLOWED_DROP, "search": "binary", "phase2_full": False, "flexiq_ratios": (0.0,)})
  return config


def run_ours(model, variables, calib, xs, ys, xte, yte):
  import tempfile

  import jax
  from flexiq_jax import calibrate as calibrate_lib
  from flexiq_jax import quantize
  from flexiq_jax.layerwise import apply as apply_lib
  from flexiq_jax.layerwise import driver
  from flexiq_jax.stage_results import Calibration, FloatModel
  t0 = time.perf_counter()
  float_model = FloatModel(model, variables)
  plan = quantize.build_plan(model, variables, (28, 28, 1), keep_8bit=())  # no BatchNorm: nothing folds
  stats = calibrate_lib.calibrate(model, plan, variables, [calib])
  calibration = Calibration(plan.with_signedness(stats), variables, stats)
  score_data = [{"image": xs, "label": ys.astype(np.int32)}]
  res = driver.layerwise_search(layerwise_config(), tempfile.mkdtemp(), float_model, calibration, [calib],
                                score_data=score_data)
  seconds = time.perf_counter() - t0
  logits = jax.jit(apply_lib.make_apply(model, calibration.plan))
  test = top1_np(logits(variables, res.tables, res.weight_bits, res.act_bits, xte), yte)
  s = res.summary
  return {"chosen": s["chosen_candidates"], "relative_bops": s["chosen"]["relative_cost"],
          "score_top1": s["chosen"]["score"], "test_top1": test, "seconds": seconds,
          "pareto_evaluations": s["new_evaluations"], "sensitivity": s["sensitivity"]}


def run_aimet(tmodel, calib, xs, ys, xte, yte):
  import torch
  stub_torchvision()
  from aimet_torch.common.defs import CallbackFunc, QuantizationDataType
  from aimet_torch.mixed_precision import choose_mixed_precision
  from aimet_torch.quantsim import QuantizationSimModel
  from aimet_torch.amp.mixed_precision_algo import EvalCallbackFactory
  t0 = time.perf_counter()
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  c, s = nchw(calib), nchw(xs)
  dummy = c[:1]
  sim = QuantizationSimModel(tmodel, dummy, default_param_bw=8,
                             default_output_bw=8)
  fwd = lambda m, _=None: m(c)
  sim.compute_encodings(fwd, None)
  int_ = QuantizationDataType.int
  cand = {"W8A8": ((8, int_), (8, int_)), "W4A8": ((8, int_), (4, int_)), "W4A4": ((4, int_), (4, int_))}
  loader = [(c[i:i + 64],) for i in range(0, 128, 64)]
  phase1 = EvalCallbackFactory(loader, forward_fn=lambda m, b: m(b[0])).sqnr()

  def phase2(m, _=None):
    with torch.no_grad():
      return top1_np(m(s).numpy(), ys)

  results_dir = os.path.join("/tmp", "aimet_amp_results")
  wrap = lambda f: f if isinstance(f, CallbackFunc) else CallbackFunc(f, None)
  pareto = choose_mixed_precision(sim, dummy, [cand[k] for k in CANDIDATES], wrap(phase1), wrap(phase2),
                                  ALLOWED_DROP, results_dir, True, wrap(fwd))
  seconds = time.perf_counter() - t0
  chosen = {}
  for name, module in sim.model.named_modules():
    if hasattr(module, "param_quantizers") and "weight" in getattr(module, "param_quantizers", {}):
      wq = module.param_quantizers["weight"]
      iq = module.input_quantizers[0] if getattr(module, "input_quantizers", None) else None
      chosen[name] = {"weight_bits": getattr(wq, "bitwidth", None),
                      "input_bits": getattr(iq, "bitwidth", None) if iq is not None else None}
  with torch.no_grad():
    test = top1_np(sim.model(nchw(xte)).numpy(), yte)
  return {"chosen": chosen, "test_top1": test, "seconds": seconds,
          "pareto": [[float(p[0]), float(p[1]), str(p[2]), str(p[3])] for p in (pareto or [])]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=OUT, help="output path without extension; .json and .md are written")
  parser.add_argument("--data_dir", default=DATA_DIR, help="the Fashion-MNIST IDX files")
  parser.add_argument("--helpfull", action="help", help=argparse.SUPPRESS)  # as the absl scripts
  args = parser.parse_args(argv)
  import torch
  torch.manual_seed(0)
  from flexiq_jax import records
  command = ["-m", __spec__.name] if __spec__ is not None else sys.argv[:1]  # as typed, not the file path
  info = records.run_info(command + (sys.argv[1:] if argv is None else list(argv)))
  xtr, ytr, xte, yte = load_data(args.data_dir)
  rng = np.random.default_rng(0)
  calib = xtr[np.sort(rng.choice(len(xtr), NUM_CALIB, replace=False))]
  xs, ys = xtr[-NUM_SCORE:], ytr[-NUM_SCORE:]
  xte, yte = xte[:NUM_TEST], yte[:NUM_TEST]
  tmodel = train_torch(torch_model(), xtr[:-NUM_SCORE], ytr[:-NUM_SCORE])
  with torch.no_grad():
    float_test = top1_np(tmodel(torch.from_numpy(xte.transpose(0, 3, 1, 2).copy())).numpy(), yte)
  model, variables = flax_twin(tmodel)
  twin_test = top1_np(model.apply(variables, xte), yte)
  out = {**info, "float_test_top1_torch": float_test, "float_test_top1_flax": twin_test,
         "candidates": CANDIDATES, "allowed_drop": ALLOWED_DROP, "num_calib": NUM_CALIB, "num_score": NUM_SCORE}
  out["flexiq_jax"] = run_ours(model, variables, calib, xs, ys, xte, yte)
  try:
    out["aimet"] = run_aimet(tmodel, calib, xs, ys, xte, yte)
  except Exception as e:  # record exactly why aimet could not run
    out["aimet_error"] = "".join(traceback.format_exception(e))[-4000:]
  records.write_json_atomic(args.out + ".json", out)
  lines = [f"# AIMET AMP vs flexiq_jax.layerwise side by side\n", records.provenance_header(out),
           f"Small CNN (3 convs + linear) trained in torch on Fashion-MNIST, converted to Flax: float test top-1 "
           f"{float_test:.2f}% (torch) / {twin_test:.2f}% (flax). Candidates {', '.join(CANDIDATES)}, allowed drop "
           f"{ALLOWED_DROP} top-1 points on {NUM_SCORE} held-out training images; phase 1 on 128 of {NUM_CALIB} "
           f"calibration images (SQNR).\n"]
  ours = out["flexiq_jax"]
  lines.append(f"## flexiq_jax.layerwise\n\nchosen: `{ours['chosen']}`  \nrelative BOPs {ours['relative_bops']:.3f}, "
               f"test top-1 {ours['test_top1']:.2f}%, wall time {ours['seconds']:.1f} s\n")
  if "aimet" in out:
    a = out["aimet"]
    lines.append(f"## AIMET AMP\n\nchosen: `{a['chosen']}`  \ntest top-1 {a['test_top1']:.2f}%, wall time "
                 f"{a['seconds']:.1f} s\n")
  else:
    lines.append("## AIMET AMP: could not run here\n\n```\n" + out["aimet_error"] + "\n```\n")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
