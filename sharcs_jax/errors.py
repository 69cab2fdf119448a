"""Errors about a user's files, settings or workdir, whose message already says everything.

The command line prints them as one line (no traceback): a traceback of library frames would only
bury the file, key or value that the message names.
"""


class RunError(RuntimeError):
  """A problem with a run's inputs, outputs or workdir, stated in full by its message."""
