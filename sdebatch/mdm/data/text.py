"""Text sources and the text tokenizer (byte-level BPE trained locally with the ``tokenizers`` package).

Built-in corpus (no download): CPython's reference documentation shipped as ``pydoc_data.topics`` plus the module
docstrings of the standard library, read from source with ``ast`` (nothing is imported). Real corpora: folders of
``.txt`` / ``.md`` files and ``.jsonl`` files with a ``text`` field.
"""
from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path

from ...utils import atomic_write

VERSION = 1


def builtin_corpus(*, max_docs: int | None = None) -> list[str]:
    """English documents that ship with CPython: pydoc topics split into paragraphs' groups, then stdlib docstrings."""
    import pydoc_data.topics as topics

    docs = []
    for key in sorted(topics.topics):
        for block in topics.topics[key].split("\n\n\n"):
            block = block.strip()
            if len(block) > 200:
                docs.append(block)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) > 200:
            docs.append(doc.strip())
    return docs[:max_docs] if max_docs else docs


def load_text_folder(folder: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[str], int]:
    """Documents from ``.txt`` / ``.md`` files (one document each) and ``.jsonl`` files (a ``text`` field per row).

    Returns (documents, skipped). An unreadable file, a row that is not JSON or has no non-empty ``text``: a
    ValueError naming the file and line, or with ``skip_bad=True`` skipped and counted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"text folder {folder} does not exist")
    docs, skipped = [], 0

    def bad(msg: str) -> None:
        nonlocal skipped
        if not skip_bad:
            raise ValueError(msg)
        skipped += 1

    for path in sorted(folder.rglob("*")):
        if path.suffix in (".txt", ".md"):
            try:
                text = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                bad(f"{path}: cannot read as UTF-8 text ({e})")
                continue
            if text:
                docs.append(text)
            else:
                bad(f"{path}: empty document")
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get("text", "")
                except (json.JSONDecodeError, AttributeError):
                    bad(f"{path}:{n}: not a JSON object")
                    continue
                if isinstance(text, str) and text.strip():
                    docs.append(text.strip())
                else:
                    bad(f"{path}:{n}: no non-empty 'text' field")
    return docs, skipped


class TextTokenizer:
    """Byte-level BPE: any string round-trips exactly (decode(encode(s)) == s).

    Use :meth:`train` or :meth:`load`; ``vocab_size`` includes the 256 byte symbols.
    """

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 2048, *, min_frequency: int = 2) -> "TextTokenizer":
        """Train on ``texts``. Args: vocab_size (>= 257, default 2048); min_frequency of a merge (default 2)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (the 256 bytes plus merges), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (("tokenizer.json", self._tok.to_str()),
                           ("config.json", json.dumps({"kind": "byte_bpe", "version": VERSION,
                                                       "vocab_size": self.vocab_size}))):
            atomic_write(folder / name, text.encode("utf-8"))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TextTokenizer":
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("version") != VERSION:
            raise ValueError(f"{folder}: text tokenizer version {config.get('version')}, this code reads {VERSION}")
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
