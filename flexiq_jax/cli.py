"""Command-line conveniences shared by run.py and experiments/: `--config=vit_b.py` finds
configs/vit_b.py, and the default workdir is named after the config."""

from __future__ import annotations

import ast
import os
import re

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_dirs() -> list[str]:
  """Where bare config names are looked up: ./configs, then the repository's configs/.

  Returns:
    The directories that exist, without duplicates, in that order.
  """
  dirs = [os.path.join(os.getcwd(), "configs"), os.path.join(_REPO_ROOT, "configs")]
  return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def available_configs() -> list[str]:
  """The config files that bare names can refer to.

  Returns:
    The sorted file names ('vit_b.py', ...) of the .py files in `config_dirs()`, without
    __init__.py and common.py.
  """
  names = set()
  for d in config_dirs():
    names.update(f for f in os.listdir(d) if f.endswith(".py") and f not in ("__init__.py", "common.py"))
  return sorted(names)


def resolve_config(value: str) -> str:
  """'vit_b.py:fmnist' or 'vit_b:fmnist' -> 'configs/vit_b.py:fmnist' when the path as given does
  not exist; an unknown name is an error listing the configs.

  Args:
    value: the --config value: a path or bare name, optionally followed by ':<arg>'.

  Returns:
    `value` unchanged when its path exists, else the found config's path (relative to the working
    directory) with the same ':<arg>' suffix.

  Raises:
    SystemExit: no such config, or the file is not a .py file, is not valid Python or defines no
      top-level get_config.
  """
  path, sep, arg = value.partition(":")
  if os.path.exists(path):
    _check_config_file(path)
    return value
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  for d in config_dirs():
    candidate = os.path.join(d, name)
    if os.path.exists(candidate):
      _check_config_file(candidate)
      return os.path.relpath(candidate) + sep + arg
  raise SystemExit(f"error: config {path!r} not found (looked for it as given and in "
                   f"{', '.join(config_dirs()) or 'configs/'}). Known configs: {', '.join(available_configs())}")


def _check_config_file(path: str) -> None:
  """A config is a Python file; anything else (a README, a checkpoint) is one clear error, not
  the chained tracebacks of importing it."""
  if not path.endswith(".py"):
    raise SystemExit(f"error: {path!r} is not a config file (a .py file defining get_config(arg)). "
                     f"Known configs: {', '.join(available_configs())}")
  try:  # parsed, not imported: a config's imports and side effects wait for ml_collections
    with open(path) as f:
      tree = ast.parse(f.read(), path)
  except SyntaxError as e:
    raise SystemExit(f"error: config {path!r} is not valid Python (line {e.lineno}: {e.msg})") from None
  if not any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
    raise SystemExit(f"error: config {path!r} defines no get_config(arg) function at its top level; a config "
                     f"file returns its ml_collections.ConfigDict from get_config (see configs/quickstart.py)")


def _check_override(arg: str) -> None:
  """--config.x.y=(nan,) would fail in the flag parser with "could not convert string to float":
  no config field accepts NaN or Inf, so say so."""
  name, _, value = arg.partition("=")
  tokens = re.split(r"[\s,()\[\]]+", value.lower())
  if name.startswith("--config.") and any(t.lstrip("+-") in ("nan", "inf", "infinity") for t in tokens):
    raise SystemExit(f"error: {arg}: NaN and Inf are not valid config values; give finite numbers "
                     "(e.g. sweep ratios in [0, 1]).")


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with the value of --config resolved (see resolve_config) and overrides checked for
  NaN/Inf; other arguments untouched.

  Args:
    argv: the command line (both '--config=X' and '--config X' are recognised).

  Returns:
    A new list; `argv` is not changed.

  Raises:
    SystemExit: a --config.* override with a NaN or Inf value, or a config that cannot be found
      or is not a config file.
  """
  out = list(argv)
  for a in out:
    _check_override(a)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def default_workdir(config_value: str) -> str:
  """workdirs/<config name>[_<args>]: 'configs/vit_b.py:fmnist,smoke' -> 'workdirs/vit_b_fmnist_smoke'.

  Args:
    config_value: the --config value, a path with an optional ':<arg>' suffix.

  Returns:
    The relative workdir path; runs of characters other than letters, digits, '.', '=' and '-' in
    the argument become '_'.
  """
  path, _, arg = config_value.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "_" + re.sub(r"[^A-Za-z0-9.=-]+", "_", arg)
  return os.path.join("workdirs", name)


def start(argv: list[str], workdir: str | None) -> str:
  """The common start of an absl entry point (run.py, experiments/): no stray arguments, Orbax's
  per-file INFO logs off unless --verbosity is given, and the workdir (default from --config),
  printed.

  Args:
    argv: the arguments absl passes to main (argv[0] is the program).
    workdir: the --workdir flag's value (None or empty: `default_workdir` of --config).

  Returns:
    The workdir.

  Raises:
    absl.app.UsageError: there are positional arguments after the program name.
  """
  from absl import app, flags, logging
  from ml_collections import config_flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  workdir = workdir or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  print(f"workdir: {workdir}")
  return workdir




def user_errors() -> tuple:
  """The exceptions that are a user's to fix (a config value, a missing input, a locked or
  changed workdir, a diverged or refused training): entry points print them as one `error:`
  line, without a traceback.

  Returns:
    A tuple of exception classes, for an `except` clause.
  """
  from flexiq_jax import artifacts, checkpoint, judge, preflight, stage_cache, train, workdir  # pylint: disable=g-import-not-at-top
  return (preflight.ConfigError, preflight.MissingInput, workdir.WorkdirLocked, stage_cache.StageConfigChanged,
          judge.FinetuneRefused, train.NonFiniteError, checkpoint.CorruptCheckpoint, artifacts.StaleArtifact)


def one_line(error: BaseException) -> str:
  """An error's message on one line, for the `error:` line of an entry point.

  Args:
    error: the exception.

  Returns:
    Its message with runs of whitespace (newlines included) collapsed to single spaces, or the
    exception's class name when the message is empty.
  """
  return " ".join(str(error).split()) or type(error).__name__


def guarded(main):
  """`main(argv)` for absl's app.run with user errors as one `error:` line and exit status 1, and
  an interrupt (Ctrl-C, SIGTERM, SIGHUP; `signals.graceful`) as one line and exit status 130,
  after the training loop has checkpointed.

  Args:
    main: the entry point's `main(argv)`.

  Returns:
    The wrapped `main`, run inside `signals.graceful()`; it raises SystemExit for `user_errors()`
    and interrupts.
  """
  import functools  # pylint: disable=g-import-not-at-top
  from flexiq_jax import signals  # pylint: disable=g-import-not-at-top

  @functools.wraps(main)
  def wrapped(argv):
    try:
      with signals.graceful():
        return main(argv)
    except user_errors() as e:
      raise SystemExit(f"error: {one_line(e)}") from None
    except KeyboardInterrupt as e:
      import sys  # pylint: disable=g-import-not-at-top
      print(f"interrupted: {one_line(e) if str(e) else 'stopped'}; rerun the same command to resume", file=sys.stderr)
      raise SystemExit(130) from None

  return wrapped


HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def print_help_and_exit(argv: list[str], doc: str) -> None:
  """`--help` (and -h, --helpshort, --helpfull): the entry point's docstring and its flags, exit
  status 0 (absl exits 1 after its help, and insists on the required flags first). Without a help
  flag it returns and does nothing.

  Args:
    argv: the command line (argv[0] is the program).
    doc: the entry point's docstring, printed first.

  Raises:
    SystemExit: with status 0, after printing the help.
  """
  import sys  # pylint: disable=g-import-not-at-top
  if not any(a in HELP_FLAGS for a in argv[1:]):
    return
  from absl import flags  # pylint: disable=g-import-not-at-top
  print(doc.strip() + "\n")
  main_module = sys.argv[0]
  text = flags.FLAGS.module_help(main_module) if "--helpfull" not in argv else flags.FLAGS.get_help()
  print(text or flags.FLAGS.main_module_help())
  raise SystemExit(0)
