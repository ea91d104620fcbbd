"""Texts for extraction jobs: inline lists, text or JSONL files, and the built-in corpus.

``load_texts(source, n_texts, ...)`` turns what an ``Extract`` spec names into a list of
strings: a list is used as it is; ``"corpus:stdlib-docstrings"`` draws English sentences
from the docstrings of Python's standard library (read from the installed sources with
``ast``, nothing imported, nothing copied into this repository); any other string is a file,
``.jsonl`` (one JSON object per line, the text under ``text_field``) or plain text (one text
per non-blank line).

The built-in corpus is deterministic for a seed on one Python version: the standard library's
files are visited in a seeded order and their sentences taken in order until there are
enough, so a smaller draw is a prefix of a larger one with the same seed.

This module knows nothing about tokenizers, models or jobs.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import islice
from pathlib import Path

CORPUS_PREFIX = "corpus:"
STDLIB_CORPUS = "stdlib-docstrings"
CORPORA = (STDLIB_CORPUS,)
DEFAULT_CORPUS_TEXTS = 1000

_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
    "turtledemo", "ensurepip", "__pycache__", "config-3", "pydoc_data",
}  # fmt: skip
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'\"()\-_./%]*[a-z0-9)]\.")
_CODE = re.compile(r"\w[._]\w|\(\)|::|\.\.")
_MIN_WORDS, _MAX_WORDS = 5, 40


class TextSourceError(ValueError):
    """The texts of a spec cannot be read (missing file, bad JSONL, unknown corpus)."""


def is_corpus(source: str) -> bool:
    return source.startswith(CORPUS_PREFIX)


def count_texts(source: Sequence[str] | str, n_texts: int | None, text_field: str = "text") -> int:
    """How many texts ``load_texts`` gives, without keeping them (files are read once)."""
    if isinstance(source, str) and is_corpus(source):
        _corpus_name(source)
        return n_texts if n_texts is not None else DEFAULT_CORPUS_TEXTS
    if isinstance(source, str):
        total = sum(1 for _ in _iter_file(Path(source), text_field))
    else:
        total = len(source)
    return total if n_texts is None else min(total, n_texts)


def load_texts(
    source: Sequence[str] | str,
    n_texts: int | None = None,
    *,
    seed: int = 0,
    text_field: str = "text",
    start: int = 0,
    stop: int | None = None,
) -> list[str]:
    """Texts ``start:stop`` of the first ``n_texts`` of ``source`` (see the module docstring)."""
    end = n_texts if stop is None else (stop if n_texts is None else min(stop, n_texts))
    if isinstance(source, str) and is_corpus(source):
        _corpus_name(source)
        want = n_texts if n_texts is not None else DEFAULT_CORPUS_TEXTS
        end = want if end is None else min(end, want)
        return stdlib_sentences(end, seed=seed)[start:]
    if isinstance(source, str):
        return list(islice(_iter_file(Path(source), text_field), start, end))
    return list(source[start:end])


def _corpus_name(source: str) -> str:
    name = source[len(CORPUS_PREFIX) :]
    if name not in CORPORA:
        raise TextSourceError(f"unknown built-in corpus {name!r}; built in: {', '.join(CORPORA)}")
    return name


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    if not path.is_file():
        raise TextSourceError(f"texts file {str(path)!r} does not exist")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not jsonl:
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextSourceError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise TextSourceError(
                    f"{path}:{lineno}: no non-empty string under {text_field!r} "
                    "(set text_field to the key that holds the text)"
                )
            yield text


# ---- the built-in corpus ------------------------------------------------------------------


def stdlib_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from the standard library's docstrings (seeded)."""
    got = _stdlib_sentences(n, seed)
    if len(got) < n:
        raise TextSourceError(
            f"the standard library's docstrings give {len(got)} sentences, fewer than {n}"
        )
    return list(got)


_PARSE_LOCK = threading.Lock()
"""CPython 3.11's ``ast.parse`` is not safe in several threads at once ("AST constructor
recursion depth mismatch"): an ``api`` worker runs jobs in threads, so parsing is serialised."""


def _stdlib_sentences(n: int, seed: int) -> tuple[str, ...]:
    with _PARSE_LOCK:
        return _stdlib_sentences_cached(n, seed)


@lru_cache(maxsize=8)
def _stdlib_sentences_cached(n: int, seed: int) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for path in _stdlib_files(seed):
        for sentence in _file_sentences(path):
            if sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
                if len(out) == n:
                    return tuple(out)
    return tuple(out)


def _stdlib_files(seed: int) -> list[Path]:
    root = sysconfig.get_paths()["stdlib"]
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test")]
    files.sort()
    random.Random(seed).shuffle(files)
    return files


def _file_sentences(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        for paragraph in doc.split("\n\n"):
            if paragraph.lstrip().startswith(">>>"):
                continue
            for sentence in _SPLIT.split(" ".join(paragraph.split())):
                if (
                    _SENTENCE.fullmatch(sentence)
                    and not _CODE.search(sentence)
                    and _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS
                ):
                    yield sentence
