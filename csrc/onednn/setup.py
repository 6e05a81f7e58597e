"""Builds flexiq_jax_onednn's kernel library where it can, and installs the package without it
where it cannot (no C++ compiler, no oneDNN or jaxlib headers): flexiq_jax then runs its XLA path.

The library links against the onednn-cpu-gomp wheel's libdnnl.so.3, which pip installs to
<prefix>/lib; the rpath $ORIGIN/../../.. is that directory as seen from
<prefix>/lib/pythonX.Y/site-packages/flexiq_jax_onednn/. flexiq_jax also preloads the library from
the wheel's recorded files where the rpath does not reach it (a user or --target install).
"""

import importlib.metadata
import importlib.util
import os

from setuptools import Extension, setup


def _wheel_dir(dist: str, suffix: str):
  """The directory D such that D/`suffix` is a file installed by distribution `dist`, or None."""
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    path = os.path.abspath(f.locate())
    if path.endswith(os.sep + suffix) and os.path.isfile(path):
      return path[:-len(os.sep + suffix)]
  return None


def _extension():
  """The kernel library's Extension, or None (with the reason printed) where it cannot be built."""
  dnnl_include = _wheel_dir("onednn-devel-cpu-gomp", os.path.join("oneapi", "dnnl", "dnnl.hpp"))
  dnnl_lib = _wheel_dir("onednn-cpu-gomp", "libdnnl.so.3")
  spec = importlib.util.find_spec("jaxlib")
  ffi_include = os.path.join(spec.submodule_search_locations[0], "include") if spec else None
  if ffi_include and not os.path.isfile(os.path.join(ffi_include, "xla", "ffi", "api", "ffi.h")):
    ffi_include = None
  missing = [what for what, path in (("oneDNN headers (onednn-devel-cpu-gomp)", dnnl_include),
                                     ("libdnnl.so.3 (onednn-cpu-gomp)", dnnl_lib),
                                     ("XLA FFI headers (jaxlib)", ffi_include)) if not path]
  if missing:
    print("flexiq_jax_onednn: building without the oneDNN kernels; missing: " + ", ".join(missing))
    return None
  return Extension(
      "flexiq_jax_onednn._kernels",
      sources=["src/onednn_ffi.cc"],
      include_dirs=[dnnl_include, ffi_include],
      library_dirs=[dnnl_lib],
      libraries=[":libdnnl.so.3"],
      extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-w"],
      extra_link_args=["-fopenmp", "-Wl,-rpath,$ORIGIN/../../.."],
      language="c++",
      optional=True,  # a failed compile leaves the package without the library, not the install failed
  )


ext = _extension()
setup(ext_modules=[ext] if ext else [])
