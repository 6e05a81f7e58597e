"""Shared fixtures: a tiny Fashion-MNIST-format dataset written as real IDX files, the quickstart
smoke config on it, and a finished run.py smoke run (one per session, shared by the files that
read a finished workdir)."""

import dataclasses
import gzip
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("FLEXIQ_NO_PROGRESS", "1")
# Many tests compile the same small computations (and subprocess tests recompile what the parent
# did): a persistent XLA cache makes the suite several times faster on 2 cores.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flexiq_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array: np.ndarray) -> None:
  """Writes an unsigned-byte IDX file (the Fashion-MNIST format), gzip-compressed."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_fmnist_dir(root, num_train=256, num_test=128, seed=0):
  """Class k images are noisy stripes at row band k, so a small model can learn them quickly."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for split, n, prefix in (("train", num_train, "train"), ("test", num_test, "t10k")):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
      images[i, 2 + 2 * k:4 + 2 * k, :] = 250
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return str(root)


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory):
  return make_fmnist_dir(tmp_path_factory.mktemp("fmnist"))


def quickstart_plan_layers():
  """The quickstart model's quantization plan, its layers as a results file records them
  (`plan_layers`), and the same layers as an earlier variant at twice the output positions (other
  MACs), for the checks that tell a stale benchmark entry from a current one."""
  import jax
  import jax.numpy as jnp
  from flexiq_jax import models, quantize
  net = models.create("resnet_small", num_classes=10)
  variables = jax.jit(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))()
  plan = quantize.build_plan(net, variables, (28, 28, 1))
  layers = {p: dataclasses.asdict(plan.layers[p]) for p in plan.quantized}
  earlier = {p: {**l, "output_shape": [1, 2 * l["output_shape"][1]] + list(l["output_shape"][2:])}
             for p, l in layers.items()}
  return plan, layers, earlier


def shrink_to_smoke(config, data_dir):
  """The quickstart smoke config on the tiny dataset: 8 float steps of 32 on 256 images."""
  config.data.data_dir = data_dir
  config.train.batch_size = 32
  config.train.num_epochs = 1.0  # 8 steps on 256 images
  config.train.checkpoint_every_steps = 3
  config.train.log_every_steps = 2
  config.eval_batch_size = 64
  config.data.eval_examples = -1
  config.finetune.batch_size = 32
  return config


@pytest.fixture(scope="session")
def make_smoke_config(tiny_fmnist):
  """A factory of fresh (unlocked, independent) smoke configs, for module-scoped fixtures."""
  def make():
    from configs import quickstart
    return shrink_to_smoke(quickstart.get_config("smoke"), tiny_fmnist)
  return make


@pytest.fixture
def smoke_config(make_smoke_config):
  """The quickstart config shrunk to a few steps on the tiny dataset."""
  return make_smoke_config()


@dataclasses.dataclass(frozen=True)
class RunPy:
  """What one `python run.py ...` printed."""

  returncode: int
  stdout: str
  stderr: str

  def check(self) -> "RunPy":
    assert self.returncode == 0, self.stdout[-2000:] + self.stderr[-4000:]
    return self


def run_py(*args, cwd=ROOT, timeout=600) -> RunPy:
  """`python <repo>/run.py *args` in a subprocess from `cwd` (the repository by default)."""
  env = dict(os.environ, FLEXIQ_NO_PROGRESS="1", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
  return RunPy(out.returncode, out.stdout, out.stderr)


def smoke_args(workdir, data_dir, *extra) -> list[str]:
  """run.py arguments of the quickstart smoke run on the tiny dataset (4 + 2 training steps)."""
  return ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.train.batch_size=32", "--config.finetune.batch_size=32", "--config.finetune.num_epochs=0.25",
          "--config.eval_batch_size=64", *extra]


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """A finished `run.py --mode=all` smoke run (evolutionary selector) on the tiny dataset."""

  workdir: str
  data_dir: str
  stdout: str

  def args(self, *extra) -> list[str]:
    """The arguments that made this run, plus `extra`."""
    return smoke_args(self.workdir, self.data_dir, "--config.select.selector=evolutionary", *extra)


@pytest.fixture(scope="session")
def finished_run(tiny_fmnist, tmp_path_factory) -> FinishedRun:
  workdir = str(tmp_path_factory.mktemp("run"))
  run = FinishedRun(workdir, tiny_fmnist, "")
  return dataclasses.replace(run, stdout=run_py(*run.args()).check().stdout)
