r"""Depthwise convolutions on CPU: XLA's grouped conv against the sum of k*k taps, forward and backward.

  python -m benchmarks.depthwise_conv                  # the depthwise layers of the depthwise models
  python -m benchmarks.depthwise_conv --batch=32 --rounds=3

Every depthwise conv of the framework on float operands (the models' own, QAT's fake-quant forward,
calibration, and the integer path's conv on float32 codes) is computed as the sum of its k*k taps
(`models.layers.depthwise_conv_general_dilated`): strided slices of the padded input times one
weight per channel. This times both forms on the distinct depthwise layer shapes of the `:fmnist`
MobileNetV2 and EfficientNet-B0 and of EfficientNet-Lite0 at its 64-px transfer resolution (shapes
traced from the models, 'SAME' padding, random values), in interleaved rounds in one process
(`integer_path.median_times`), and checks that both give the same output (to float rounding).

Writes benchmarks/results/depthwise_conv.{json,md} with command, commit, device and date.
"""

from __future__ import annotations

import importlib
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexiq_jax import pipeline
from flexiq_jax import quantize
from flexiq_jax import records
from flexiq_jax.models import layers

from benchmarks.integer_path import median_times

MODELS = (("mobilenetv2", "fmnist"), ("efficientnet_b0", "fmnist"), ("efficientnet_lite0", "fmnist_pretrained"))

_BATCH = flags.DEFINE_integer("batch", 128, "Batch size (the training batch of the :fmnist configs).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds.")
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")


def depthwise_shapes(config_name: str, arg: str) -> list[dict]:
  """The distinct depthwise layer geometries of a model config.

  Args:
    config_name: a module of configs/.
    arg: the config argument (e.g. 'fmnist').

  Returns:
    [{'input': (H, W, C), 'kernel': k, 'stride': s, 'padding': [(lo, hi), (lo, hi)], 'count': n}].
  """
  config = importlib.import_module(f"configs.{config_name}").get_config(arg)
  net = pipeline.build_model(config, 10)
  shape = pipeline.image_shape(config)
  variables = jax.jit(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), train=False))()
  plan = quantize.build_plan(net, variables, shape)
  found: dict = {}
  for info in plan.layer_infos().values():
    if info.kind == "conv" and info.groups > 1 and info.groups == info.in_channels == info.out_channels:
      key = (tuple(info.input_shape[1:]), tuple(info.kernel_shape), tuple(info.output_shape[1:]))
      found.setdefault(key, 0)
      found[key] += 1
  out = []
  for (inp, kernel, outp), count in found.items():
    stride = -(-inp[0] // outp[0])
    pads = lax.padtype_to_pads(inp[:2], kernel[:2], (stride, stride), "SAME")
    out.append({"input": list(inp), "kernel": kernel[0], "stride": stride, "padding": [list(p) for p in pads],
                "count": count})
  return out


def forms(layer: dict):
  """The two forms of one layer, forward and gradient (to input and kernel), jitted."""
  strides = (layer["stride"],) * 2
  xla = lambda x, w: lax.conv_general_dilated(x, w, strides, layer["padding"],
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                              feature_group_count=x.shape[-1])
  taps = lambda x, w: layers.depthwise_conv_general_dilated(x, w, strides, layer["padding"],
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                            feature_group_count=x.shape[-1])
  grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
  return {"xla forward": jax.jit(xla), "taps forward": jax.jit(taps),
          "xla forward+backward": grad(xla), "taps forward+backward": grad(taps)}


def main(argv):
  del argv
  info = records.run_info()
  info["host"] = records.host_description()
  rows = []
  for name, arg in MODELS:
    for layer in depthwise_shapes(name, arg):
      x = jax.random.normal(jax.random.PRNGKey(0), (_BATCH.value, *layer["input"]))
      w = jax.random.normal(jax.random.PRNGKey(1), (layer["kernel"], layer["kernel"], 1, layer["input"][-1]))
      fns = forms(layer)
      diff = float(jnp.max(jnp.abs(fns["xla forward"](x, w) - fns["taps forward"](x, w))))
      scale = float(jnp.max(jnp.abs(fns["xla forward"](x, w))))
      times = median_times(fns, {k: (x, w) for k in fns}, _ROUNDS.value)
      rows.append({"model": f"{name}:{arg}", **layer, "times_s": times, "max_abs_diff": diff, "max_abs_out": scale})
      print(rows[-1], flush=True)
  results = {"info": info, "batch": _BATCH.value, "rounds": _ROUNDS.value, "rows": rows}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "depthwise_conv")
  records.write_json_atomic(path + ".json", results)
  text = ["# Depthwise convolutions on CPU: XLA's grouped conv vs the sum of k*k taps\n",
          records.provenance_header(info),
          f"Host: {info['host']}. Batch {_BATCH.value}, median of {_ROUNDS.value} interleaved rounds (ms); "
          "speed-up = XLA's time / the taps' time. Max |difference| of the outputs against the output's max.\n\n"]
  table = [[r["model"], "x".join(str(v) for v in r["input"]), r["kernel"], r["stride"], r["count"],
            *(f"{1e3 * r['times_s'][k]:.1f}" for k in ("xla forward", "taps forward")),
            f"{r['times_s']['xla forward'] / r['times_s']['taps forward']:.1f}x",
            *(f"{1e3 * r['times_s'][k]:.1f}" for k in ("xla forward+backward", "taps forward+backward")),
            f"{r['times_s']['xla forward+backward'] / r['times_s']['taps forward+backward']:.1f}x",
            f"{r['max_abs_diff']:.1e} / {r['max_abs_out']:.1e}"] for r in rows]
  text.append(records.markdown_table(
      ["model", "input HxWxC", "k", "stride", "layers", "XLA fwd", "taps fwd", "fwd speed-up", "XLA fwd+bwd",
       "taps fwd+bwd", "fwd+bwd speed-up", "max diff / max out"], table))
  fwd = [r["times_s"]["xla forward"] / r["times_s"]["taps forward"] for r in rows]
  bwd = [r["times_s"]["xla forward+backward"] / r["times_s"]["taps forward+backward"] for r in rows]
  text.append(f"\nGeometric mean speed-up over the layer shapes: forward {float(np.exp(np.mean(np.log(fwd)))):.1f}x, "
              f"forward+backward {float(np.exp(np.mean(np.log(bwd)))):.1f}x.\n")
  with open(path + ".md", "w") as f:
    f.write("".join(text))
  print(f"wrote {path}.md")


if __name__ == "__main__":
  app.run(main)
