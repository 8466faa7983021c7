"""Score (query, passage) pairs with a MiniLM cross-encoder, from the command line.

Two modes:

  python infer.py QUERY PASSAGE [PASSAGE ...]        rank the passages for the query, print a table (or --json)
  python infer.py --input pairs.jsonl --output out.jsonl
                                                     add a `score` to every row of a JSONL / TSV / CSV file

A file is streamed: rows are read, checked and scored CHUNK_ROWS at a time, so memory does not grow with the file.
The output is written to a temporary file next to it and renamed only when every row has been scored: a bad row or
an interrupted run leaves no output file behind, and an existing one untouched. (A run killed outright, kill -9 or out
of memory, cannot remove its temporary file: the next run writing that output does.)

Under torchrun (`torchrun --nproc-per-node N infer.py --input ... --output ...`) the processes share the rows of a
file and process 0 writes the output, the same as one process writes (see Shards); ranking mode runs on process 0.

torch and the model code are imported only after the arguments have been checked, so `--help` and argument errors
are instant and the time to the first score is the time to load the model.
"""

import argparse
import bisect
import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minilm.cli import ArgumentParser, exit_after_process_group, stop_on_signals, whole_number

DEFAULT_MODEL = "cross-encoder/ms-marco-MiniLM-L6-v2"
DTYPE_CHOICES = ("fp32", "bf16", "fp16", "int8")
FORMAT_CHOICES = ("jsonl", "tsv", "csv")
CHUNK_ROWS = 1024  # rows read, scored and written at a time in file mode (under torchrun, how often the progress bar moves)
# Tokenize the next chunk in a worker thread while this one is scored (see `tokenized`). Off: measured, it gained
# nothing on a CPU (tokenizing is under 1% of the time there) and lost on an H100 and an H200 (0.82x, 0.83x the
# pairs/s of tokenizing in line: the tokenizer's threads and its Python part compete with the Python that launches
# the GPU's kernels); docs/performance.md
TOKENIZE_AHEAD = False
# Under torchrun, how long a process waits for the others at an exchange: they may be loading the model (downloading
# it, the first time) or scoring a chunk. One that takes longer is taken for hung, and the others stop.
SHARD_TIMEOUT_S = 600

EPILOG = """\
examples:
  python infer.py "how tall is everest" "Mount Everest is 8,849 m high." "Everest is a brand of shoes."
  python infer.py --json --top-k 1 --sigmoid "capital of france" "Paris is in France." "Berlin is in Germany."
  python infer.py --input pairs.tsv --output scored.tsv --model weights/cross-encoder/ms-marco-MiniLM-L6-v2
  cat pairs.jsonl | python infer.py --input - --quiet > scored.jsonl

input files (--input): JSONL with the fields "query" and "passage" (or "sentence_0" and "sentence_1"), or TSV / CSV
with a header row naming those columns. Every other field (qid, label, ...) is kept; the output has the same format,
rows and order, plus a "score" field (an existing "score" is overwritten, with a note). A JSONL row is written back
as it was, byte for byte, with the score added (lines end in \n; blank lines are left out); a TSV / CSV file that starts with a byte-order mark (Excel's "CSV UTF-8") gives
an output that starts with one. Exit status: 0 on success, 2 for bad arguments, bad input or a model that cannot be
found.

several processes (one per GPU, or CPU processes) share the rows of a file when started by torchrun:
  torchrun --nproc-per-node 4 infer.py --input pairs.jsonl --output scored.jsonl
"""


class UsageError(Exception):
    """A mistake of the user's (bad option value, missing model, unwritable output): one line on stderr, exit 2."""


class ShardError(Exception):
    """Scoring under torchrun stopped (a process failed, or the others lost it): exit `status`, print the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="infer.py",
        usage="%(prog)s [options] QUERY PASSAGE [PASSAGE ...]  |  %(prog)s [options] --input FILE [--output FILE]",
        description="Score (query, passage) pairs with a cross-encoder reranker: rank passages for one query,\n"
        "or add a score to every row of a JSONL / TSV / CSV file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("query", nargs="?", metavar="QUERY", help="the query to rank passages for")
    parser.add_argument("passages", nargs="*", metavar="PASSAGE",
                        help="passages to rank (put `--` before them if one starts with '-')")

    files = parser.add_argument_group("file mode")
    files.add_argument("--input", metavar="FILE",
                       help="score every row of FILE (.jsonl, .tsv or .csv; '-' reads standard input, as JSONL "
                       "unless --format says otherwise)")
    files.add_argument("--output", metavar="FILE",
                       help="where the scored rows go, in the input's format (default '-': standard output). "
                       "Written only when every row has been scored")
    files.add_argument("--format", choices=FORMAT_CHOICES,
                       help="the input's format, overriding its extension (needed for stdin that is not JSONL)")
    files.add_argument("--quiet", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")

    ranking = parser.add_argument_group("ranking mode")
    ranking.add_argument("--top-k", type=whole_number(1), metavar="N", help="print only the N best passages")
    ranking.add_argument("--json", action="store_true",
                         help='print a JSON array of {"corpus_id", "score", "text"}, highest score first, '
                         "instead of a table")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_DIR",
                       help="a local checkpoint directory, a folder name under weights/, or a Hugging Face Hub id "
                       f"(default: {DEFAULT_MODEL})")
    model.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model")
    model.add_argument("--batch-size", type=whole_number(1), default=32, metavar="N", help="pairs per forward pass (default: 32)")
    model.add_argument("--max-length", type=whole_number(5), metavar="N",
                       help="tokens per pair including [CLS]/[SEP]; longer pairs are truncated (default: the model's, 512)")
    model.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu; cpu for int8)")
    model.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32",
                       help="fp32 (default, exact); bf16 or fp16 for speed on a GPU (bf16 also on CPUs with AMX or "
                       "AVX512-BF16); int8 (dynamic quantization) on a CPU")
    model.add_argument("--sigmoid", action="store_true",
                       help="apply a sigmoid to the scores (0..1). Default: the model's own activation, which for the "
                       "ms-marco models is none (raw logits)")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Combinations argparse cannot express; each error is one line, exit status 2."""
    ranking = args.query is not None
    if args.input is not None:
        if ranking:
            parser.error("give either QUERY PASSAGE [PASSAGE ...] or --input FILE, not both")
        if args.top_k is not None or args.json:
            parser.error("--top-k and --json apply to QUERY PASSAGE ranking, not to --input files")
        if args.output is None:
            args.output = "-"
        return
    if args.output is not None or args.format is not None:
        parser.error("--output and --format go with --input FILE")
    if not ranking:
        parser.error("nothing to score: give QUERY PASSAGE [PASSAGE ...] or --input FILE")
    if not args.passages:
        parser.error("give at least one PASSAGE after the QUERY")
    texts = [("the QUERY", args.query), *((f"PASSAGE {i + 1} (id {i})", p) for i, p in enumerate(args.passages))]
    for n, (name, text) in enumerate(texts):
        if text == "-" and n < len(texts) - args.verbatim:  # a reader of the command sees standard input there
            parser.error(f"{name} is '-': ranking mode does not read standard input; give the passages as arguments "
                         "(the text '-' after `--`), or score a file of (query, passage) rows with --input")
        if not text.strip():
            parser.error(f"{name} is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
            parser.error(f"{name} is not UTF-8 text")


# ---------------------------------------------------------------------------------------------------------- model

def load_model(args):
    """Import torch and the model code (the slow part of a cold start) and load the checkpoint."""
    import torch

    from minilm.checkpoint import CheckpointError
    from minilm.crossencoder import CrossEncoder, default_device
    from minilm.tokenizer import MaxLengthError

    device = args.device
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise UsageError(f"--device {device}: {str(e).splitlines()[0]}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available")
    from minilm import precision

    try:  # a precision this device cannot run is the option's fault, not the model's
        precision.check(args.dtype, torch.device(device or default_device(args.dtype)))
    except ValueError as e:
        raise UsageError(f"--dtype {args.dtype}: {e}") from None
    try:
        return CrossEncoder.from_pretrained(args.model, revision=args.revision, device=device, dtype=args.dtype,
                                            max_length=args.max_length)
    except MaxLengthError as e:  # more than the model's position embeddings
        raise UsageError(f"--max-length {args.max_length}: {e}") from None
    except (CheckpointError, ValueError, OSError) as e:  # not found, a config this model does not support, unreadable
        raise UsageError(f"cannot load model{'' if args.model in str(e) else ' ' + args.model}: {e}") from None


# ---------------------------------------------------------------------------------------------------- ranking mode

def rank_passages(args) -> int:
    """CrossEncoder.rank, in steps: each can fail naming the argument at fault."""
    from minilm.crossencoder import ranked
    from minilm.tokenizer import NoTokens

    model = load_model(args)
    try:  # like an empty argument, which such a text would be scored as
        encodings = model.tokenizer.encode([(args.query, p) for p in args.passages], require_tokens=True)
    except NoTokens as e:
        raise UsageError(f"{'the QUERY' if e.text == 'query' else f'PASSAGE {e.index + 1} (id {e.index})'} {e.problem}") from None
    logits = model.score_encodings(encodings, batch_size=args.batch_size)
    check_finite(logits, lambda i: f"PASSAGE {i + 1} (id {i})", args)
    cut = [i for i, e in enumerate(encodings) if e.truncated]
    if cut:
        ids = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(f"infer.py: note: {len(cut)} of {len(encodings)} pairs (id {ids}) were longer than {model.max_length} tokens "
              f"and were cut to fit (the longer text, at its end){cut_hint(model)}", file=sys.stderr)
    scores = model.activate(logits, "sigmoid" if args.sigmoid else None)
    results = ranked(scores, logits, args.passages, args.top_k, return_documents=True)
    if hasattr(sys.stdout, "reconfigure"):  # not on a StringIO that a caller of main() put there
        sys.stdout.reconfigure(encoding="utf-8")
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return 0
    width = shutil.get_terminal_size((100, 24)).columns
    id_width = max(2, len(str(len(args.passages) - 1)))
    scores = [f"{r['score']:.4f}" for r in results]
    score_width = max(5, *(len(s) for s in scores))
    print(f"{'rank':>4}  {'score':>{score_width}}  {'id':>{id_width}}  passage")
    for i, (r, score) in enumerate(zip(results, scores), start=1):
        prefix = f"{i:>4}  {score:>{score_width}}  {r['corpus_id']:>{id_width}}  "
        print(prefix + preview(r["text"], max(20, width - len(prefix) - 1)))
    return 0


def cut_hint(model) -> str:
    limit = model.tokenizer.max_positions
    return f"; --max-length can go up to {limit}" if limit and model.max_length < limit else ""


BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder what follows


def preview(text: str, width: int) -> str:
    """The text on one line (whitespace runs collapsed; control characters, such as a terminal's escape sequences,
    and bidirectional overrides shown as U+FFFD), cut to `width` terminal columns (East Asian wide characters take
    two)."""
    line = "".join("\ufffd" if unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS else c for c in " ".join(text.split()))
    columns = [2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line]
    if sum(columns) <= width:
        return line
    kept = list(itertools.accumulate(columns))
    return line[: bisect.bisect_right(kept, width - 3)].rstrip() + "..."


# ------------------------------------------------------------------------------------------------------- file mode

def score_file(args) -> int:
    from minilm.data import detect_format, iter_pairs, starts_with_byte_order_mark

    fmt = detect_format(args.input, args.format, "--format")
    check_output(args.output, fmt)
    total = before = None  # stdin and pipes (--input <(zcat pairs.jsonl.gz)) can be read only once: rows are checked as scored
    if args.input != "-" and not is_pipe(args.input):
        before = file_state(args.input)
        total = sum(1 for _ in iter_pairs(args.input, fmt))  # a bad row fails here, instantly, before the model loads
    byte_order_mark = not is_pipe(args.input) and starts_with_byte_order_mark(args.input)  # '-' is looked at, not read
    model = load_model(args)

    scored = cut = 0
    with output_file(args.output) as out, progress_bar(total, args.quiet) as bar:
        writer = RowWriter(out, fmt, byte_order_mark=byte_order_mark)
        for chunk, encodings in tokenized(model, chunked(iter_pairs(args.input, fmt), CHUNK_ROWS), args.input):
            cut += score_chunk(model, chunk, encodings, writer, args, bar)
            scored += len(chunk)
        if before is not None:
            check_unchanged(args.input, before)
    say_notes(model, scored, cut, writer.replaced)
    return 0


def say_notes(model, scored: int, cut: int, replaced: int) -> None:
    """What a user should know of a file scored: rows truncated, a score field replaced (sentence-transformers
    datasets keep their gold labels in one)."""
    if cut:
        print(f"infer.py: note: {cut:,} of {scored:,} pairs were longer than {model.max_length} tokens and were cut to fit "
              f"(the longer text, at its end){cut_hint(model)}", file=sys.stderr)
    if replaced:
        print(f"infer.py: note: {replaced:,} of {scored:,} rows had a 'score' field; it holds this model's scores now "
              "(rename the field to keep it)", file=sys.stderr)


def file_state(path: str) -> tuple | None:
    """A file's size and modification time, to tell whether it changed between its check and its last row scored
    (None if it cannot be read: reading it says why)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def check_unchanged(path: str, before: tuple | None) -> None:
    if file_state(path) != before:  # rows added or edited meanwhile: what was checked, counted, shared is not what was read
        raise UsageError(f"--input {path}: the file changed while it was being scored; score a copy of it")


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        digest = hashlib.blake2b()
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tokenized(model, chunks, path: str):
    """(chunk, its encodings) for each chunk of rows. Tokenizing ahead (TOKENIZE_AHEAD), the next chunk is read here
    and tokenized by a worker thread while the caller scores this one (the Rust tokenizer releases the GIL), so that a
    GPU need not wait for the tokenizer between chunks. The reading stays in this thread, so that a read blocked on
    an idle pipe is still interrupted by Ctrl-C or SIGTERM, and the worker never holds more than one chunk's work."""
    from minilm.data import DataError, shown
    from minilm.tokenizer import NoTokens

    def tokenize(chunk):
        try:
            return model.tokenizer.encode([(p.query, p.passage) for p in chunk], require_tokens=True)
        except NoTokens as e:  # like an empty field, which it would be scored as
            raise DataError(e.at(f"{shown(path)}:{chunk[e.index].line}")) from None

    if not TOKENIZE_AHEAD:
        yield from ((chunk, tokenize(chunk)) for chunk in chunks)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as worker:
        previous = None
        for chunk in chunks:
            current = (chunk, worker.submit(tokenize, chunk))
            if previous is not None:
                yield previous[0], previous[1].result()
            previous = current
        if previous is not None:
            yield previous[0], previous[1].result()


def score_chunk(model, chunk: list, encodings: list, writer: "RowWriter", args, bar=None) -> int:
    """Score and write the rows of `chunk`; the number of them that were truncated."""
    from minilm.data import shown

    logits = model.score_encodings(encodings, batch_size=args.batch_size, progress=bar)
    check_finite(logits, lambda i: f"{shown(args.input)}:{chunk[i].line}", args)
    scores = model.activate(logits, "sigmoid" if args.sigmoid else None)
    for pair, score in zip(chunk, scores.tolist()):
        writer.write(pair.row, score, pair.source)
    return sum(e.truncated for e in encodings)


def check_finite(logits, where, args) -> None:
    """A NaN or infinite logit (fp16 overflow, weights gone bad) is an error naming the first pair (`where(index)`),
    never a score: not even after a sigmoid, which would turn an overflow into a confident 1.0."""
    if not bool(logits.isfinite().all()):
        i = int((~logits.isfinite()).nonzero()[0])
        hint = "; fp16 overflowed: use --dtype bf16 or fp32" if args.dtype == "fp16" else ""
        raise UsageError(f"{where(i)}: the model scored it {logits[i].item()}{hint}")


def check_output(output: str, fmt: str) -> None:
    fd = open_fd(output)
    if fd is not None:
        try:
            writable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        except OSError:
            writable = False
        if not writable:
            raise UsageError(f"--output {output}: descriptor {fd} is not open for writing")
        return
    if output == "-" or is_pipe(output):
        return
    if not output:
        raise UsageError("--output is empty; leave it out to write to standard output")
    if output.endswith(("/", os.sep)):
        raise UsageError(f"--output {output}: names a folder; give a file name")
    path = Path(os.path.realpath(output))
    if path.is_dir():
        raise UsageError(f"--output {output}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--output {output}: no such directory {str(path.parent)!r}")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--output {output}: cannot write to the directory {str(path.parent)!r}")
    if path.exists() and not os.access(path, os.W_OK):  # a rename would replace it all the same; `>` would not
        raise UsageError(f"--output {output}: the file is read-only")
    from minilm.data import COMPRESSED

    suffix = path.suffix.lower().lstrip(".")
    if suffix in COMPRESSED:
        raise UsageError(f"--output {output}: the output is plain text; to compress it, pipe it: --output - | gzip > {output}")
    suffix = "jsonl" if suffix in ("json", "ndjson") else suffix
    if suffix in FORMAT_CHOICES and suffix != fmt:
        raise UsageError(f"--output {output}: the output keeps the input's format ({fmt}); give it a .{fmt} name")


def open_fd(path: str) -> int | None:
    """The file descriptor that /dev/stdout, /dev/stderr, /dev/fd/N or /proc/self/fd/N names, else None. Such an
    output is written through that descriptor: opening the path again would truncate a file the shell opened for
    appending (`>> log`), and renaming onto it would replace that file."""
    named = {"/dev/stdout": 1, "/dev/stderr": 2}
    if path in named:
        return named[path]
    for prefix in ("/dev/fd/", "/proc/self/fd/", f"/proc/{os.getpid()}/fd/"):
        if path.startswith(prefix) and path[len(prefix):].isdigit():
            return int(path[len(prefix):])
    return None


def is_pipe(path: str) -> bool:
    """A FIFO, a character device (/dev/null, a terminal) or a socket: read once, written in place, never renamed."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # reading it reports the problem
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


@contextlib.contextmanager
def output_file(output: str):
    """A text file for the scored rows, whose content reaches `output` only if the block completes.

    A regular file is written under a temporary name beside it and renamed (an existing file stays untouched until
    then). Standard output, a pipe or /dev/null cannot be renamed onto: the rows are spooled to an anonymous temporary
    file and copied there at the end, so that a bad row prints nothing rather than half a result."""
    fd = 1 if output == "-" else open_fd(output)
    if fd is None and not is_pipe(output):
        from minilm.checkpoint import atomic_open

        with atomic_open(Path(os.path.realpath(output))) as out:  # through a symlink: replace the file, keep the link
            yield out
        return
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as spool:
        yield spool
        spool.seek(0)
        if fd == 1:
            sys.stdout.reconfigure(encoding="utf-8")
            shutil.copyfileobj(spool, sys.stdout)
            sys.stdout.flush()
        elif fd is not None:
            with open(os.dup(fd), "w", encoding="utf-8", newline="") as out:  # where, and how, the shell opened it
                shutil.copyfileobj(spool, out)
        else:
            with open(output, "w", encoding="utf-8", newline="") as out:
                shutil.copyfileobj(spool, out)


def let_the_reader_go(output: str | None) -> None:
    """After a failed run: a program waiting to read a named pipe given as --output (`cat fifo`) gets an empty stream
    (the pipe is opened and closed) instead of waiting forever for rows that never come."""
    if output and output != "-" and open_fd(output) is None:
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.stat(output).st_mode):  # O_NONBLOCK: with no reader, ENXIO instead of a wait
                os.close(os.open(output, os.O_WRONLY | os.O_NONBLOCK))


def output_option(argv: list) -> str | None:
    """--output as the command line gives it, read before the full parse (whose errors must let its reader go too)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--output")
    try:
        return parser.parse_known_args(argv[: argv.index("--")] if "--" in argv else argv)[0].output
    except argparse.ArgumentError:
        return None


def chunked(items, size: int):
    """Lists of `size` consecutive items (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class RowWriter:
    """Writes rows in `fmt` with a `score` field added (or replaced): JSONL objects (the row's own text with the score
    added before its closing brace, or in place of the value of a score it already has, so its numbers, escapes and
    spacing stay as they were), TSV lines (fields joined by tabs, no quoting: the text goes back byte for byte), or CSV
    records quoted by the csv module; TSV/CSV with a header (unless `header` is False: rows that go after another
    writer's), after a byte-order mark if `byte_order_mark` (the input had one: Excel reads a CSV without one in the
    system's legacy code page, and Cyrillic comes out garbled; JSONL never has one, JSON parsers refuse it). The score
    is the float32 value as a Python float's repr (up to 17 digits), which reads back to the same float32."""

    def __init__(self, out, fmt: str, header: bool = True, byte_order_mark: bool = False):
        from minilm.data import JSON_WHITESPACE

        self.json_whitespace = JSON_WHITESPACE
        self.out = out
        self.fmt = fmt
        self.write_header = header
        self.byte_order_mark = byte_order_mark
        self.replaced = 0  # rows that had a score field
        self.header = None
        if fmt == "csv":
            import csv

            self.csv = csv.writer(out, lineterminator="\n")

    def write(self, row: dict, score: float, source: str | None) -> None:
        """source: a JSONL row's text (data.Pair.source), a non-empty object "{...}"."""
        self.replaced += "score" in row
        if self.fmt == "jsonl":
            if "score" in row:  # a file scored before: the new score takes the old one's place
                from minilm.data import json_value_span

                start, end = json_value_span(source, "score")
                self.out.write(source[:start] + repr(score) + source[end:] + "\n")
            else:
                self.out.write(source[:-1].rstrip(self.json_whitespace) + ', "score": ' + repr(score) + "}\n")
            return
        if self.header is None:
            self.header = list(row) + ([] if "score" in row else ["score"])
            if self.write_header:
                if self.byte_order_mark:
                    self.out.write("\ufeff")
                self.write_record(self.header)
        row["score"] = repr(score)
        self.write_record([row[key] for key in self.header])

    def write_record(self, values: list) -> None:
        if self.fmt == "csv":
            self.csv.writerow(values)
        else:  # fields read from TSV lines hold no tab and no line break
            self.out.write("\t".join(values) + "\n")


@contextlib.contextmanager
def progress_bar(total, quiet: bool):
    """A tqdm bar counting pairs on stderr, silent with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    with tqdm(total=total, unit="pair", desc="Scoring", file=sys.stderr, dynamic_ncols=True,
              disable=quiet or not sys.stderr.isatty()) as bar:
        yield bar


# ----------------------------------------------------------------------------------------------- several processes

def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) of this process when torchrun started it; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Shards:
    """The processes torchrun started, scoring one file together.

    Every process reads the whole file (reading is cheap next to scoring) and scores every world-th chunk of
    CHUNK_ROWS rows: process r the chunks r, r + world, r + 2 world, ... In each round every process scores one chunk
    and sends its output lines to process 0, which writes them, in input order, into the output. So the output is
    what one process writes, each process holds one chunk at a time (process 0 the lines of one round), and only
    process 0 writes anything, so the output path need not exist on the other machines.

    Only text crosses between processes, so the group is gloo (TCP), also when each process scores on its own GPU.
    A process whose step fails does not leave: it says so at the end of the step (`agree`), and every process stops
    there with that error, which process 0 reports after removing its temporary output. A process that dies closes
    its connections, which fails the others' next exchange at once; one that hangs is given up after SHARD_TIMEOUT_S."""

    def __init__(self):
        from datetime import timedelta

        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = torchrun_rank()
        self.stopped = False  # every process agreed to stop on an error
        dist.init_process_group("gloo", timeout=timedelta(seconds=SHARD_TIMEOUT_S))

    def score(self, args) -> int:
        from minilm.data import detect_format, iter_pairs, starts_with_byte_order_mark

        def check_input():
            fmt = detect_format(args.input, args.format, "--format")
            if args.input == "-" or is_pipe(args.input):
                raise UsageError(f"--input {args.input}: under torchrun every process reads the input; give a file")
            if self.rank == 0:
                check_output(args.output, fmt)
            before = file_state(args.input)
            total = sum(1 for _ in iter_pairs(args.input, fmt))  # a bad row fails here, before the model loads
            return fmt, total, before, file_digest(args.input), starts_with_byte_order_mark(args.input)

        def load():
            import torch

            if args.device in (None, "cuda") and args.dtype != "int8" and torch.cuda.is_available():
                args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per process
                torch.cuda.set_device(args.device)  # else pinned host buffers make a context on GPU 0 in every process
            return load_model(args)

        fmt, total, before, digest, byte_order_mark = self.agree(check_input)
        inputs = [None] * self.world
        self.collective(self.dist.all_gather_object, inputs, (total, digest))
        if len(set(inputs)) > 1:  # "the same path on every machine" is not the same file on every machine
            self.stopped = True
            rows = ", ".join(f"process {r}: {n} rows" for r, (n, _) in enumerate(inputs))
            raise ShardError(2, f"--input {args.input}: the processes read different files ({rows}); every process "
                                "must read the same file")
        model = self.agree(load)
        mine = tokenized(model, itertools.islice(chunked(iter_pairs(args.input, fmt), CHUNK_ROWS), self.rank, None, self.world),
                         args.input)

        def score_mine(index: int) -> tuple[str, int, int]:
            """This process's chunk of the round: its scored rows' text, how many of them were truncated, how many
            had a score field."""
            lines = io.StringIO()
            writer = RowWriter(lines, fmt, header=index == 0, byte_order_mark=byte_order_mark)
            item = next(mine, None)  # None in the last round, for the processes after the file's last chunk
            cut = 0 if item is None else score_chunk(model, *item, writer, args)
            return lines.getvalue(), cut, writer.replaced

        cut = replaced = 0
        with contextlib.ExitStack() as stack:
            if self.rank == 0:
                out = stack.enter_context(output_file(args.output))
                bar = stack.enter_context(progress_bar(total, args.quiet))
            for first in range(0, math.ceil(total / CHUNK_ROWS), self.world):  # a round: chunk first + rank each
                shares = self.gather(self.agree(lambda: score_mine(first + self.rank)))
                if self.rank == 0:  # failing to write is process 0's own error: it reports it, the others lose it
                    out.writelines(text for text, _, _ in shares)
                    cut += sum(n for _, n, _ in shares)
                    replaced += sum(n for _, _, n in shares)
                    bar.update(min(total, (first + self.world) * CHUNK_ROWS) - first * CHUNK_ROWS)
            self.agree(lambda: check_unchanged(args.input, before))  # rows added meanwhile would be left out
            self.collective(self.dist.barrier)  # no process leaves (closing its connections) before its lines are in
        if self.rank == 0:
            say_notes(model, total, cut, replaced)
        return 0

    def agree(self, step):
        """step()'s result if it succeeded in every process; otherwise every process raises the error of the first
        one that failed."""
        from minilm.data import DataError

        result = failure = None
        try:
            result = step()
        except (UsageError, DataError) as e:  # bad input: the same in every process
            failure = (2, str(e))
        except Exception as e:  # a crash: named, since process 0 reports it
            failure = (1, f"process {self.rank}: {type(e).__name__}: {e}")
        failures = [None] * self.world
        self.collective(self.dist.all_gather_object, failures, failure)
        failure = next((f for f in failures if f is not None), None)
        if failure is not None:
            self.stopped = True
            raise ShardError(*failure)
        return result

    def gather(self, share):
        """Every process's `share`, in rank order, on process 0 (None elsewhere)."""
        shares = [None] * self.world if self.rank == 0 else None
        self.collective(self.dist.gather_object, share, shares, dst=0)
        return shares

    def collective(self, op, *args, **kwargs) -> None:
        try:
            op(*args, **kwargs)
        except RuntimeError as e:  # gloo: a process closed its connections (it died), or timed out (it hangs)
            reason = str(e).splitlines()[0].split("] ", 1)[-1].split(". ")[0]  # without gloo's source line and advice
            raise ShardError(1, f"lost contact with another process: {reason}") from None

    def leave(self) -> None:
        if self.stopped:  # torchrun stops every process as soon as one exits with an error: first let process 0
            with contextlib.suppress(ShardError):  # remove its temporary output and report the error
                self.collective(self.dist.barrier)
        self.dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = 1  # unless run_command returns or exits otherwise
    try:
        status = run_command(argv)
    except SystemExit as e:  # argparse's (2; 0 after --help), a signal's
        status = e.code
        raise
    finally:
        if status != 0 and torchrun_rank()[0] == 0:  # only process 0 writes the output
            let_the_reader_go(output_option(argv))
    return status


def run_command(argv: list) -> int:
    parser = build_parser()
    # Everything after the first `--` is a passage, verbatim (argparse would also drop every later "--")
    head, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_intermixed_args(head)
    args.verbatim = len(tail)  # the last texts, given after `--`: taken as written, even "-"
    if tail:
        texts = ([] if args.query is None else [args.query]) + args.passages + tail
        args.query, args.passages = texts[0], texts[1:]
    check_args(parser, args)
    if sys.stdout is None and (args.input is None or args.output == "-" or open_fd(args.output) == 1):
        return fail("standard output is closed")
    global error_reported
    error_reported = False
    stop_on_signals(stop)  # like Ctrl-C: unwind, so no temporary output is left
    from minilm.data import DataError  # plain Python; torch is imported later, by load_model

    rank, world = torchrun_rank()
    if args.input is None and rank > 0:
        return 0  # ranking a few passages is work for one process: process 0's
    quiet = rank > 0  # under torchrun, process 0 reports
    shards = None
    try:
        if args.input is None:
            return rank_passages(args)
        if world == 1:
            return score_file(args)
        shards = Shards()
        return shards.score(args)
    except (UsageError, DataError) as e:  # DataError names the file, the line and the problem
        return fail(str(e))
    except ShardError as e:  # every process stops, process 0 says why
        return fail(str(e), e.status, quiet)
    except KeyboardInterrupt:
        if not quiet:
            print("infer.py: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python infer.py ... | head`: the reader left; say nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:  # writing the output failed (disk full, ...); the temporary file is already gone
        to_stdout = args.output in (None, "-")
        if not to_stdout and (e.filename is None or Path(e.filename).parent == Path(os.path.realpath(args.output)).parent):
            return fail(f"--output {args.output}: {e.strerror or e}", status=1)  # not the temporary file's name
        return fail(f"{e.filename or '<stdout>'}: {e.strerror or e}", status=1)
    finally:
        if shards is not None:
            shards.leave()


def stop(signum, frame):
    global error_reported
    signal.signal(signum, signal.SIG_IGN)  # a second signal (kill sent twice) must not cut the unwinding short
    rank, world = torchrun_rank()
    # torchrun sends SIGTERM to every process when it is stopped, and when one of them fails. A process that raised
    # has had its error reported by process 0 already, but one killed outright (SIGKILL, out of memory) says nothing,
    # and the SIGTERM may reach process 0 before it notices the loss: then this is the only line infer.py prints.
    if rank == 0 and not error_reported:
        why = " (torchrun sends it to every process when it is stopped or when one of them fails)" if world > 1 else ""
        print(f"infer.py: stopped by {signal.Signals(signum).name}{why}; no output written", file=sys.stderr)
    error_reported = True
    sys.exit(128 + signum)


error_reported = False  # by fail(): a signal that comes later (torchrun stopping every process) adds no second line


def fail(message: str, status: int = 2, quiet: bool = False) -> int:
    global error_reported
    if not quiet:
        print(f"infer.py: error: {' '.join(message.split())}", file=sys.stderr)
        error_reported = True
    return status


def main_exit() -> None:
    """sys.exit(main()); under torchrun without the interpreter's teardown, which may abort once the process group
    has ended (minilm/cli.py: exit_after_process_group), also after an exit on the way (argparse's, a signal's)."""
    try:
        status = main()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if torchrun_rank()[1] > 1:
        exit_after_process_group(status)
    sys.exit(status)


if __name__ == "__main__":
    main_exit()
