"""The variants of experiments/flexiq_fixes.py and the helpers it shares with
experiments/layer_diagnosis.py (no flags here, so both scripts can import it)."""

import os

from absl import app

from flexiq_jax import pipeline
from flexiq_jax import records

_LSQ = {"finetune.lsq": True, "finetune.lsq_grad_scale": "effective", "finetune.lsq_learning_rate": "compare"}
# name -> config overrides ("compare" as a value: the LSQ baseline's compare.lsq_learning_rate).
# Each names its activation grid: symmetric unless it says otherwise (the grid these variants were
# measured on before the asymmetric grid became the configs' default).
_VARIANT_CHANGES = {
    "reference": {"quant.weight_scale": "max127"},  # the grid before max112 became the default
    "joint": {"quant.weight_scale": "joint"},
    "joint_sandwich": {"quant.weight_scale": "joint", "finetune.every_step_ratios": (0.0, 1.0)},
    "joint_sandwich_lsq": {"quant.weight_scale": "joint", "finetune.every_step_ratios": (0.0, 1.0), **_LSQ},
    "max112": {"quant.weight_scale": "max112"},
    "sandwich": {"quant.weight_scale": "max127", "finetune.every_step_ratios": (0.0, 1.0)},
    "max112_sandwich": {"quant.weight_scale": "max112", "finetune.every_step_ratios": (0.0, 1.0)},
    # FlexiQ finetuned for 100 % only (LSQ's setting): one network for one point, for the fair fight.
    "max112_only100": {"quant.weight_scale": "max112", "finetune.levels": (1.0,), "finetune.level_probs": (1.0,),
                       "finetune.uniform_prob": 0.0},
    "max112_sandwich_lsq": {"quant.weight_scale": "max112", "finetune.every_step_ratios": (0.0, 1.0), **_LSQ},
    "joint_lsq_qmax8": {"quant.weight_scale": "joint", "finetune.lsq": True, "finetune.lsq_grad_scale": "qmax8",
                        "finetune.lsq_learning_rate": "compare"},
    "joint_lsq": {"quant.weight_scale": "joint", **_LSQ},
    # Learnt activation and weight scales, as the LSQ baseline learns them.
    "max112_lsq": {"quant.weight_scale": "max112", **_LSQ, "finetune.lsq_weights": True},
    # Signed inputs (after SiLU) on an unsigned grid with a zero point that survives extraction.
    "max112_asym": {"quant.weight_scale": "max112", "quant.act_grid": "asymmetric"},
    # Cross-layer equalization of the folded weights before calibration (quant.equalize).
    "max112_cle": {"quant.weight_scale": "max112", "quant.equalize": True},
}
VARIANTS = {name: {"quant.act_grid": "symmetric", **changes} for name, changes in _VARIANT_CHANGES.items()}


def override(config, changes: dict):
  """A copy of `config` with the dotted `changes` applied."""
  config = config.copy_and_resolve_references()
  for dotted, value in changes.items():
    section, field = dotted.split(".")
    if value == "compare":
      value = float(config.compare.lsq_learning_rate)
    config[section][field] = value
  return config


def run_with_reference_selection(variant: pipeline.Run, float_model, reference_dir: str, base,
                                 finetune: bool = True):
  """calibrate -> (the reference variant's selection) -> quantize [-> finetune] in the variant's
  workdir; the reference variant must have run first (it runs its own selection)."""
  calib = pipeline.calibrate(variant, float_model)
  reference = pipeline.Run(base, reference_dir, variant.mesh)
  if variant.workdir == reference_dir:
    selection = pipeline.select(variant, float_model, calib)
  else:
    if not os.path.exists(os.path.join(reference_dir, "select", "done.json")):
      raise app.UsageError("--share_selection: run the 'reference' variant first (it makes the selection)")
    selection = pipeline.select(reference, float_model, pipeline.calibrate(reference, float_model))
    records.write_json_atomic(os.path.join(variant.workdir, "selection_from.json"),
                              {"selection": os.path.join(reference_dir, "select")})
  quantized = pipeline.quantize(variant, float_model, calib, selection)
  finetuned = pipeline.finetune(variant, float_model, quantized) if finetune else None
  return pipeline.PipelineResult(float_model, calibration=calib, selection=selection, quantized=quantized,
                                 finetuned=finetuned)


