"""flexiq_jax/host_memory.py: glibc keeps freed memory for the next call, once per process, and
the environment can turn it off."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> str:
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip()


def test_freed_memory_is_kept_and_reused_without_new_page_faults():
  """After keep_freed_memory, a 64 MB block (above glibc's largest mmap threshold) malloc'ed,
  written and freed again and again faults its pages in once, not on every allocation."""
  code = ("import ctypes, resource\n"
          "from flexiq_jax import host_memory\n"
          "on = host_memory.keep_freed_memory()\n"
          "assert host_memory.keep_freed_memory() == on\n"  # once per process: the same answer
          "libc = ctypes.CDLL('libc.so.6')\n"
          "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)\n"
          "libc.free.argtypes = (ctypes.c_void_p,)\n"
          "def touch():\n"
          "  p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
          "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "touch()\n"
          "before = faults()\n"
          "for _ in range(5):\n"
          "  touch()\n"
          "print(on, faults() - before, host_memory.state())\n")
  on, faults, state = _run(code).split(" ", 2)
  if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
    assert on == "True" and "M_MMAP_MAX=0" in state
    assert int(faults) < 1000  # five fresh mappings fault 5 x 16384 pages
  if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
    _, faults_off, _ = _run(code, FLEXIQ_KEEP_FREED_MEMORY="0").split(" ", 2)
    assert int(faults_off) > 5 * 16384 // 2  # the default: fresh pages on every allocation
  off = _run("from flexiq_jax import host_memory\nprint(host_memory.keep_freed_memory(), host_memory.state())",
             FLEXIQ_KEEP_FREED_MEMORY="0")
  assert off.startswith("False") and "default" in off
