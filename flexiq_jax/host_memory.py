"""Host memory on CPU: the allocator under XLA's buffers.

XLA:CPU allocates each call's outputs and temporaries with `malloc` and frees them when the call
ends, from several threads. glibc's `malloc` serves a block above its mmap threshold (at most
32 MiB) with a fresh `mmap` and returns the thread arenas' emptied heaps to the system, so a call
whose buffers are that large touches fresh pages every time: the kernel faults in and zeroes
each 4 KiB page again, and writing a large float32 result costs several times the work that
makes it. tcmalloc (gperftools' `libtcmalloc_minimal`, Debian's `libtcmalloc-minimal4`) keeps
freed memory for reuse; CPU inference launchers preload it (or jemalloc) for that reason, and so
do the Cloud TPU images for JAX. One trial of glibc's own knobs (`mallopt`: no mmap, a high trim
threshold) gave a whole model no gain beyond the run-to-run spread (likely, not checked: its
buffers come from the worker threads' arenas).

`rerun_with_tcmalloc` restarts the current process with tcmalloc preloaded where it is installed
(`LD_PRELOAD` must be set before the process starts). `run.py`, the sweep (`experiments/
paper_tables.py`, whose workers inherit it) and the benchmarks call it first; on the benchmark
machine a MobileNetV2 `:fmnist` forward+backward pass took 171 ms on it against 301 on glibc's
malloc, ResNet-18's 153 against 179 (`benchmarks/allocator.py`, `benchmarks/results/allocator_cpu.md`),
and the oneDNN integer path of ResNet-18 at batch 16 1.18-1.19x PyTorch int8's time against
1.63-1.73x (`benchmarks/results/onednn_int8_cpu_vnni_b16*.md`). `FLEXIQ_ALLOCATOR=system` keeps the system
allocator. Results do not change: only where the buffers live. To serve from your own process,
start it with `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4`.
"""

from __future__ import annotations

import os
import sys

ENV = "FLEXIQ_ALLOCATOR"  # 'tcmalloc' (the default, where installed) or 'system'
RERUN = "FLEXIQ_ALLOCATOR_RERUN"  # set in the restarted process
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# tcmalloc reports every allocation above 1 GiB on stderr unless told otherwise.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def tcmalloc_path() -> str | None:
  """The installed tcmalloc library, or None.

  Returns:
    The path of the first of NAMES found in DIRS.
  """
  for directory in DIRS:
    for name in NAMES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  return None


def allocator() -> str:
  """The allocator this process runs on: 'tcmalloc', 'jemalloc' or 'system' (read from the
  libraries mapped into it, so a preload by any means counts).

  Returns:
    The allocator's name.
  """
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "system"
  for name in ("tcmalloc", "jemalloc"):
    if f"lib{name}" in maps:
      return name
  return "system"


def rerun_with_tcmalloc() -> None:
  """Restarts this process (the same interpreter and command line) with tcmalloc preloaded, unless
  it already runs on tcmalloc or jemalloc, tcmalloc is not installed, or FLEXIQ_ALLOCATOR=system.
  Call it before any work, from a command's entry point (`if __name__ == "__main__":`), never
  from a function another program may call in its own process: the process is replaced and does
  not return here.
  """
  if (os.environ.get(ENV, "tcmalloc").strip().lower() == "system" or allocator() != "system"
      or os.environ.get(RERUN)):  # a preload that did not take: run on as it is, never restart twice
    return
  path = tcmalloc_path()
  if path is None or not getattr(sys, "orig_argv", None):
    return
  env = {**os.environ, **QUIET, RERUN: "1",
         "LD_PRELOAD": ":".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


def state() -> str:
  """One line for a results header: the allocator this process runs on.

  Returns:
    The line's text.
  """
  name = allocator()
  if name == "system":
    why = "FLEXIQ_ALLOCATOR=system" if os.environ.get(ENV, "").lower() == "system" else "tcmalloc not installed"
    return f"the system malloc ({why})"
  return f"{name} (preloaded)"
