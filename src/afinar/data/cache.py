"""On-disk cache of tokenised examples, so preprocessing is not repeated on every run.

The key covers everything the token ids depend on: the data file's bytes, the format, the
tokenizer (vocabulary, chat template, special tokens) and the stop tokens. A changed file or
template therefore simply misses; entries are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

from afinar.data.tokenize import ChatEncoder, Tokenized
from afinar.paths import afinar_home

_VERSION = "2"  # bump when the encoding logic changes


def tokenizer_fingerprint(encoder: ChatEncoder) -> str:
    tok = encoder.tokenizer
    digest = hashlib.sha256()
    digest.update(tok.backend_tokenizer.to_str().encode() if hasattr(tok, "backend_tokenizer")
                  else json.dumps(sorted(tok.get_vocab().items())).encode())
    digest.update(json.dumps([tok.chat_template, tok.bos_token, tok.eos_token,
                              sorted(encoder.stop_ids)], default=str).encode())
    return digest.hexdigest()


def _key(data_path: str, fmt: str | None, encoder: ChatEncoder) -> str:
    digest = hashlib.sha256(_VERSION.encode())
    digest.update(Path(data_path).read_bytes())
    digest.update(str(fmt).encode())
    digest.update(tokenizer_fingerprint(encoder).encode())
    return digest.hexdigest()[:32]


def cached_encode(data_path: str, fmt: str | None, encoder: ChatEncoder,
                  compute: Callable[[], list[Tokenized]]) -> tuple[list[Tokenized], bool]:
    """(encodings, whether they came from the cache)."""
    folder = afinar_home() / "cache" / "tokens"
    file = folder / f"{_key(data_path, fmt, encoder)}.pkl"
    if file.is_file():
        try:
            with open(file, "rb") as handle:
                return pickle.load(handle), True
        except (OSError, pickle.UnpicklingError, EOFError):
            pass  # a damaged entry is recomputed and replaced
    items = compute()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=folder)
    with os.fdopen(fd, "wb") as handle:
        pickle.dump(items, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, file)
    return items, False
