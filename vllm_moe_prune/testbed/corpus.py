"""Four text domains that every fresh machine of this kind already has on disk.

The testbed model must show expert specialisation, so its training text has to come
from domains that really differ in vocabulary and structure:

* ``python``: the CPython standard library sources,
* ``c``: the C headers under ``/usr/include`` (installed with gcc),
* ``prose``: English documentation (``pydoc_data.topics``) and licence texts,
* ``arithmetic``: generated integer arithmetic with answers.

Files are split into train and held-out by a stable hash of their path, so the
held-out text of every domain is never seen in training, and the split is the same
on every machine that has the same files.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("python", "c", "prose", "arithmetic")

#: Share of source documents (files, topics) that go to the held-out split.
HELDOUT_SHARE = 0.1


@dataclass(frozen=True)
class Document:
    """One unit of text and the stable key that decides its split."""

    key: str
    text: str


def _is_heldout(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return digest[0] < 256 * HELDOUT_SHARE


def _read_files(paths: list[Path], root: Path) -> list[Document]:
    docs = []
    for path in sorted(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(str(path.relative_to(root)), text))
    return docs


def python_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.glob("*.py")] + [p for p in root.glob("*/*.py") if "test" not in p.parts[-2]]
    return _read_files(paths, root)


def c_documents() -> list[Document]:
    root = Path("/usr/include")
    if not root.is_dir():
        raise FileNotFoundError("the 'c' domain needs C headers in /usr/include (install gcc / libc6-dev)")
    return _read_files(list(root.rglob("*.h")), root)


def prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    docs = [Document(f"pydoc:{name}", text) for name, text in sorted(topics.items())]
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        docs += _read_files([p for p in licenses.iterdir() if p.is_file()], licenses)
    return docs


def arithmetic_documents(count: int = 4000, seed: int = 0) -> list[Document]:
    """Generated sums, differences and products, one small worksheet per document."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        lines = []
        for _ in range(rng.randint(4, 12)):
            a, b = rng.randint(0, 9999), rng.randint(0, 999)
            op = rng.choice("+-*")
            result = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {result}")
        docs.append(Document(f"arith:{i}", "\n".join(lines) + "\n"))
    return docs


_SOURCES = {
    "python": python_documents,
    "c": c_documents,
    "prose": prose_documents,
    "arithmetic": arithmetic_documents,
}


def domain_split(domain: str) -> tuple[str, str]:
    """(train text, held-out text) of one domain; documents are joined by blank lines."""
    if domain not in _SOURCES:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    train, heldout = [], []
    for doc in _SOURCES[domain]():
        (heldout if _is_heldout(doc.key) else train).append(doc.text)
    if not train or not heldout:
        raise RuntimeError(f"domain {domain!r} has too few documents to split on this machine")
    return "\n\n".join(train), "\n\n".join(heldout)
