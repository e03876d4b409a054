"""Reading instruction datasets: a JSON list of objects, or JSON Lines, validated record by record.

Every error names the file and where: a JSON syntax error by line and column, a bad record by its
index (and id when it has one). Shared by training, perplexity and prediction.
"""
from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    pass


def _where(path, i, rec):
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{path}: record {i}" + (f" (id {rid!r})" if rid is not None else "")


def read_records(path, required=("instruction", "output"), unique_ids=False) -> list[dict]:
    """Load `path` (.json list or .jsonl) and check that every record has the `required` string fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}, column {e.colno}: {e.msg}") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    seen = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{_where(path, i, rec)} is a {type(rec).__name__}, not an object")
        for key in required:
            if not isinstance(rec.get(key), str):
                what = "has no" if key not in rec else "has a non-string"
                raise DataError(f"{_where(path, i, rec)} {what} {key!r} field")
        if unique_ids and "id" in rec:
            if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
                raise DataError(f"{_where(path, i, rec)}: id must be a string or an integer")
            if rec["id"] in seen:
                raise DataError(f"{_where(path, i, rec)}: duplicate id, first at record {seen[rec['id']]}")
            seen[rec["id"]] = i
    return records
