"""Helpers on records that every source shares: the text at a field path, and which whole
documents are held out."""

from __future__ import annotations

import collections.abc
import hashlib
from collections.abc import Callable, Sequence
from typing import Any


def lookup(record: Any, path: str) -> Any:
    """The value at field path 'a/b' of a record; KeyError naming the fields there."""
    for key in path.split("/"):
        if not isinstance(record, collections.abc.Mapping) or key not in record:
            keys = sorted(record) if isinstance(record, collections.abc.Mapping) else type(record)
            raise KeyError(
                f"Record has no field {path!r} (at {key!r}; available: {keys}); "
                "set data.text_key to the field holding the text."
            )
        record = record[key]
    return record


def holdout_split(names: Sequence[str], k: int, key: Callable[[str], str] = str) -> dict[str, str]:
    """Assigns whole documents to splits: name -> 'train' | 'validation' | 'test'.

    Names are ordered by the sha256 of ``key(name)`` (ties by name): a fixed
    pseudo-random order that does not depend on listing order. The first ``k``
    go to test, the next ``k`` to validation, the rest to train.
    """
    ranked = sorted(names, key=lambda n: (hashlib.sha256(key(n).encode()).hexdigest(), n))
    out = dict.fromkeys(names, "train")
    for name in ranked[:k]:
        out[name] = "test"
    for name in ranked[k : 2 * k]:
        out[name] = "validation"
    return out
