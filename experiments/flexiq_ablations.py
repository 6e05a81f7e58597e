r"""FlexiQ ablations before finetuning: extraction (fitted vs naive) and channel selectors.

  python experiments/flexiq_ablations.py --config=configs/quickstart.py --workdir=workdirs/quickstart

Reuses (or trains) the float model in --workdir, then for each variant calibrates, selects,
quantizes and sweeps the 4-bit ratios in its own sub-workdir (<workdir>/ablations/<variant>).
Writes experiments/results/flexiq_ablations_<model>.md and .json (command, commit, device, date).
"""

import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexiq_jax import pipeline  # noqa: E402
from flexiq_jax import records  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding (or to hold) the float model.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")
flags.mark_flags_as_required(["config", "workdir"])

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
  del argv
  logging.set_verbosity(logging.WARNING)
  base, workdir = _CONFIG.value, _WORKDIR.value
  info = records.run_info()  # the code that runs is the code at start
  model, variables = pipeline.train_float(base, workdir)
  float_metrics = pipeline.evaluate_float(base, workdir, model, variables)
  rows = {}
  for name, changes in VARIANTS.items():
    config = _override(base, changes)
    sub = os.path.join(workdir, "ablations", name)
    if not os.path.isdir(os.path.join(sub, "float")):  # share the float model, not retrain it
      shutil.copytree(os.path.join(workdir, "float"), os.path.join(sub, "float"))
    plan, folded, calib = pipeline.calibrate_stage(config, sub, model, variables)
    orders, counts, levels = pipeline.select_stage(config, sub, model, variables, plan, folded, calib)
    qmodel, qvars = pipeline.quantize_stage(config, sub, model, plan, folded, calib, orders, counts, levels)
    rows[name] = {"changes": changes, "sweep": pipeline.sweep(base, qmodel, qvars, desc=name)}

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
  app.run(main)
