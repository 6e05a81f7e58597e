"""What one invocation does to a workdir: an exclusive lock while it runs, a run record
(`runs/<timestamp>.json`: command, resolved config, commit, status and the metrics it produced),
and results.json derived from the finished runs whose stages are still the workdir's.

A failed or refused run leaves results.json as it was: it only records its failure in its own
run record. results.json is rebuilt when a run finishes, from the newest finished run of each
section whose stage fingerprints match the stages now in the workdir, and names that run.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import tempfile

import jax
from etils import epath

from flexiq_jax import records

# The stage directories each results section depends on (sections not listed: all of them).
STAGE_DIRS = ("float", "calibrate", "select", "quantized", "finetune")
SECTION_STAGES = {"float": ("float",), "compare": ("float",), "ratio_sweep": STAGE_DIRS}


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def is_local(path: str) -> bool:
  """Whether `path` is on the local file system (it has no scheme such as gs://).

  Args:
    path: a path or URL.

  Returns:
    True unless `path` contains '://'.
  """
  return "://" not in str(path)


class ReadOnlyWorkdir(ValueError):
  """A mode that writes was asked of a workdir that cannot be written."""


# What a read-only workdir still allows: evaluating the stages it holds, without writing.
READ_ONLY_MODES = ("train", "eval", "calibrate", "select", "quantize", "finetune", "sweep")


def read_only_reason(workdir: str) -> str | None:
  """Why `workdir` cannot be written, or None when it can (or is remote: not probed).

  A temporary file is created in it and removed (the directory is created first when it does not
  exist), so the answer holds for the file system's mount flags and the user's permissions alike.

  Args:
    workdir: the workdir.

  Returns:
    The OS error's text (e.g. 'Read-only file system'), or None when the workdir is writable.
  """
  if not is_local(workdir):
    return None
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    return e.strerror or type(e).__name__
  return None


def check_read_only_mode(workdir: str, reason: str, mode: str, force_from: str | None) -> None:
  """Refuses, before any work, a run.py mode that must write to a read-only workdir.

  Args:
    workdir: the workdir.
    reason: why it cannot be written (`read_only_reason`).
    mode: the --mode value.
    force_from: the --force_from value (None when not given).

  Raises:
    ReadOnlyWorkdir: `force_from` is given, or `mode` is not one of READ_ONLY_MODES.
  """
  writes = "--force_from" if force_from else None if mode in READ_ONLY_MODES else f"--mode={mode}"
  if writes:
    raise ReadOnlyWorkdir(
        f"workdir {workdir} is read-only ({reason}) and {writes} writes to it; copy the workdir to a writable "
        f"place, or use another --workdir (a read-only workdir can be evaluated: --mode=eval or --mode=sweep "
        f"reuse the stages it holds and write nothing)")


@contextlib.contextmanager
def locked(workdir: str):
  """An exclusive fcntl lock on <workdir>/.lock for the duration (process 0 of a multi-host run
  only; remote workdirs such as gs:// cannot be locked and are not). The lock file holds the pid
  of the process that holds it; a read-only workdir runs without the lock, with a note.

  Args:
    workdir: the workdir (created if it does not exist).

  Returns:
    A context manager holding the lock while its block runs.

  Raises:
    WorkdirLocked: another process holds the lock.
  """
  if jax.process_index() != 0 or not is_local(workdir):
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  try:
    f = open(path, "a+")
  except OSError as e:  # a read-only workdir: nothing can change it, so there is nothing to lock
    print(f"note: {workdir} is read-only ({e.strerror}): running without the workdir lock; a mode that "
          f"writes will fail at its first write")
    yield
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise WorkdirLocked(
          f"workdir {workdir} is in use by another run (pid {holder}, lock file {path}). Wait for it to "
          f"finish, or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def stage_fingerprints(workdir: str) -> dict:
  """{stage directory: fingerprint of its done marker, or None} as the workdir holds them now.

  Args:
    workdir: the workdir.

  Returns:
    A dict with one entry per STAGE_DIRS name: the 'fingerprint' of its done.json, or None when
    the stage is not done.
  """
  out = {}
  for name in STAGE_DIRS:
    done = records.read_json(os.path.join(workdir, name, "done.json"))
    out[name] = done.get("fingerprint") if done else None
  return out


class RunRecord:
  """runs/<timestamp>.json of one invocation; use as a context manager around the run."""

  def __init__(self, workdir: str, config, argv=None):
    self.workdir, self.config = workdir, config
    self.info = records.run_info(argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    self.name = f"runs/{stamp}.json"
    self.metrics, self.status, self.error = {}, "running", None
    self.read_only = False

  def add(self, section: str, metrics) -> None:
    self.metrics[section] = metrics

  def _write(self) -> None:
    if self.read_only:
      return
    try:
      self._write_record()
    except OSError as e:  # a read-only workdir: the run goes on without its record
      self.read_only = True
      print(f"note: cannot write the run record {self.name} in {self.workdir} ({e.strerror}); not recorded")

  def _write_record(self) -> None:
    records.write_json_atomic(os.path.join(self.workdir, self.name), {
        **self.info, "status": self.status, "error": self.error, "pid": os.getpid(), "hostname": socket.gethostname(),
        "config": self.config.to_dict() if hasattr(self.config, "to_dict") else self.config,
        "stages": stage_fingerprints(self.workdir) if self.status == "finished" else None,
        "metrics": self.metrics})

  def __enter__(self):
    if os.access(self.workdir, os.W_OK) or not is_local(self.workdir):
      mark_dead_runs(self.workdir)
    self._write()
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None or issubclass(exc_type, SystemExit) and not exc.code:
      self.status = "finished"
      self._write()
      if not self.read_only:
        derive_results(self.workdir)
    else:
      # Ctrl-C, SIGTERM, SIGHUP (signals.Interrupted is a KeyboardInterrupt): the work is
      # checkpointed, and rerunning the command resumes it.
      self.status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
      self.error = f"{exc_type.__name__}: {exc}"
      self._write()
    return False


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError, OverflowError):
    return True  # exists under another user (or no usable pid): not known to be dead
  return True


def mark_dead_runs(workdir: str) -> list[str]:
  """Marks the run records left `running` by a process that is gone (killed by SIGKILL, or its
  machine stopped) as `died`, and returns their names. Called by a run that holds the workdir
  lock: a record of this host whose pid no longer exists cannot be running. Only process 0 does it.

  Args:
    workdir: the workdir (its runs/ folder is read).

  Returns:
    The file names of the records marked `died` (empty on other processes or without runs/).
  """
  runs_dir = epath.Path(workdir) / "runs"
  if not process_zero() or not runs_dir.is_dir():
    return []
  dead = []
  for path in sorted(runs_dir.glob("*.json")):
    run = records.read_json(path)
    if not run or run.get("status") != "running":
      continue
    same_host = run.get("hostname") in (None, socket.gethostname())
    if same_host and (run.get("pid") is None or not _alive(run["pid"])):
      run.update(status="died", error=f"process {run.get('pid', '(not recorded)')} ended without finishing "
                                      f"(killed, or its machine stopped); found by the next run")
      records.write_json_atomic(str(path), run)
      dead.append(path.name)
  if dead:
    print(f"note: marked {len(dead)} earlier run record(s) whose process is gone as died: {', '.join(dead)}")
  return dead


def derive_results(workdir: str) -> dict | None:
  """Rebuilds <workdir>/results.json from the finished run records: each section from the newest
  finished run that produced it with the stage fingerprints the workdir holds now. The run
  metadata and config at the top are the newest contributing run's; `sources` names the run
  record of each section.

  Args:
    workdir: the workdir.

  Returns:
    The results dict as written, or None (and results.json untouched) when there is no runs/
    folder or no finished run matches the stages now in the workdir.
  """
  runs_dir = epath.Path(workdir) / "runs"
  if not runs_dir.is_dir():
    return None
  now = stage_fingerprints(workdir)
  sections, sources, newest = {}, {}, None
  for name in sorted(p.name for p in runs_dir.iterdir()):
    if not name.endswith(".json"):
      continue
    run = records.read_json(runs_dir / name)
    if not run or run.get("status") != "finished":
      continue
    for section, metrics in run.get("metrics", {}).items():
      deps = SECTION_STAGES.get(section, STAGE_DIRS)
      if all((run.get("stages") or {}).get(d) == now[d] for d in deps):
        sections[section], sources[section], newest = metrics, f"runs/{name}", run
  if newest is None:
    return None
  results = {k: newest[k] for k in ("command", "flexiq_jax_version", "commit", "device", "date", "jax_version")
             if k in newest}  # runs recorded before the version was recorded lack it
  results.update(config=newest["config"], metrics=sections, sources=sources)
  records.write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results


def process_zero() -> bool:
  """Files are written by process 0 only (every process computes the same values).

  Returns:
    True in process 0 of a (multi-host) run.
  """
  return jax.process_index() == 0
