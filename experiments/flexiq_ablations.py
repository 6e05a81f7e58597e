r"""FlexiQ ablations before finetuning: extraction (fitted vs naive) and channel selectors.

  python -m experiments.flexiq_ablations --config=configs/quickstart.py [--workdir=workdirs/quickstart]

Run from the repository root. Reuses (or trains) the float model in --workdir (default
workdirs/<config name>[_<args>], as run.py), then for each variant calibrates, selects, quantizes
and sweeps the 4-bit ratios in its own sub-workdir (<workdir>/ablations/<variant>); every variant
is given the one float model (`pipeline.run_until(..., float_model=...)`), none retrains it.
Writes experiments/results/flexiq_ablations_<model>.md and .json (command, commit, device, date).
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from flexiq_jax import cli
from flexiq_jax import pipeline
from flexiq_jax import records

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding (or to hold) the float model "
                               "(default: workdirs/<config name>[_<args>]).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")
flags.mark_flags_as_required(["config"])

# name -> (config field, value) overrides; 'reference' is the config as given.
VARIANTS = {
    "reference": {},
    "naive_extraction": {"quant.extraction": "naive"},
    "no_bias_correction": {"quant.bias_correction": False},
    "naive_no_bias_correction": {"quant.extraction": "naive", "quant.bias_correction": False},
    "selector_uniform": {"select.selector": "uniform"},
    "selector_greedy": {"select.selector": "greedy"},
    "selector_random": {"select.selector": "random"},
    "random_channel_order": {"select.channel_order": "random"},
}


def _override(config, changes):
  config = config.copy_and_resolve_references()
  for dotted, value in changes.items():
    section, field = dotted.split(".")
    config[section][field] = value
  return config


def main(argv):
  base = _CONFIG.value
  workdir = cli.start(argv, _WORKDIR.value)
  info = records.run_info(records.command_argv())  # the code that runs is the code at start
  run = pipeline.Run(base, workdir)
  result = pipeline.run_until(run, "eval")
  float_model, float_metrics = result.float_model, result.float_metrics
  rows = {}
  for name, changes in VARIANTS.items():
    config = _override(base, changes)
    variant = pipeline.Run(config, os.path.join(workdir, "ablations", name), run.mesh)
    records.write_run_config(variant.workdir, config)
    quantized = pipeline.run_until(variant, "quantize", float_model=float_model, evaluate=False).quantized
    points = pipeline.sweep(variant, quantized, desc=name)
    rows[name] = {"changes": changes, "sweep": [dataclasses.asdict(p) for p in points]}

  ratios = [r["ratio"] for r in rows["reference"]["sweep"]]
  headers = ["variant", "changes"] + [f"top-1 @ {100 * r:.0f}%" for r in ratios]
  table = [[name, ", ".join(f"{k}={v}" for k, v in row["changes"].items()) or "(config as given)"]
           + [s["top1"] for s in row["sweep"]] for name, row in rows.items()]
  text = (f"# FlexiQ ablations before finetuning: {base.model.name} on {base.data.name}\n\n"
          + records.provenance_header(info)
          + f"Float top-1: {float_metrics['top1']:.2f}%. Top-1 (%) on {base.data.eval_split} at each 4-bit ratio, "
            "no finetuning.\n\n" + records.markdown_table(headers, table))
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"flexiq_ablations_{base.model.name}")
  with open(stem + ".md", "w") as f:
    f.write(text)
  with open(stem + ".json", "w") as f:
    json.dump({**info, "float": float_metrics, "variants": rows}, f, indent=2)
  print(text)


if __name__ == "__main__":
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main)
