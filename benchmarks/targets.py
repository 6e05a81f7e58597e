"""The integer-path benchmark's targets, read off its results: met or missed, and for a miss the
measured reason (from the per-layer times the benchmark records) and what would close it.

Kept apart from benchmarks/integer_path.py, which defines absl flags, so tests can import it.
"""
from __future__ import annotations

CPU_SPEEDUP = 1.3  # integer path (tuned, ratio 0) vs float32 at the largest batch, CPU CNNs
GPU_SPEEDUP = 1.5  # vs bfloat16 at batch 256: ViT-B/16 and ResNet-50 full size
MIXED_OVERHEAD = 0.03  # ratio 0.5 vs ratio 0
QAT_OVER_FLOAT = 1.2

_CNN_PREFIXES = ("quickstart", "resnet", "mobilenetv2", "efficientnet", "regnet")
_GPU_TARGET_MODELS = ("vit_b", "resnet50")  # the full-size entries' names (the reduced ones end in ':fmnist')


def _is_cnn(name: str) -> bool:
  return name.startswith(_CNN_PREFIXES)


def _int_time(times: dict, ratio: str) -> float:
  return times[f"int tuned r={ratio}"]


def speed_reason(entry: dict, batch: int) -> str:
  """Why the integer path is not faster, from the layer times measured alone: the quantized layers'
  integer time against their float32 time, the layers that gain least, and (where the layers
  alone add up to less than the whole float model) the time outside them and the speed-up bound
  of today's kernels."""
  t = entry["times"][str(batch)]
  layers = [l for l in entry.get("layers", []) if "float32_seconds" in l]
  if not layers:
    return "no per-layer float times in this entry (measured by an earlier version of the benchmark)"
  int_sum = sum(l["seconds"] for l in layers)
  float_sum = sum(l["float32_seconds"] for l in layers)
  worst = sorted(layers, key=lambda l: l["seconds"] - l["float32_seconds"], reverse=True)[:3]
  worst_text = ", ".join(f"{l['path']} (integer, {l['impl']} kernel: {l['seconds'] * 1e3:.1f} ms; float layer "
                         f"{l['float32_seconds'] * 1e3:.1f} ms)" for l in worst)
  text = (f"timed alone, its {len(layers)} quantized layers take {int_sum * 1e3:.1f} ms in the integer path and "
          f"{float_sum * 1e3:.1f} ms as float32 layers ({int_sum / float_sum:.2f}x); the layers that gain least: "
          f"{worst_text}")
  rest_float = t["float32"] - float_sum
  if rest_float >= 0:
    bound = t["float32"] / (rest_float + sum(min(l["seconds"], l["float32_seconds"]) for l in layers))
    text += (f"; the whole float32 model takes {t['float32'] * 1e3:.1f} ms, so about {rest_float * 1e3:.1f} ms is "
             "outside the quantized layers (norms, activations, adds, pooling); were every quantized layer at the "
             f"faster of its two times, the model would reach about {bound:.2f}x (the bound of today's kernels)")
  else:
    text += (f"; alone they add up to more than the whole float32 model ({t['float32'] * 1e3:.1f} ms: within it "
             "XLA fuses their neighbours and reuses buffers), so they compare the layers, not split the model's time")
  on_float = [l for l in layers if l.get("int8_over_float32") and l["impl"] == "float32"]
  if on_float:
    ratios = sorted(l["int8_over_float32"] for l in on_float)
    text += (f"; {len(on_float)} conv(s) run as float32 on the integer codes because XLA:CPU's int8 conv is "
             f"{ratios[0]:.1f}-{ratios[-1]:.1f}x slower than float32 at their shapes, so they pay the quantize and "
             "epilogue passes (which XLA cannot fuse into the library conv) without a faster conv: an int8 conv "
             "kernel that is fast at those shapes and quantizes its input as it loads it would close it")
  elif any(l["seconds"] > l["float32_seconds"] for l in worst):
    text += ("; a faster int8 kernel at the shapes of the layers that gain least, with their quantize and "
             "epilogue passes fused into it, would close it")
  return text


def targets(results: dict, batch: int) -> list[dict]:
  """[{target, model, measured, met, reason}] for every target the results can speak to."""
  rows = []
  backend = results["info"].get("backend", "cpu")
  for e in results["models"]:
    t = e["times"].get(str(batch))
    if t is None:
      continue
    name = e["name"]
    if backend == "cpu" and _is_cnn(name):
      speedup = t["float32"] / _int_time(t, "0")
      met = speedup >= CPU_SPEEDUP
      rows.append({"target": f"integer path >= {CPU_SPEEDUP}x float32 (CPU CNN, batch {batch}, ratio 0)",
                   "model": name, "measured": f"{speedup:.2f}x", "met": met,
                   "reason": "" if met else speed_reason(e, batch)})
    if backend == "gpu" and name in _GPU_TARGET_MODELS and "bfloat16" in t:
      speedup = t["bfloat16"] / min(v for k, v in t.items() if k.startswith("int ") and k.endswith("r=0"))
      rows.append({"target": f"integer path >= {GPU_SPEEDUP}x bfloat16 (GPU, batch {batch})", "model": name,
                   "measured": f"{speedup:.2f}x", "met": speedup >= GPU_SPEEDUP,
                   "reason": "" if speedup >= GPU_SPEEDUP else speed_reason(e, batch)})
    extra = _int_time(t, "0.5") / _int_time(t, "0") - 1
    met = extra <= MIXED_OVERHEAD
    reason = ""
    if not met:
      iqr = e.get("times_iqr", {}).get(str(batch), {})
      diff = _int_time(t, "0.5") - _int_time(t, "0")
      reason = (f"ratio 0.5 takes {diff * 1e3:+.1f} ms and ratio 1 {(_int_time(t, '1') - _int_time(t, '0')) * 1e3:+.1f} "
                "ms against ratio 0, in one compiled function whose work does not depend on the ratio (it only "
                "changes which channels' codes are lowered)")
      if "int tuned r=0" in iqr and "int tuned r=0.5" in iqr:
        spread = max(iqr["int tuned r=0"], iqr["int tuned r=0.5"])
        if spread == 0:
          reason += "; the rounds' spread is unknown (a single timed round: raise --repeats)"
        else:
          reason += (f"; the interquartile range of the timed rounds is {spread * 1e3:.1f} ms, so the difference is "
                     + ("within" if abs(diff) <= spread else "beyond") + " run-to-run spread")
      if e.get("load_average_before", 0) > 1.5 or e.get("load_average_after", 0) > 1.5:
        reason += (f" (load average {e.get('load_average_before', 0):.1f}->{e.get('load_average_after', 0):.1f} "
                   "on this machine's cores while it ran)")
    rows.append({"target": f"ratio 0.5 at most {MIXED_OVERHEAD * 100:.0f}% slower than ratio 0 (batch {batch})",
                 "model": name, "measured": f"{extra * 100:+.1f}%", "met": met, "reason": reason})
    if "ratio_switch" in e:
      n = e["ratio_switch"]["compilations"]
      rows.append({"target": "0 compilations across ratio switches", "model": name, "measured": str(n),
                   "met": n == 0, "reason": "" if n == 0 else "the ratio reached the jitted function as a static value"})
    if "qat_vs_float_step" in e:
      q = e["qat_vs_float_step"]["qat_over_float"]
      rows.append({"target": f"QAT step at most {QAT_OVER_FLOAT}x the float step", "model": name,
                   "measured": f"{q:.2f}x", "met": q <= QAT_OVER_FLOAT, "reason": ""})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| target | model | measured | met | reason (measured) and what would close it |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['target']} | {r['model']} | {r['measured']} | {'yes' if r['met'] else '**no**'} | "
                 f"{r['reason'] or '-'} |")
  return "\n".join(lines) + "\n"
