"""Character sequences for the sequence models (Markov chains, the character RNN).

Each line of a text is one sequence of characters, ended by the symbol "\\n" (so
models also learn where a line stops). Sequences are padded with -1 into one
LongTensor [n_lines, T_max]; the alphabet is kept in ``Dataset.meta["alphabet"]``.

The default text: the 395 Reuters headlines that the PyPI package ``lda`` ships as
``lda/tests/reuters.titles`` (Blei's LDA data, as packaged by Riddell et al.).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ppl_gen.core.dataset import Dataset
from ppl_gen.core.errors import UserError

EOS = "\n"
HOLDOUT_EVERY = 5  # every 5th line is held out


def reuters_path() -> Path:
    try:
        import lda
    except ImportError:
        raise UserError("the default text ships with the PyPI package lda: pip install lda, "
                        "or give a text file with --data FILE") from None
    path = Path(lda.__file__).parent / "tests" / "reuters.titles"
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed lda package; give --data FILE")
    return path


def split_lines(lines: list[str], source: str, move_unseen: bool = False) -> tuple[list[str], list[str]]:
    """Every HOLDOUT_EVERY-th line is held out. With ``move_unseen``, a held-out line that
    uses a character absent from the training lines goes to training instead; otherwise
    such a character is an error that names it."""
    if len(lines) < 2:
        raise UserError(f"{source} has {len(lines)} non-empty line(s); a sequence model needs at least 2 "
                        "(one to train on, one held out)")
    train = [s for i, s in enumerate(lines) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    test = [s for i, s in enumerate(lines) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    seen = set("".join(train))
    if move_unseen:
        train += [s for s in test if set(s) - seen]
        test = [s for s in test if not set(s) - seen]
    unseen = sorted(set("".join(test)) - seen)
    if unseen:
        which = ", ".join(repr(c) for c in unseen)
        raise UserError(f"{source}: held-out lines use {which}, which no training line contains; a model over "
                        "the training alphabet cannot score them: remove them or add a training line with them")
    return train, test


def encode(lines: list[str], alphabet: str) -> torch.Tensor:
    """Lines -> LongTensor [n, T_max] of symbol ids, each line ended by EOS, padded with -1."""
    index = {c: i for i, c in enumerate(alphabet)}
    T = max(len(s) for s in lines) + 1
    x = torch.full((len(lines), T), -1, dtype=torch.long)
    for n, s in enumerate(lines):
        x[n, :len(s) + 1] = torch.tensor([index[c] for c in s + EOS])
    return x


def decode(x: torch.Tensor, alphabet: str) -> list[str]:
    """Symbol ids (one row per sequence; -1 or EOS ends a row) -> strings."""
    out = []
    for row in x.tolist():
        chars = []
        for i in row:
            if i < 0 or alphabet[i] == EOS:
                break
            chars.append(alphabet[i])
        out.append("".join(chars))
    return out


def load_text(spec: str | None) -> Dataset:
    """``--data``: None/``reuters`` for the bundled headlines, or the path of a text file."""
    if spec in (None, "", "reuters"):
        path = reuters_path()
        # each line is "<id> <headline>"; the id is not text
        lines = [s.split(" ", 1)[1] for s in path.read_text().splitlines() if " " in s.strip()]
        train, test = split_lines(lines, str(path), move_unseen=True)
        name = "reuters"
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--data {spec!r} is neither 'reuters' nor an existing text file")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); give a text file") from None
        lines = [s for s in text.splitlines() if s.strip()]
        train, test = split_lines(lines, str(path))
        name = path.stem
    alphabet = "".join(sorted(set("".join(train)) | {EOS}))
    return Dataset(encode(train, alphabet), encode(test, alphabet), name=name,
                   meta={"alphabet": alphabet, "source": str(path), "holdout": f"every {HOLDOUT_EVERY}th line"})
