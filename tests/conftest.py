"""Shared test helpers: loading config files the way the scripts do."""

from __future__ import annotations

import importlib.util
import os
import pathlib

# Tests run tiny models: XLA's LLVM optimisation buys nothing there but costs most of the compile
# time. Set before JAX starts its backend; subprocesses inherit it.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
# Identical graphs (the paper configs shrink to the same towers at runlocal) compile once per run,
# across pytest-xdist workers and subprocesses too.
ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.pytest_cache' / 'jax_compilation'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402

# Test modules that use tfds.testing import its mocking module at collection, never first inside a test: pytest
# rewrites its asserts on import, and CPython 3.11.7's ast.parse can then fail with 'AST
# constructor recursion depth mismatch' (CPython gh-106905) when called from a deep stack.

CONFIG_DIR = ROOT / 'configs'
# Every experiment file in configs/ (helpers like common.py define no get_config).
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob('*.py') if p.stem not in ('__init__', 'common'))


def load_config(path: pathlib.Path | str, arg: str | None = None):
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def config_loader():
  return load_config
