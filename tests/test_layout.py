"""The package layout's import direction: model/ and data/ at the bottom, serve/ above them,
train/ above serve/ (dev evaluation runs on the serving programs), baselines/ above train/; the
shared top-level modules (config, checkpoint, run and the utilities) never import train/'s loop or
baselines/. Read from the source, so a new import that breaks it fails here."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sharcs_jax"
# Each layer may import itself and the layers before it (and the shared top-level modules).
LAYERS = ("model", "data", "serve", "train", "baselines")
NOT_FROM_SHARED = ("sharcs_jax.train.loop", "sharcs_jax.baselines")


# Modules the exported loader and the dispatch core run on: numpy only (no jax, flax, optax, orbax),
# here and through every module of ours they import.
NUMPY_ONLY = ("sharcs_jax.serve.dispatch", "sharcs_jax.serve.layout", "sharcs_jax.serve.routing",
              "sharcs_jax.serve.export.loader", "sharcs_jax.serve.onnx.runner")
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "chex", "transformers")
# The HTTP layer knows the engine's public API and its own limits: nothing of widths, exits,
# programs, routing or the model.
HTTP_MAY_IMPORT = ("sharcs_jax.serve.http", "sharcs_jax.data.batching", "sharcs_jax.errors")


def _third_party(path: pathlib.Path) -> set[str]:
  """The top-level names of every other package a file imports at module level."""
  found = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module.split(".")[0])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[0] for a in node.names}
  return found


def _imports(path: pathlib.Path) -> set[str]:
  """Every sharcs_jax module a file imports (module-level and inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sharcs_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        as_module = PACKAGE.parent / (candidate.replace(".", "/") + ".py")
        found.add(candidate if as_module.exists() else node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("sharcs_jax")}
  return found


def _modules() -> dict[str, set[str]]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = _imports(path)
  return out


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def test_no_layer_imports_a_later_one():
  wrong = []
  for module, imports in _modules().items():
    layer = _layer(module)
    for target in imports:
      target_layer = _layer(target)
      if layer is None:
        if module != "sharcs_jax.main" and target.startswith(NOT_FROM_SHARED):
          wrong.append(f"{module} -> {target}")
      elif target_layer is not None and LAYERS.index(target_layer) > LAYERS.index(layer):
        wrong.append(f"{module} -> {target}")
  assert not wrong, wrong


@pytest.mark.parametrize("layer", ["model", "data"])
def test_foundations_import_only_themselves(layer):
  wrong = [f"{m} -> {t}" for m, imports in _modules().items() if _layer(m) == layer
           for t in imports if _layer(t) != layer and t != "sharcs_jax.errors"]
  assert not wrong, wrong


def test_no_import_cycles():
  graph = _modules()
  state = {}

  def visit(module, stack):
    state[module] = "open"
    for target in graph.get(module, ()):
      if state.get(target) == "open":
        raise AssertionError(" -> ".join(stack + [module, target]))
      if target not in state:
        visit(target, stack + [module])
    state[module] = "done"

  for module in graph:
    if module not in state:
      visit(module, [])


def test_the_graph_is_read_from_the_source():
  graph = _modules()
  assert "sharcs_jax.run" in graph["sharcs_jax.serve.engine"]
  assert "sharcs_jax.serve.programs" in graph["sharcs_jax.train.loop"]
  assert _layer("sharcs_jax.train.loop") == "train" and _layer("sharcs_jax.config") is None


def _path(module: str) -> pathlib.Path:
  as_file = PACKAGE.parent / (module.replace(".", "/") + ".py")
  return as_file if as_file.exists() else PACKAGE.parent / module.replace(".", "/") / "__init__.py"


@pytest.mark.parametrize("module", NUMPY_ONLY)
def test_the_loaders_core_is_numpy_only(module):
  """What the exported loader runs imports no jax or flax, through none of our modules either."""
  graph, seen, todo, heavy = _modules(), set(), [module], []
  while todo:
    current = todo.pop()
    if current in seen:
      continue
    seen.add(current)
    heavy += [f"{current} -> {name}" for name in _third_party(_path(current)) & set(HEAVY)]
    todo += [t for t in graph.get(current, ()) if t.startswith("sharcs_jax.")]
  assert not heavy, heavy


def test_serve_shows_its_parts_as_sub_packages():
  graph = _modules()
  for package in ("onnx", "export", "http"):
    assert f"sharcs_jax.serve.{package}" in graph  # a package, with its docstring
  http = {t for m, imports in graph.items() if m.startswith("sharcs_jax.serve.http")
          for t in imports}
  wrong = sorted(t for t in http if not t.startswith(HTTP_MAY_IMPORT))
  assert not wrong, wrong
