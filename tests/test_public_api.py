"""The public API's contract with its users: a licence, one version (pyproject, the package,
run.py --version, every run record), PEP 561 typing (py.typed) and a type annotation on every
parameter and return of what flexiq_jax exports and of api.py's public functions."""

import dataclasses
import inspect
import os
import re

import pytest

import flexiq_jax
from flexiq_jax import api
from flexiq_jax import records

from conftest import ROOT, run_py


def _public_callables():
  out = {}
  for name in flexiq_jax.__all__:
    if name == "__version__":
      continue
    obj = getattr(flexiq_jax, name)
    if inspect.isclass(obj):
      for attr, member in vars(obj).items():
        if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__call__"):
          out[f"{name}.{attr}"] = member
    else:
      out[name] = obj
  for name, fn in inspect.getmembers(api, inspect.isfunction):
    if not name.startswith("_") and fn.__module__ == api.__name__:
      out[f"api.{name}"] = fn
  return out


def test_every_public_function_is_fully_annotated():
  missing = []
  for name, fn in _public_callables().items():
    sig = inspect.signature(fn)
    for p in sig.parameters.values():
      if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
        missing.append(f"{name}({p.name})")
    if sig.return_annotation is inspect.Signature.empty:
      missing.append(f"{name} -> ?")
  assert not missing, missing
  for name in flexiq_jax.__all__:
    obj = getattr(flexiq_jax, name)
    if dataclasses.is_dataclass(obj):
      assert all(f.type is not None for f in dataclasses.fields(obj)), name


def test_version_in_one_place_and_licence():
  assert re.fullmatch(r"\d+\.\d+\.\d+", flexiq_jax.__version__)
  pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
  assert 'dynamic = ["version"]' in pyproject and 'attr = "flexiq_jax.version.__version__"' in pyproject
  assert not re.search(r'^version\s*=\s*"', pyproject, re.M)  # no second copy of the number
  assert os.path.exists(os.path.join(ROOT, "flexiq_jax", "py.typed"))
  licence = open(os.path.join(ROOT, "LICENSE")).read()
  assert "Apache License" in licence and "Version 2.0, January 2004" in licence and 'license = "Apache-2.0"' in pyproject
  assert records.run_info()["flexiq_jax_version"] == flexiq_jax.__version__


def test_run_py_version():
  out = run_py("--version")
  assert out.returncode == 0 and out.stdout.strip() == f"flexiq_jax {flexiq_jax.__version__}"


@pytest.mark.parametrize("marker", ["api-example-linen", "api-example-nnx"])
def test_docs_api_examples_run_as_written(marker):
  text = open(os.path.join(ROOT, "docs", "api.md")).read()
  tag = f"<!-- {marker} -->"
  assert tag in text, f"docs/api.md has no {tag} marker"
  block = re.search(r"```python\n(.*?)```", text[text.index(tag):], re.S)
  assert block, f"docs/api.md's {tag} is not followed by a ```python block"
  namespace = {}
  exec(compile(block.group(1), f"docs/api.md:{marker}", "exec"), namespace)
  logits = namespace["logits"]
  assert logits.shape == (8, 10) and bool((logits == logits).all())
  assert namespace["qmodel"].plan.lowerable
