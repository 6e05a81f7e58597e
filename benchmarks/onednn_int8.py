r"""The integer path on oneDNN's int8 kernels beside XLA float32, the XLA integer path and PyTorch
int8 (FX quantization, x86 backend), in one process, same threads, interleaved rounds.

  python -m benchmarks.onednn_int8 --nets=quickstart,mobilenetv2,resnet18:full --batch=16 --rounds=5

Run from the repository root. Each JAX net is built from its config with random weights and
quantized on random images (the greedy selector; speed does not depend on the values, except for
the oneDNN library's 'single' mode on CPUs without VNNI, whose remainder grows with the share of
activation codes outside the low range: the results give that share); PyTorch's
twin (torchvision's ResNet-18/50 and MobileNetV2 for `resnet18:full`, `resnet50:full` and
`mobilenetv2:full`; none for the others) gets
random weights and is calibrated on random images. Every alternative is called once per round in
rotating order; the table gives medians. Variants of the integer path: the XLA kernels (the
backend's default per conv), every conv and dense layer on oneDNN, and (models with depthwise or
grouped convs) oneDNN for those convs only, and (--split) the oneDNN model with every layer split at
ratio 0, and (where the model has requantization edges) the oneDNN model with float outputs between
every pair of layers (`fuse_requant=False`, ratio 0), and (where the model has `ResidualAdd`s fused
into its convs) the oneDNN model with its residual sums added by XLA (`fuse_residual=False`, ratio
0), and (where the model has residual sums read by a quantized layer) the oneDNN model with the
8-bit residual stream (`residual_codes=True`: other numerics, each such sum kept on its reader's 8-bit
grid, as PyTorch's int8 models keep it; its logits checked against the XLA integer path with the
same stream); a --baseline_library runs the model with neither fusion (its library has the plain targets only). Also counted: compilations while the oneDNN model switches
ratios (must be 0). Writes benchmarks/results/<--results_name>.{json,md} with the command, commit,
CPU model, load average and date.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import api
from flexiq_jax import host_memory
from flexiq_jax import quantize
from flexiq_jax import records
from flexiq_jax.quantize import onednn
from flexiq_jax.serve import count_compilations

from benchmarks import integer_path
from benchmarks.integer_path import cpu_model
from benchmarks import torch_int8

_NETS = flags.DEFINE_list("nets", ["quickstart", "mobilenetv2", "resnet18:full"],
                          "'quickstart', '<config>' (its :fmnist variant) or '<config>:full' (224 px).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (every alternative once per round).")
_THREADS = flags.DEFINE_integer("threads", 2, "PyTorch's intra-op threads (XLA and oneDNN use the machine's cores).")
_OUT = flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")
_BASELINE = flags.DEFINE_string(
    "baseline_library", None, "Also time the oneDNN model (every ratio) on this other build of the kernel library "
    "(e.g. one compiled from an earlier commit's csrc/onednn/src/onednn_ffi.cc), registered under its own FFI "
    "targets: a before/after comparison in one process. Its FFI handlers must take the same operands and attributes.")
_BASELINE_NOTE = flags.DEFINE_string("baseline_note", None, "How the baseline library was built (for the results).")
_NAME = flags.DEFINE_string("results_name", "onednn_int8_cpu", "The results files' name (<name>.json and <name>.md in "
                            "--results_dir): runs of other nets or batches get files of their own.")
_SPLIT = flags.DEFINE_bool("split", True, "Also time the oneDNN model with every layer in the library's 'split' mode "
                           "(ratio 0): the exact mode on CPUs without VNNI before 'single'.")
RATIOS = (0.0, 0.5, 1.0)


@functools.cache
def baseline_targets(path: str) -> tuple[str, str]:
  """(conv, matmul) FFI target names of the kernel library at `path`, registered for the CPU."""
  onednn.available()  # loads oneDNN (libdnnl.so.3) first, which the other build links against
  lib = ctypes.CDLL(path)
  names = (onednn.CONV_TARGET + "_baseline", onednn.MATMUL_TARGET + "_baseline")
  jax.ffi.register_ffi_target(names[0], jax.ffi.pycapsule(lib.FlexiqOnednnConv), platform="cpu")
  jax.ffi.register_ffi_target(names[1], jax.ffi.pycapsule(lib.FlexiqOnednnMatmul), platform="cpu")
  return names


def compiled_on_library(qm, svars, images, ratio, path: str):
  """`qm.apply` compiled for (svars, images, ratio) with its custom calls on the library at `path`."""
  saved = onednn.CONV_TARGET, onednn.MATMUL_TARGET
  onednn.CONV_TARGET, onednn.MATMUL_TARGET = baseline_targets(path)
  try:
    # A function object of its own: JAX's trace cache is keyed by the function, not by the targets.
    return jax.jit(lambda *a: qm.apply(*a)).lower(svars, images, ratio).compile()
  finally:
    onednn.CONV_TARGET, onednn.MATMUL_TARGET = saved


TORCHVISION_TWINS = {"resnet18": "resnet18", "resnet50": "resnet50", "mobilenetv2": "mobilenet_v2"}


def torch_twin(spec: str):
  """(float torch model, int8 FX model, int8 FX model with full-range activations) for a
  full-size config with a torchvision twin of the same architecture (TORCHVISION_TWINS), or None."""
  name = spec.split(":")[0]
  if not spec.endswith(":full") or name not in TORCHVISION_TWINS:
    return None
  import torch
  from torch.ao.quantization import get_default_qconfig_mapping
  from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  import timm_reference  # torchvision beside the CPU-only torch
  torchvision = timm_reference.import_torchvision()
  torch.manual_seed(0)
  model = getattr(torchvision.models, TORCHVISION_TWINS[name])(weights=None).eval()
  torch.backends.quantized.engine = "x86"
  example = torch.randn(_BATCH.value, 3, 224, 224)
  converted = []
  for mapping in (get_default_qconfig_mapping("x86"), torch_int8.full_range_qconfig_mapping()):
    torch.manual_seed(0)
    prepared = prepare_fx(copy.deepcopy(model), mapping, example_inputs=(example,))
    with torch.inference_mode():
      for _ in range(2):
        prepared(torch.randn(8, 3, 224, 224))
    converted.append(convert_fx(prepared))
  return (model, *converted)


def run_net(spec: str, batch: int, rounds: int) -> dict:
  """Times one net's alternatives; returns its results entry."""
  full = spec.endswith(":full")
  subject = integer_path.build_subject(spec.split(":")[0], full)
  calib = np.random.default_rng(0).normal(size=(16,) + subject.image_shape).astype(np.float32)
  qmodel, qvars = api.quantize_model(subject.model, subject.variables, calib, selector="greedy", calib_batch_size=8)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(batch,) + subject.image_shape), jnp.float32)
  float_fn = jax.jit(lambda v, x: subject.model.apply(v, x, train=False))
  fns = {"XLA float32": float_fn}
  args = {"XLA float32": (subject.variables, images)}
  variants = {"XLA int": qmodel,
              "oneDNN int": dataclasses.replace(qmodel, conv_impls="onednn", dense_impl="onednn")}
  grouped = tuple((p, "onednn") for p in qmodel.plan.quantized
                  if qmodel.plan.layers[p].kind == "conv" and qmodel.plan.layers[p].groups > 1)
  if grouped:  # oneDNN only where XLA:CPU is slowest (depthwise and grouped convs), XLA elsewhere
    variants["XLA int + oneDNN grouped"] = dataclasses.replace(qmodel, conv_impls=grouped)
  for label, qm in variants.items():
    svars = jax.jit(qm.prepare)(qvars)
    fn = jax.jit(qm.apply)
    for r in RATIOS:
      fns[f"{label} r={r:g}"] = fn
      args[f"{label} r={r:g}"] = (svars, images, jnp.float32(r))
  onednn_svars = args["oneDNN int r=0"][0]  # the oneDNN model's prepared variables, shared below
  # The oneDNN model with float outputs between every pair of layers (QuantizedModel.fuse_requant).
  unfused = dataclasses.replace(variants["oneDNN int"], fuse_requant=False)
  if variants["oneDNN int"].requant_edges(onednn_svars, images):
    fns["oneDNN int, no requant fusion r=0"] = jax.jit(unfused.apply)
    args["oneDNN int, no requant fusion r=0"] = (onednn_svars, images, jnp.float32(0))
  # The oneDNN model with its residual sums added by XLA (QuantizedModel.fuse_residual).
  if onednn.CONV_ADD_TARGET in fns["oneDNN int r=0"].lower(*args["oneDNN int r=0"]).as_text():
    plain_sums = dataclasses.replace(variants["oneDNN int"], fuse_residual=False)
    fns["oneDNN int, no residual fusion r=0"] = jax.jit(plain_sums.apply)
    args["oneDNN int, no residual fusion r=0"] = (onednn_svars, images, jnp.float32(0))
  # The 8-bit residual stream (QuantizedModel.residual_codes: other numerics, PyTorch int8's form).
  stream_model = dataclasses.replace(variants["oneDNN int"], residual_codes=True)
  stream_diffs = {}
  if stream_model.stream_edges(qvars, images):
    stream_fn, stream_xla = jax.jit(stream_model.apply), jax.jit(dataclasses.replace(qmodel, residual_codes=True).apply)
    stream_svars = jax.jit(stream_model.prepare)(qvars)
    for r in RATIOS:
      fns[f"oneDNN int, 8-bit residual stream r={r:g}"] = stream_fn
      args[f"oneDNN int, 8-bit residual stream r={r:g}"] = (stream_svars, images, jnp.float32(r))
      stream_diffs[f"r={r:g}"] = float(jnp.max(jnp.abs(stream_fn(stream_svars, images, jnp.float32(r))
                                                        - stream_xla(qvars, images, jnp.float32(r)))))
  if _BASELINE.value:  # the same oneDNN model on another build of the library: one compilation, every ratio
    # Without either fusion: the baseline library's conv and matmul targets only.
    baseline_model = dataclasses.replace(unfused, fuse_residual=False)
    baseline_fn = compiled_on_library(baseline_model, onednn_svars, images, jnp.float32(0), _BASELINE.value)
    for r in RATIOS:
      label = f"oneDNN int, baseline library r={r:g}"
      args[label] = (onednn_svars, images, jnp.float32(r))
      fns[label] = baseline_fn
  if _SPLIT.value:  # the same oneDNN model with every layer split (the exact mode before 'single')
    split_model = variants["oneDNN int"]
    svars = onednn_svars
    saved = onednn.auto_mode
    onednn.auto_mode = lambda: "split"
    try:
      fns["oneDNN int split r=0"] = jax.jit(split_model.apply).lower(svars, images, jnp.float32(0)).compile()
    finally:
      onednn.auto_mode = saved
    args["oneDNN int split r=0"] = (svars, images, jnp.float32(0))
  twin = torch_twin(spec)
  if twin is not None:
    import torch
    torch.set_num_threads(_THREADS.value)
    x_torch = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())

    def torch_call(m):
      def call(x):
        with torch.inference_mode():
          return m(x)
      return call
    fns["PyTorch float32"], args["PyTorch float32"] = torch_call(twin[0]), (x_torch,)
    fns["PyTorch int8 (FX, x86)"], args["PyTorch int8 (FX, x86)"] = torch_call(twin[1]), (x_torch,)
    label = "PyTorch int8 (FX, x86, 8-bit activations)"  # reduce_range off: the same codes as ours
    fns[label], args[label] = torch_call(twin[2]), (x_torch,)
  spread = {}
  times = integer_path.median_times(fns, args, rounds, spread)
  # Logit agreement of the oneDNN model with the XLA integer path (same ratio, same variables).
  diffs = {f"r={r:g}": float(jnp.max(jnp.abs(fns[f"oneDNN int r={r:g}"](*args[f"oneDNN int r={r:g}"])
                                              - fns[f"XLA int r={r:g}"](*args[f"XLA int r={r:g}"]))))
           for r in RATIOS}
  # How the library ran the oneDNN model's layers in one call at each ratio (single, split, ...).
  before = onednn.run_counts()
  for r in RATIOS:
    jax.block_until_ready(fns[f"oneDNN int r={r:g}"](*args[f"oneDNN int r={r:g}"]))
  runs = {k: v - before.get(k, 0) for k, v in onednn.run_counts().items()}
  predict = quantize.make_predict(variants["oneDNN int"], qvars)
  jax.block_until_ready(predict(images, 0.0))
  with count_compilations() as compiled:
    for r in np.linspace(0.05, 0.95, 5):
      jax.block_until_ready(predict(images, float(r)))
  return {"name": subject.name + (" (224 px)" if full else ""), "batch": batch, "median_s": times, "iqr_s": spread,
          "max_abs_logit_diff_onednn_vs_xla_int": diffs, "max_abs_logit_diff_stream_onednn_vs_xla_int": stream_diffs,
          "compilations_over_5_ratio_switches": compiled.count,
          "onednn_runs_over_3_calls": runs}


def write_markdown(results: dict, path: str) -> None:
  """The results as a Markdown table per net."""
  info = results["info"]
  lines = ["# oneDNN int8 kernels vs XLA and PyTorch int8 (CPU)", "",
           f"Command: `{info['command']}`  ", f"Commit: {info['commit']}  ", f"Date: {info['date']}  ",
           f"CPU: {info['cpu']}, {info['cores']} cores; oneDNN {info['onednn']}, mode 'auto' runs "
           f"{'fused (VNNI)' if info['onednn_direct'] else 'single (exact without VNNI: one int8 run on the low codes plus the sparse remainder; split where the remainder is dense)'}  ",
           f"Load average at the start: {info['loadavg']} (the machine is shared with other jobs: times are noisy)  ",
           f"Host memory: {info.get('malloc', 'not recorded')} (`flexiq_jax.host_memory`; "
           "PyTorch runs in the same process on the same allocator)", ""]
  if info.get("baseline_library"):
    lines += [f"Baseline library ('oneDNN int, baseline library' rows, the same model and variables): "
              f"{info['baseline_library']}", ""]
  for net in results["nets"]:
    t, iqr = net["median_s"], net["iqr_s"]
    base = t["XLA float32"]
    peer = t.get("PyTorch int8 (FX, x86)")  # the target: time / PyTorch int8's time <= 1
    lines += [f"## {net['name']}, batch {net['batch']}", "",
              "| alternative | median ms | IQR ms | vs XLA float32 |" + (" time / PyTorch int8's |" if peer else ""),
              "| --- | ---: | ---: | ---: |" + (" ---: |" if peer else "")]
    for name in t:
      lines.append(f"| {name} | {1e3 * t[name]:.1f} | {1e3 * iqr[name]:.1f} | {base / t[name]:.2f}x |"
                   + (f" {t[name] / peer:.2f} |" if peer else ""))
    lines += ["", f"Max |logit difference| oneDNN vs XLA integer path: "
              + ", ".join(f"{k}: {v:.2e}" for k, v in net["max_abs_logit_diff_onednn_vs_xla_int"].items())
              + f". Compilations over 5 ratio switches (oneDNN model): {net['compilations_over_5_ratio_switches']}."]
    if net.get("max_abs_logit_diff_stream_onednn_vs_xla_int"):
      lines += ["", "The 8-bit residual stream (`residual_codes=True`, other numerics than the rows above): max "
                "|logit difference| oneDNN vs the XLA integer path with the same stream: "
                + ", ".join(f"{k}: {v:.2e}" for k, v in net["max_abs_logit_diff_stream_onednn_vs_xla_int"].items())
                + "."]
    runs = net.get("onednn_runs_over_3_calls", {})
    if runs:
      share = runs["single_remainders"] / runs["single_inputs"] if runs.get("single_inputs") else 0.0
      lines += ["", "oneDNN layer runs over one call at each ratio: "
                + ", ".join(f"{k} {runs[k]}" for k in ("direct", "split", "single", "depthwise") if k in runs)
                + f"; activation codes the single runs added as the sparse remainder: {100 * share:.2f}%."]
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main(argv):
  del argv
  if not onednn.available():
    raise SystemExit(f"oneDNN kernels unavailable: {onednn.unavailable_reason()}")
  info = records.run_info()
  info.update(malloc=host_memory.state(), cpu=cpu_model(), cores=os.cpu_count(), onednn=onednn.version(),
              onednn_direct=onednn.direct_here(),
              loadavg=records.load_average())
  if _BASELINE.value:
    if not os.path.isfile(_BASELINE.value):
      raise SystemExit(f"error: --baseline_library {_BASELINE.value!r} is not a file")
    info["baseline_library"] = _BASELINE_NOTE.value or _BASELINE.value
  results = {"info": info, "nets": []}
  os.makedirs(_OUT.value, exist_ok=True)
  for spec in _NETS.value:
    print(f"== {spec}", flush=True)
    results["nets"].append(run_net(spec, _BATCH.value, _ROUNDS.value))
    print(results["nets"][-1], flush=True)
    records.write_json_atomic(os.path.join(_OUT.value, _NAME.value + ".json"), results)
    write_markdown(results, os.path.join(_OUT.value, _NAME.value + ".md"))


if __name__ == "__main__":
  host_memory.rerun_with_tcmalloc()  # every alternative on the same allocator (flexiq_jax.host_memory)
  app.run(main)
