"""Errors about a user's files, settings or workdir, whose message already says everything.

The command line prints them as one line (no traceback): a traceback of library frames would only
bury the file, key or value that the message names.
"""


class RunError(RuntimeError):
  """A problem with a run's inputs, outputs or workdir, stated in full by its message."""


class ConfigError(RunError, ValueError):
  """A config value out of its range or set, named by the message (a ValueError for callers that
  catch that, a RunError so the command line prints it as one line)."""


class MissingFileError(RunError, FileNotFoundError):
  """A file or directory the run reads is not there, named by the message (a FileNotFoundError
  for callers that catch that)."""


class DataError(RunError, ValueError):
  """Data that cannot be read as the task needs (a malformed row, a header without its columns)
  or a split too small for what the config asks of it, named by file, line or setting."""


def one_line_errors(main, *also: type[BaseException]):
  """`main` for `absl.app.run`, ended by a `RunError`, a usage error or one of `also` with one
  line, `FATAL <message>`, and exit status 1: the one way every command here (training, serving,
  export, the benchmarks) reports what its user must fix."""
  import os
  import sys

  from absl import app, logging

  def run(argv):
    sys.unraisablehook = ignore_closed_loop_callbacks(sys.unraisablehook)
    try:
      main(argv)
    except (RunError, app.UsageError, *also) as e:
      logging.flush()
      sys.stderr.write(f"FATAL {e}\n")
      sys.stderr.flush()
      os._exit(1)  # at once: orbax's reader threads would print their own tracebacks at shutdown

  return run


def ignore_closed_loop_callbacks(previous):
  """An unraisable-exception hook that drops asyncio's "Event loop is closed" and passes on
  everything else.

  orbax reads a checkpoint through tensorstore futures whose callbacks post to an asyncio loop.
  When one array of a damaged checkpoint fails, the loop closes while the other reads are still
  pending, and each of them then reports that error at random moments around the one-line FATAL
  message. That is noise about reads already abandoned, not a second fault.
  """
  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)
  return hook
