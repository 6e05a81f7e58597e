r"""Per-layer diagnosis of FlexiQ at ratio 1: which lowered layers cost the most, activation or weight.

  python -m experiments.layer_diagnosis --config=configs/mobilenetv2.py:fmnist --workdir=WORKDIR \
      [--variant=joint] [--images=1000]

Run from the repository root on a workdir whose FlexiQ stages have finished (`run.py`, or a
variant of `experiments.flexiq_fixes` under <workdir>/fixes/<variant>, with that variant's config
overrides). At ratio 1 (every lowerable channel in 4 bits) it puts one lowerable layer back to
8 bits at a time, three ways: its input activations only, its weights only, both; and measures
KL(float || quantized) on the first --images eval images (fake-quant arithmetic, the integer
path's values; the bias correction follows what stays lowered). Before and after finetuning.
Layers are grouped by kind (stem-fed, depthwise, pointwise / 1x1, k x k conv, dense, squeeze-
excite) with the KL recovered summed per kind.

Writes experiments/results/layer_diagnosis_<model>[_<variant>].md and .json (command, commit,
device, date).
"""

import dataclasses
import json
import os
import re
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flexiq_jax import cli
from flexiq_jax import data
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import interception
from flexiq_jax import numerics
from flexiq_jax import pipeline
from flexiq_jax import records
from flexiq_jax.interception import LayerCall, MatmulCall, get_path
from flexiq_jax import layer_ops

from experiments import fixes_variants

# The flags exist only when this file runs as a script: the tests import its classes in the
# same process as run.py, whose --config would otherwise be defined twice.
if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                            lock_config=False)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding the float model (and the FlexiQ stages).")
  _VARIANT = flags.DEFINE_string("variant", None, "A variant of experiments.flexiq_fixes (its sub-workdir and "
                                 "overrides); default: the workdir's own stages.")
  _SHARED = flags.DEFINE_bool("shared_selection", False, "The variant ran with experiments.flexiq_fixes "
                               "--share_selection (its workdir is <workdir>/fixes_shared/<variant>).")
  _IMAGES = flags.DEFINE_integer("images", 1000, "Eval images the KL is measured on (the first ones).")
  _OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                             "Folder for the results files.")
  flags.mark_flags_as_required(["config"])


def layer_kind(path: str, info) -> str:
  """A coarse kind for grouping: squeeze-excite, depthwise, pointwise (1x1), kxk conv, dense."""
  if re.search(r"(^|/)se(/|$)|squeeze|excite", path):
    return "squeeze-excite"
  if info.kind == "dense":
    return "dense"
  if info.groups > 1 and info.groups == info.in_channels:
    return "depthwise"
  if info.groups > 1:
    return "grouped conv"
  kernel = tuple(info.kernel_shape[:2])
  return "pointwise (1x1)" if kernel == (1, 1) else f"conv {kernel[0]}x{kernel[1]}"


@dataclasses.dataclass(frozen=True)
class DiagnosisLayers:
  """FlexiQ's fake-quant layers with every lowerable layer's activation and weight lowering
  switched separately (act_low / w_low: {path: traced bool}); matmuls as in FlexiQLayers."""

  quant: dict
  signed: dict
  act_low: dict
  w_low: dict
  matmul_signed: dict

  def matmul(self, call: MatmulCall, a, b):
    return layer_ops.quantized_matmul(call, a, b, get_path(self.quant, call.path),
                                      signed=self.matmul_signed[call.path], mode="fake")

  def layer(self, call: LayerCall, x):
    info, lq = call.info, get_path(self.quant, call.path)
    none = jnp.zeros((info.in_channels,), bool)
    if call.path not in self.act_low:
      return layer_ops.quantized_forward(call, x, lq, none, signed=self.signed[call.path], mode="fake")
    xm = interception.as_matrix_input(info, x)
    plain = {k: v for k, v in lq.items() if k not in ("mean_code", "mean_lowered")}
    xq, wq8, s_x, s_w, _ = layer_ops.quantize_codes(info, xm, call.kernel, plain, none, signed=self.signed[call.path],
                                                    ste=False)
    signed = self.signed[call.path]
    xq = jnp.where(self.act_low[call.path], numerics.lower_codes(xq, lq["act_e"], signed=signed), xq)
    w4 = numerics.lower_codes(wq8, layer_ops.gather_channel(lq["weight_e"], info), signed=True)
    wq = jnp.where(self.w_low[call.path], w4, wq8)
    shift = jnp.zeros(s_w.shape, jnp.float32)
    if "mean_lowered" in lq:  # the mean output lost by what is lowered (quantize_codes' rule)
      m = layer_ops.gather_channel(lq["mean_code"], info)
      mx = jnp.where(self.act_low[call.path], layer_ops.gather_channel(lq["mean_lowered"], info), m)
      table = layer_ops.per_channel_sum(info, m * wq8 - mx * wq)
      shift = table.sum(axis=0) * s_x * s_w
    xd, wd = xq * s_x, wq * s_w
    if info.kind == "dense":
      y = xd @ wd
    else:
      y = interception.conv(call.module, xd, wd, interception.conv_padding(call.module, xm.shape, call.kernel.shape))
    return interception.finish(info, y + shift, call.bias)


def diagnose(model, plan, qvars, images, teacher_logits) -> dict:
  """{'all_lowered': KL, 'layers': [{path, kind, ..., kl_act8, kl_weight8, kl_both8}]} at ratio 1."""
  paths = list(plan.lowerable)
  variables = {k: v for k, v in qvars.items() if k in ("params", "batch_stats")}

  def kl_of(qv, x, teacher, act_low, w_low):
    provider = DiagnosisLayers(qv["quant"], plan.signed, act_low, w_low, plan.matmul_signed)
    logits = interception.run_with_provider(model, plan, {k: qv[k] for k in variables}, x, provider)
    return finetune_lib.kl_divergence(teacher, logits)

  kl_of = jax.jit(kl_of)  # the variables as arguments: XLA would constant-fold closed-over weights
  kl = lambda act_low, w_low: kl_of(qvars, images, teacher_logits, act_low, w_low)
  ones = {p: jnp.bool_(True) for p in paths}
  base = float(kl(ones, ones))
  total_macs = sum(plan.layers[p].macs for p in paths)
  rows = []
  for p in paths:
    back = {**ones, p: jnp.bool_(False)}
    info = plan.layers[p]
    rows.append({"path": p, "kind": layer_kind(p, info), "channels": info.in_channels,
                 "mac_share": info.macs / total_macs,
                 "kl_act8": float(kl(back, ones)), "kl_weight8": float(kl(ones, back)), "kl_both8": float(kl(back, back))})
  return {"all_lowered": base, "all_8bit": float(kl({p: jnp.bool_(False) for p in paths},
                                                    {p: jnp.bool_(False) for p in paths})), "layers": rows}


def by_kind(result: dict) -> list[dict]:
  base = result["all_lowered"]
  kinds = {}
  for r in result["layers"]:
    k = kinds.setdefault(r["kind"], {"kind": r["kind"], "layers": 0, "mac_share": 0.0, "act": 0.0, "weight": 0.0,
                                     "both": 0.0})
    k["layers"] += 1
    k["mac_share"] += r["mac_share"]
    for name, key in (("act", "kl_act8"), ("weight", "kl_weight8"), ("both", "kl_both8")):
      k[name] += base - r[key]
  return sorted(kinds.values(), key=lambda k: -k["both"])


def render(title, info, results: dict, images: int) -> str:
  text = f"# {title}\n\n" + records.provenance_header(info)
  text += (f"KL(float || quantized) on the first {images} eval images at ratio 1 (every lowerable channel in 4 bits), "
           "fake-quant arithmetic. One lowerable layer back to 8 bits at a time: its input activations only, its "
           "weights only, or both; 'recovered' = KL at ratio 1 minus KL with that layer back (positive: the layer's "
           "lowering costs that much).\n\n")
  for stage, res in results.items():
    base = res["all_lowered"]
    text += f"## {stage}\n\nKL at ratio 1: {base:.4f}; every lowerable layer 8-bit (ratio 0): {res['all_8bit']:.4f}.\n\n"
    text += "By kind (recovered KL summed over the kind's layers):\n\n"
    text += records.markdown_table(
        ["kind", "layers", "MAC share", "activation -> 8 bit", "weight -> 8 bit", "both -> 8 bit"],
        [[k["kind"], k["layers"], f"{k['mac_share']:.3f}", f"{k['act']:.4f}", f"{k['weight']:.4f}", f"{k['both']:.4f}"]
         for k in by_kind(res)])
    top = sorted(res["layers"], key=lambda r: r["kl_both8"])[:12]
    text += "\n\nThe 12 layers whose return to 8 bits recovers the most:\n\n"
    text += records.markdown_table(
        ["layer", "kind", "channels", "MAC share", "activation -> 8 bit", "weight -> 8 bit", "both -> 8 bit"],
        [[r["path"], r["kind"], r["channels"], f"{r['mac_share']:.3f}", f"{base - r['kl_act8']:.4f}",
          f"{base - r['kl_weight8']:.4f}", f"{base - r['kl_both8']:.4f}"] for r in top])
    text += "\n\n"
  return text


def main(argv):
  base = _CONFIG.value
  workdir = cli.start(argv, _WORKDIR.value)
  info = records.run_info(records.command_argv())
  variant = _VARIANT.value
  if variant is not None and variant not in fixes_variants.VARIANTS:
    raise app.UsageError(f"unknown variant {variant!r}; known: {', '.join(fixes_variants.VARIANTS)}")
  run = pipeline.Run(base, workdir)
  float_model = pipeline.run_until(run, "train").float_model
  config = fixes_variants.override(base, fixes_variants.VARIANTS[variant]) if variant else base
  subdir = "fixes_shared" if _SHARED.value else "fixes"
  stages = pipeline.Run(config, os.path.join(workdir, subdir, variant) if variant else workdir, run.mesh)
  if _SHARED.value:
    if not variant:
      raise app.UsageError("--shared_selection needs --variant")
    res = fixes_variants.run_with_reference_selection(stages, float_model, os.path.join(workdir, subdir, "reference"),
                                                    base)
  else:
    res = pipeline.run_until(stages, "finetune", float_model=float_model, evaluate=False)
  images = []
  for batch in pipeline.eval_batches(config):
    images.append(np.asarray(batch["image"]))
    if sum(len(b) for b in images) >= _IMAGES.value:
      break
  images = jnp.asarray(np.concatenate(images)[:_IMAGES.value])
  teacher = float_model.logits(images)
  plan = res.quantized.qmodel.plan
  results = {"before finetuning": diagnose(float_model.model, plan, res.quantized.qvars, images, teacher),
             "after finetuning": diagnose(float_model.model, plan, res.finetuned.qvars, images, teacher)}
  name = base.model.name + (f"_{variant}" if variant else "") + ("_shared_selection" if _SHARED.value else "")
  title = (f"Per-layer diagnosis at ratio 1: {base.model.name} on {base.data.name}"
           + (f", variant {variant} ({', '.join(f'{k}={v}' for k, v in fixes_variants.VARIANTS[variant].items())})"
              if variant else ""))
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"layer_diagnosis_{name}")
  with open(stem + ".json", "w") as f:
    json.dump({**info, "variant": variant, "images": int(images.shape[0]), "results": results}, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(render(title, info, results, int(images.shape[0])))
  print(open(stem + ".md").read())


if __name__ == "__main__":
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main)
