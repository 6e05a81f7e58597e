r"""What the installed XLA:CPU can do for int8 by itself: its oneDNN / XNNPACK / YNNPACK switches.

  python -m benchmarks.xla_cpu_flags                    # every flag set, quickstart + ResNet-18 (224 px)
  python -m benchmarks.xla_cpu_flags --nets=quickstart --batch=16 --rounds=5

jaxlib's XLA:CPU carries several optional back ends that only `XLA_FLAGS` switch on
(`xla_cpu_use_onednn`, `xla_cpu_experimental_onednn_fusion_type`, `xla_cpu_use_xnnpack`,
`xla_cpu_experimental_xnn_fusion_type`, `xla_cpu_experimental_xnn_graph_fusion_mode`,
`xla_cpu_experimental_ynn_fusion_type`). Flags are read once per process, so each flag set runs in
a child process of its own; within that process every alternative is timed in interleaved rounds
(`integer_path.median_times`), and the table reports each time relative to the same process's
float32 model (the ratio is what carries across processes and machine load). Each child also
counts the custom calls and fusions the flag put into the compiled integer program: a flag that
rewrote nothing shows zero. The PyTorch `x86` int8 peer (FX graph mode, the same ResNet-18
architecture with random weights) runs in the default-flags child, beside XLA's float32.

Writes benchmarks/results/xla_cpu_flags.{json,md} with command, commit, device and date.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from absl import app
from absl import flags

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn fusions": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn graph greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn fusions": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
}
RATIOS = (0.0, 0.5, 1.0)

_MODELS = flags.DEFINE_list("nets", ["quickstart", "resnet18:full"], "Models: 'quickstart' or <config>[:full].")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size of the model timings.")
_REPEATS = flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds.")
_SETS = flags.DEFINE_list("flag_sets", list(FLAG_SETS), f"Which flag sets: {', '.join(FLAG_SETS)}.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one flag set in this process, print JSON.")
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")


def rewrites(compiled_text: str) -> dict:
  """Counts what a back end leaves in an optimized HLO module: custom calls by target, fusions by kind.

  Args:
    compiled_text: `jax.jit(f).lower(...).compile().as_text()`.

  Returns:
    {'custom_call:<target>': n, 'fusion:<kind>': n}.
  """
  out: dict = {}
  for target in re.findall(r'custom_call_target="([^"]+)"', compiled_text):
    out[f"custom_call:{target}"] = out.get(f"custom_call:{target}", 0) + 1
  for kind in re.findall(r"\bfusion\([^)]*\), kind=(\w+)", compiled_text):
    out[f"fusion:{kind}"] = out.get(f"fusion:{kind}", 0) + 1
  for kind in re.findall(r'"fusion_kind"\s*:\s*"(\w+)"', compiled_text):
    out[f"backend_fusion:{kind}"] = out.get(f"backend_fusion:{kind}", 0) + 1
  for word in ("onednn", "xnn", "ynn"):
    n = len(re.findall(word, compiled_text, flags=re.IGNORECASE))
    if n:
      out[f"mentions:{word}"] = n
  return out


def torch_peer(batch: int, repeats: int) -> dict:
  """ResNet-18 (torchvision's architecture through timm, random weights) in PyTorch float32 and
  int8 (FX graph mode, `x86` backend), same threads as this process. Returns {name: seconds}."""
  import time

  import numpy as np
  import torch
  from torch.ao.quantization import get_default_qconfig_mapping
  from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  from timm_reference import import_timm  # pylint: disable=g-import-not-at-top
  timm = import_timm()
  torch.set_num_threads(os.cpu_count() or 1)
  torch.backends.quantized.engine = "x86"
  model = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()
  x = torch.randn(batch, 3, 224, 224)
  with torch.no_grad():
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(x,))
    for _ in range(4):
      prepared(torch.randn(batch, 3, 224, 224))
    int8 = convert_fx(prepared)
    fns = {"torch float32": model, "torch int8 (x86 FX)": int8}
    for fn in fns.values():
      fn(x)
      fn(x)
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
      for name in names[i % 2:] + names[:i % 2]:
        t0 = time.perf_counter()
        fns[name](x)
        times[name].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


def child(flag_set: str) -> dict:
  """Times one flag set (already in XLA_FLAGS of this process). Returns the JSON-able results."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import integer_path
  from flexiq_jax import api
  from flexiq_jax import quantize

  out = {"flag_set": flag_set, "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_before":
         os.getloadavg()[0], "micro": {}, "models": {}}
  rng = np.random.default_rng(0)
  # Micro: one GEMM and one 3x3 conv of ResNet-18's second stage, float32 against int8 -> int32.
  a32 = jnp.asarray(rng.normal(size=(256, 1024)), jnp.float32)
  b32 = jnp.asarray(rng.normal(size=(1024, 1024)), jnp.float32)
  a8, b8 = a32.astype(jnp.int8), b32.astype(jnp.int8)
  x32 = jnp.asarray(rng.normal(size=(16, 28, 28, 128)), jnp.float32)
  w32 = jnp.asarray(rng.normal(size=(3, 3, 128, 128)), jnp.float32)
  x8, w8 = x32.astype(jnp.int8), w32.astype(jnp.int8)
  dims = (((1,), (0,)), ((), ()))
  conv = lambda x, w, t: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                      preferred_element_type=t)
  fns = {"dot f32": jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims)),
         "dot s8->s32": jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)),
         "conv f32": jax.jit(lambda x, w: conv(x, w, jnp.float32)),
         "conv s8->s32": jax.jit(lambda x, w: conv(x, w, jnp.int32))}
  args = {"dot f32": (a32, b32), "dot s8->s32": (a8, b8), "conv f32": (x32, w32), "conv s8->s32": (x8, w8)}
  out["micro"] = integer_path.median_times(fns, args, _REPEATS.value)
  out["micro_rewrites"] = {k: rewrites(f.lower(*args[k]).compile().as_text()) for k, f in fns.items()}
  for spec in _MODELS.value:
    base, _, size = spec.partition(":")
    subject = integer_path.build_subject(base, size == "full")
    calib = rng.normal(size=(32,) + subject.image_shape).astype(np.float32)
    qmodel, qvars = api.quantize_model(subject.model, subject.variables, calib, selector="greedy",
                                       calib_batch_size=16)
    images = jnp.asarray(rng.normal(size=(_BATCH.value,) + subject.image_shape), jnp.float32)
    float_fn = jax.jit(lambda v, x, m=subject.model: m.apply(v, x, train=False))
    svars = jax.jit(qmodel.prepare)(qvars)
    int_fn = jax.jit(qmodel.apply)
    fns = {"float32": float_fn}
    args = {"float32": (subject.variables, images)}
    for r in RATIOS:
      fns[f"int r={r:g}"] = int_fn
      args[f"int r={r:g}"] = (svars, images, jnp.float32(r))
    times = integer_path.median_times(fns, args, _REPEATS.value)
    entry = {"batch": _BATCH.value, "times": times,
             "int_rewrites": rewrites(int_fn.lower(svars, images, jnp.float32(0.5)).compile().as_text()),
             "float_rewrites": rewrites(float_fn.lower(subject.variables, images).compile().as_text())}
    if flag_set == "default" and spec == "resnet18:full":
      entry["torch"] = torch_peer(_BATCH.value, _REPEATS.value)
    out["models"][subject.name] = entry
    del qmodel, qvars, svars
  out["load_average_after"] = os.getloadavg()[0]
  return out


def run_child(name: str) -> dict:
  """Runs one flag set in a fresh process and returns its JSON, or {'error': ...}."""
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG_SETS[name]).strip())
  argv = [sys.executable, "-m", "benchmarks.xla_cpu_flags", f"--child={name}", f"--nets={','.join(_MODELS.value)}",
          f"--batch={_BATCH.value}", f"--rounds={_REPEATS.value}"]
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"flag_set": name, "xla_flags": FLAG_SETS[name], "error": " | ".join(tail)}
  return json.loads(lines[-1])


def markdown(results: dict) -> str:
  """The results as Markdown: micro ops and models, each relative to its process's float32."""
  from flexiq_jax import records
  lines = ["# XLA:CPU's own int8 switches\n", records.provenance_header(results["info"]),
           "Each flag set ran in its own process; times are medians of interleaved rounds. 'x f32' is the "
           "float32 time of the same process divided by the time (above 1 = faster than float32). Load average "
           "(1 min) is shown because the machine may be shared.\n"]
  ok = [r for r in results["children"] if "error" not in r]
  lines.append("\n## Micro: ResNet-18-sized GEMM (256x1024x1024) and 3x3 conv (16x28x28x128 -> 128)\n")
  lines.append(records.markdown_table(
      ["flag set", "dot f32 ms", "dot s8 ms (x f32)", "conv f32 ms", "conv s8 ms (x f32)", "load"],
      [[r["flag_set"], f"{r['micro']['dot f32'] * 1e3:.2f}",
        f"{r['micro']['dot s8->s32'] * 1e3:.2f} ({r['micro']['dot f32'] / r['micro']['dot s8->s32']:.2f}x)",
        f"{r['micro']['conv f32'] * 1e3:.2f}",
        f"{r['micro']['conv s8->s32'] * 1e3:.2f} ({r['micro']['conv f32'] / r['micro']['conv s8->s32']:.2f}x)",
        f"{r['load_average_before']:.1f}"] for r in ok]))
  for model in sorted({m for r in ok for m in r["models"]}):
    rows = []
    for r in ok:
      e = r["models"].get(model)
      if not e:
        continue
      t = e["times"]
      rows.append([r["flag_set"], f"{t['float32'] * 1e3:.1f}"] +
                  [f"{t[f'int r={x:g}'] * 1e3:.1f} ({t['float32'] / t[f'int r={x:g}']:.2f}x)" for x in RATIOS] +
                  [", ".join(f"{k} {v}" for k, v in sorted(e["int_rewrites"].items())
                             if not k.startswith("fusion:")) or "none"])
    batch = next(r["models"][model]["batch"] for r in ok if model in r["models"])
    lines.append(f"\n## {model}, batch {batch}: ms (x f32)\n")
    lines.append(records.markdown_table(["flag set", "float32"] + [f"int r={x:g}" for x in RATIOS] +
                                        ["custom calls / back-end marks in the int program"], rows))
    for r in ok:
      peer = r["models"].get(model, {}).get("torch")
      if peer:
        f32 = r["models"][model]["times"]["float32"]
        lines.append("\nPyTorch in the default-flags process, same batch: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms ({f32 / v:.2f}x XLA f32)" for k, v in peer.items()) + ".\n")
  failed = [r for r in results["children"] if "error" in r]
  if failed:
    lines.append("\n## Flag sets that failed\n")
    lines.append(records.markdown_table(["flag set", "XLA_FLAGS", "error"],
                                        [[r["flag_set"], r["xla_flags"], r["error"][:300]] for r in failed]))
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(child(_CHILD.value)), flush=True)
    return
  from flexiq_jax import records
  unknown = [s for s in _SETS.value if s not in FLAG_SETS]
  if unknown:
    raise app.UsageError(f"unknown --flag_sets {unknown}; known: {', '.join(FLAG_SETS)}")
  results = {"info": records.run_info(), "children": []}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "xla_cpu_flags")
  for name in _SETS.value:
    print(f"== {name}: XLA_FLAGS={FLAG_SETS[name] or '(none)'}", flush=True)
    results["children"].append(run_child(name))
    records.write_json_atomic(path + ".json", results)
    with open(path + ".md", "w") as f:
      f.write(markdown(results))
  print(f"wrote {path}.md/.json")


if __name__ == "__main__":
  app.run(main)
