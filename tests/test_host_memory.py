"""flexiq_jax/host_memory.py: the benchmarks' restart on tcmalloc, once, and the way out of it."""

import os
import subprocess
import sys

import pytest

from flexiq_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("import os\n"
        "from flexiq_jax import host_memory\n"
        "host_memory.rerun_with_tcmalloc()\n"
        "print(host_memory.allocator(), os.environ.get('FLEXIQ_ALLOCATOR_RERUN', '-'), host_memory.state())\n")


def _run(**env) -> list[str]:
  clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_memory.ENV, host_memory.RERUN)}
  out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**clean, **env})
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().split(" ", 2)


@pytest.mark.skipif(host_memory.tcmalloc_path() is None, reason="tcmalloc is not installed here")
def test_a_process_restarts_once_on_tcmalloc_where_it_is_installed():
  name, rerun, state = _run()
  assert name == "tcmalloc" and rerun == "1" and state == "tcmalloc (preloaded)"
  # A preload that does not take (here: a library that is not there) runs on, without a second restart.
  name, rerun, _ = _run(LD_PRELOAD="", FLEXIQ_ALLOCATOR_RERUN="1")
  assert name == "system" and rerun == "1"


def test_the_system_allocator_on_request_and_where_tcmalloc_is_missing(monkeypatch):
  name, rerun, state = _run(FLEXIQ_ALLOCATOR="system")
  assert name == "system" and rerun == "-" and state == "the system malloc (FLEXIQ_ALLOCATOR=system)"
  monkeypatch.setattr(host_memory, "DIRS", ())
  assert host_memory.tcmalloc_path() is None
  host_memory.rerun_with_tcmalloc()  # nothing to preload: returns, this process goes on


def _main_guard_calls(path: str) -> tuple[int, int]:
  """(calls of rerun_with_tcmalloc in the file, those inside `if __name__ == "__main__":`)."""
  import ast
  tree = ast.parse(open(path).read())
  def calls(node):
    return sum(isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "rerun_with_tcmalloc"
               for n in ast.walk(node))
  guarded = sum(calls(n) for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
  return calls(tree), guarded


def test_the_restart_is_only_called_from_a_commands_entry_point():
  """A restart replaces the process: called from a function (run.main, paper_tables.main) it would
  replace a test runner or a notebook that calls that function."""
  files = [os.path.join(ROOT, f) for f in ("run.py", "experiments/paper_tables.py", "benchmarks/onednn_int8.py",
                                          "benchmarks/onednn_profile.py", "benchmarks/integer_path.py",
                                          "benchmarks/allocator.py")]
  for path in files:
    total, guarded = _main_guard_calls(path)
    assert total == guarded == 1, path
