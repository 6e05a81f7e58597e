r"""Speed of the quantized model: float32, bfloat16, fake-quant and the integer path side by side.

  python -m benchmarks.integer_path                      # CPU: quickstart + the eleven :fmnist variants
  python -m benchmarks.integer_path --models=quickstart --batches=1,32,512 --repeats=10

Run from the repository root. One process, one run: every model is built from its config with
random weights and calibrated on random images (speed does not depend on the values; the
selection uses the greedy selector to save time), then each alternative is timed in interleaved
rounds (every round calls every alternative once, in rotating order, so drifting machine load
hits all alike); the table reports medians. On a GPU (`--device` auto) the eleven full-size
models (224 px) are added.

Also reported: compilations across ratio switches (must be 0) and the time of a call at a new
ratio; the QAT step against the float training step (quickstart model); per-layer integer times
and the cost model fitted to them (`cost.RooflineModel`): its prediction of the whole integer
path per model and the modelled speed-up of a 4-bit-capable target per ratio; packed 4-bit
weights unpacked by XLA against int8 weights on ViT-B's layer shapes at batch 1.

Writes benchmarks/results/integer_path_<backend>.{json,md} and a time-vs-ratio plot (.png), with
command, commit, device, versions and date.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import api
from flexiq_jax import cost
from flexiq_jax import finetune
from flexiq_jax import host_memory
from flexiq_jax import interception
from flexiq_jax import models
from flexiq_jax import numerics
from flexiq_jax import quantize
from flexiq_jax import records
from flexiq_jax import train as train_lib
from flexiq_jax.quantize import integer
from flexiq_jax.quantize import tuning
from flexiq_jax.serve import count_compilations

from benchmarks import targets

ELEVEN = tuple(spec.config for spec in models.specs())  # config names of the ImageNet architectures
RATIOS = (0.0, 0.5, 1.0)

_MODELS = flags.DEFINE_list("models", None, "Model configs: 'quickstart', config names (configs/<name>.py, "
                            "reduced :fmnist variants; '<name>:full' at 224 px), 'fmnist' (all eleven), 'full' "
                            "(the eleven at 224 px). "
                            "Default: quickstart,fmnist (+ full on a GPU).")
_BATCHES = flags.DEFINE_list("batches", None, "Batch sizes (default 1,32,512 on CPU; 1,32,256 on GPU).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds per batch size (every alternative once per round).")
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu", "tpu"], "Backend; auto = JAX's default.")
_RESUME = flags.DEFINE_bool("resume", False, "Keep the models already in the results file (unless measured on an "
                             "earlier variant: other layer MACs) and measure the rest.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Time nothing: rewrite the Markdown and the plot from the "
                                 "results JSON (e.g. after the report's format changed).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")


@dataclasses.dataclass(frozen=True)
class Subject:
  """One model to time: its name, a linen module, float variables and an image shape."""

  name: str
  model: object
  variables: dict
  image_shape: tuple[int, int, int]


def build_subject(spec: str, full: bool) -> Subject:
  """`quickstart` or a config name; full=True: the architecture of the timm weights at its size."""
  if spec == "quickstart":
    model = models.create("resnet_small", num_classes=10)
    shape, name = (28, 28, 1), "quickstart (resnet_small)"
  else:
    config = importlib.import_module(f"configs.{spec}").get_config("" if full else "fmnist")
    kwargs = config.model.kwargs.to_dict()
    model = models.create(config.model.name, num_classes=1000 if full else 10, **kwargs)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    name = f"{spec}{'' if full else ':fmnist'}"
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), train=False)
  return Subject(name, model, dict(variables), shape)


def cpu_model() -> str:
  """The host CPU's model name and whether it has AVX-512 VNNI / AVX-VNNI (from /proc/cpuinfo).

  Returns:
    e.g. 'AMD EPYC 7B12 (avx2; no VNNI)'.
  """
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return "unknown"
  name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
  flags_line = next((line for line in text.splitlines() if line.startswith("flags")), "")
  vnni = [f for f in ("avx512_vnni", "avx_vnni") if f" {f}" in flags_line]
  isa = "avx512f" if " avx512f" in flags_line else "avx2" if " avx2" in flags_line else "no avx2"
  return f"{name} ({isa}; {'VNNI: ' + ', '.join(vnni) if vnni else 'no VNNI'})"


def median_times(fns: dict, args: dict, repeats: int, spread: dict | None = None) -> dict:
  """{name: median seconds} over `repeats` interleaved rounds (after two warm-up calls each);
  `spread`, if given, receives {name: interquartile range of the rounds, seconds}."""
  for name, fn in fns.items():
    for _ in range(2):
      jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  names = list(fns)
  for i in range(repeats):
    for name in names[i % len(names):] + names[:i % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name](*args[name]))
      times[name].append(time.perf_counter() - t0)
  if spread is not None:
    spread.update({name: float(np.subtract(*np.percentile(t, [75, 25]))) for name, t in times.items()})
  return {name: float(np.median(t)) for name, t in times.items()}


def alternatives(subject: Subject, qmodel, qvars, images):
  """{name: (jitted fn, args builder(images))} of everything timed per batch size; the integer
  path with every conv as int8 ('int8'), the backend's default per conv ('default') and the
  implementations `quantize.tune_conv_impls` measured fastest at this batch ('tuned'); on a GPU also
  'tuned' with every dense layer in the fused Pallas kernel ('pallas dense'). Also returns the tuned
  model and the tuner's {conv path: {impl: seconds}}."""
  model, variables = subject.model, subject.variables
  float_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, variables)
  fake = jax.jit(qmodel.with_mode("fake").apply)
  reference = jax.jit(dataclasses.replace(qmodel, mode="int_reference").apply)
  out = {"float32": (float_fn, lambda x: (variables, x)),
         "bfloat16": (float_fn, lambda x: (bf16, x.astype(jnp.bfloat16))),
         "fake-quant r=0.5": (fake, lambda x: (qvars, x, jnp.float32(0.5))),
         "int reference r=0.5": (reference, lambda x: (qvars, x, jnp.float32(0.5)))}
  tuned, impl_times = quantize.tune_conv_impls(qmodel, qvars, images)
  variants = {"int8": dataclasses.replace(qmodel, conv_impls="int8"), "default": qmodel, "tuned": tuned}
  if jax.default_backend() == "gpu" and any(qmodel.plan.layers[p].kind == "dense" for p in qmodel.plan.quantized):
    # The fused Pallas kernel for every dense layer (quantize/pallas_dense.py); off a GPU it runs
    # only in interpret mode, which checks it but says nothing of its speed.
    variants["pallas dense"] = dataclasses.replace(tuned, dense_impl="pallas")
  for label, qm in variants.items():
    svars = jax.jit(qm.prepare)(qvars)
    fn = jax.jit(qm.apply)
    for r in RATIOS:
      out[f"int {label} r={r:g}"] = (fn, lambda x, svars=svars, r=r: (svars, x, jnp.float32(r)))
  return out, tuned, impl_times


def ratio_switch(qmodel, qvars, images) -> dict:
  """Compilations while switching over many ratios (must be 0) and the time of a call at a new
  ratio against a call at the same ratio."""
  predict = quantize.make_predict(qmodel, qvars)
  jax.block_until_ready(predict(images, 0.0))
  same, new = [], []
  with count_compilations() as compiled:
    for r in np.linspace(0.05, 0.95, 10):
      t0 = time.perf_counter()
      jax.block_until_ready(predict(images, float(r)))
      new.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(predict(images, float(r)))
      same.append(time.perf_counter() - t0)
  return {"compilations": compiled.count, "switches": 10, "new_ratio_s": float(np.median(new)),
          "same_ratio_s": float(np.median(same))}


def layer_times(subject: Subject, qmodel, qvars, batch: int, repeats: int, impl_times: dict) -> list[dict]:
  """Per quantized layer at `batch`: the integer layer alone (its input captured from the serving
  form) at ratio 0 with its tuned implementation and the float32 layer on an input of that shape,
  with MACs and bytes for the cost model; for convs the tuner's int8 / float32-on-codes time ratio."""
  plan, impls = qmodel.plan, qmodel.conv_impl_map()
  svars = jax.jit(qmodel.prepare)(qvars)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(batch,) + subject.image_shape), jnp.float32)
  rows = []
  for path, (call, x) in tuning.capture_layer_inputs(qmodel, svars, images).items():
    info, entry = plan.layers[path], interception.get_path(svars[integer.SERVING_KEY], path)
    impl = integer.conv_impl_for(info, plan.signed[path], impls.get(path)) if info.kind == "conv" else "int8"
    fn = jax.jit(lambda x, e, k, b, call=call, s=plan.signed[path], impl=impl: integer.integer_forward(
        dataclasses.replace(call, kernel=k, bias=b), x, e, None, signed=s, conv_impl=impl))
    t = tuning.time_call(fn, (x, entry, call.kernel, call.bias), repeats)
    # The serving form holds codes; a float32 kernel of the same shape times the float layer.
    float_fn = jax.jit(lambda x, k, b, call=call: dataclasses.replace(call, kernel=k, bias=b).float_forward(x))
    as_f32 = lambda a: None if a is None else a.astype(jnp.float32)
    t_float = tuning.time_call(float_fn, (as_f32(x), as_f32(call.kernel), as_f32(call.bias)), repeats)
    row = {"path": path, "impl": impl, "seconds": t, "float32_seconds": t_float, "macs": info.macs * batch,
           "bytes": cost.integer_layer_bytes(info, batch)}
    tried = impl_times.get(path, {})
    if "int8" in tried and "float32" in tried:
      row["int8_over_float32"] = tried["int8"] / tried["float32"]
    rows.append(row)
  return rows


def qat_vs_float_step(subject: Subject, qmodel, qvars, batch: int, repeats: int) -> dict:
  """Seconds per step: float training step vs FlexiQ's QAT step (fake-quant, sampled ratio)."""
  import optax
  tx = optax.sgd(0.01, momentum=0.9)
  state = train_lib.create_train_state(subject.model, jax.random.PRNGKey(0), subject.image_shape, tx)
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.normal(size=(batch,) + subject.image_shape), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  float_step = jax.jit(lambda s, b: train_lib.train_step(s, b, apply_fn=subject.model.apply, tx=tx))
  qstate = finetune.create_state(qvars, tx, lsq=False)
  sampler = finetune.RatioSampler((0.0, 0.5, 1.0), (1 / 3, 1 / 3, 1 / 3))
  qat = jax.jit(lambda s, b: finetune.qat_step(s, b, qmodel=qmodel.with_mode("fake"), tx=tx, sampler=sampler,
                                               rng_key=jax.random.PRNGKey(0)))
  t = median_times({"float": float_step, "qat": qat}, {"float": (state, data), "qat": (qstate, data)}, repeats)
  return {"batch": batch, "float_step_s": t["float"], "qat_step_s": t["qat"], "qat_over_float": t["qat"] / t["float"]}


def packed_weights_check(batch: int, repeats: int) -> list[dict]:
  """ViT-B's dense shapes at `batch`: the int8 GEMM from int8 weights vs from 4-bit weights packed
  two per byte and unpacked by XLA before the GEMM (what a run-time ratio allows without a fused
  kernel). Does unpacking pay where weight bytes dominate?"""
  rows = []
  rng = np.random.default_rng(0)
  for c, o in ((768, 2304), (768, 3072), (3072, 768)):
    x = jnp.asarray(rng.integers(-128, 128, (batch, c)), jnp.int8)
    w = jnp.asarray(rng.integers(-8, 8, (c, o)), jnp.int8)
    packed = numerics.pack_int4(w)
    dot = lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    fns = {"int8 weights": jax.jit(dot), "packed int4, XLA unpack": jax.jit(lambda x, p: dot(x, numerics.unpack_int4(p)))}
    t = median_times(fns, {"int8 weights": (x, w), "packed int4, XLA unpack": (x, packed)}, repeats)
    rows.append({"shape": f"{batch}x{c} @ {c}x{o}", **t})
  return rows


def layerwise_phase_times(subject: Subject) -> dict:
  """The layer-wise algorithm on the quickstart model, from an empty cache, with the quickstart
  config's sizes (sensitivity images, score examples, candidates) on random images labelled by the
  float model: seconds of setup, compilation, the baseline step and phases 1-3."""
  import tempfile
  from configs import quickstart
  from flexiq_jax import pipeline
  from flexiq_jax.layerwise import driver
  from flexiq_jax.stage_results import FloatModel
  config = quickstart.get_config()
  lw = config.layerwise
  rng = np.random.default_rng(3)
  float_model = FloatModel(subject.model, subject.variables)
  calib = [rng.normal(size=(config.calib.batch_size,) + subject.image_shape).astype(np.float32)
           for _ in range(config.calib.num_images // config.calib.batch_size)]
  images = rng.normal(size=(lw.score_examples,) + subject.image_shape).astype(np.float32)
  score = []
  for batch in np.array_split(images, range(config.eval_batch_size, len(images), config.eval_batch_size)):
    label = np.argmax(np.asarray(float_model.logits(batch)), -1).astype(np.int32)
    score.append({"image": batch, "label": label, "mask": np.ones(len(batch), np.float32)})
  with tempfile.TemporaryDirectory() as workdir:
    run = pipeline.Run(config, workdir)
    t0 = time.perf_counter()
    calibration = pipeline.calibrate(run, float_model, calib)
    t_calib = time.perf_counter() - t0
    summary = driver.layerwise_search(config, workdir, float_model, calibration, calib, run.mesh,
                                      score_data=score, early_exit=False).summary
  return {"model": subject.name, "calibrate_s": t_calib, "seconds": summary["seconds"],
          "phases_run": summary["phases_run"], "groups": len(summary["members"]),
          "candidates": list(lw.candidates), "pareto_points": summary["num_points"],
          "sensitivity_images": lw.sensitivity_images, "score_examples": lw.score_examples,
          "search": lw.search, "phase2_full": lw.phase2_full}


def specs(batches_default) -> tuple[list[tuple[str, bool]], list[int]]:
  backend = jax.default_backend()
  names = _MODELS.value or (["quickstart", "fmnist"] + (["full"] if backend == "gpu" else []))
  out = []
  for n in names:
    if n == "fmnist":
      out += [(m, False) for m in ELEVEN]
    elif n == "full":
      out += [(m, True) for m in ELEVEN]
    else:
      base, _, size = n.partition(":")
      if base not in ("quickstart",) + ELEVEN or size not in ("", "fmnist", "full") or (base == "quickstart" and size):
        raise app.UsageError(f"unknown model {n!r} in --models; known: quickstart, fmnist (the eleven reduced), full "
                             f"(the eleven at 224 px), or one of {', '.join(ELEVEN)} with ':full' for its full size")
      out.append((base, size == "full"))
  batches = sorted(int(b) for b in (_BATCHES.value or batches_default))  # the last one's tuned model is kept
  return out, batches


def main(argv):
  del argv
  if _DEVICE.value != "auto":
    jax.config.update("jax_platforms", _DEVICE.value)
  backend = jax.default_backend()
  model_specs, batches = specs(["1", "32", "512"] if backend == "cpu" else ["1", "32", "256"])
  info = records.run_info()
  info.update(malloc=host_memory.state(), backend=backend, python=platform.python_version(), flax=importlib.import_module("flax").__version__,
              cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
  out_path = os.path.join(_OUT.value, f"integer_path_{backend}")
  if _REPORT_ONLY.value:
    if not os.path.exists(out_path + ".json"):
      raise FileNotFoundError(f"--report_only: no results at {out_path}.json; run the benchmark first")
    results = records.read_json(out_path + ".json")
    results["info"]["report_rewritten_by"] = {k: info[k] for k in ("command", "commit", "date")}
    write_results(results, _OUT.value, max(int(b) for b in results["models"][0]["times"]))
    print(f"rewrote {out_path}.md/.png from {out_path}.json")
    return
  results = {"info": info, "models": [], "notes": []}
  if _RESUME.value and os.path.exists(out_path + ".json"):
    previous = records.read_json(out_path + ".json")
    results["models"] = previous["models"]
    first = previous["info"]
    while "resumed_from" in first:  # the run that measured the first models
      first = first["resumed_from"]
    results["info"]["resumed_from"] = first
  repeats = _REPEATS.value
  for spec, full in model_specs:
    subject = build_subject(spec, full)
    measured = [e for e in results["models"] if e["name"] == subject.name]
    if measured:
      plan = quantize.build_plan(subject.model, subject.variables, subject.image_shape)
      recorded = measured[0].get("plan_layers", {})
      if recorded and cost.recorded_macs(recorded) == cost.total_macs(plan.layer_infos()):
        print(f"== {subject.name}: measured already (--resume)", flush=True)
        continue
      print(f"== {subject.name}: the file's entry is of an earlier variant (other layer MACs): measuring again",
            flush=True)
      results["models"] = [e for e in results["models"] if e["name"] != subject.name]
    print(f"== {subject.name}", flush=True)
    calib = np.random.default_rng(0).normal(size=(64,) + subject.image_shape).astype(np.float32)
    qmodel, qvars = api.quantize_model(subject.model, subject.variables, calib, selector="greedy",
                                       calib_batch_size=32)
    entry = {"name": subject.name, "image_shape": list(subject.image_shape),
             "measured_by": {k: info[k] for k in ("command", "commit", "date")}, "times": {}, "times_iqr": {},
             "load_average_before": os.getloadavg()[0]}  # other jobs on the machine skew times
    for batch in batches:
      images = jnp.asarray(np.random.default_rng(1).normal(size=(batch,) + subject.image_shape), jnp.float32)
      alts, tuned, impl_times = alternatives(subject, qmodel, qvars, images)
      spread = {}
      t = median_times({k: f for k, (f, _) in alts.items()}, {k: a(images) for k, (_, a) in alts.items()}, repeats,
                       spread)
      entry["times"][str(batch)] = t
      entry["times_iqr"][str(batch)] = spread
      base = t["float32"]
      print(f"  batch {batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms ({base / v:.2f}x)" for k, v in t.items()),
            flush=True)
      entry.setdefault("tuned_conv_impls", {})[str(batch)] = dict(tuned.conv_impl_map())
      entry.setdefault("conv_impl_times", {})[str(batch)] = impl_times
    big = max(batches)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(big,) + subject.image_shape), jnp.float32)
    entry["ratio_switch"] = ratio_switch(tuned, qvars, images)
    layers = layer_times(subject, tuned, qvars, big, max(3, repeats // 2), entry["conv_impl_times"][str(big)])
    entry["layers"] = layers
    entry["lowered"] = {f"{r:g}": quantize.lowered_channels(qmodel, qvars, r) for r in (0.0, 0.25, 0.5, 0.75, 1.0)}
    entry["plan_layers"] = {p: dataclasses.asdict(qmodel.plan.layers[p]) for p in qmodel.plan.quantized}
    if spec == "quickstart":
      entry["qat_vs_float_step"] = qat_vs_float_step(subject, qmodel, qvars, 128, repeats)
    entry["load_average_after"] = os.getloadavg()[0]
    results["models"].append(entry)
    results["cost_model"] = fit_cost_model(results["models"], max(batches))
    write_results(results, _OUT.value, max(batches))  # after every model: a killed run keeps them
    print(f"wrote {out_path}.md/.json/.png", flush=True)
  results["packed_weights"] = packed_weights_check(1, repeats)
  if any(spec == "quickstart" for spec, _ in model_specs):
    results["layerwise_phases"] = layerwise_phase_times(build_subject("quickstart", False))
  results["cost_model"] = fit_cost_model(results["models"], max(batches))
  write_results(results, _OUT.value, max(batches))
  print(f"wrote {out_path}.md/.json/.png")


def fit_cost_model(entries: list[dict], batch: int) -> dict:
  """Fits cost.RooflineModel on every measured integer layer (all models), then predicts each
  model's integer path at ratio 0 (sum of its layers) and the modelled 4-bit target per ratio."""
  rows = [l for e in entries for l in e["layers"] if l["impl"] == "int8"]  # the int8 kernels' own speed
  roofline = cost.RooflineModel.fit([l["macs"] for l in rows], [l["bytes"] for l in rows],
                                    [l["seconds"] for l in rows])
  per_model = []
  for e in entries:
    infos = {p: interception.LayerInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
             for p, d in e["plan_layers"].items()}
    int8 = [l for l in e["layers"] if l["impl"] == "int8"]
    measured_layers = sum(l["seconds"] for l in int8)
    predicted = sum(roofline.layer_time(infos[l["path"]], batch) for l in int8)
    t_int = e["times"][str(batch)]["int tuned r=0"]
    modelled = {r: roofline.model_time(infos, batch, lowered, low_bits_speedup=2.0) for r, lowered in e["lowered"].items()}
    t0, t1 = modelled["0"], modelled["1"]
    per_model.append({"name": e["name"], "int8_layers": len(int8), "measured_layers_s": measured_layers,
                      "predicted_layers_s": predicted,
                      "measured_int_path_s": t_int, "modelled_4bit_target_s": modelled,
                      "share_of_full_speedup_at_0.5": (t0 - modelled["0.5"]) / (t0 - t1) if t0 > t1 else None})
  return {"roofline": dataclasses.asdict(roofline), "r2": roofline.r2, "layers_fitted": len(rows),
          "models": per_model}


def write_results(results: dict, out_dir: str, batch: int) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"integer_path_{results['info']['backend']}")
  records.write_json_atomic(path + ".json", results)
  lines = ["# Integer path speed\n", records.provenance_header(results["info"])]
  if results["info"].get("malloc"):
    lines.append(f"Host memory: {results['info']['malloc']} (`flexiq_jax.host_memory`).\n")
  if "resumed_from" in results["info"]:
    first = results["info"]["resumed_from"]
    lines.append(f"Resumed: the models already in the file were measured by `{first['command']}` at commit "
                 f"`{first['commit']}` on {first['date']}; this run measured the rest and the sections after the "
                 "model tables.\n")
  if "report_rewritten_by" in results["info"]:
    r = results["info"]["report_rewritten_by"]
    lines.append(f"This Markdown and the plot were rewritten from the JSON (no new timing) by `{r['command']}` at "
                 f"commit `{r['commit']}` on {r['date']}.\n")
  lines += [
           f"Python {results['info']['python']}, jax {results['info']['jax_version']}, flax {results['info']['flax']}, "
           f"{results['info']['cores']} cores ({results['info']['cpu']}). Random weights, random calibration images "
           "(speed only). Median of interleaved rounds; speed-up = float32 time / time.\n"]
  for b in sorted({int(b) for e in results["models"] for b in e["times"]}):
    names = list(results["models"][0]["times"][str(b)])
    rows = [[e["name"]] + [f"{e['times'][str(b)][n] * 1e3:.2f} ({e['times'][str(b)]['float32'] / e['times'][str(b)][n]:.2f}x)"
                            for n in names] for e in results["models"] if str(b) in e["times"]]
    lines += [f"\n## Batch {b}: ms (speed-up vs float32)\n", records.markdown_table(["model"] + names, rows)]
    spread = [e["times_iqr"][str(b)][n] / e["times"][str(b)][n] for e in results["models"]
              if str(b) in e.get("times_iqr", {}) for n in e["times_iqr"][str(b)]]
    if spread:  # differences below this are run-to-run spread, not the alternatives
      lines.append(f"\nInterquartile range of the timed rounds, relative to the median: median "
                   f"{100 * float(np.median(spread)):.1f} %, largest {100 * max(spread):.1f} % over the cells above.\n")
  lines.append("\nMeasured by: " + "; ".join(
      f"{e['name']} at `{e['measured_by']['commit'][:7]}` ({e['measured_by']['date']})" if "measured_by" in e
      else f"{e['name']} by the run named under 'Resumed'" for e in results["models"]) + ".\n")
  lines.append("\nLoad average (1 min) while each model was measured: " + ", ".join(
      f"{e['name']} {e.get('load_average_before', float('nan')):.1f}→{e.get('load_average_after', float('nan')):.1f}"
      for e in results["models"]) + f" ({results['info']['cores']} cores).\n")
  lines.append(f"\n## Targets (batch {batch})\n")
  lines.append(targets.markdown(targets.targets(results, batch)))
  lines.append("\n## Ratio switches\n")
  lines.append(records.markdown_table(
      ["model", "compilations over 10 switches", "call at a new ratio (ms)", "call at the same ratio (ms)"],
      [[e["name"], e["ratio_switch"]["compilations"], f"{e['ratio_switch']['new_ratio_s'] * 1e3:.2f}",
        f"{e['ratio_switch']['same_ratio_s'] * 1e3:.2f}"] for e in results["models"]]))
  for e in results["models"]:
    if "qat_vs_float_step" in e:
      q = e["qat_vs_float_step"]
      lines.append(f"\n## QAT step vs float training step ({e['name']}, batch {q['batch']})\n\n"
                   f"float {q['float_step_s'] * 1e3:.1f} ms, QAT {q['qat_step_s'] * 1e3:.1f} ms: "
                   f"**{q['qat_over_float']:.2f}x** the float step (the QAT step trains the BN-folded model, "
                   "the float step also computes BatchNorm's batch statistics).\n")
  cm = results["cost_model"]
  r = cm["roofline"]
  lines.append(f"\n## Cost model vs measurement (batch {batch})\n\n`cost.RooflineModel` fitted on {cm['layers_fitted']} "
               f"measured integer layers: {r['overhead_s'] * 1e6:.1f} us per layer + MACs / {r['macs_per_s'] / 1e9:.1f} G/s "
               f"+ bytes / {r['bytes_per_s'] / 1e9:.2f} GB/s (R² {cm['r2']:.3f}). The modelled 4-bit target runs "
               "lowered MACs at twice the int8 rate and moves their bytes at half the size.\n")
  lines.append(records.markdown_table(
      ["model", "int8 layers", "their time measured (ms)", "predicted (ms)", "whole int path measured (ms)",
       "4-bit target: speed-up at 50% / 100%", "share of the 100% speed-up at 50%"],
      [[m["name"], m["int8_layers"], f"{m['measured_layers_s'] * 1e3:.2f}", f"{m['predicted_layers_s'] * 1e3:.2f}",
        f"{m['measured_int_path_s'] * 1e3:.2f}",
        f"{m['modelled_4bit_target_s']['0'] / m['modelled_4bit_target_s']['0.5']:.2f}x / "
        f"{m['modelled_4bit_target_s']['0'] / m['modelled_4bit_target_s']['1']:.2f}x",
        "-" if m["share_of_full_speedup_at_0.5"] is None else f"{100 * m['share_of_full_speedup_at_0.5']:.0f}%"]
       for m in cm["models"]]))
  if "packed_weights" in results:
    lines.append("\n## Packed 4-bit weights without a fused kernel (batch 1)\n")
    rows = results["packed_weights"]
    lines.append(records.markdown_table(
        ["GEMM", "int8 weights (ms)", "packed int4 + XLA unpack (ms)", "packed / int8"],
        [[p["shape"], f"{p['int8 weights'] * 1e3:.3f}", f"{p['packed int4, XLA unpack'] * 1e3:.3f}",
          f"{p['packed int4, XLA unpack'] / p['int8 weights']:.2f}"] for p in rows]))
    pays = [p["shape"] for p in rows if p["packed int4, XLA unpack"] < 0.95 * p["int8 weights"]]
    best = min(p["packed int4, XLA unpack"] / p["int8 weights"] for p in rows)
    lines.append(f"\nPacking pays (at least 5% faster) on {len(pays)} of {len(rows)} shapes"
                 + (f" ({', '.join(pays)})" if pays else "") + f"; at best packed takes {best:.2f}x the int8 time. "
                 "Unpacked by XLA, the weights are written to memory as int8 before the GEMM, so part of the bytes "
                 "saved is spent again. The integer path keeps int8 weights on this backend, so its measured time "
                 "does not fall with the ratio; the packed form is the Pallas dense kernel's "
                 "(`fused_dense_packed`, GPU), which unpacks in registers.\n")
  if "layerwise_phases" in results:
    lp = results["layerwise_phases"]
    sec = lp["seconds"]
    lines.append(f"\n## Layer-wise mixed-precision search: phase times ({lp['model']}, empty cache)\n\n"
                 f"{lp['groups']} groups x {len(lp['candidates'])} candidates ({', '.join(lp['candidates'])}), "
                 f"{lp['sensitivity_images']} sensitivity images, {lp['score_examples']} score images (random, "
                 f"labelled by the float model), {lp['search']} search, every Pareto point scored: "
                 f"{lp['phase2_full']}; {lp['pareto_points']} Pareto points; phases run: {lp['phases_run']}"
                 + (" (phase 3 searches over phase 2's scores, so it evaluates nothing new)" if lp["phase2_full"]
                    else "") + ".\n")
    lines.append(records.markdown_table(["calibrate"] + list(sec), [[f"{lp['calibrate_s']:.2f} s"]
                                        + [f"{v:.2f} s" for v in sec.values()]]))
  for note in results["notes"]:
    lines.append(f"\n{note}\n")
  with open(path + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot_time_vs_ratio(results, path + ".png", batch)
  return path


def plot_time_vs_ratio(results: dict, path: str, batch: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for e in results["models"]:
    t = e["times"][str(batch)]
    base = t["float32"]
    line, = ax.plot(RATIOS, [base / t[f"int tuned r={r:g}"] for r in RATIOS], marker="o", label=e["name"])
    m = next(m for m in results["cost_model"]["models"] if m["name"] == e["name"])
    mod = m["modelled_4bit_target_s"]
    ax.plot([float(r) for r in mod], [mod["0"] / v * base / t["int tuned r=0"] for v in mod.values()],
            ls=":", color=line.get_color())
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xlabel("4-bit ratio")
  ax.set_ylabel("speed-up vs float32 (measured: solid; modelled 4-bit target: dotted)")
  ax.set_title(f"Integer path, batch {batch}, {results['info']['device']}", fontsize=9)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  host_memory.rerun_with_tcmalloc()
  app.run(main)
