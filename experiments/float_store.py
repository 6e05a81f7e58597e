r"""Float stages kept beside the sweep's results, so that a new machine skips float training.

  python -m experiments.float_store --pack=swin_t,vit_b      # workdirs/paper/<name> -> the store
  python -m experiments.float_store --unpack=swin_t          # the store -> workdirs/paper/<name>
  python -m experiments.float_store --list

A model's float stage (`<workdir>/float`) is the sweep's longest step on 2 CPU cores (up to an
hour for a transformer's 20 epochs) and every method reuses it; the workdirs live on the machine
that made them. `pack` writes the stage as it is, finished or part-trained, into
`experiments/results/paper_sweep/floats/<name>_seed<seed>.tar.gz`: its newest checkpoint (the
whole training state, so a part-trained run resumes where it stopped), its fingerprint, done
marker, metrics and periodic evaluation, with the workdir's `config.json` and the run records
that trained it (`runs/*.json`, which `experiments.float_recipes` reads). `unpack` puts it into a
workdir that has no float stage of its own, when the stored stage's fingerprint is the one the
config asks for now; the pipeline then resumes or reuses it as if it had trained it there. The
sweep (`experiments.paper_tables`) does both by itself: it unpacks before the float stage and
packs once the float stage is done.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

STORE = os.path.join("experiments", "results", "paper_sweep", "floats")


def archive_path(name: str, seed: int = 0, store: str = STORE) -> str:
  """The store's file for model `name` and `seed`."""
  return os.path.join(store, f"{name}_seed{seed}.tar.gz")


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _newest_checkpoint(ckpt_dir: str) -> str | None:
  """The newest finished Orbax step directory of `ckpt_dir` (an integer name; Orbax's
  temporary directories of a save in progress are not)."""
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  return os.path.join(ckpt_dir, str(max(steps))) if steps else None


def stage_state(workdir: str) -> dict | None:
  """What the float stage of `workdir` holds: its fingerprint, whether it is done, and the
  step of its newest checkpoint (None when there is no float stage with a checkpoint)."""
  float_dir = os.path.join(workdir, "float")
  fingerprint = (_read_json(os.path.join(float_dir, "fingerprint.json")) or {}).get("fingerprint")
  newest = _newest_checkpoint(os.path.join(float_dir, "checkpoints"))
  if fingerprint is None or newest is None:
    return None
  done = _read_json(os.path.join(float_dir, "done.json"))
  return {"fingerprint": fingerprint, "done": bool(done and done.get("fingerprint") == fingerprint),
          "step": int(os.path.basename(newest))}


def stored_state(path: str) -> dict | None:
  """The `stage_state` recorded in the store's file `path` (None if there is none)."""
  if not os.path.exists(path):
    return None
  with tarfile.open(path, "r:gz") as tar:
    try:
      member = tar.extractfile("STATE.json")
    except KeyError:
      return None
    return json.load(member) if member else None


def pack(workdir: str, path: str) -> dict | None:
  """Writes the float stage of `workdir` to `path` (atomically), unless `path` already holds the
  same stage at the same step.

  Args:
    workdir: the model's workdir.
    path: the store's file (`archive_path`).

  Returns:
    The packed `stage_state`, or None when the workdir has no float stage with a checkpoint or the
    store already holds it.
  """
  state = stage_state(workdir)
  if state is None or stored_state(path) == state:
    return None
  float_dir = os.path.join(workdir, "float")
  newest = _newest_checkpoint(os.path.join(float_dir, "checkpoints"))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  partial = path + ".partial"
  with tarfile.open(partial, "w:gz") as tar:
    payload = json.dumps(state, indent=1).encode()
    info = tarfile.TarInfo("STATE.json")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
    for name in sorted(os.listdir(float_dir)):
      if name != "checkpoints" and os.path.isfile(os.path.join(float_dir, name)):
        tar.add(os.path.join(float_dir, name), arcname=os.path.join("float", name))
    tar.add(newest, arcname=os.path.join("float", "checkpoints", os.path.basename(newest)))
    if os.path.exists(os.path.join(workdir, "config.json")):
      tar.add(os.path.join(workdir, "config.json"), arcname="config.json")
    runs = os.path.join(workdir, "runs")
    for record in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
      tar.add(os.path.join(runs, record), arcname=os.path.join("runs", record))
  os.replace(partial, path)
  return state


def unpack(path: str, workdir: str, fingerprint: str) -> dict | None:
  """Puts the stored float stage of `path` into `workdir` when the workdir has none (no float
  checkpoint) and the stored stage was made for `fingerprint`.

  Args:
    path: the store's file.
    workdir: the model's workdir (created if needed).
    fingerprint: the float stage's fingerprint under the config of this run.

  Returns:
    The unpacked `stage_state`, or None when nothing was unpacked (no stored stage, the workdir
    has its own, or the stored one was made under other float settings: a note says so).
  """
  stored = stored_state(path)
  if stored is None or stage_state(workdir) is not None:
    return None
  if stored["fingerprint"] != fingerprint:
    print(f"note: {path} holds a float stage made with other float settings; not used (training here)",
          flush=True)
    return None
  os.makedirs(workdir, exist_ok=True)
  with tarfile.open(path, "r:gz") as tar:
    members = [m for m in tar.getmembers() if m.name != "STATE.json"]
    for m in members:
      target = os.path.realpath(os.path.join(workdir, m.name))
      if not target.startswith(os.path.realpath(workdir) + os.sep) or not (m.isfile() or m.isdir()):
        raise ValueError(f"{path}: unexpected entry {m.name!r}; delete the file and train the float model")
      if m.isfile() and os.path.exists(target) and m.name in ("config.json",):
        continue  # a workdir's own config stays
      tar.extract(m, workdir, filter="data")
  return stored


def main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.float_store", description=__doc__.splitlines()[0])
  parser.add_argument("--pack", default="", help="comma-separated models whose float stage goes into the store")
  parser.add_argument("--unpack", default="", help="comma-separated models whose stored float stage goes into their workdir")
  parser.add_argument("--list", action="store_true", help="what the store holds")
  parser.add_argument("--workroot", default=os.path.join("workdirs", "paper"), help="parent of the model workdirs")
  parser.add_argument("--store", default=STORE, help="the store's folder")
  args = parser.parse_args(argv)
  if not (args.pack or args.unpack or args.list):
    parser.print_usage(sys.stderr)
    print("error: give --pack=<models>, --unpack=<models> or --list", file=sys.stderr)
    return 2
  for name in filter(None, args.pack.split(",")):
    workdir = os.path.join(args.workroot, name)
    state = pack(workdir, archive_path(name, store=args.store))
    print(f"{name}: " + (f"packed step {state['step']}{' (done)' if state['done'] else ' (part-trained)'}"
                         if state else f"nothing new to pack from {workdir}"))
  for name in filter(None, args.unpack.split(",")):
    from experiments import sweep_models
    from flexiq_jax import pipeline
    workdir = os.path.join(args.workroot, name)
    config = sweep_models.model_config(name, 0, ("flexiq",), (), smoke=False)  # an unknown name exits, listing them
    run = pipeline.Run(config, workdir)
    state = unpack(archive_path(name, store=args.store), workdir, run.stage("float").fingerprint)
    print(f"{name}: " + (f"unpacked step {state['step']} into {workdir}" if state else "nothing unpacked"))
  if args.list:
    names = sorted(f for f in os.listdir(args.store) if f.endswith(".tar.gz")) if os.path.isdir(args.store) else []
    if not names:
      print(f"{args.store} holds no float stage")
    for f in names:
      state = stored_state(os.path.join(args.store, f)) or {}
      size = os.path.getsize(os.path.join(args.store, f)) / 2**20
      print(f"{f}: step {state.get('step')}, {'done' if state.get('done') else 'part-trained'}, {size:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
