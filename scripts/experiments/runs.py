"""What the demo experiment scripts share: running a repository script, formatting a table cell."""

from __future__ import annotations

import os
import subprocess
import sys

from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args: list[str]) -> None:
  """Runs `python ARGS…` from the repository root with this interpreter; raises on failure."""
  logging.info('$ %s', ' '.join(args))
  subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def cell(values: list[float], fmt: str = '.1f') -> str:
  """A table cell: the mean, and the range over seeds when there are several."""
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f'{mean:{fmt}}'
  return f'{mean:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})'
