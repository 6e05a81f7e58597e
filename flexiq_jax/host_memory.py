"""Host memory on CPU: keep the memory a call frees for the next call.

XLA:CPU allocates each call's outputs and temporaries with `malloc` and frees them when the call
ends. glibc's `malloc` serves a block above its mmap threshold (dynamic, at most 32 MiB) with a
fresh `mmap` and unmaps it on `free`, so a call whose buffers are that large touches fresh pages
every time: the kernel faults in and zeroes each 4 KiB page again. Writing a large float32 result
then costs several times the work that makes it (on the benchmark's 2-core AMD EPYC, ResNet-18's
float32 stem output at batch 16, 51 MB, takes three times as long per image as at batch 4).
PyTorch's int8 tensors are a quarter of the size and stay under the threshold.

`keep_freed_memory` tells glibc to serve every block from its heap (`M_MMAP_MAX` = 0) and to
return freed memory to the system only above `TRIM_THRESHOLD` (`M_TRIM_THRESHOLD`): the pages
faulted in once are reused by every later call. The process keeps what it freed (its resident
size stays near its peak), as it would with tcmalloc or jemalloc, which CPU inference launchers
preload for the same reason. Results do not change: only where the buffers live. The command-line
entry points (`run.py`, the sweep, the benchmarks) call it at start; `FLEXIQ_KEEP_FREED_MEMORY=0`
turns it off. Elsewhere (another C library, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # freed memory above this much at the heap's top goes back to the system
ENV = "FLEXIQ_KEEP_FREED_MEMORY"

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (module docstring); once per process.

  Returns:
    True where it is in effect (glibc, not turned off by FLEXIQ_KEEP_FREED_MEMORY=0), else False.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt's parameters are glibc's
      return False
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
  return _applied


def state() -> str:
  """One line for a results header: whether freed memory is kept (`keep_freed_memory`).

  Returns:
    The line's text.
  """
  if _applied:
    return f"glibc malloc keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD={TRIM_THRESHOLD >> 20} MiB)"
  return "the C library's default malloc settings"
