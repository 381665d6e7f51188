"""A failure inside a user's model file is a user error: one line naming the file, the line
and the exception (``--traceback`` shows the whole), not a traceback through the library.

The file's own frames in the traceback decide: an exception raised while the model file's code
is on the stack (directly, or inside Pyro called from its ``model``) is the file's; one raised
with no frame of the file on the stack is the library's and keeps its traceback.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from pathlib import Path

from ppl_gen.core.errors import UserError


class ModelFileError(UserError):
    """An exception inside a model file; ``__cause__`` is the original, for ``--traceback``."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def blame(e: BaseException, path: Path) -> traceback.FrameSummary | None:
    """The innermost frame of ``path`` in ``e``'s traceback, or None."""
    path = Path(path).resolve()
    last = None
    for frame in traceback.extract_tb(e.__traceback__):
        try:
            if Path(frame.filename).resolve() == path:
                last = frame
        except (OSError, ValueError):
            continue
    return last


@contextmanager
def model_code(path: Path, doing: str):
    """Run the block as the model file's code: its exceptions become one-line user errors.
    ``doing`` says what the runner was doing, e.g. "in data()" or "at step 1"."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        frame = blame(e, path)
        if frame is None:
            raise
        raise ModelFileError(f"{Path(path).name}:{frame.lineno} ({frame.name}, {doing}): {_first_line(e)}; "
                             "fix the model file (--traceback shows the whole traceback)") from e
