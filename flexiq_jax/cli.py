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
    SystemExit: an `error:` line, when there are positional arguments after the program name.
  """
  from absl import flags, logging
  from ml_collections import config_flags
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]} (flags take the form --name=value; "
                     f"--help lists them)")
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
  return (preflight.ConfigError, preflight.MissingInput, workdir.WorkdirLocked, workdir.ReadOnlyWorkdir,
          stage_cache.StageConfigChanged, judge.FinetuneRefused, train.NonFiniteError, checkpoint.CorruptCheckpoint,
          artifacts.StaleArtifact)


# OS errors that a user fixes (a read-only or foreign workdir, a full disk), not a bug to trace.
_USER_OS_ERRNOS = ("EROFS", "EACCES", "EPERM", "ENOSPC", "EDQUOT")


def user_os_error(error: BaseException) -> str | None:
  """The `error:` line of an OS error that is the user's to fix (a read-only file system, a
  permission, a full disk) on a named file; None for any other error.

  Args:
    error: the exception.

  Returns:
    One line naming the file and the OS's reason, or None.
  """
  import errno  # pylint: disable=g-import-not-at-top
  codes = {getattr(errno, name) for name in _USER_OS_ERRNOS if hasattr(errno, name)}
  if not isinstance(error, OSError) or error.errno not in codes or not error.filename:
    return None
  return (f"error: {error.filename}: {error.strerror}. A read-only workdir can only be evaluated with the stages it "
          f"holds (--mode=eval, --mode=sweep); to compute or write anything, use a writable --workdir")


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
    except OSError as e:
      line = user_os_error(e)
      if line is None:
        raise
      raise SystemExit(line) from None
    except KeyboardInterrupt as e:
      import sys  # pylint: disable=g-import-not-at-top
      line = one_line(e) if str(e) else "stopped"
      if "rerun the same command" not in line:
        line += "; rerun the same command to resume"
      print(f"interrupted: {line}", file=sys.stderr)
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


def _override_of(field: str, argv: list[str]) -> str | None:
  """The --config.<...>=<value> argument of `argv` whose dotted name ends in or passes through
  `field`, or None."""
  for a in argv:
    name = a.partition("=")[0]
    if name.startswith("--config.") and field in name[len("--config."):].split("."):
      return a
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=cli.parse_flags)`, with its errors (an
  unknown flag or config field, a value of the wrong type, a config file whose get_config fails)
  as one `error:` line and exit status 1 instead of absl's FATAL lines or a traceback.

  Args:
    argv: the command line (argv[0] is the program).

  Returns:
    The arguments left after the flags (absl's `FLAGS(argv)`).

  Raises:
    SystemExit: with the `error:` line, when the flags do not parse.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # A config file whose get_config raised: absl quotes its traceback; its last line is the error.
    text = lines[0] + " " + lines[-1] if len(lines) > 1 and any(l.startswith("Traceback") for l in lines) else " ".join(lines)
    raise SystemExit(f"error: {text} (python {os.path.basename(argv[0])} --help lists the flags)") from None
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
    inner = e
    while inner.args and isinstance(inner.args[0], BaseException):  # AttributeError(KeyError(...))
      inner = inner.args[0]
    message = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    field = message.splitlines()[0].strip("'\" ")
    hint = " ".join(message.splitlines()[1:]).strip()
    arg = _override_of(field, argv[1:]) or f"--config...{field}"
    raise SystemExit(f"error: {arg}: the config has no field {field!r}" + (f" ({hint})" if hint else "")) from None
  except (TypeError, ValueError) as e:  # an override whose value the field's type cannot take
    raise SystemExit(f"error: {one_line(e)}") from None

