"""The compiled oneDNN kernels of flexiq_jax (XLA FFI handlers); flexiq_jax.quantize.onednn uses them.

This package only locates the library; it is installed without it where it could not be built.
"""

import glob
import importlib.metadata
import os


def library_path():
  """The path of the compiled kernel library.

  Returns:
    The library's path, or None where the package was installed without it.
  """
  found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels*.so")))
  return found[0] if found else None


def dnnl_path():
  """The path of libdnnl.so.3 as installed by the onednn-cpu-gomp wheel.

  Returns:
    Its path, or None where that wheel is not installed.
  """
  try:
    files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name == "libdnnl.so.3":
      return str(f.locate())
  return None
