"""How the command-line entry points end on bad input: one line naming the thing, not a traceback.

Every script runs its `main` through `cli.run(main)` (instead of `absl.app.run`). An error a user
can cause and fix — a `UserError`, any `ValueError` (config values, malformed files), an `OSError`
(a missing or unwritable path, a full disk) or a TensorFlow I/O error — ends the command with

  error: <message>

on stderr and exit status 1. `VATT_TRACEBACK=1` in the environment shows the full traceback
instead (for bug reports). Anything else (a bug) keeps its traceback. Ctrl-C and usage errors keep
absl's own handling.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

TRACEBACK_ENV = 'VATT_TRACEBACK'
EXIT_ERROR = 1


class UserError(ValueError):
  """Bad input or a refused command: the message is the whole story (one line, names the thing)."""


_OS_HINTS = {
  errno.ENOSPC: 'no space left on the device',
  errno.EDQUOT: 'disk quota exceeded',
  errno.EACCES: 'permission denied',
  errno.EROFS: 'read-only file system',
  errno.EPERM: 'operation not permitted',
}


def describe(e: BaseException) -> str:
  """The one-line text of an expected error."""
  if isinstance(e, OSError) and not isinstance(e, UserError):
    what = _OS_HINTS.get(e.errno) or e.strerror or type(e).__name__
    where = e.filename if e.filename is not None else None
    if where is None:
      text = str(e) or what
      return text if what in text else f'{what}: {text}'
    extra = f' → {e.filename2}' if e.filename2 is not None else ''
    return f'{what}: {where}{extra}'
  message = getattr(e, 'message', None) if _is_tf_error(e) else None
  text = str(message if message is not None else e) or type(e).__name__
  return ' '.join(line.strip() for line in text.strip().splitlines() if line.strip())


def _is_tf_error(e: BaseException) -> bool:
  return any(c.__module__.startswith('tensorflow') for c in type(e).__mro__[:-1])


def expected(e: BaseException) -> bool:
  """Whether `e` is an error of the input (one line) rather than a bug (a traceback)."""
  if isinstance(e, (app.UsageError, KeyboardInterrupt, SystemExit)):
    return False
  return isinstance(e, (ValueError, OSError)) or _is_tf_error(e)


def guard(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """`main` with expected errors turned into one line on stderr and exit status 1."""

  def guarded(argv):
    try:
      return main(argv)
    except BaseException as e:
      if not expected(e) or os.environ.get(TRACEBACK_ENV):
        raise
      logging.flush()
      print(f'error: {describe(e)}', file=sys.stderr, flush=True)
      sys.exit(EXIT_ERROR)

  return guarded


def _innermost_user_error(e: BaseException) -> UserError | None:
  """The UserError a flag parser wrapped (absl chains it: IllegalFlagValueError → …)."""
  found, seen = None, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, UserError):
      found = e
    e = e.__cause__ or e.__context__
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that a bad value a config file refused with a UserError (an
  unknown `--config=x.py:variant`) ends in its one line rather than absl's usage block."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    inner = _innermost_user_error(e)
    if inner is None or os.environ.get(TRACEBACK_ENV):
      return app.parse_flags_with_usage(argv)
    print(f'error: {describe(inner)}', file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    if os.environ.get(TRACEBACK_ENV) or not any(a.startswith('--config.') for a in argv):
      raise
    text = describe(e).strip('"\'').replace("\\'", "'").replace('\\n', ' ')
    print(
      f'error: a --config.* override names no field of the config: {text}',
      file=sys.stderr,
      flush=True,
    )
    sys.exit(EXIT_ERROR)


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` with one-line errors (see the module docstring)."""
  app.run(guard(main), flags_parser=parse_flags)
