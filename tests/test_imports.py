"""The import graph of flexiq_jax has no cycles: neither between modules nor between subpackages.

Every `import` / `from ... import` statement anywhere in a module counts (module level and inside
functions alike: a function-level import is still a dependency, only a deferred one). An import of
a package counts as an import of its `__init__`, which in turn imports what it re-exports;
`from pkg import name` counts as an import of the module `pkg.name` when that is a module, else of
`pkg`. At the subpackage level every module of `flexiq_jax/<sub>/` is collapsed into `<sub>`
(top-level modules stay themselves), and the package's own `flexiq_jax/__init__.py` (the public
face, which imports the API) is left out of that level.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flexiq_jax")
PACKAGE = "flexiq_jax"


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: modules of flexiq_jax it imports}."""
  modules = _modules()

  def resolve(name):
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  graph = {m: set() for m in modules}
  for module, path in modules.items():
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path).read(), path)):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = module.split(".") if is_package else module.split(".")[:-1]
          parts = parts[:len(parts) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      for target in targets:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
          resolved = resolve(target)
          if resolved and resolved != module:
            graph[module].add(resolved)
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  top = lambda m: ".".join(m.split(".")[:2])
  out = {}
  for module, targets in graph.items():
    for target in targets:
      a, b = top(module), top(target)
      if a != b and PACKAGE not in (a, b):
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set())
  return out


def test_the_graph_sees_the_imports_it_must():
  graph = import_graph()
  assert "flexiq_jax.numerics.quantizers" in graph["flexiq_jax.numerics"]  # `from pkg.mod import x`
  assert "flexiq_jax.quantize" in graph["flexiq_jax.fitness"]  # `from flexiq_jax import quantize as q`
  assert "flexiq_jax.models" in graph["flexiq_jax.pipeline"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("level", ["module", "subpackage"])
def test_no_import_cycles(level):
  graph = import_graph()
  if level == "subpackage":
    graph = subpackage_graph(graph)
  assert _cycles(graph) == [], f"import cycles between {level}s of flexiq_jax"


def test_models_never_import_quantization_code():
  graph = import_graph()
  for module, targets in graph.items():
    if module.startswith("flexiq_jax.models"):
      assert all(t.startswith(("flexiq_jax.models", "flexiq_jax.interception")) for t in targets), (module, targets)


# The stage packages in pipeline order: each may import the ones before it, never one after it.
STAGE_ORDER = ("flexiq_jax.calibrate", "flexiq_jax.select", "flexiq_jax.quantize", "flexiq_jax.finetune")


def test_no_stage_package_imports_a_later_stage():
  """calibrate imports none of select/quantize/finetune, select none of quantize/finetune, quantize
  not finetune: the quantized-model core (plan, layer arithmetic) sits below all of them."""
  graph = subpackage_graph(import_graph())
  for i, stage in enumerate(STAGE_ORDER):
    later = set(STAGE_ORDER[i + 1:])
    assert not graph.get(stage, set()) & later, f"{stage} imports a later stage: {graph[stage] & later}"
