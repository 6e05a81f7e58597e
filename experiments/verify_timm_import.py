r"""Full-size check of the timm weight import for every model of the zoo, at 224x224.

  python -m experiments.verify_timm_import [--models resnet18 ...] [--out PATH]

(from the repository root: the comparison helpers are tests/timm_reference.py, shared with the tests).

For each model: timm's model with random weights (norm parameters and BN statistics made non-trivial),
saved as .safetensors, imported with `flexiq_jax.models.load_timm`, and both run in float32 eval
mode on the same random batch. Pass: max|logit difference| <= 1e-4 * max|timm logit|.
Writes experiments/results/timm_import.json and .md (override with --out). Needs torch and timm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def default_models() -> list[str]:
  """Every registered ImageNet architecture (`flexiq_jax.models.specs()`)."""
  from flexiq_jax import models
  return [spec.name for spec in models.specs()]


def _git(*args) -> str:
  try:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                          cwd=_REPO).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="*", default=None, help="default: every registered architecture")
  parser.add_argument("--batch-size", type=int, default=2)
  parser.add_argument("--out", default=os.path.join("experiments", "results", "timm_import"),
                      help="output path without extension; .json and .md are written")
  parser.add_argument("--helpfull", action="help", help=argparse.SUPPRESS)  # as the absl scripts
  args = parser.parse_args(argv)
  args.models = default_models() if args.models is None else args.models

  import jax
  import torch

  from tests import timm_reference

  timm = timm_reference.import_timm()
  torch.set_num_threads(os.cpu_count() or 1)
  dev = jax.devices()[0]
  # The files this check depends on; uncommitted edits there would make the commit hash misleading.
  relevant = ["flexiq_jax/models", "tests/timm_reference.py", "experiments/verify_timm_import.py"]
  meta = dict(
      command=" ".join(shlex.quote(a) for a in ["python", "-m", "experiments.verify_timm_import"] + (argv or sys.argv[1:])),
      git_commit=_git("rev-parse", "HEAD"),
      uncommitted_changes_in_checked_files=_git("status", "--porcelain", "--", *relevant).splitlines(),
      date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax_device=f"{dev.platform}: {dev.device_kind}",
      host=f"{platform.machine()}, {os.cpu_count()} CPUs",
      versions=dict(python=platform.python_version(), jax=jax.__version__, torch=torch.__version__,
                    timm=timm.__version__),
      tolerance="max|dlogit| <= 1e-4 * max|logit|",
      input=f"{args.batch_size} random N(0,1) images, 224x224x3, float32; 1000 classes",
  )
  results = []
  for i, name in enumerate(args.models):
    t0 = time.time()
    # A seed per model, so that models of one architecture (vit_s / deit_s) get different weights.
    r = timm_reference.compare(name, timm_reference.full_case(name), num_classes=1000,
                               batch_size=args.batch_size, seed=i)
    r["seed"] = i
    r["seconds"] = round(time.time() - t0, 1)
    results.append(r)
    print(f"{name:32s} max|d|={r['max_abs_diff']:.3e} rel={r['rel_diff']:.3e} "
          f"{'PASS' if r['passed'] else 'FAIL'} ({r['seconds']} s)", flush=True)

  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(dict(meta, results=results), f, indent=2, default=str)
  lines = ["# timm weight import: Flax vs timm logits, full-size models", "",
           "Written by `experiments/verify_timm_import.py`; do not edit by hand.", ""]
  lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in meta.items() if k != "versions"]
  lines += [f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}", "",
            "| model | params | seed | max abs logit | max abs diff | relative diff | result | seconds |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]
  for r in results:
    lines.append(f"| {r['model']} | {r['num_params']:,} | {r['seed']} | {r['max_abs_logit']:.4g} | {r['max_abs_diff']:.3e} | "
                 f"{r['rel_diff']:.3e} | {'pass' if r['passed'] else 'FAIL'} | {r['seconds']} |")
  passed = sum(r["passed"] for r in results)
  lines += ["", f"{passed} of {len(results)} models pass."]
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}.json and {args.out}.md: {passed}/{len(results)} pass")
  return 0 if passed == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())
