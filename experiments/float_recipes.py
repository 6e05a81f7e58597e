r"""The float models of the sweep: each `:fmnist` recipe, its training curve and its test top-1.

  python -m experiments.float_recipes                     # every model under workdirs/paper
  python -m experiments.float_recipes --models=resnet18,vit_s --workroot=workdirs/paper
  python -m experiments.float_recipes --train    # first train (or resume) every unfinished one

Run from the repository root, after (or while) the float models train, e.g.
`python run.py --config=configs/<name>.py:fmnist --workdir=workdirs/paper/<name> --mode=train`
(the sweep, `python -m experiments.paper_tables`, trains them itself and reuses them). Reads each
workdir's float stage only: the recipe (`config.json`), the periodic evaluation on the eval split
(`float/eval.jsonl`, one row an epoch under the `:fmnist` recipes), and the run record that
trained it (`runs/*.json`: command, commit, host, date). A model whose float stage has not
finished is listed with the curve so far. Writes experiments/results/float_recipes.{json,md}.
"""

from __future__ import annotations

import glob
import json
import os
import sys

# The aim of the :fmnist recipes on the Fashion-MNIST test split (top-1, %).
TARGET_CNN = 90.0
TARGET_TRANSFORMER = 86.0
TARGET_PRETRAINED = 92.0  # the ImageNet-trained network finetuned: above every model from scratch


# Recipes tried and replaced, kept for the record: {model: [(workdir, what differed)]}. Each
# workdir holds a finished float stage of the earlier recipe (a file's absence drops the line).
EARLIER_RUNS = {
    "mobilenetv2": [(os.path.join("workdirs", "recipe_mbv2_warmup50"), "no gradient clipping (today at norm 2)"),
                    (os.path.join("workdirs", "recipe_mbv2_warmup1ep"), "no gradient clipping, warmup 429 steps "
                     "(today at norm 2, warmup 50)"),
                    (os.path.join("workdirs", "recipe_mbv2_wd5e-4"), "stem stride 2, weight decay 5e-4 (today 1, 4e-5)"),
                    (os.path.join("workdirs", "recipe_mbv2_stem2"), "stem stride 2 (today 1)")],
    "efficientnet_b0": [(os.path.join("workdirs", "recipe_b0_warmup50"), "no gradient clipping (today at norm 2)"),
                        (os.path.join("workdirs", "recipe_b0_stem2"), "stem stride 2 (today 1)")],
    "efficientnet_lite0": [(os.path.join("workdirs", "recipe_lite0_e1"), "1 epoch (today 2)")],
}


def _steps_per_epoch(train_split: str, batch_size: int) -> int:
  """Steps of one epoch over Fashion-MNIST's `train_split` (e.g. 'train[:-5000]': 430 at 128)."""
  from flexiq_jax.data import fashion_mnist

  return -(-fashion_mnist.split_size(train_split) // batch_size)


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def training_record(workdir: str, fingerprint: str | None) -> dict | None:
  """The first finished run record of `workdir` whose float stage has `fingerprint` and which
  trained it (its command is a training mode), else the first with that fingerprint (a record
  still running, or one that died before naming its stages, is skipped)."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "runs", "*.json"))):
    with open(path) as f:
      rec = json.load(f)
    if (rec.get("stages") or {}).get("float") == fingerprint and rec.get("status") == "finished":
      found.append(rec)
  trained = [r for r in found if "--mode=train" in r.get("command", "") or "--mode" not in r.get("command", "")]
  pick = (trained or found or [None])[0]
  return None if pick is None else {k: pick.get(k) for k in ("command", "commit", "host", "date")}


def model_row(name: str, workdir: str) -> dict:
  """One model's recipe, curve and result (from its workdir; absent files give empty fields).

  Args:
    name: the config name (configs/<name>.py).
    workdir: its sweep workdir.

  Returns:
    {'model', 'workdir', 'transformer', 'recipe', 'curve' [(epoch, top1)], 'top1', 'done',
    'target', 'met', 'record'}.
  """
  from flexiq_jax import models

  config = common_config(name)
  spec = models.spec(config.model.name)
  transformer = spec.transformer
  steps_per_epoch = _steps_per_epoch(config.data.train_split, config.train.batch_size)
  done = _read_json(os.path.join(workdir, "float", "done.json"))
  fingerprint = _read_json(os.path.join(workdir, "float", "fingerprint.json")) or {}
  evals = _read_jsonl(os.path.join(workdir, "float", "eval.jsonl"))
  curve = [(round(r["step"] / steps_per_epoch, 2), r["top1"]) for r in evals]
  total = done.get("total_steps") if done else None
  top1 = evals[-1]["top1"] if done and evals and evals[-1]["step"] == total else None
  target = TARGET_PRETRAINED if spec.pretrained_fmnist else TARGET_TRANSFORMER if transformer else TARGET_CNN
  t = config.train
  recipe = dict(epochs=t.num_epochs, optimizer=t.optimizer, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                warmup_steps=t.warmup_steps, label_smoothing=t.label_smoothing, augment=bool(config.data.augment),
                batch_size=t.batch_size, train_split=config.data.train_split, grad_clip_norm=t.grad_clip_norm)
  return dict(model=name, workdir=workdir, transformer=transformer, pretrained=spec.pretrained_fmnist, recipe=recipe, curve=curve, top1=top1,
              done=bool(done), target=target, met=None if top1 is None else top1 >= target,
              record=training_record(workdir, fingerprint.get("fingerprint")) if done else None)


def earlier_rows(name: str) -> list[dict]:
  """The finished runs of replaced recipes of `name` (EARLIER_RUNS) that are still on disk.

  Args:
    name: the config name.

  Returns:
    [{'model', 'workdir', 'change', 'curve' [(epoch, top1)], 'top1', 'train_accuracy', 'record'}].
  """
  out = []
  for workdir, change in EARLIER_RUNS.get(name, []):
    done = _read_json(os.path.join(workdir, "float", "done.json"))
    config = _read_json(os.path.join(workdir, "config.json"))
    evals = _read_jsonl(os.path.join(workdir, "float", "eval.jsonl"))
    if not (done and config and evals):
      continue
    steps_per_epoch = _steps_per_epoch(config.get("data", {}).get("train_split", "train"),
                                       int(config["train"]["batch_size"]))
    metrics = _read_jsonl(os.path.join(workdir, "float", "metrics.jsonl"))
    fingerprint = (_read_json(os.path.join(workdir, "float", "fingerprint.json")) or {}).get("fingerprint")
    out.append(dict(model=name, workdir=workdir, change=change,
                    curve=[(round(r["step"] / steps_per_epoch, 2), r["top1"]) for r in evals], top1=evals[-1]["top1"],
                    train_accuracy=100 * metrics[-1]["accuracy"] if metrics else None,
                    record=training_record(workdir, fingerprint)))
  return out


# Recipe fields added to the report later, and the value an earlier report's recipe had.
_RECIPE_DEFAULTS = {"train_split": "train", "grad_clip_norm": 0.0}


def _recipe_changes(old: dict, now: dict) -> str:
  """What differs between an earlier report's recipe and today's ('' when nothing does)."""
  value = lambda recipe, k: recipe.get(k, _RECIPE_DEFAULTS.get(k))
  return ", ".join(f"{k} {value(old, k)} (today {now[k]})" for k in now if value(old, k) != now[k])


def keep_recorded(rows: list[dict], previous: dict) -> list[dict]:
  """`rows` with what an earlier report (`previous`, its JSON) recorded of a finished float stage
  whose workdir this machine does not hold (a new machine; workdirs are not committed): a model
  row not finished here keeps the earlier finished row of the same recipe (marked 'kept', with
  the curve of a retraining in progress as 'retraining'), and a replaced recipe missing here keeps
  its earlier entry. A finished stage on disk always wins.

  Args:
    rows: the rows read from the workdirs now.
    previous: the report this run replaces ({} if none).

  Returns:
    The rows to report.
  """
  before = {r["model"]: r for r in previous.get("models", [])}
  out = []
  for row in rows:
    old = before.get(row["model"])
    change = _recipe_changes(old["recipe"], row["recipe"]) if old else ""
    if old and not row["done"] and old.get("done") and not change:
      kept = {**old, "kept": old.get("kept") or {"commit": previous.get("commit"), "date": previous.get("date")},
              "retraining": row["curve"] or None}
      row = {**kept, "earlier": row["earlier"]}
    elif old and old.get("done") and old.get("top1") is not None and change:
      # The recipe changed since: the finished run of the earlier one is listed among the replaced.
      replaced = {"model": row["model"], "workdir": old["workdir"], "change": change, "curve": old["curve"],
                  "top1": old["top1"], "train_accuracy": None, "record": old.get("record")}
      row = {**row, "earlier": row["earlier"] + [replaced]}
    if old:
      run_of = lambda e: (e["workdir"], tuple(tuple(p) for p in e["curve"]))  # one training run, however described
      here = {run_of(e) for e in row["earlier"]}
      row = {**row, "earlier": row["earlier"] + [e for e in old.get("earlier", []) if run_of(e) not in here]}
    out.append(row)
  return out


def common_config(name: str):
  """configs/<name>.py at the setting of its Fashion-MNIST sweep row."""
  import importlib

  from experiments import paper_tables
  return importlib.import_module(f"configs.{name}").get_config(paper_tables.fmnist_arg(name))


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _short(commit) -> str:
  """A commit as the report shows it: 7 digits, '-dirty' kept (uncommitted changes in the tree)."""
  commit = str(commit)
  return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def render(info: dict, rows: list[dict]) -> str:
  """The Markdown report of `rows` under `info`'s provenance header."""
  from flexiq_jax import records

  lines = [records.provenance_header(info), "# Float models of the sweep (`:fmnist` recipes)\n\n",
           f"Top-1 on the config's eval images (the first 5000 Fashion-MNIST test images), evaluated once an "
           f"epoch during training (`float/eval.jsonl`). Aim: CNNs >= {TARGET_CNN:.0f} %, transformers >= "
           f"{TARGET_TRANSFORMER:.0f} %, the ImageNet-pretrained network >= {TARGET_PRETRAINED:.0f} %. A model not finished is shown with its curve so far.\n\n"]
  table = []
  for r in rows:
    p = r["recipe"]
    recipe = (f"{p['epochs']:g} ep, {p['optimizer']} {p['learning_rate']:g}, wd {p['weight_decay']:g}, warmup "
              f"{p['warmup_steps']}, ls {p['label_smoothing']:g}{', augment' if p['augment'] else ''}"
              + (f", clip {p['grad_clip_norm']:g}" if p.get("grad_clip_norm") else ""))
    state = ("not started" if not r["curve"] and not r["done"] else
             f"{r['top1']:.2f}" if r["top1"] is not None else "training")
    met = "" if r["met"] is None else ("yes" if r["met"] else f"no ({r['top1'] - r['target']:+.2f})")
    curve = ", ".join(f"{top1:.1f}" for _, top1 in r["curve"]) or "-"
    kind = ("CNN, ImageNet-pretrained" if r["pretrained"] else "CNN") if not r["transformer"] else "transformer"
    if r.get("retraining"):
      curve += f" (training again here: {', '.join(f'{top1:.1f}' for _, top1 in r['retraining'])})"
    table.append([r["model"] + (" *" if r.get("kept") else ""), kind, recipe, state, met, curve])
  lines.append(records.markdown_table(["model", "kind", "recipe", "top-1 (%)", f"aim met", "top-1 per epoch"], table))
  kept = [r for r in rows if r.get("kept")]
  if kept:
    lines.append("\n\\* Kept from the report of " + "; ".join(sorted({f"{_short(r['kept']['commit'])} ({r['kept']['date']})" for r in kept}))
                 + ": the workdir of that float stage is not on the machine that wrote this one (workdirs are not "
                 "committed); the row is as that report recorded it.\n")
  lines.append("\nTrained by (the run record of each float stage):\n\n")
  for r in rows:
    rec = r["record"]
    if rec:
      lines.append(f"- {r['model']}: `{rec['command']}` at {_short(rec['commit'])} on {rec['host']}, {rec['date']}\n")
  if any(str((r["record"] or {}).get("commit", "")).endswith("-dirty") for r in rows):
    lines.append("\n(-dirty: the working tree held changes not yet committed; the commit after it holds them.)\n")
  earlier = [e for r in rows for e in r.get("earlier", [])]
  if earlier:
    lines.append("\nRecipes tried and replaced (their float stages in the workdirs named, or on the machine of an "
                 "earlier report):\n\n")
    lines.append(records.markdown_table(
        ["model", "what differed", "top-1 (%)", "last logged train accuracy (%)", "top-1 per epoch", "trained by"],
        [[e["model"], e["change"], f"{e['top1']:.2f}",
          "-" if e["train_accuracy"] is None else f"{e['train_accuracy']:.1f}",
          ", ".join(f"{top1:.1f}" for _, top1 in e["curve"]),
          f"`{e['record']['command']}` at {_short(e['record']['commit'])}, {e['record']['date']}" if e["record"] else "-"]
         for e in earlier]))
  return "".join(lines)


def train_commands(names: list[str], workroot: str) -> list[list[str]]:
  """`run.py --mode=train` for each model of `names` whose float stage in `workroot` has not
  finished, at its sweep row's config argument (a killed one resumes from its checkpoint).

  Args:
    names: config names, in the order to train them.
    workroot: the parent of the model workdirs.

  Returns:
    The commands (argument lists).
  """
  from experiments import paper_tables

  return [[sys.executable, "run.py", f"--config=configs/{n}.py:{paper_tables.fmnist_arg(n)}",
           f"--workdir={os.path.join(workroot, n)}", "--mode=train"]
          for n in names if not os.path.exists(os.path.join(workroot, n, "float", "done.json"))]


def main(argv=None) -> int:
  import argparse

  from flexiq_jax import records

  from experiments import paper_tables

  order = list(paper_tables.SWEEP_ORDER)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(order), help="comma-separated config names")
  parser.add_argument("--workroot", default=os.path.join("workdirs", "paper"), help="parent of the model workdirs")
  parser.add_argument("--out", default=os.path.join("experiments", "results", "float_recipes"),
                      help="output path without extension; .json and .md are written")
  parser.add_argument("--train", action="store_true",
                      help="first train every listed model whose float stage is not finished, one after another")
  args = parser.parse_args(argv)
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n not in order]
  if unknown:
    print(f"error: unknown model {', '.join(unknown)}; use config names of {', '.join(order)}", file=sys.stderr)
    return 2
  if args.train:
    import subprocess

    for command in train_commands(names, args.workroot):
      print("+", " ".join(command[1:]), flush=True)
      if subprocess.run(command, check=False).returncode != 0:
        print(f"error: {' '.join(command[1:])} failed; its log is above, the models before it are kept",
              file=sys.stderr)
        return 1
  rows = [{**model_row(n, os.path.join(args.workroot, n)), "earlier": earlier_rows(n)} for n in names]
  rows = keep_recorded(rows, _read_json(args.out + ".json") or {})
  info = records.run_info(["-m", "experiments.float_recipes"] + list(argv if argv is not None else sys.argv[1:]))
  records.write_json_atomic(args.out + ".json", {**info, "models": rows})
  text = render(info, rows)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
