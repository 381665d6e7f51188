"""A failure inside a user's model file is a user error: one line naming the file, the line
and the exception (``--traceback`` shows the whole), not a traceback through the library.

The file's own frames in the traceback decide: an exception raised while the model file's code
is on the stack (directly, or inside Pyro called from its ``model``) is the file's; one raised
with no frame of the file on the stack is the library's and keeps its traceback.
"""

from __future__ import annotations

import re
import traceback
from contextlib import contextmanager
from pathlib import Path

from ppl_gen.core.errors import UserError


class ModelFileError(UserError):
    """An exception inside a model file; ``__cause__`` is the original, for ``--traceback``."""


def _first_line(e: BaseException) -> str:
    text = [t.strip() for t in str(e).strip().splitlines()]
    if len(text) > 1 and text[0].endswith(":"):  # Pyro's "Error while computing log_prob at site 'x':"
        text = [f"{text[0]} {text[1]}"]
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def site_line(e: BaseException, path: Path) -> tuple[int, str] | None:
    """For Pyro's errors about a sample site (raised inside the ELBO, after the model's own code
    has returned): the line of the model file that declares that site."""
    found = re.search(r"at site '([^']+)'", str(e))
    if not found:
        return None
    site = re.escape(found.group(1))
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines, 1):
        if re.search(rf"sample\(\s*f?['\"]{site}['\"]", line):
            return i, f"site {found.group(1)!r}"
    return None


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
        where = (frame.lineno, frame.name) if frame is not None else site_line(e, path)
        if where is None:
            raise
        raise ModelFileError(f"{Path(path).name}:{where[0]} ({where[1]}, {doing}): {_first_line(e)}; "
                             "fix the model file (--traceback shows the whole traceback)") from e
