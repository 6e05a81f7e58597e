r"""XLA:CPU's training step and forward pass on the system malloc and on tcmalloc.

  python -m benchmarks.allocator                        # MobileNetV2 and ResNet-18 :fmnist
  python -m benchmarks.allocator --nets=mobilenetv2 --rounds=3 --steps=10

The allocator is chosen when a process starts (`flexiq_jax.host_memory`), so each allocator runs
in child processes of its own, alternating (system, tcmalloc, system, ...) for `--rounds` rounds;
a child builds the `:fmnist` model of a config at its training batch size and times, after one
compiling call, `--steps` calls of a jitted forward+backward (the float training step's work,
without the optimizer) and of the forward pass; the table gives the median over rounds of each
child's median. The numbers do not change with the allocator: only where the buffers live.

Writes benchmarks/results/allocator_cpu.{json,md} with the command, commit, CPU model and date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

_NETS = flags.DEFINE_list("nets", ["mobilenetv2", "resnet18"], "Configs (configs/<name>.py, the :fmnist variant).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Child processes per allocator, alternating.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per child.")
_OUT = flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Where allocator_cpu.{json,md} go.")
_CHILD = flags.DEFINE_string("child", None, "Internal: time one net in this process and print JSON.")

ALLOCATORS = ("system", "tcmalloc")


def child(name: str, steps: int) -> dict:
  """Times one net's forward+backward and forward passes in this process.

  Args:
    name: the config name.
    steps: timed calls of each.

  Returns:
    {'allocator', 'batch', 'train_step_s', 'forward_s'} (medians).
  """
  import importlib
  import time
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flexiq_jax import host_memory
  from flexiq_jax import pipeline
  config = importlib.import_module(f"configs.{name}").get_config("fmnist")
  net = pipeline.build_model(config, 10)
  batch = int(config.train.batch_size)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch,) + pipeline.image_shape(config)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))
  variables = net.init(jax.random.PRNGKey(0), x[:1], train=False)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss(p):
    logits, _ = net.apply({"params": p, **state}, x, train=True, mutable=list(state))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  grad = jax.jit(jax.grad(loss))
  forward = jax.jit(lambda p: net.apply({"params": p, **state}, x, train=False))

  def median(fn):
    jax.block_until_ready(fn(params))
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      jax.block_until_ready(fn(params))
      times.append(time.perf_counter() - t)
    return float(np.median(times))
  return {"allocator": host_memory.allocator(), "batch": batch, "train_step_s": median(grad),
          "forward_s": median(forward)}


def run_child(name: str, allocator: str, steps: int) -> dict:
  env = {**os.environ, "FLEXIQ_ALLOCATOR": allocator}
  env.pop("FLEXIQ_ALLOCATOR_RERUN", None)
  if allocator == "system":
    env["LD_PRELOAD"] = ""
  out = subprocess.run([sys.executable, "-m", "benchmarks.allocator", f"--child={name}", f"--steps={steps}"],
                       capture_output=True, text=True, env=env, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  from flexiq_jax import host_memory
  if _CHILD.value:
    print(json.dumps(child(_CHILD.value, _STEPS.value)))
    return
  import numpy as np
  from flexiq_jax import records
  if host_memory.tcmalloc_path() is None:
    raise SystemExit("tcmalloc is not installed (Debian: apt-get install libtcmalloc-minimal4): nothing to compare")
  info = records.run_info()
  info.update(loadavg=records.load_average())
  nets = []
  for name in _NETS.value:
    runs = {a: [] for a in ALLOCATORS}
    for _ in range(_ROUNDS.value):
      for a in ALLOCATORS:
        r = run_child(name, a, _STEPS.value)
        if r["allocator"] != a:
          raise SystemExit(f"the {a} child ran on {r['allocator']}")
        runs[a].append(r)
    nets.append({"name": name, "batch": runs["system"][0]["batch"],
                 **{f"{a}_{k}": float(np.median([r[k] for r in runs[a]])) for a in ALLOCATORS
                    for k in ("train_step_s", "forward_s")}})
    print(nets[-1], flush=True)
  results = {"info": info, "rounds": _ROUNDS.value, "steps": _STEPS.value, "nets": nets}
  os.makedirs(_OUT.value, exist_ok=True)
  records.write_json_atomic(os.path.join(_OUT.value, "allocator_cpu.json"), results)
  lines = ["# XLA:CPU on the system malloc and on tcmalloc\n", records.provenance_header(info),
           f"Host: {info.get('host')}. Load average at the start: {info['loadavg']}.\n",
           f"Medians over {_ROUNDS.value} child processes per allocator (alternating), each the median of "
           f"{_STEPS.value} calls after a compiling one; random weights and images at the training batch size.\n",
           "| net (:fmnist) | batch | forward+backward, system (ms) | tcmalloc (ms) | speed-up | forward, system (ms) "
           "| tcmalloc (ms) | speed-up |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for n in nets:
    lines.append(f"| {n['name']} | {n['batch']} | {1e3 * n['system_train_step_s']:.1f} | {1e3 * n['tcmalloc_train_step_s']:.1f} "
                 f"| {n['system_train_step_s'] / n['tcmalloc_train_step_s']:.2f}x | {1e3 * n['system_forward_s']:.1f} "
                 f"| {1e3 * n['tcmalloc_forward_s']:.1f} | {n['system_forward_s'] / n['tcmalloc_forward_s']:.2f}x |")
  with open(os.path.join(_OUT.value, "allocator_cpu.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {os.path.join(_OUT.value, 'allocator_cpu.md')}")


if __name__ == "__main__":
  from flexiq_jax import host_memory  # pylint: disable=g-import-not-at-top
  if any(a.startswith("--child=") for a in sys.argv[1:]):
    host_memory.rerun_with_tcmalloc()
  app.run(main)
