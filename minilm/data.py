"""Reading (query, passage[, label]) files: JSONL, TSV or CSV with a header, streamed row by row.

Text columns are `query`/`passage`, or `sentence_0`/`sentence_1` as in sentence-transformers datasets; `label` is a
number in [0, 1]; an optional `qid` (text or a whole number: 1 and "1" are one query) groups the candidates of one
query in evaluation data. Every problem is a `DataError` whose message names the file, the line and the field
("train.jsonl:17: field 'label': expected a number in [0, 1], got 'yes'").

The formats, as the tools that write them mean them:
  * JSONL: one JSON object per line.
  * TSV: one row per line, fields split on tabs, no quoting (a `"` is just a character, as in `cut -f` and pandas'
    `quoting=csv.QUOTE_NONE`). A tab or a line break inside a field cannot be written in TSV: use JSONL or CSV.
  * CSV: Python's csv module (RFC 4180 quoting, so fields may hold commas, quotes and line breaks).
A UTF-8 byte-order mark at the start of a file (Excel's "CSV UTF-8" writes one) is skipped.
"""

import csv
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("jsonl", "tsv", "csv")
COMPRESSED = ("gz", "bz2", "xz", "zst", "zip", "lz4")  # read and written as plain text only
TEXT_FIELDS = (("query", "passage"), ("sentence_0", "sentence_1"))
# The csv module's default field limit, 128 Ki characters, refuses long passages; no limit would let one stray quote
# pull the rest of a big file into memory before the error
CSV_FIELD_CHARS = 64 << 20
BYTE_ORDER_MARK = b"\xef\xbb\xbf"  # UTF-8's
INT_DIGITS = 4300  # sys.get_int_max_str_digits()'s default
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # what a data file means by a number: no "0_1", no "inf"


class DataError(ValueError):
    """Bad input data; the message is one line naming file, line and problem."""


@dataclass
class Pair:
    query: str
    passage: str
    label: float | None
    qid: str | None
    line: int
    row: dict = field(repr=False)  # every field of the input row, untouched (infer.py writes them back)
    source: str | None = field(default=None, repr=False)  # a JSONL row's own text, for writing it back byte for byte


def shown(path: str) -> str:
    """How error messages name an input: its path, or <stdin> for '-'."""
    return "<stdin>" if path == "-" else path


def detect_format(path: str, fmt: str | None = None, option: str = "") -> str:
    """The format from `fmt` or the file extension; standard input ('-') is JSONL unless told otherwise. `option`: the
    command-line option that gives a format, if the caller has one (infer.py's --format), for the error to suggest."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in COMPRESSED:
        raise DataError(f"{path}: a compressed file; decompress it first, or read it through a pipe: "
                        f"<(zcat {path}) with the format given{f' ({option})' if option else ''}")
    if suffix in ("jsonl", "json", "ndjson"):
        return "jsonl"
    if suffix in ("tsv", "csv"):
        return suffix
    raise DataError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; use .jsonl, .tsv or .csv"
                    f"{f' (or {option})' if option else ''}")


def starts_with_byte_order_mark(path: str) -> bool:
    """Whether the file `path`, or standard input ('-', looked at without reading it), starts with a UTF-8 byte-order
    mark (False for a file that cannot be read, and for a named pipe, which can be read only once)."""
    if path == "-":
        peek = getattr(sys.stdin.buffer, "peek", None)  # a BufferedReader's, as standard input's buffer is
        return peek is not None and peek(len(BYTE_ORDER_MARK))[: len(BYTE_ORDER_MARK)] == BYTE_ORDER_MARK
    try:
        with open(path, "rb") as f:
            return f.read(len(BYTE_ORDER_MARK)) == BYTE_ORDER_MARK
    except OSError:
        return False


def text_lines(path: str):
    """Yield (line number, decoded line with its line break) of a file or stdin ('-'); bytes are decoded line by line
    so that invalid UTF-8 is reported on its real line."""
    name = shown(path)
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    try:
        for n, raw in enumerate(f, start=1):
            if raw.startswith(BYTE_ORDER_MARK):
                if n > 1:
                    raise DataError(f"{name}:{n}: a byte-order mark starts this line, as where files were concatenated; "
                                    "remove it")
                raw = raw[3:]
            if n == 1 and b"\n" not in raw and b"\r" in raw.rstrip(b"\r"):  # the whole file is one "line"
                raise DataError(f"{name}:1: lines end in a carriage return alone (classic Mac line breaks); convert them "
                                "to newlines first, e.g. with tr '\\r' '\\n'")
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()


CSV_SPACE_QUOTE = re.compile(r'[ \t]+"')
JSON_WHITESPACE = " \t\r\n"
JSON_SPACE = re.compile(f"[{JSON_WHITESPACE}]*")


def read_rows(path: str, fmt: str):
    """Yield (line number, row dict, source) in file order. Rows keep every field of the input, untouched; source is a
    JSONL row's text without the whitespace around it (None for TSV and CSV)."""
    name = shown(path)
    lines = text_lines(path)
    if fmt == "jsonl":
        first = None  # the first row's line number
        for n, line in lines:
            if not line.strip():
                continue
            first = first or n
            if first == n and line.lstrip(JSON_WHITESPACE).startswith("["):  # a .json file: one array of objects
                raise DataError(f"{name}:{n}: a JSON array; JSONL is one object per line (convert it with "
                                f"`jq -c '.[]' FILE > FILE.jsonl`)")
            try:
                row = json.loads(line, parse_constant=not_json, parse_float=finite_float, parse_int=json_int,
                                 object_pairs_hook=unique_keys)
            except json.JSONDecodeError as e:
                hint = ("; standard input is read as JSONL: give --format tsv or --format csv for those" if path == "-"
                        and first == n and not line.lstrip(JSON_WHITESPACE).startswith("{") else "")
                raise DataError(f"{name}:{n}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}){hint}") from None
            except ValueError as e:
                raise DataError(f"{name}:{n}: {e}") from None
            except RecursionError:
                raise DataError(f"{name}:{n}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}:{n}: expected a JSON object, got {type(row).__name__}")
            if "\\ud" in line or "\\uD" in line:  # a "\udXXX" escape may be a lone surrogate: valid JSON, not text
                for key, value in row.items():
                    try:
                        json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise DataError(f"{name}:{n}: field {shorten(key)!r}: not valid Unicode text ({e.reason})") from None
            yield n, row, line.strip(JSON_WHITESPACE)  # json.loads allows no other whitespace around the object
        return
    if fmt == "tsv":
        records = ((n, line.rstrip("\n").removesuffix("\r").split("\t")) for n, line in lines if line.strip("\r\n"))
    else:
        csv.field_size_limit(CSV_FIELD_CHARS)
        numbers = []  # csv.reader pulls lines one at a time: the last one pulled ends the current record
        reader = csv.reader(((numbers.append(n), line)[1] for n, line in lines), strict=True)  # a stray quote is an error
        records = csv_records(reader, numbers, name)
    header = None
    for n, values in records:
        if header is None:
            header = values
            if len(set(header)) != len(header):
                raise DataError(f"{name}:{n}: duplicate column names in header {header}")
            check_header(header, name, n, fmt)
            continue
        if len(values) != len(header):
            quoted = fmt == "tsv" and any(v.startswith('"') for v in values)
            raise DataError(f"{name}:{n}: expected {len(header)} fields ({', '.join(header)}), got {len(values)}"
                            + ("; a quoted field holding a tab or a line break? TSV is read without quoting: use CSV "
                               "or JSONL" if quoted else ""))
        if values == header:
            raise DataError(f"{name}:{n}: repeats the header, as where files were concatenated; remove it")
        for column, value in zip(header, values):
            if fmt == "tsv" and quoted_with_quotes(value):
                raise DataError(f"{name}:{n}: field {shorten(column)!r} is quoted the way Python's csv module and "
                                "pandas write TSV (\"...\"\"...\"); TSV is read here without quoting, so the quotes would "
                                "be scored as text: write it with quoting=csv.QUOTE_NONE, or as CSV or JSONL")
            if fmt == "csv" and CSV_SPACE_QUOTE.match(value):  # `a, "b,c"`: the csv module reads ` "b` and `c"`
                raise DataError(f"{name}:{n}: field {shorten(column)!r} is a space and then a quote; a quoted CSV "
                                "field starts right after the comma: remove the space")
        yield n, dict(zip(header, values)), None


def quoted_with_quotes(value: str) -> bool:
    """Whether `value` is a field the way the csv module quotes one holding quotes: "a ""b"" c", every inner quote
    doubled. Text that merely starts and ends with a quote ("a" + "" + "b") is not."""
    inner = value[1:-1]
    return len(value) >= 4 and value[0] == value[-1] == '"' and '""' in inner and '"' not in inner.replace('""', "")


def check_header(header: list, name: str, n: int, fmt: str) -> None:
    """A TSV/CSV header must name the two text columns: said once, at the header, not as a missing field of row 2."""
    if any(set(columns) <= set(header) for columns in TEXT_FIELDS):
        return
    expected = next((columns for columns in TEXT_FIELDS if set(columns) & set(header)), TEXT_FIELDS[0])
    missing = " and no ".join(repr(c) for c in expected if c not in header)
    has = ", ".join(repr(shorten(c)) for c in header[:10]) + (", ..." if len(header) > 10 else "")
    other = {"csv": ("\t", "tab", "tsv"), "tsv": (",", "comma", "csv")}[fmt]
    hint = (" (JSON lines? name it .jsonl or give --format jsonl)" if header[0].lstrip().startswith("{") else
            f" ({other[1]}-separated? name it .{other[2]} or give --format {other[2]})" if other[0] in "".join(header) else
            " (semicolon-separated, as Excel saves CSV in many locales? save it with commas, or as tab-separated .tsv)"
            if fmt == "csv" and ";" in header[0] else "")
    raise DataError(f"{name}:{n}: the header has no {missing} column (expected 'query' and 'passage', or 'sentence_0' "
                    f"and 'sentence_1'); it has {has}{hint}")


def json_value_span(source: str, key: str) -> tuple[int, int]:
    """Where, in a JSON object's text, the value of its top-level member `key` is (it has one, and only one)."""
    def skip(i):  # JSON's whitespace
        return JSON_SPACE.match(source, i).end()

    i = skip(1)  # at a member's name
    while True:
        name, i = json.decoder.scanstring(source, i + 1)  # escapes decoded: "sc\u006fre" is score
        start = skip(skip(i) + 1)  # past the colon
        end = json.JSONDecoder().raw_decode(source, start)[1]
        if name == key:
            return start, end
        i = skip(skip(end) + 1)  # past the comma


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON (Python writes it for a non-finite float; JSON has no such number)")


def unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different (json.loads would keep the last of two "passage" fields)."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {shorten(key)!r}")
    return row


def shorten(text: str, width: int = 60) -> str:
    """`text` cut to `width` characters for an error message."""
    return text if len(text) <= width else text[: width - 3] + "..."


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but no 64-bit float holds it, and writing it back would be invalid
        raise ValueError(f"the number {text} does not fit a 64-bit float")
    return value


def json_int(text: str) -> int:
    if len(text) > INT_DIGITS:  # Python's own limit, whose message would advise calling sys.set_int_max_str_digits()
        raise ValueError(f"the number {text[:12]}... has {len(text):,} digits; at most {INT_DIGITS:,} are read")
    return int(text)


def csv_records(reader, numbers, name):
    """(first line number, fields) of each CSV record; a quoted field may span lines."""
    while True:
        start = len(numbers)
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            reason = str(e).split(" - do you need")[0]  # the csv module's advice to open the file otherwise: not for us
            if reason.startswith("new-line character"):
                reason = "a carriage return inside an unquoted field: quote the field"
            raise DataError(f"{name}:{numbers[start] if len(numbers) > start else start + 1}: malformed CSV ({reason})") from None
        if values:
            yield numbers[start], values


def parse_pair(row: dict, name: str, n: int, require_label: bool, source: str | None = None) -> Pair:
    """Check one row and turn it into a Pair; raise DataError naming the field otherwise."""
    named = [k for k in TEXT_FIELDS if k[0] in row or k[1] in row]
    if len(named) > 1:
        raise DataError(f"{name}:{n}: the row has both {named[0][0]!r}/{named[0][1]!r} and {named[1][0]!r}/"
                        f"{named[1][1]!r} fields: which pair to score is ambiguous")
    keys = named[0] if named else TEXT_FIELDS[0]
    texts = []
    for key in keys:
        if key not in row:
            has = ", ".join(repr(shorten(k)) for k in list(row)[:10]) + (", ..." if len(row) > 10 else "")
            raise DataError(f"{name}:{n}: missing field {key!r} (expected fields {keys[0]!r} and {keys[1]!r}; the row "
                            f"has {has or 'none'})")
        value = row[key]
        if not isinstance(value, str):
            raise DataError(f"{name}:{n}: field {key!r}: expected text, got {json.dumps(value)}")
        if not value.strip():
            raise DataError(f"{name}:{n}: field {key!r} is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": valid JSON, not text
            raise DataError(f"{name}:{n}: field {key!r}: not valid Unicode text ({e.reason} at character {e.start})") from None
        texts.append(value)
    label = None
    if require_label:
        if "label" not in row:
            has = ", ".join(repr(shorten(k)) for k in list(row)[:10]) + (", ..." if len(row) > 10 else "")
            hint = "; sentence-transformers datasets call it 'score': rename that field" if "score" in row else ""
            raise DataError(f"{name}:{n}: missing field 'label' (the row has {has}{hint})")
        raw = row["label"]
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            label = float(raw) if abs(raw) <= 2 else math.nan  # a 400-digit int would overflow a float
        elif isinstance(raw, str) and NUMBER.fullmatch(raw.strip()):
            label = float(raw)
        else:
            label = math.nan
        if not 0.0 <= label <= 1.0:  # also rejects NaN
            raise DataError(f"{name}:{n}: field 'label': expected a number in [0, 1], got "
                            f"{shorten(json.dumps(raw, ensure_ascii=False))}")
    qid = row.get("qid")
    return Pair(texts[0], texts[1], label, None if qid is None else str(qid), n, row, source)


def iter_pairs(path: str, fmt: str | None = None, require_label: bool = False):
    """Every row of a file as a checked Pair, streamed; an empty file is an error."""
    name = shown(path)
    empty = True
    for n, row, source in read_rows(path, detect_format(path, fmt)):
        empty = False
        yield parse_pair(row, name, n, require_label, source)
    if empty:
        raise DataError(f"{name}: no rows")


def read_pairs(path: str, fmt: str | None = None, require_label: bool = False) -> list[Pair]:
    """Every row of a file, all checked before anything is returned."""
    return list(iter_pairs(path, fmt, require_label))


def read_ranking_pairs(path: str, fmt: str | None = None) -> list[Pair]:
    """Labelled pairs whose candidates are ranked per query (evaluation data), their qids checked: a qid is text or a
    whole number; every row has one or none does (then the query text groups them); one qid is one query text. A file
    that mixed them up (two files with qids 0, 1, ... concatenated) would otherwise rank foreign candidates together."""
    pairs = read_pairs(path, fmt, require_label=True)
    name, with_qid = shown(path), pairs[0].qid is not None
    first = {}  # qid -> the first pair that has it
    for p in pairs:
        if (p.qid is not None) != with_qid:
            has, lacks = (pairs[0], p) if with_qid else (p, pairs[0])
            raise DataError(f"{name}:{p.line}: line {has.line} has a 'qid' and line {lacks.line} none: give every row a "
                            "qid, or none (then the query text groups the candidates)")
        if p.qid is None:
            continue
        raw = p.row["qid"]
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise DataError(f"{name}:{p.line}: field 'qid': expected text or a whole number, got "
                            f"{shorten(json.dumps(raw, ensure_ascii=False))}")
        if not p.qid.strip():
            raise DataError(f"{name}:{p.line}: field 'qid' is empty")
        seen = first.setdefault(p.qid, p)
        if seen.query != p.query:
            raise DataError(f"{name}:{p.line}: qid {json.dumps(raw, ensure_ascii=False)} is the query {shorten(p.query)!r} "
                            f"here and {shorten(seen.query)!r} at line {seen.line}: one qid, one query")
    candidates = {}  # (query's group, passage) -> its first pair
    for p in pairs:
        seen = candidates.setdefault((p.qid if with_qid else p.query, p.passage), p)
        if seen.label != p.label:
            raise DataError(f"{name}:{p.line}: the passage {shorten(p.passage)!r} of this query is labelled {p.label:g} "
                            f"here and {seen.label:g} at line {seen.line}: which is it?")
    return pairs


def fingerprint(pairs, with_qids: bool = False) -> str:
    """sha256 of the (query, passage, label[, qid]) content of `pairs`, in order: the same data whatever the file
    format. Qids group evaluation data, so they count there (where given: data without them hashes as before)."""
    digest = hashlib.sha256()
    for p in pairs:
        fields = [p.query, p.passage, p.label, *([p.qid] if with_qids and p.qid is not None else [])]
        digest.update(json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()
