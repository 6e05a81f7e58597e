r"""Where the time of the integer path on oneDNN goes, layer by layer, beside PyTorch int8.

  python -m benchmarks.onednn_profile --net=resnet18:full --batch=16 --modes=split,auto

Run from the repository root. One process: the net is built from its config with random weights
and quantized on random images (as benchmarks/onednn_int8.py does); then, after warm-up calls,
one forward pass of each variant runs under JAX's profiler and its executed thunks are summed by
kind: the oneDNN custom calls, XLA's convolutions and the rest of XLA's work (the glue: the
activations' quantize pass, the epilogue outside the custom call, residual adds, ReLUs, pooling).
For the oneDNN variants, oneDNN's own verbose log of one more forward pass gives each primitive's
execution time (the convolution or matmul itself, and the weight reorders); the rest of the custom
call is the library's own work around the primitive (shifted copies, residual corrections,
combining, the epilogue loop). The PyTorch twin (FX int8, x86 backend; ResNets only) is profiled
with torch.profiler on the same batch: its quantized convolutions, adds and quantize steps.

Variants: 'XLA int' (the backend's default convs) and 'oneDNN <mode>' for each of --modes (every
conv and dense layer on oneDNN, the library run in that mode). Writes
benchmarks/results/onednn_profile_cpu.{json,md} with the command, commit, CPU and load average.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import api
from flexiq_jax import host_memory
from flexiq_jax import records
from flexiq_jax.quantize import onednn

from benchmarks import integer_path
from benchmarks import onednn_int8

_NET = flags.DEFINE_string("net", "resnet18:full", "'quickstart', '<config>' (:fmnist) or '<config>:full'.")
_MODES = flags.DEFINE_list("modes", ["split", "auto"], "oneDNN library modes to profile (onednn.MODES).")
_STREAM = flags.DEFINE_bool("residual_codes", False, "Also profile the oneDNN model with the 8-bit residual stream "
                             "(`QuantizedModel.residual_codes`, mode 'auto').")
_RATIO = flags.DEFINE_float("ratio", 0.0, "The 4-bit ratio of the profiled calls.")
_REPORT_ONLY = integer_path._REPORT_ONLY  # --report_only: profile nothing, rewrite the Markdown from the JSON
_CALLS = flags.DEFINE_integer("calls", 3, "Untraced timed calls per variant (median reported).")
# --batch, --threads and --results_dir are benchmarks/onednn_int8.py's flags (imported above).
_BATCH, _THREADS, _OUT = onednn_int8._BATCH, onednn_int8._THREADS, onednn_int8._OUT


def thunk_times(fn, args, verbose: bool = False):
  """([(thunk name, ms)] of one traced call of `fn` in execution order (XLA:CPU's thunks), and, with
  `verbose`, oneDNN's verbose log of the same call ([] otherwise))."""
  prims = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      if verbose:
        prims = onednn_verbose(fn, args)
      else:
        jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  op = re.compile(r"^[a-z][a-z0-9_.\-]*$")  # XLA's instruction names (host-side events have others)
  out = [(e["ts"], e["name"], e["dur"] / 1e3) for e in events
         if e.get("ph") == "X" and "dur" in e and op.match(e["name"])]
  return [(name, ms) for _, name, ms in sorted(out)], prims


def thunk_kind(name: str) -> str:
  if name.startswith(("ffi_call", "custom-call", "custom_call")):
    return "oneDNN custom calls"
  if "convolution" in name or name.startswith("ynn") or "dot" in name:
    return "XLA conv/dot"
  return "XLA other (glue)"


@contextlib.contextmanager
def capture_fd1():
  """Captures what C code writes to file descriptor 1 (oneDNN's verbose log) into a list of lines."""
  lines = []
  sys.stdout.flush()
  saved = os.dup(1)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 1)
    try:
      yield lines
    finally:
      libc = ctypes.CDLL(None)
      libc.fflush(None)
      os.dup2(saved, 1)
      os.close(saved)
      tmp.seek(0)
      lines.extend(tmp.read().decode(errors="replace").splitlines())


def onednn_verbose(fn, args) -> list[tuple[str, str, float]]:
  """[(primitive kind, shape description, ms)] of one call of `fn`, from oneDNN's verbose log."""
  dnnl = ctypes.CDLL("libdnnl.so.3")  # already loaded by the kernel library
  with capture_fd1() as lines:
    dnnl.dnnl_set_verbose(1)
    jax.block_until_ready(fn(*args))
    dnnl.dnnl_set_verbose(0)
  out = []
  for line in lines:
    parts = line.split(",")
    if len(parts) > 4 and parts[0] == "onednn_verbose" and parts[1] == "exec":
      out.append((parts[3], parts[-2], float(parts[-1])))
  return out


def torch_profile(model, x) -> list[tuple[str, str, float]]:
  """[(op name, input shapes, ms)] of the top-level ATen/quantized ops of one forward pass, in order."""
  import torch
  from torch.profiler import ProfilerActivity, profile
  with torch.inference_mode():
    model(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
      model(x)
  events = [e for e in prof.events() if e.cpu_parent is None]
  events.sort(key=lambda e: e.time_range.start)
  return [(e.name, str(e.input_shapes), e.time_range.elapsed_us() / 1e3) for e in events]


def problem_key(desc: str):
  """(ic, oh, kh, sh) of a oneDNN conv problem string (the output channels differ in split mode,
  the input height where the input comes padded)."""
  m = re.search(r"ic(\d+)oc\d+_ih\d+oh(\d+)kh(\d+)sh(\d+)", desc)
  return tuple(int(v) for v in m.groups()) if m else None


def main(argv):
  del argv
  if _REPORT_ONLY.value:
    path = os.path.join(_OUT.value, "onednn_profile_cpu.json")
    with open(path) as f:
      results = json.load(f)
    results["info"]["markdown_rewritten_by"] = records.run_info()["command"]
    write_markdown(results, os.path.join(_OUT.value, "onednn_profile_cpu.md"))
    return
  if not onednn.available():
    raise SystemExit(f"error: oneDNN kernels unavailable: {onednn.unavailable_reason()}")
  info = records.run_info()
  info.update(malloc=host_memory.state(), cpu=integer_path.cpu_model(), cores=os.cpu_count(), onednn=onednn.version(),
              loadavg=records.load_average())
  spec, batch = _NET.value, _BATCH.value
  full = spec.endswith(":full")
  subject = integer_path.build_subject(spec.split(":")[0], full)
  calib = np.random.default_rng(0).normal(size=(16,) + subject.image_shape).astype(np.float32)
  qmodel, qvars = api.quantize_model(subject.model, subject.variables, calib, selector="greedy", calib_batch_size=8)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(batch,) + subject.image_shape), jnp.float32)
  ratio = jnp.float32(_RATIO.value)
  variants = {"XLA int": (qmodel, None)}
  for mode in _MODES.value:
    if mode not in onednn.MODES:
      raise SystemExit(f"error: unknown mode {mode!r}; use one of {tuple(onednn.MODES)}")
    variants[f"oneDNN {mode}"] = (dataclasses.replace(qmodel, conv_impls="onednn", dense_impl="onednn"), mode)
  if _STREAM.value:  # other numerics: its logits differ from the XLA integer path's by the stream's rounding
    variants["oneDNN auto, 8-bit residual stream"] = (
        dataclasses.replace(qmodel, conv_impls="onednn", dense_impl="onednn", residual_codes=True), "auto")
  results = {"info": info, "net": subject.name, "batch": batch, "ratio": _RATIO.value, "variants": {}}
  reference = None
  for label, (qm, mode) in variants.items():
    print(f"== {label}", flush=True)
    svars = jax.jit(qm.prepare)(qvars)
    saved = onednn.auto_mode
    if mode is not None:  # trace this variant's custom calls with the mode asked for
      onednn.auto_mode = lambda m=mode: m if m != "auto" else saved()
    try:
      fn = jax.jit(qm.apply).lower(svars, images, ratio).compile()
    finally:
      onednn.auto_mode = saved
    out = fn(svars, images, ratio)
    if reference is None:
      reference = out
    for _ in range(2):
      jax.block_until_ready(fn(svars, images, ratio))
    walls = []
    for _ in range(_CALLS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(svars, images, ratio))
      walls.append(1e3 * (time.perf_counter() - t0))
    before = onednn.run_counts()
    thunks, prims = thunk_times(fn, (svars, images, ratio), verbose=mode is not None)
    runs = {k: v - before.get(k, 0) for k, v in onednn.run_counts().items()}
    by_kind = collections.defaultdict(float)
    for name, ms in thunks:
      by_kind[thunk_kind(name)] += ms
    entry = {"wall_ms": float(np.median(walls)), "thunks_ms": dict(by_kind),
             "max_abs_logit_diff_vs_xla_int": float(jnp.max(jnp.abs(out - reference)))}
    if mode is not None:
      kinds = collections.defaultdict(float)
      for kind, _, ms in prims:
        kinds[kind] += ms
      entry["onednn_primitives_ms"] = dict(kinds)
      entry["runs"] = runs
      # Per custom call: its thunk time, and the primitives (and reorders) its log lines name.
      calls = [ms for name, ms in thunks if thunk_kind(name) == "oneDNN custom calls"]
      layers, pending = [], []
      for kind, desc, ms in prims:
        pending.append((kind, desc, ms))
        if kind in ("convolution", "matmul"):
          layers.append(pending)
          pending = []
      if len(layers) == len(calls):  # one primitive per call (not so for split depthwise layers)
        entry["layers"] = [{"problem": next(d for k, d, _ in ls if k in ("convolution", "matmul")),
                            "call_ms": c, "primitive_ms": sum(m for k, _, m in ls if k != "reorder"),
                            "reorder_ms": sum(m for k, _, m in ls if k == "reorder")}
                           for ls, c in zip(layers, calls)]
    results["variants"][label] = entry
    print(json.dumps({k: v for k, v in entry.items() if k != "layers"}), flush=True)
  twin = onednn_int8.torch_twin(spec)
  if twin is not None:
    import torch
    torch.set_num_threads(_THREADS.value)
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    walls = []
    with torch.inference_mode():
      for _ in range(2 + _CALLS.value):
        t0 = time.perf_counter()
        twin[1](x)
        walls.append(1e3 * (time.perf_counter() - t0))
    ops = torch_profile(twin[1], x)
    by_op = collections.defaultdict(float)
    for name, _, ms in ops:
      by_op[name] += ms
    # The quantized convs in module order, which is their execution order in torchvision's ResNets.
    modules = [m for m in twin[1].modules() if type(m).__name__.startswith("Conv")]
    conv_ops = [(shapes, ms) for name, shapes, ms in ops if "conv" in name]
    convs = []
    for m, (shapes, ms) in zip(modules, conv_ops):
      size = re.match(r"\[\[\d+, (\d+), (\d+), \d+\]", shapes)
      if size is None or int(size.group(1)) != m.in_channels:
        convs = []
        break
      oh = (int(size.group(2)) + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
      convs.append({"key": [m.in_channels, oh, m.kernel_size[0], m.stride[0]], "ms": ms})
    results["torch_int8"] = {"wall_ms": float(np.median(walls[2:])), "ops_ms": dict(by_op), "convs": convs}
  os.makedirs(_OUT.value, exist_ok=True)
  records.write_json_atomic(os.path.join(_OUT.value, "onednn_profile_cpu.json"), results)
  write_markdown(results, os.path.join(_OUT.value, "onednn_profile_cpu.md"))


def write_markdown(results: dict, path: str) -> None:
  """The profile as Markdown: a per-variant breakdown and the per-layer conv times side by side."""
  info, variants = results["info"], results["variants"]
  lines = ["# Where the oneDNN integer path's time goes (CPU)", "",
           f"Command: `{info['command']}`  ", f"Commit: {info['commit']}  ", f"Date: {info['date']}  ",
           f"CPU: {info['cpu']}, {info['cores']} cores; oneDNN {info['onednn']}  ",
           f"Load average at the start: {info['loadavg']} (the machine is shared with other jobs: times are noisy)  ",
           f"Host memory: {info.get('malloc', 'not recorded')} (`flexiq_jax.host_memory`)",
           *([f"Markdown rewritten from the JSON by `{info['markdown_rewritten_by']}`"]
             if "markdown_rewritten_by" in info else []),
           "", f"## {results['net']}, batch {results['batch']}, ratio {results['ratio']:g}: one forward pass", "",
           "Wall: median of calls outside the profiler (variants one after another, not interleaved). The thunk columns are one profiled call (XLA:CPU's thunks; "
           "the profiler adds a little). oneDNN primitives: oneDNN's verbose log of one more call "
           "(convolution/matmul execution; reorder = the weights into the primitive's layout).", "",
           "| variant | wall ms | custom calls ms | XLA conv/dot ms | XLA other (glue) ms | oneDNN conv+matmul ms "
           "| oneDNN reorders ms | library work outside primitives ms | max abs logit diff vs XLA int |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for label, v in variants.items():
    t, p = v["thunks_ms"], v.get("onednn_primitives_ms", {})
    calls = t.get("oneDNN custom calls", 0.0)
    prim = p.get("convolution", 0.0) + p.get("matmul", 0.0)
    reorder = p.get("reorder", 0.0)
    fmt = lambda x: f"{x:.1f}" if p else "-"
    lines.append(f"| {label} | {v['wall_ms']:.1f} | {calls:.1f} | {t.get('XLA conv/dot', 0.0):.1f} | "
                 f"{t.get('XLA other (glue)', 0.0):.1f} | {fmt(prim)} | {fmt(reorder)} | "
                 f"{fmt(calls - prim - reorder)} | {v['max_abs_logit_diff_vs_xla_int']:.2e} |")
  if "torch_int8" in results:
    tq = results["torch_int8"]
    conv = sum(v for k, v in tq["ops_ms"].items() if "conv" in k)
    lines.append(f"| PyTorch int8 (FX, x86) | {tq['wall_ms']:.1f} | - | {conv:.1f} (quantized convs) | "
                 f"{sum(tq['ops_ms'].values()) - conv:.1f} (other ops) | - | - | - | - |")
    lines += ["", "PyTorch int8's top-level ops in one profiled forward pass (ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(tq["ops_ms"].items(), key=lambda kv: -kv[1])) + "."]
  for label, v in variants.items():
    if "runs" in v and v["runs"].get("single_inputs"):
      r = v["runs"]
      lines += ["", f"{label}: layer runs {', '.join(f'{k} {r[k]}' for k in ('direct', 'split', 'single', 'depthwise'))}; "
                f"activation codes above the low range (the single mode's sparse remainder): "
                f"{r['single_remainders']} of {r['single_inputs']} ({100 * r['single_remainders'] / r['single_inputs']:.2f}%); "
                f"the single runs' steps (ms): "
                + ", ".join(f"{k[len('single_ns_'):].replace('_', ' ')} {r[k] / 1e6:.1f}"
                            for k in ("single_ns_split_codes", "single_ns_primitive", "single_ns_remainder",
                                      "single_ns_epilogue", "single_ns_finish") if k in r) + "."
                + (" (finish: one pass over the outputs adding the remainder and applying the epilogue)"
                   if "single_ns_finish" in r else "")]
  layered = [(label, v["layers"]) for label, v in variants.items() if "layers" in v]
  if layered:
    torch_convs = results.get("torch_int8", {}).get("convs", [])
    lines += ["", "## Per layer: the custom call's ms (XLA's thunk) = oneDNN primitive + weight reorder + the "
              "library's own work; PyTorch int8's quantized conv (profiler) of the same shape", "",
              "| layer (oneDNN problem of the first variant) | " + " | ".join(
                  f"{label} call / primitive / reorder" for label, _ in layered)
              + (" | PyTorch int8 conv |" if torch_convs else " |"),
              "| --- |" + " ---: |" * (len(layered) + bool(torch_convs))]
    seen = collections.Counter()
    for i, first in enumerate(layered[0][1]):
      key = problem_key(first["problem"])
      seen[key] += 1
      cells = []
      for _, rows in layered:
        r = rows[i] if i < len(rows) else None
        cells.append(f"{r['call_ms']:.1f} / {r['primitive_ms']:.1f} / {r['reorder_ms']:.2f}" if r else "")
      if torch_convs:
        same = [c["ms"] for c in torch_convs if tuple(c["key"]) == key]
        cells.append(f"{same[seen[key] - 1]:.1f}" if key and len(same) >= seen[key] else "")
      lines.append(f"| `{first['problem']}` | " + " | ".join(cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  host_memory.rerun_with_tcmalloc()
  app.run(main)
