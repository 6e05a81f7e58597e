"""Run metadata and result files: every results file says which command, commit, device and
date produced it."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys

import jax
from etils import epath

from flexiq_jax.version import __version__


# Folders of committed outputs: a run writing its results there does not make the code dirty.
RESULTS_FOLDERS = ("experiments/results", "benchmarks/results")


@functools.lru_cache(maxsize=None)
def git_commit(checkout: str | None = None) -> str:
  """The checkout's commit, + '-dirty' if a tracked file outside RESULTS_FOLDERS differs from it
  (a sweep's workers start after earlier jobs wrote their records there; that is not a code
  change). Read once per process: results written later in a long run still name the code that
  started it, whatever was committed or edited meanwhile.

  Args:
    checkout: a directory inside the git checkout (default: this package's directory).

  Returns:
    The commit hash, with '-dirty' appended for uncommitted changes, or 'unknown' when git is not
    available or the directory is not a checkout.
  """
  here = checkout or os.path.dirname(os.path.abspath(__file__))
  outputs = [f":(top,exclude){folder}" for folder in RESULTS_FOLDERS]
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/"] + outputs,
                           cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def device_description() -> str:
  """The JAX devices this process sees, for provenance.

  Returns:
    A string such as '8x TPU v4 (tpu), 2 process(es)': the device count, the first device's kind,
    the backend and the process count.
  """
  devices = jax.devices()
  return f"{len(devices)}x {devices[0].device_kind} ({jax.default_backend()}), {jax.process_count()} process(es)"


def host_description() -> str:
  """The host CPU and its usable cores: XLA:CPU compiles for the CPU it finds, so the same code
  and seed can round differently on another CPU model (float training is not bitwise portable).

  Returns:
    '<CPU model name>, <n> cores' (the model from /proc/cpuinfo where readable; the cores this
    process may run on).
  """
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{model}, {cores} cores"


# The packages whose versions change results or file formats (distribution names).
PACKAGES_OF_NOTE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml_collections",
                    "tensorflow-datasets", "safetensors", "tensorboardX", "flatbuffers", "absl-py", "torch", "timm")


@functools.lru_cache(maxsize=None)
def package_versions() -> dict:
  """{distribution: version} of PACKAGES_OF_NOTE that are installed, and the Python version.

  Returns:
    A dict with 'python' and one entry per installed package of PACKAGES_OF_NOTE (cached per process).
  """
  from importlib import metadata
  versions = {"python": sys.version.split()[0]}
  for name in PACKAGES_OF_NOTE:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def command_argv() -> list[str]:
  """The command as typed, for provenance: `-m <module> ...` when run with `python -m` (sys.argv[0]
  is then the file path, which names neither the module nor the checkout portably), else sys.argv.

  Returns:
    The argument list, without the interpreter.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is None:
    return list(sys.argv)
  module = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
  return ["-m", module] + sys.argv[1:]


def utc_now() -> str:
  """The date and time results files carry (UTC, to the second).

  Returns:
    The ISO 8601 string, e.g. '2024-01-31T12:00:00+00:00'.
  """
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_info(argv=None) -> dict:
  """Provenance of a results file: the command, the flexiq_jax release version, the commit, the
  device and host, the date, and the versions of the packages of note.

  Args:
    argv: the command's arguments (default: `command_argv()`); recorded as 'python <argv...>',
      shell-quoted.

  Returns:
    A dict with 'command', 'flexiq_jax_version', 'commit', 'device', 'host', 'date',
    'jax_version' and 'versions'.
  """
  argv = command_argv() if argv is None else argv
  return {
      "command": " ".join(shlex.quote(a) for a in ["python"] + list(argv)),
      "flexiq_jax_version": __version__,
      "commit": git_commit(),
      "device": device_description(),
      "host": host_description(),
      "date": utc_now(),
      "jax_version": jax.__version__,
      "versions": package_versions(),
  }


def _non_finite_name(value: float) -> str:
  return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def finite_json(data):
  """`data` with every NaN/Inf float replaced by None, so that it is valid JSON (which has no
  NaN or Infinity): in a dict, key `k` also gets `k_non_finite` naming the value ('NaN',
  'Infinity', '-Infinity'); in a list, the reason goes to the enclosing dict's `non_finite`
  list as '<key>[<index>]: <value>'.

  Args:
    data: a JSON-like value (dicts, lists, tuples, numbers, strings); values that JSON cannot
      encode are converted with `str`.

  Returns:
    A new JSON-compatible value (tuples become lists); `data` is not changed.
  """
  def clean(value, notes, where):
    if isinstance(value, float) and not math.isfinite(value):
      notes.append(f"{where}: {_non_finite_name(value)}")
      return None
    if isinstance(value, dict):
      out = {}
      for k, v in value.items():
        inner = []
        out[k] = clean(v, inner, k)
        if isinstance(v, float) and inner:
          out[f"{k}_non_finite"] = _non_finite_name(v)
        elif inner:
          out.setdefault("non_finite", []).extend(inner)
      return out
    if isinstance(value, (list, tuple)):
      return [clean(v, notes, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
  return clean(json.loads(json.dumps(data, default=str)), [], "")


def write_json_atomic(path: str, data) -> None:
  """Writes through etils.epath (local and gs:// alike), from process 0 only: every process of a
  multi-host run holds the same values, and one writer keeps the file whole. NaN and Inf are
  written as null with the value named beside it (`finite_json`): the file is always valid JSON.
  The file is written to a temporary name and then renamed over `path`; parent directories are
  created. A file that already holds exactly this text is left alone (a reused stage rewrites
  nothing, so a read-only workdir can still be read).

  Args:
    path: the JSON file's path (local or gs://).
    data: the JSON-like value to write (indented by 2).
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  text = json.dumps(finite_json(data), indent=2, sort_keys=False, allow_nan=False)
  try:
    if path.exists() and path.read_text() == text:
      return
  except (OSError, UnicodeDecodeError):
    pass  # unreadable: write it anew
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(path)


def read_json(path: str, default=None):
  """Reads a JSON file (local or gs://, through etils.epath).

  Args:
    path: the file's path.
    default: what to return when the file does not exist.

  Returns:
    The parsed value, or `default` when there is no file.
  """
  path = epath.Path(path)
  if not path.exists():
    return default
  return json.loads(path.read_text())


def update_results(workdir: str, config, section: str, metrics, argv=None, record=None) -> dict:
  """Records `metrics` as results section `section`.

  Args:
    workdir: the run's workdir.
    config: the resolved config (written beside the metrics in results.json).
    section: the results section, e.g. 'float' or 'ratio_sweep'.
    metrics: a JSON-serialisable value.
    argv: the command line recorded with the metrics (default: this process's).
    record: the `workdir.RunRecord` of the run.py invocation, if any: the metrics go to it, and
      results.json is derived from the finished runs when it ends.

  Returns:
    The results dict as written (with a record: just {'metrics': {section: metrics}}).
  """
  if record is not None:
    record.add(section, metrics)
    return {"metrics": {section: metrics}}
  path = os.path.join(workdir, "results.json")
  results = read_json(path, {}) or {}
  results.update(run_info(argv))
  results["config"] = config.to_dict() if hasattr(config, "to_dict") else config
  results.setdefault("metrics", {})[section] = metrics
  write_json_atomic(path, results)
  return results


def write_run_config(workdir: str, config) -> str:
  """<workdir>/config.json: the resolved config of the run (written by the float stage once it has
  accepted the config, in every mode; `flexiq_jax.load_quantized` rebuilds the model from it).

  Args:
    workdir: the run's workdir.
    config: the resolved config (a ConfigDict, or a plain dict).

  Returns:
    The path of config.json.
  """
  path = os.path.join(workdir, "config.json")
  write_json_atomic(path, config.to_dict() if hasattr(config, "to_dict") else config)
  return path


def load_average() -> str:
  """The machine's 1-, 5- and 15-minute load averages, for a benchmark's header (other jobs skew times).

  Returns:
    e.g. '1.62 2.28 2.65'.
  """
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


def markdown_table(headers: list[str], rows: list[list]) -> str:
  """A Markdown table of `rows` under `headers`; floats are shown with 2 decimals.

  Args:
    headers: the column names.
    rows: the rows, each a list of cell values (one per header).

  Returns:
    The table, one line per row, ending in a newline.
  """
  def fmt(v):  # a '|' inside a cell (max|w|) would end it: escaped
    return (f"{v:.2f}" if isinstance(v, float) else str(v)).replace("|", "\\|")

  lines = ["| " + " | ".join(fmt(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def provenance_header(info: dict) -> str:
  """The Markdown lines that head a results report: its command, commit, device and date.

  Args:
    info: a `run_info()` dict (its 'command', 'commit', 'device' and 'date' are used).

  Returns:
    The header text, ending in a blank line.
  """
  return (f"Command: `{info['command']}`  \nCommit: `{info['commit']}`  \nDevice: {info['device']}  \n"
          f"Date: {info['date']}\n\n")
