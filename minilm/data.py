"""Reading (query, passage[, label]) files: JSONL, TSV or CSV with a header, streamed row by row.

Text columns are `query`/`passage`, or `sentence_0`/`sentence_1` as in sentence-transformers datasets; `label` is a
float in [0, 1]; an optional `qid` groups the candidates of one query. Every problem is a `DataError` whose message
names the file, the line and the field ("train.jsonl:17: field 'label': expected a number in [0, 1], got 'yes'").
"""

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("jsonl", "tsv", "csv")
TEXT_FIELDS = (("query", "passage"), ("sentence_0", "sentence_1"))


class DataError(ValueError):
    """Bad input data; the message is one line naming file, line and problem."""


@dataclass
class Pair:
    query: str
    passage: str
    label: float | None
    qid: str | None
    line: int


def detect_format(path: str, fmt: str | None = None) -> str:
    """The format from `fmt` or the file extension; standard input ('-') is JSONL unless told otherwise."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("jsonl", "json", "ndjson"):
        return "jsonl"
    if suffix in ("tsv", "csv"):
        return suffix
    raise DataError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; use .jsonl, .tsv or .csv (or --format)")


def open_text(path: str):
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None


def read_rows(path: str, fmt: str):
    """Yield (line number, row dict) in file order. Rows keep every field of the input, untouched."""
    name = "<stdin>" if path == "-" else path
    f = open_text(path)
    try:
        if fmt == "jsonl":
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{name}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{name}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
        else:
            reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
            try:
                header = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise DataError(f"{name}:1: malformed header ({e})") from None
            if len(set(header)) != len(header):
                raise DataError(f"{name}:1: duplicate column names in header {header}")
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as e:
                    raise DataError(f"{name}:{reader.line_num}: malformed {fmt.upper()} ({e})") from None
                if not values:
                    continue
                if len(values) != len(header):
                    raise DataError(f"{name}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), got {len(values)}")
                yield reader.line_num, dict(zip(header, values))
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    finally:
        if f is not sys.stdin:
            f.close()


def parse_pair(row: dict, name: str, n: int, require_label: bool) -> Pair:
    """Check one row and turn it into a Pair; raise DataError naming the field otherwise."""
    keys = next((k for k in TEXT_FIELDS if k[0] in row or k[1] in row), TEXT_FIELDS[0])
    texts = []
    for key in keys:
        if key not in row:
            raise DataError(f"{name}:{n}: missing field {key!r} (expected fields {keys[0]!r} and {keys[1]!r})")
        value = row[key]
        if not isinstance(value, str):
            raise DataError(f"{name}:{n}: field {key!r}: expected text, got {json.dumps(value)}")
        if not value.strip():
            raise DataError(f"{name}:{n}: field {key!r} is empty")
        texts.append(value)
    label = None
    if require_label:
        if "label" not in row:
            raise DataError(f"{name}:{n}: missing field 'label'")
        raw = row["label"]
        try:
            label = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            label = math.nan
        if not 0.0 <= label <= 1.0:  # also rejects NaN
            raise DataError(f"{name}:{n}: field 'label': expected a number in [0, 1], got {json.dumps(raw, ensure_ascii=False)}")
    qid = row.get("qid")
    return Pair(texts[0], texts[1], label, None if qid is None else str(qid), n)


def read_pairs(path: str, fmt: str | None = None, require_label: bool = False) -> list[Pair]:
    """Every row of a file, all checked before anything is returned; an empty file is an error too."""
    name = "<stdin>" if path == "-" else path
    pairs = [parse_pair(row, name, n, require_label) for n, row in read_rows(path, detect_format(path, fmt))]
    if not pairs:
        raise DataError(f"{name}: no rows")
    return pairs
