"""infer.py, the scoring CLI: ranking mode, every file format, streaming, and every user error (exit 2, one line).

Most cases call `infer.main([...])` in-process; a few run `python infer.py` in a subprocess to check what only a real
process shows (exit status, no traceback, torch not imported for --help and argument errors). The model is the
stand-in checkpoint of tests/standin.py (conftest.py builds it once); its scores mean nothing, only agreement with
`CrossEncoder.predict` on the same pairs matters.
"""

import csv
import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import infer  # noqa: E402

QUERY = "what is the capital of france"
PASSAGES = ["Paris is the capital and largest city of France.", "Berlin is in Germany.", "Bananas are yellow."]
PAIRS = [
    ("capital of france", "Paris is the capital of France."),
    ("capital of france", "The Eiffel tower, in Paris."),
    ("how tall is everest", "Mount Everest is 8,849 m high."),
    ("how tall is everest", "Bananas, \"quoted\", and\nnewlines."),
]


@pytest.fixture
def standin(standin_dir) -> Path:  # the session's stand-in checkpoint (conftest.py)
    return standin_dir


@pytest.fixture
def model(standin_model):
    return standin_model


def run(capsys, *argv):
    """infer.main in-process: (exit code, stdout, stderr). argparse errors (SystemExit) give their code too."""
    try:
        rc = infer.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli(*argv, input=None, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, input=input, capture_output=True, text=True,
                          env=env, timeout=120)


def imported_torch(importtime_stderr: str) -> bool:
    return any(line.rstrip().endswith("| torch") for line in importtime_stderr.splitlines())


def assert_one_line_error(err: str, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("infer.py: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, err)


def expected_scores(model, pairs, sigmoid=False):
    logits = model.predict(list(pairs), batch_size=32)
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) if sigmoid else logits


def no_load(*_):
    raise AssertionError("the model was loaded although the input is bad")


# ---------------------------------------------------------------------------------------------------- process level

def test_help_and_argument_errors_are_instant_without_torch():
    done = run_cli("-X", "importtime", "infer.py", "--help")
    assert done.returncode == 0
    assert "examples:" in done.stdout and "--input" in done.stdout and "--sigmoid" in done.stdout
    assert not imported_torch(done.stderr)

    done = run_cli("-X", "importtime", "infer.py", "only-a-query")
    assert done.returncode == 2
    assert "at least one PASSAGE" in done.stderr
    assert not imported_torch(done.stderr)


def test_bad_input_fails_before_torch_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "passage": "p"}\n{"query": "q", "passage": \n')
    out = tmp_path / "out.jsonl"
    done = run_cli("-X", "importtime", "infer.py", "--input", bad, "--output", out, "--model", tmp_path / "no-model")
    assert done.returncode == 2
    assert not imported_torch(done.stderr)
    message = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert_one_line_error("\n".join(message), f"{bad}:2", "malformed JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_rank_table_subprocess(standin, model):
    done = run_cli("infer.py", "--model", standin, "--device", "cpu", QUERY, *PASSAGES)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    header, *rows = done.stdout.strip().splitlines()
    assert header.split() == ["rank", "score", "id", "passage"]
    scores = expected_scores(model, [(QUERY, p) for p in PASSAGES])
    order = sorted(range(len(PASSAGES)), key=lambda i: -scores[i])
    assert len(rows) == len(PASSAGES)
    for rank, (row, i) in enumerate(zip(rows, order), start=1):
        fields = row.split(maxsplit=3)
        assert fields[0] == str(rank)
        assert float(fields[1]) == pytest.approx(scores[i], abs=1e-4)
        assert fields[2] == str(i)
        assert fields[3] == PASSAGES[i]


def test_stdin_tsv_to_stdout_subprocess(standin, model):
    text = "qid\tquery\tpassage\n" + "".join(f"{i}\t{q}\t{p.splitlines()[0]}\n" for i, (q, p) in enumerate(PAIRS))
    done = run_cli("infer.py", "--model", standin, "--device", "cpu", "--input", "-", "--format", "tsv", input=text)
    assert done.returncode == 0, done.stderr
    rows = read_output(done.stdout, "tsv")
    assert [r["qid"] for r in rows] == [str(i) for i in range(len(PAIRS))]
    scores = expected_scores(model, [(r["query"], r["passage"]) for r in rows])
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- ranking mode

def test_rank_json_matches_predict(standin, model, capsys):
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", QUERY, *PASSAGES)
    assert rc == 0, err
    results = json.loads(out)
    scores = expected_scores(model, [(QUERY, p) for p in PASSAGES])
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert sorted(r["corpus_id"] for r in results) == [0, 1, 2]
    for r in results:
        assert set(r) == {"corpus_id", "score", "text"}
        assert r["text"] == PASSAGES[r["corpus_id"]]
        assert r["score"] == pytest.approx(float(scores[r["corpus_id"]]), abs=1e-6)


def test_rank_top_k_and_options_between_positionals(standin, model, capsys):
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", QUERY, "--top-k", "2", *PASSAGES, "--json")
    assert rc == 0, err
    results = json.loads(out)
    scores = expected_scores(model, [(QUERY, p) for p in PASSAGES])
    assert [r["corpus_id"] for r in results] == list(np.argsort(-scores, kind="stable")[:2])


def test_option_spellings_do_not_touch_passages(standin, capsys):
    """--top_k for --top-k (Hugging Face's spelling) and a negative value reaching the option's own rule, but a passage
    that merely starts with "--" and has a space stays as written."""
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", "--top_k", "1", QUERY, "--snake_case x")
    assert rc == 0, err
    assert [r["text"] for r in json.loads(out)] == ["--snake_case x"]
    rc, _, err = run(capsys, "--model", standin, "--top-k", "-1", QUERY, "p")
    assert rc == 2
    assert_one_line_error(err, "argument --top-k: must be at least 1, got -1")


def test_rank_sigmoid(standin, model, capsys):
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", "--sigmoid", QUERY, *PASSAGES)
    assert rc == 0, err
    probabilities = expected_scores(model, [(QUERY, p) for p in PASSAGES], sigmoid=True)
    for r in json.loads(out):
        assert 0.0 < r["score"] < 1.0
        assert r["score"] == pytest.approx(probabilities[r["corpus_id"]], abs=1e-6)


def test_rank_passage_starting_with_dash(standin, capsys):
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", QUERY, "--", "-5 degrees", "warm")
    assert rc == 0, err
    assert {r["text"] for r in json.loads(out)} == {"-5 degrees", "warm"}
    # after the first `--` every argument is a passage, "--" too (argparse drops them all): ids stay the user's
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", QUERY, "--", "first", "--", "third")
    assert rc == 0, err
    assert sorted((r["corpus_id"], r["text"]) for r in json.loads(out)) == [(0, "first"), (1, "--"), (2, "third")]


def test_rank_arguments_that_are_not_utf8_exit_2(standin):
    done = subprocess.run([sys.executable, "infer.py", "--model", str(standin), "q", b"caf\xe9"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "PASSAGE 1 (id 0) is not UTF-8 text" in done.stderr, done.stderr


def test_a_non_finite_score_is_an_error_never_a_result(standin, tmp_path, monkeypatch, capsys):
    """fp16 overflow or weights gone NaN: no `nan` in a TSV, no invalid JSON, no output file; the row is named."""
    from minilm.crossencoder import CrossEncoder

    real = CrossEncoder.score_encodings
    monkeypatch.setattr(CrossEncoder, "score_encodings",
                        lambda self, enc, *a, **kw: real(self, enc, *a, **kw).index_fill(0, torch.tensor([len(enc) - 1]), math.nan))
    src, dst = tmp_path / "in.tsv", tmp_path / "out.tsv"
    write_input(src, "tsv", [{"query": q, "passage": p.replace("\n", " ")} for q, p in PAIRS])
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 2
    assert_one_line_error(err, f"{src}:{len(PAIRS) + 1}", "the model scored it nan")
    assert sorted(tmp_path.iterdir()) == [src]
    for top_k in ([], ["--top-k", "1"]):  # also when the NaN would not be among the results shown
        rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", *top_k, "q", "a", "b")
        assert rc == 2 and out == ""
        assert_one_line_error(err, "PASSAGE 2 (id 1): the model scored it nan")


# ------------------------------------------------------------------------------------------------------- file mode

def stdin(text: str) -> io.TextIOWrapper:
    """A stand-in for sys.stdin: text over a byte buffer, as a real one is."""
    return io.TextIOWrapper(io.BufferedReader(io.BytesIO(text.encode("utf-8"))), encoding="utf-8")


def write_input(path: Path, fmt: str, rows: list[dict]) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "tsv":  # plain TSV: tab-separated, no quoting
        path.write_text("".join("\t".join(r) + "\n" for r in [list(rows[0]), *(r.values() for r in rows)]), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def read_output(text: str, fmt: str) -> list[dict]:
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    if fmt == "tsv":
        header, *lines = [line.split("\t") for line in text.splitlines()]
        return [dict(zip(header, values, strict=True)) for values in lines]
    return list(csv.DictReader(io.StringIO(text, newline="")))


def assert_scored(model, rows_in, rows_out, text_keys=("query", "passage"), sigmoid=False):
    """Same rows, same order, same fields in the same order, plus a float32-exact score equal to predict's."""
    assert len(rows_out) == len(rows_in)
    for row_in, row_out in zip(rows_in, rows_out):
        assert list(row_out) == list(row_in) + ([] if "score" in row_in else ["score"])  # a present score keeps its place
        assert {k: v for k, v in row_out.items() if k != "score"} == {k: v for k, v in row_in.items() if k != "score"}
    scores = expected_scores(model, [(r[text_keys[0]], r[text_keys[1]]) for r in rows_in], sigmoid)
    got = [float(r["score"]) for r in rows_out]
    np.testing.assert_allclose(got, scores, atol=1e-6)
    if not sigmoid:
        assert all(float(np.float32(g)) == g for g in got)  # written with every digit of the float32 value


FILE_CASES = {
    "jsonl": ("jsonl", [{"query": q, "passage": p} for q, p in PAIRS], ("query", "passage")),
    "jsonl-sentences": ("jsonl", [{"sentence_0": q, "sentence_1": p, "label": i % 2} for i, (q, p) in enumerate(PAIRS)],
                        ("sentence_0", "sentence_1")),
    "tsv": ("tsv", [{"qid": str(i), "query": q, "passage": p.replace("\n", " ")} for i, (q, p) in enumerate(PAIRS)],
            ("query", "passage")),
    "csv-quoted": ("csv", [{"query": q, "passage": p, "label": "1"} for q, p in PAIRS], ("query", "passage")),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_file_formats(standin, model, tmp_path, capsys, case):
    fmt, rows, keys = FILE_CASES[case]
    src, dst = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    write_input(src, fmt, rows)
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    assert out == "" and err == ""
    rows_in = read_output(src.read_text(encoding="utf-8"), fmt)
    text = dst.read_text(encoding="utf-8")
    assert_scored(model, rows_in, read_output(text, fmt), keys)
    if case == "csv-quoted":
        assert '"Bananas, ""quoted"", and\nnewlines."' in text  # quoting and the embedded newline survive
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's private 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])


def test_tsv_is_one_row_per_line_with_no_quoting(standin, model, tmp_path, capsys):
    """Quotes are ordinary characters in TSV (MS MARCO text has many): 5 rows in, the same 5 rows out, byte for byte."""
    src, dst = tmp_path / "in.tsv", tmp_path / "out.tsv"
    src.write_text('query\tpassage\n"quoted" query\tplain\nq2\t"Hello" she said\nq3\t"unbalanced\nq4\tx\nq5\ty\n',
                   encoding="utf-8")
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    lines = dst.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "query\tpassage\tscore"
    assert [line.rsplit("\t", 1)[0] for line in lines[1:]] == src.read_text(encoding="utf-8").splitlines()[1:]
    pairs = [tuple(line.split("\t")) for line in src.read_text(encoding="utf-8").splitlines()[1:]]
    np.testing.assert_allclose([float(line.rsplit("\t", 1)[1]) for line in lines[1:]], expected_scores(model, pairs), atol=1e-6)


def test_extra_fields_kept_and_existing_score_replaced(standin, model, tmp_path, capsys):
    rows = [
        {"qid": 7, "query": "q one", "passage": "p one", "label": 1, "meta": {"source": ["a", 1]}, "score": "old"},
        {"qid": 7, "query": "q one", "score": None, "passage": "p two, é ü", "label": 0.5, "meta": None},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst, "--sigmoid")
    assert rc == 0, err
    out = read_output(dst.read_text(encoding="utf-8"), "jsonl")
    assert [list(r) for r in out] == [list(r) for r in rows]  # the score keeps its place
    assert_scored(model, rows, out, sigmoid=True)


def test_jsonl_rows_go_back_byte_for_byte_with_the_score_added(standin, model, tmp_path, capsys):
    """A JSONL row's numbers, escapes, spacing and key order stay as written (1e5 is not rewritten as 100000.0, nor
    1.10 as 1.1); only the score is added before the closing brace, or put in place of the value of the score a row
    already has (a file scored again). The first line's BOM, the whitespace around a row and CRLF line ends are not
    part of the row."""
    lines = ['{"qid": 1e5, "query": "caf\\u00e9 \\"q\\"", "passage": "Лев\\tТолстой", "x": 1.10, "y": [2.50, -0.0]}',
             '{"query":"q two","passage":"p\\/two" , "z" : {"a": null, "b": 1E+2}}']
    scored_before = ('{"query": "q3", "sc\\u006fre" :', ' 1e5 ', ', "passage": "p3 \\"score\\": 1", "m": {"score": 2}}')
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(("\ufeff" + lines[0] + "  \r\n\t" + lines[1] + "\n" + "".join(scored_before) + "\n").encode("utf-8"))
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    out = dst.read_text(encoding="utf-8").splitlines()
    scores = expected_scores(model, [('café "q"', "Лев\tТолстой"), ("q two", "p/two"), ("q3", 'p3 "score": 1')])
    assert [line.rsplit(', "score": ', 1)[0] for line in out[:2]] == [lines[0][:-1], lines[1][:-1]]
    assert all(line.endswith("}") for line in out[:2])
    before, _, after = scored_before
    assert out[2].startswith(before + " ") and out[2].endswith(" " + after) and "1e5" not in out[2]
    np.testing.assert_allclose([json.loads(line)["score"] for line in out], scores, atol=1e-6)


def test_stdin_to_stdout_jsonl(standin, model, monkeypatch, capsys):
    rows = [{"query": q, "passage": p, "label": 1} for q, p in PAIRS]
    monkeypatch.setattr(sys, "stdin", stdin("".join(json.dumps(r) + "\n" for r in rows)))
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", "-")
    assert rc == 0, err
    assert_scored(model, rows, read_output(out, "jsonl"))


def test_format_overrides_extension(standin, model, tmp_path, capsys):
    src, dst = tmp_path / "pairs.txt", tmp_path / "scored.txt"
    src.write_text("query,passage\nq one,p one\nq two,p two\n")
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst, "--format", "csv")
    assert rc == 0, err
    assert_scored(model, read_output(src.read_text(), "csv"), read_output(dst.read_text(), "csv"))


@pytest.mark.parametrize("ahead", [True, False], ids=["tokenize-ahead", "in-line"])
def test_streams_in_chunks(standin, model, tmp_path, monkeypatch, capsys, ahead):
    monkeypatch.setattr(infer, "CHUNK_ROWS", 2)
    monkeypatch.setattr(infer, "TOKENIZE_AHEAD", ahead)
    rows = [{"query": q, "passage": p} for q, p in PAIRS] + [{"query": "fifth", "passage": "row"}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", rows)
    chunks = []
    score = type(model).score_encodings
    monkeypatch.setattr(type(model), "score_encodings", lambda self, enc, *a, **kw: chunks.append(len(enc)) or score(self, enc, *a, **kw))
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    assert chunks == [2, 2, 1]
    assert_scored(model, rows, read_output(dst.read_text(), "jsonl"))


@pytest.mark.parametrize("ahead", [True, False], ids=["tokenize-ahead", "in-line (the default)"])
def test_next_chunk_is_tokenized_while_this_one_is_scored(standin, model, tmp_path, monkeypatch, capsys, ahead):
    """Each chunk's scoring notes whether the tokenizing of the next chunk has begun, waiting up to 10 s for it when
    tokenizing ahead (in line it cannot have begun), and the tokenizing is done by another thread than the main one
    exactly when tokenizing ahead."""
    monkeypatch.setattr(infer, "CHUNK_ROWS", 2)
    monkeypatch.setattr(infer, "TOKENIZE_AHEAD", ahead)
    rows = [{"query": q, "passage": p} for q, p in PAIRS] + [{"query": "fifth", "passage": "row"}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", rows)
    began = [threading.Event() for _ in range(3)]  # tokenizing of chunk i began
    next_began, in_main_thread = [], []
    encode, score = type(model.tokenizer).encode, type(model).score_encodings

    def encode_noted(self, pairs, **kw):
        in_main_thread.append(threading.current_thread() is threading.main_thread())
        began[sum(e.is_set() for e in began)].set()
        return encode(self, pairs, **kw)

    def score_noting_next(self, encodings, *args, **kw):
        i = len(next_began)
        next_began.append(began[i + 1].wait(10 if ahead else 0) if i + 1 < len(began) else None)
        return score(self, encodings, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(type(model.tokenizer), "encode", encode_noted)
        patch.setattr(type(model), "score_encodings", score_noting_next)
        rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    assert next_began == [ahead, ahead, None]
    assert in_main_thread == [not ahead] * 3
    assert_scored(model, rows, read_output(dst.read_text(), "jsonl"))


@pytest.mark.parametrize("ahead", [True, False], ids=["tokenize-ahead", "in-line"])
def test_bad_row_after_scored_chunks_leaves_no_output(standin, tmp_path, monkeypatch, capsys, ahead):
    """Standard input is not checked ahead: the bad row is met after one or (in line) two chunks were written to the
    temporary file."""
    monkeypatch.setattr(infer, "CHUNK_ROWS", 2)
    monkeypatch.setattr(infer, "TOKENIZE_AHEAD", ahead)
    good = "".join(json.dumps({"query": q, "passage": p}) + "\n" for q, p in PAIRS)
    monkeypatch.setattr(sys, "stdin", stdin(good + '{"query": "q"}\n'))
    dst = tmp_path / "out.jsonl"
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", "-", "--output", dst)
    assert rc == 2
    assert_one_line_error(err, "<stdin>:5", "missing field 'passage'")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary file


def test_rows_added_while_scoring_are_an_error(standin, tmp_path, monkeypatch, capsys):
    """A file that grows (or is edited) while it is scored: what was checked and counted is not what was scored."""
    monkeypatch.setattr(infer, "CHUNK_ROWS", 2)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", [{"query": q, "passage": p} for q, p in PAIRS])
    score_chunk = infer.score_chunk

    def score_and_append(model, chunk, *args):
        with open(src, "a", encoding="utf-8") as f:
            f.write(chunk[0].source + "\n")
        return score_chunk(model, chunk, *args)

    monkeypatch.setattr(infer, "score_chunk", score_and_append)
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 2
    assert_one_line_error(err, f"--input {src}", "the file changed while it was being scored")
    assert list(tmp_path.iterdir()) == [src]


def test_bad_row_on_stdin_prints_nothing_to_stdout(standin, monkeypatch, capsys):
    monkeypatch.setattr(infer, "CHUNK_ROWS", 1)
    monkeypatch.setattr(sys, "stdin", stdin('{"query": "q", "passage": "p"}\nnot json\n'))
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", "-")
    assert rc == 2
    assert out == ""
    assert_one_line_error(err, "<stdin>:2", "malformed JSON")



def test_progress_bar_only_on_a_terminal_and_not_with_quiet(standin, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    write_input(src, "jsonl", [{"query": q, "passage": p} for q, p in PAIRS])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", tmp_path / "out.jsonl")
    assert rc == 0
    assert f"{len(PAIRS)}/{len(PAIRS)}" in err and "pair" in err
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", tmp_path / "out.jsonl", "--quiet")
    assert rc == 0 and err == ""


def test_output_through_symlink_and_into_fifo(standin, model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [{"query": q, "passage": p} for q, p in PAIRS]
    write_input(src, "jsonl", rows)
    (tmp_path / "sub").mkdir()
    real, link = tmp_path / "sub" / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", link)
    assert rc == 0, err
    assert link.is_symlink()  # the file it points to was replaced, not the link
    assert_scored(model, rows, read_output(real.read_text(), "jsonl"))

    fifo = tmp_path / "fifo"  # like /dev/null or /dev/stdout: written into, never renamed over
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", fifo)
    reader.join(timeout=30)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert_scored(model, rows, read_output(received[0], "jsonl"))

    src.write_text('{"query": "q"}\n', encoding="utf-8")
    for failing, error in [([], "missing field 'passage'"), (["--batch-size", "0"], "--batch-size: must be at least 1")]:
        received.clear()  # a failed run lets the pipe's reader go (an empty stream) instead of leaving it waiting
        reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
        reader.start()
        deadline = time.time() + 10
        while Path(f"/proc/self/task/{reader.native_id}/wchan").read_text() != "wait_for_partner" and time.time() < deadline:
            time.sleep(0.01)  # until the reader waits in open() for a writer
        rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", fifo, *failing)
        reader.join(timeout=10)
        left_waiting = reader.is_alive()
        if left_waiting:
            os.close(os.open(fifo, os.O_WRONLY))  # set it free before failing
        assert rc == 2 and error in err, err
        assert not left_waiting and received == [""]


@pytest.mark.parametrize("ahead", [True, False], ids=["tokenize-ahead", "in-line"])
def test_interrupt_leaves_no_output(standin, tmp_path, monkeypatch, capsys, ahead):
    monkeypatch.setattr(infer, "TOKENIZE_AHEAD", ahead)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", [{"query": q, "passage": p} for q, p in PAIRS])

    def interrupted(self, encodings, **kw):
        raise KeyboardInterrupt

    from minilm import CrossEncoder

    monkeypatch.setattr(CrossEncoder, "score_encodings", interrupted)
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 130
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [src]


def test_output_to_dev_stdout_appends_where_the_shell_says(standin, model, tmp_path):
    """`--output /dev/stdout >> log.jsonl`: the rows go through the descriptor the shell opened for appending; opening
    the path again (or renaming onto it) would wipe the log's earlier lines."""
    src, log = tmp_path / "in.jsonl", tmp_path / "log.jsonl"
    rows = [{"query": q, "passage": p} for q, p in PAIRS]
    write_input(src, "jsonl", rows)
    log.write_text("earlier line\n")
    for output in ("/dev/stdout", "/dev/fd/1"):
        with open(log, "a") as appended:
            done = subprocess.run([sys.executable, "infer.py", "--model", str(standin), "--device", "cpu", "--quiet",
                                   "--input", str(src), "--output", output], cwd=REPO, stdout=appended,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier line" and len(lines) == 1 + 2 * len(rows)
    assert_scored(model, rows, read_output("\n".join(lines[1 : 1 + len(rows)]) + "\n", "jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "log.jsonl"]


def test_output_to_a_descriptor_not_open_for_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load_model", no_load)  # refused before the model loads, not after scoring everything
    (tmp_path / "in.jsonl").write_text('{"query": "q", "passage": "p"}\n')
    fd = os.open(tmp_path / "in.jsonl", os.O_RDONLY)
    try:
        rc, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", f"/dev/fd/{fd}")
    finally:
        os.close(fd)
    assert rc == 2
    assert_one_line_error(err, f"descriptor {fd} is not open for writing")


def wait_until_caught(proc: subprocess.Popen, signum: int) -> None:
    """Until process `proc` has a handler for `signum` (Linux: the SigCgt mask of /proc/PID/status)."""
    pid, deadline = proc.pid, time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:  # ended before (a dead process's mask reads 0): say how, not "never installed"
            raise AssertionError(f"process {pid} ended with status {proc.returncode}: {proc.stderr.read()}")
        with open(f"/proc/{pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never installed a handler for {signal.Signals(signum).name}")


def test_sighup_stops_cleanly_but_not_under_nohup(standin, model, tmp_path):
    """A closed terminal (SIGHUP) unwinds like SIGTERM: exit 129, no output. Under nohup (SIGHUP ignored) it is no
    reason to stop."""
    rows = [{"query": q, "passage": p} for q, p in PAIRS]
    for ignored in (False, True):
        dst = tmp_path / f"out-{ignored}.jsonl"
        proc = subprocess.Popen([sys.executable, "infer.py", "--model", str(standin), "--device", "cpu", "--input", "-",
                                 "--output", str(dst)], cwd=REPO, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # both ways set, not inherited: under `nohup pytest` the child would start with it ignored
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN if ignored else signal.SIG_DFL))
        proc.stdin.write(json.dumps(rows[0]) + "\n")
        proc.stdin.flush()
        if not ignored:
            wait_until_caught(proc, signal.SIGHUP)  # before that, SIGHUP's default action would kill it
        time.sleep(3)  # reading stdin, waiting for more rows
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        if ignored:
            proc.stdin.write("".join(json.dumps(r) + "\n" for r in rows[1:]))
        proc.stdin.close()
        assert proc.wait(timeout=60) == (0 if ignored else 129), proc.stderr.read()
        if ignored:
            assert_scored(model, rows, read_output(dst.read_text(), "jsonl"))
        else:
            assert not dst.exists() and "stopped by SIGHUP" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-True.jsonl"]


def scoring_into_old_output(standin, tmp_path, rows) -> subprocess.Popen:
    """infer.py scoring 3,000 copies of `rows` from tmp_path/in.jsonl into tmp_path/out.jsonl (holding "old"), once
    it has begun writing its temporary output."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", rows * 3000)
    dst.write_text("old\n")
    proc = subprocess.Popen([sys.executable, "infer.py", "--model", str(standin), "--device", "cpu", "--input", str(src),
                             "--output", str(dst)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.jsonl.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.jsonl.*.tmp")), "the temporary output never appeared"
    return proc


def test_sigterm_leaves_no_output(standin, tmp_path):
    """SIGTERM (what `kill` and job schedulers send) while scoring: exit 143, no temporary file, the old output kept."""
    dst = tmp_path / "out.jsonl"
    proc = scoring_into_old_output(standin, tmp_path, [{"query": q, "passage": p} for q, p in PAIRS])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"] and dst.read_text() == "old\n"


def test_kill_9_leaves_a_temporary_file_that_the_next_run_removes(standin, model, tmp_path):
    """SIGKILL cannot be caught: the old output is kept and the temporary file stays. The next run writing that output
    removes it, but not the temporary file of a process still running here, nor one of another machine or container
    (whose process ids mean other processes), nor a file of any other shape."""
    from minilm.checkpoint import temporary_prefix

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"query": q, "passage": p} for q, p in PAIRS]
    proc = scoring_into_old_output(standin, tmp_path, rows)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    [left] = tmp_path.glob(".out.jsonl.*.tmp")
    assert left.name.startswith(f"{temporary_prefix(dst)}{proc.pid}.") and dst.read_text() == "old\n"
    running = tmp_path / f"{temporary_prefix(dst)}{os.getpid()}.abcd_123.tmp"
    elsewhere = tmp_path / f".out.jsonl.0123456789ab-{proc.pid}.abcd_123.tmp"
    notes = tmp_path / f"{temporary_prefix(dst)}{proc.pid}.my-notes.tmp"
    for path in (running, elsewhere, notes):
        path.write_text("not a stale temporary file of this machine")
    write_input(src, "jsonl", rows)
    done = subprocess.run([sys.executable, "infer.py", "--model", str(standin), "--device", "cpu", "--input", str(src),
                           "--output", str(dst)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_scored(model, rows, read_output(dst.read_text(), "jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", "out.jsonl", running.name, elsewhere.name,
                                                                 notes.name])


BAD_INPUTS = {
    "malformed-json": ("in.jsonl", '{"query": "q", "passage": "p"}\n{"query": "q", "passage": "p"\n', ":2", "malformed JSON"),
    "not-an-object": ("in.jsonl", '{"query": "q", "passage": "p"}\n["q", "p"]\n', ":2", "expected a JSON object"),
    "json-array": ("in.jsonl", '[\n  {"query": "q", "passage": "p"}\n]\n', ":1",
                   "a JSON array; JSONL is one object per line (convert it with `jq -c '.[]' FILE > FILE.jsonl`)"),
    "missing-field": ("in.jsonl", '{"query": "q", "passage": "p"}\n{"query": "q", "text": "p"}\n', ":2", "missing field 'passage'"),
    "empty-passage": ("in.jsonl", '{"query": "q", "passage": "  "}\n', ":1", "'passage' is empty"),
    "number-passage": ("in.jsonl", '{"query": "q", "passage": 3}\n', ":1", "expected text"),
    "tsv-columns": ("in.tsv", "query\tpassage\nq\tp\nq\tp\textra\n", ":3", "expected 2 fields"),
    "csv-missing-column": ("in.csv", "query,text\nq,p\n", ":1", "the header has no 'passage' column"),
    "unknown-extension": ("in.txt", '{"query": "q", "passage": "p"}\n', "", "cannot tell the format"),
    "empty-file": ("in.jsonl", "", "", "no rows"),
    "header-only": ("in.csv", "query,passage\n", "", "no rows"),
    "not-utf8": ("in.tsv", b"query\tpassage\nq\t\xff\xfe\n", ":2", "not UTF-8"),
    "not-utf8-deep": ("in.jsonl", b'{"query": "q", "passage": "p"}\n' * 2500 + b'{"query": "q", "passage": "\xff"}\n', ":2501",
                      "not UTF-8"),
    "lone-surrogate": ("in.jsonl", '{"query": "q", "passage": "p"}\n{"query": "\\ud800", "passage": "p"}\n', ":2",
                       "field 'query': not valid Unicode text"),
    "nan-literal": ("in.jsonl", '{"query": "q", "passage": "p", "x": NaN}\n', ":1", "NaN is not JSON"),
    "huge-number": ("in.jsonl", '{"query": "q", "passage": "p"}\n{"query": "q", "passage": "p", "x": 1e400}\n', ":2",
                    "the number 1e400 does not fit a 64-bit float"),
    "csv-stray-quote": ("in.csv", 'query,passage\nq,"p\nq,p\n', ":2", "malformed CSV"),
    "csv-bare-carriage-return": ("in.csv", "query,passage\nq,p\rp\n", ":2",
                                 "malformed CSV (a carriage return inside an unquoted field: quote the field)"),
    "header-without-columns": ("in.csv", "question,text\nq,p\n", ":1", "no 'query' and no 'passage' column (expected "
                               "'query' and 'passage', or 'sentence_0' and 'sentence_1'); it has 'question', 'text'"),
    "tsv-named-csv": ("in.csv", "query\tpassage\nq\tp\n", ":1", "(tab-separated? name it .tsv or give --format tsv)"),
    "csv-named-tsv": ("in.tsv", "query,passage\nq,p\n", ":1", "(comma-separated? name it .csv or give --format csv)"),
    "semicolon-csv": ("in.csv", "query;passage\nq;p\n", ":1", "it has 'query;passage' (semicolon-separated, as Excel "
                      "saves CSV in many locales? save it with commas, or as tab-separated .tsv)"),
    "duplicate-key": ("in.jsonl", '{"query": "q", "passage": "p"}\n{"query": "q", "passage": "a", "passage": "b"}\n', ":2",
                      "duplicate key 'passage'"),
    "both-field-pairs": ("in.jsonl", '{"query": "q", "passage": "p", "sentence_0": "a", "sentence_1": "b"}\n', ":1",
                         "ambiguous"),
    "surrogate-elsewhere": ("in.jsonl", '{"query": "q", "passage": "p", "note": "\\udfff"}\n', ":1",
                            "field 'note': not valid Unicode text"),
    "cr-only-jsonl": ("in.jsonl", '{"query": "q", "passage": "p"}\r{"query": "q", "passage": "p"}\r', ":1",
                      "lines end in a carriage return alone"),
    "cr-only-tsv": ("in.tsv", "query\tpassage\rq\tp\r", ":1", "lines end in a carriage return alone"),
    "cr-only-csv": ("in.csv", "query,passage\rq,p\r", ":1", "lines end in a carriage return alone"),
    "control-character": ("in.jsonl", '{"query": "q", "passage": "p\x00x"}\n', ":1",
                          "malformed JSON (Invalid control character at column 29)"),
    # concatenated files: a second byte-order mark or header is not a row
    "bom-mid-file": ("in.jsonl", '{"query": "q", "passage": "p"}\n\ufeff{"query": "q", "passage": "p"}\n', ":2",
                     "a byte-order mark starts this line, as where files were concatenated"),
    "header-again": ("in.tsv", "query\tpassage\nq\tp\nquery\tpassage\nq\tp\n", ":3",
                     "repeats the header, as where files were concatenated"),
    # the csv module reads `q, "a,b"` as the fields `q`, ` "a`, `b"`: with a third column, silently
    "csv-space-before-quote": ("in.csv", 'query,passage,label\nq, "a,b"\n', ":2",
                               "field 'passage' is a space and then a quote; a quoted CSV field starts right after the comma"),
    "compressed": ("in.jsonl.gz", b"\x1f\x8b\x08\x00", "", "a compressed file; decompress it first, or read it through a pipe"),
    # a TSV written by pandas or the csv module quotes a field holding a quote: read as text, its quotes would be scored
    "tsv-quoted-the-csv-way": ("in.tsv", 'query\tpassage\nq\t"a" + "" + "b"\nq\t"He said ""hi"""\n', ":3",
                               "field 'passage' is quoted the way Python's csv module and pandas write TSV"),
    "tsv-quoted-tab": ("in.tsv", 'query\tpassage\nq\t"a\tb"\n', ":2",
                       "got 3; a quoted field holding a tab or a line break? TSV is read without quoting"),
    "jsonl-read-as-tsv": ("in.tsv", '{"query": "q", "passage": "p"}\n', ":1", "(JSON lines? name it .jsonl"),
    "deep-nesting": ("in.jsonl", '{"query": "q", "passage": "p", "x": ' + "[" * 100000 + "]" * 100000 + "}\n", ":1",
                     "nested too deeply"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_naming_file_and_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(infer, "load_model", no_load)  # files are checked before the model is loaded
    name, content, line, problem = BAD_INPUTS[case]
    src = tmp_path / name
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    dst = tmp_path / ("out" + src.suffix)
    rc, out, err = run(capsys, "--input", src, "--output", dst)
    assert rc == 2
    assert out == ""
    assert_one_line_error(err, f"{src}{line}", problem)
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv"])
def test_a_byte_order_mark_is_skipped(standin, model, tmp_path, monkeypatch, capsys, fmt):
    """Excel's "CSV UTF-8" and many Windows tools start files with a UTF-8 BOM: it is not part of the first field.
    A TSV or CSV output gets it back (without it Excel reads UTF-8 in a legacy code page); JSONL does not (JSON
    parsers refuse it)."""
    rows = [{"query": q, "passage": p.replace("\n", " ")} for q, p in PAIRS]
    src, dst = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    write_input(src, fmt, rows)
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    scored = dst.read_bytes()
    assert scored.startswith(b"\xef\xbb\xbf") == (fmt != "jsonl") and scored.count(b"\xef\xbb\xbf") <= 1
    assert_scored(model, rows, read_output(scored.decode("utf-8-sig"), fmt))
    monkeypatch.setattr(sys, "stdin", stdin(src.read_text(encoding="utf-8")))  # from standard input too
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", "-", "--format", fmt)
    assert rc == 0 and out.startswith("\ufeff") == (fmt != "jsonl"), err
    src.write_bytes(src.read_bytes()[3:])  # and without one in, none out
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0 and not dst.read_bytes().startswith(b"\xef\xbb\xbf"), err


def test_missing_input_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load_model", no_load)
    missing = tmp_path / "missing.jsonl"
    rc, _, err = run(capsys, "--input", missing, "--output", tmp_path / "out.jsonl")
    assert rc == 2
    assert_one_line_error(err, str(missing), "No such file")
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_existing_output_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load_model", no_load)
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text('query,passage\nq,p\n"q,"unterminated\n')
    dst.write_text("precious\n")
    rc, _, err = run(capsys, "--input", src, "--output", dst)
    assert rc == 2
    assert_one_line_error(err, f"{src}:")
    assert dst.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]


def test_failed_stream_leaves_existing_output_untouched(standin, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", stdin('{"query": "q", "passage": "p"}\n{"query": "", "passage": "p"}\n'))
    dst = tmp_path / "out.jsonl"
    dst.write_text("precious\n")
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", "-", "--output", dst)
    assert rc == 2
    assert_one_line_error(err, "<stdin>:2", "'query' is empty")
    assert dst.read_text() == "precious\n"
    assert list(tmp_path.iterdir()) == [dst]


@pytest.mark.parametrize("output, problem", [("out.tsv", "keeps the input's format"), ("nodir/out.jsonl", "no such directory"),
                                             (".", "is a directory"), ("new/", "names a folder"),
                                             ("out.jsonl.gz", "the output is plain text; to compress it, pipe it")])
def test_bad_output(tmp_path, monkeypatch, capsys, output, problem):
    monkeypatch.setattr(infer, "load_model", no_load)
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n')
    rc, _, err = run(capsys, "--input", src, "--output", f"{tmp_path}/{output}")  # as typed: a Path drops a last "/"
    assert rc == 2
    assert_one_line_error(err, problem)
    assert list(tmp_path.iterdir()) == [src]


def test_a_read_only_output_file_is_not_replaced(tmp_path):
    """`> file` fails on a read-only file; renaming the finished output onto it would not: refused before scoring."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n')
    dst.write_text("the user's\n")
    dst.chmod(0o444)
    as_user = []
    if os.geteuid() == 0:  # root writes read-only files: run it without that capability
        if not shutil.which("setpriv"):
            pytest.skip("running as root, and no setpriv to drop root's override of file modes")
        dropped = "-dac_override,-dac_read_search"
        as_user = ["setpriv", f"--bounding-set={dropped}", f"--inh-caps={dropped}", "--"]
    done = subprocess.run([*as_user, sys.executable, "infer.py", "--input", src, "--output", dst, "--model",
                           tmp_path / "no-model"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, f"--output {dst}: the file is read-only")
    assert dst.read_text() == "the user's\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), a device always full")
@pytest.mark.parametrize("mode", ["rank", "file"])
def test_a_full_disk_on_stdout_is_one_line_naming_it(standin, tmp_path, mode):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n')
    args = ["q", "p one", "p two"] if mode == "rank" else ["--input", src]
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "infer.py", "--model", standin, "--device", "cpu", *map(str, args)],
                              cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1
    assert_one_line_error(done.stderr, "<stdout>: No space left on device")


# ------------------------------------------------------------------------------------------- model and argument errors

def test_unknown_model_dir(tmp_path, capsys):
    rc, out, err = run(capsys, "--model", tmp_path / "no-such-model", "q", "p")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "cannot load model", str(tmp_path / "no-such-model"), "no such directory")

    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "--model", tmp_path / "empty", "q", "p")
    assert rc == 2
    assert_one_line_error(err, "not a checkpoint directory")

    (tmp_path / "model.safetensors").write_bytes(b"")
    rc, _, err = run(capsys, "--model", tmp_path / "model.safetensors", "q", "p")
    assert rc == 2
    assert_one_line_error(err, f"{tmp_path / 'model.safetensors'} is a file; a model is a directory")


def test_empty_output_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load_model", no_load)
    (tmp_path / "in.jsonl").write_text('{"query": "q", "passage": "p"}\n')
    rc, _, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output", "")
    assert rc == 2
    assert_one_line_error(err, "--output is empty")


def test_a_csv_field_longer_than_the_csv_modules_default_limit(standin, model, tmp_path, capsys):
    rows = [{"query": "q", "passage": "слово " * 30000}]  # 180,000 characters; the csv module stops at 131,072
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    write_input(src, "csv", rows)
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0, err
    assert_scored(model, rows, read_output(dst.read_text(encoding="utf-8"), "csv"))


def test_text_with_no_tokens_is_refused_like_empty_text(standin, tmp_path, capsys):
    """Zero-width spaces, a soft hyphen, a lone combining accent: the normalizer removes them all, so the model would
    score an empty text, which is refused as a bad row (and as an argument)."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n{"query": "q", "passage": "\\u00ad \\u0301"}\n')
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 2
    assert_one_line_error(err, f"{src}:2: the passage has no tokens")
    assert list(tmp_path.iterdir()) == [src]
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "\u200b\u200b", "p")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "the QUERY has no tokens")


def test_model_error_in_file_mode_leaves_no_output(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n')
    rc, _, err = run(capsys, "--model", tmp_path / "no-such-model", "--input", src, "--output", dst)
    assert rc == 2
    assert_one_line_error(err, "no such directory")
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("argv, problem", [
    (["--max-length", "1000"], "--max-length 1000: max_length 1000 exceeds the model's 512"),  # the option, not the model
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16: fp16 is for GPUs"),
    (["--device", "no-such-device"], "--device no-such-device"),
    (["--revision", "v2"], "a revision (v2) applies to Hub ids only"),  # a folder has no revisions: never ignored
])
def test_bad_model_options(standin, capsys, argv, problem):
    rc, _, err = run(capsys, "--model", standin, *argv, "q", "p")
    assert rc == 2
    assert_one_line_error(err, problem)


@pytest.mark.parametrize("argv", [
    [],
    ["q"],
    ["q", " "],
    ["q", "p", "--input", "x.jsonl"],
    ["q", "p", "--output", "x.jsonl"],
    ["q", "p", "--format", "tsv"],
    ["--input", "x.jsonl", "--top-k", "1"],
    ["--input", "x.jsonl", "--json"],
    ["--input", "x.jsonl", "--format", "xml"],
    ["--batch-size", "0", "q", "p"],
    ["--top-k", "two", "q", "p"],
    ["--dtype", "fp64", "q", "p"],
    ["--batch-size", "1_0", "q", "p"],  # int() would read 10
    ["--max-length", "\u0665\u0661\u0662", "q", "p"],  # int() would read 512 from these Arabic-Indic digits
    ["--max-length", "4", "q", "p"],  # [CLS] q [SEP] p [SEP] truncated to 4 tokens keeps no token of the query
    ["--dev", "cpu", "q", "p"],  # no abbreviations: a typo is not taken for another option
    ["q", "-"],  # would be scored as the text "-", not read from standard input
])
def test_argument_errors_exit_2(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert_one_line_error(err)
    assert err.rstrip().endswith("(see infer.py --help)"), err


def test_help_exits_0(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    assert "examples:" in out
    for option in ("--model", "--revision", "--batch-size", "--max-length", "--device", "--dtype", "--sigmoid",
                   "--top-k", "--quiet", "--json", "--format", "--input", "--output"):
        assert option in out



def test_passages_that_look_like_options_or_stdin_are_explained(capsys):
    rc, _, err = run(capsys, "q", "-foo", "b")
    assert rc == 2 and "put `--` before the texts" in err, err
    rc, _, err = run(capsys, "q", "p", "-")
    assert rc == 2 and "PASSAGE 2 (id 1) is '-': ranking mode does not read standard input" in err, err


def test_a_dash_after_double_dash_is_a_text(standin, model, capsys):
    rc, out, err = run(capsys, "--model", standin, "--device", "cpu", "--json", "--", "what is a dash", "-", "a hyphen")
    assert rc == 0, err
    scores = {r["text"]: r["score"] for r in json.loads(out)}
    assert scores["-"] == pytest.approx(float(model.predict(("what is a dash", "-"))), abs=1e-6)


def test_an_existing_score_field_is_replaced_with_a_note(standin, model, tmp_path, capsys):
    """sentence-transformers datasets keep their gold labels in a 'score' column: replacing it is said, once."""
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("query,passage,score\nq,p,0.7\nq,x,0.1\n")
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", dst)
    assert rc == 0 and err == "infer.py: note: 2 of 2 rows had a 'score' field; it holds this model's scores now " \
                               "(rename the field to keep it)\n", err
    assert [float(r["score"]) for r in read_output(dst.read_text(), "csv")] == pytest.approx(
        model.predict([("q", "p"), ("q", "x")]).tolist(), abs=1e-6)


def test_truncation_is_said(standin, tmp_path, capsys):
    long = " ".join(["word"] * 40)
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--max-length", "16", "q", "short", long)
    assert rc == 0 and "infer.py: note: 1 of 2 pairs (id 1) were longer than 16 tokens and were cut to fit (the longer " \
                       "text, at its end); --max-length can go up to 512" in err, err
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"query": "q", "passage": p}) + "\n" for p in ("short", long, long)))
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--max-length", "16", "--input", src, "--quiet")
    assert rc == 0 and "infer.py: note: 2 of 3 pairs were longer than 16 tokens and were cut to fit" in err, err
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--max-length", "64", "--input", src, "--quiet")
    assert rc == 0 and err == ""


def test_stdin_that_is_not_jsonl_points_to_format(standin, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", stdin("query,passage\nq,p\n"))
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", "-")
    assert rc == 2
    assert_one_line_error(err, "<stdin>:1: malformed JSON", "give --format tsv or --format csv")


def test_an_output_that_cannot_be_created_is_named_as_the_option(standin, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n')
    rc, _, err = run(capsys, "--model", standin, "--device", "cpu", "--input", src, "--output", "/proc/scored.jsonl")
    assert rc == 1
    assert_one_line_error(err, "--output /proc/scored.jsonl: ")  # not the temporary file's name


def test_table_previews_fit_the_terminal_and_carry_no_control_characters():
    assert infer.preview("a\x1b[31mred\x1b[0m", 40) == "a\ufffd[31mred\ufffd[0m"  # no escape reaches the terminal
    assert infer.preview("evil \u202eReversed", 40) == "evil \ufffdReversed"  # nor a right-to-left override
    wide = infer.preview("北京市" * 20, 21)  # two columns a character
    assert wide == "北京市" * 3 + "..." and infer.preview("北京", 4) == "北京"


def test_the_progress_bar_moves_batch_by_batch(model):
    class Bar:
        counts = []

        def update(self, n):
            self.counts.append(n)

    encodings = model.tokenizer.encode([("q", "p " * k) for k in range(1, 40)])
    model.score_encodings(encodings, batch_size=8, progress=Bar())
    assert Bar.counts == [8, 8, 8, 8, 7]
