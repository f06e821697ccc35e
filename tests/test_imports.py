"""The import structure: no hidden cycles, no project import deferred into a function unless the
module it imports pulls in a heavy optional dependency (TensorFlow, PyAV, matplotlib, …).

Read from the source (ast), nothing is imported: a function-level import hides a cycle from
Python's own check, so these tests look at every import statement wherever it stands.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('vatt_jax', 'data_pipelines', 'configs')
# Third-party packages slow to import or optional at run time: a project module that imports one
# of them (itself or through project modules, at module level) may be imported inside a function.
HEAVY = ('tensorflow', 'tensorflow_datasets', 'av', 'matplotlib', 'sklearn', 'ott')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _sources() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob('*.py'):
      out[_module_name(path)] = path
  return out


SOURCES = _sources()


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ''
  base = module.split('.') if is_package else module.split('.')[:-1]
  base = base[: len(base) - (node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def _imports(path: pathlib.Path) -> list[tuple[str, bool, int]]:
  """(imported module, inside a function?, line) of every import statement of a file. For
  `from package import name`, the submodule package.name when there is one."""
  inside = path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / 'scripts')
  module = _module_name(path) if inside else path.stem
  tree = ast.parse(path.read_text(), str(path))
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
      if isinstance(child, ast.Import):
        found.extend((alias.name, in_function, child.lineno) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = _resolve(child, module, path.name == '__init__.py')
        for alias in child.names:
          sub = f'{base}.{alias.name}'
          found.append((sub if sub in SOURCES else base, in_function, child.lineno))
      visit(child, nested)

  visit(tree, False)
  return found


def _project(name: str) -> str | None:
  """The project module an import names (the longest known prefix), or None if third-party."""
  parts = name.split('.')
  for i in range(len(parts), 0, -1):
    candidate = '.'.join(parts[:i])
    if candidate in SOURCES:
      return candidate
  return None


def _heavy_modules() -> set[str]:
  """Project modules that import a HEAVY package at module level, directly or transitively."""
  direct, edges = set(), {}
  for module, path in SOURCES.items():
    edges[module] = set()
    for name, in_function, _ in _imports(path):
      if in_function:
        continue
      if name.split('.')[0] in HEAVY:
        direct.add(module)
      target = _project(name)
      if target and target != module:
        edges[module].add(target)
  heavy, changed = set(direct), True
  while changed:
    changed = False
    for module, targets in edges.items():
      if module not in heavy and targets & heavy:
        heavy.add(module)
        changed = True
  return heavy


def test_project_imports_inside_functions_only_for_heavy_modules():
  heavy = _heavy_modules()
  files = list(SOURCES.values()) + sorted((ROOT / 'scripts').rglob('*.py'))
  problems = []
  for path in files:
    for name, in_function, line in _imports(path):
      target = _project(name)
      if in_function and target and target not in heavy:
        problems.append(f'{path.relative_to(ROOT)}:{line} imports {target} inside a function')
  assert not problems, '\n'.join(problems)


def _package_of(module: str) -> str:
  parts = module.split('.')
  return '.'.join(parts[:2]) if parts[0] == 'vatt_jax' and len(parts) > 1 else parts[0]


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(edges.get(node, ())):
      if state.get(target) == 'open':
        return stack[stack.index(target) :] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


@pytest.mark.parametrize('granularity', ['packages', 'modules'])
def test_no_import_cycle(granularity):
  """Between the packages of vatt_jax (models, losses, train, …; every import, wherever it
  stands), and between project modules."""
  edges = {}
  for module, path in SOURCES.items():
    source = _package_of(module) if granularity == 'packages' else module
    for name, _, _ in _imports(path):
      target = _project(name)
      if target is None:
        continue
      target = _package_of(target) if granularity == 'packages' else target
      if target != source and not (granularity == 'modules' and source.startswith(target + '.')):
        edges.setdefault(source, set()).add(target)
  cycle = _cycle(edges)
  assert cycle is None, ' → '.join(cycle)


def test_the_checker_sees_a_deferred_import(tmp_path):
  """The scan finds an import nested in a function (the case these tests exist for)."""
  path = tmp_path / 'x.py'
  path.write_text(
    'import os\n\ndef f():\n  from vatt_jax.models import contract\n  return contract\n'
  )
  assert ('vatt_jax.models.contract', True, 4) in _imports(path)
  assert ('os', False, 1) in _imports(path)
