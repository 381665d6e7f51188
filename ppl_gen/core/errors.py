"""The project's error convention.

A :class:`UserError` is a mistake the user can fix (a bad flag, a missing file).
The entry points print it as one line, ``error: <message>``, and exit with code 2,
without a traceback. Anything else is an internal failure and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept on disk."""
