"""infer.py under torchrun: two gloo processes on the CPU share a file's rows and write what one process writes.

Each case starts `python -m torch.distributed.run --nproc-per-node 2 tests/shard_launch.py ...` (infer.py with
chunks of 3 rows, so that 25 rows make 5 rounds, and hooks that log or crash a process's scoring) on the stand-in
checkpoint, and compares with `infer.main` run in this process. torchrun adds its own report of failed processes to
stderr; the lines of infer.py's are the ones that start with "infer.py:".
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_infer import assert_one_line_error, read_output, write_input

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "shard_launch.py"
ROWS = [{"qid": str(i // 4), "query": f"query {i // 4}", "passage": f"passage {i}, about \"things\" number {i}"}
        for i in range(25)]
QUICK = ["--device", "cpu", "--max-length", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*argv) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(LAUNCHER), *map(str, argv)]


def torchrun(*argv, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(torchrun_command(*argv), cwd=REPO, capture_output=True, text=True, env=env, timeout=180)


def infer_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("infer.py:")]


def assert_both_failed(stderr: str) -> None:
    """torchrun's report lists both processes as failed. Once one has exited, torchrun sends SIGTERM to the other,
    which may get it on its way out (exit code -15) instead of returning its own status."""
    codes = [int(code) for code in re.findall(r"exitcode +: (-?\d+)", stderr)]
    assert len(codes) == 2 and 0 not in codes, stderr


def one_process(capsys, *argv) -> str:
    """What infer.py writes to stdout when run as a single process."""
    import infer

    assert infer.main([*map(str, argv), "--quiet"]) == 0
    return capsys.readouterr().out


def assert_same_output(sharded: str, single: str, fmt: str) -> None:
    """The same rows, order and fields; the scores within 1e-5 (the processes batch differently)."""
    got, want = read_output(sharded, fmt), read_output(single, fmt)
    assert [list(r) for r in got] == [list(r) for r in want]
    assert [{k: v for k, v in r.items() if k != "score"} for r in got] == \
           [{k: v for k, v in r.items() if k != "score"} for r in want]
    np.testing.assert_allclose([float(r["score"]) for r in got], [float(r["score"]) for r in want], atol=1e-5)


@pytest.mark.parametrize("fmt, ahead", [("jsonl", "0"), ("tsv", "0"), ("csv", "0"), ("jsonl", "1")],
                         ids=["jsonl", "tsv", "csv", "jsonl-tokenize-ahead"])
def test_two_processes_write_what_one_writes(standin_dir, tmp_path, capsys, fmt, ahead):
    work, log = tmp_path / "work", tmp_path / "log"
    work.mkdir(), log.mkdir()
    rows = [dict(r) for r in ROWS]
    if fmt != "tsv":  # a quoted line break: one CSV record over two lines
        rows[7]["passage"] = "passage 7, with a line\nbreak"
    src, dst = work / f"in.{fmt}", work / f"out.{fmt}"
    write_input(src, fmt, rows)
    if fmt == "csv":  # Excel's "CSV UTF-8": the output starts with the byte-order mark too, once
        src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    done = torchrun("--model", standin_dir, *QUICK, "--input", src, "--output", dst,
                    env_extra={"SHARD_TEST_LOG": str(log), "SHARD_TEST_AHEAD": ahead})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    text = dst.read_text(encoding="utf-8")
    assert text.count("\ufeff") == (fmt == "csv") and text.startswith("\ufeff") == (fmt == "csv")
    assert_same_output(text, one_process(capsys, "--model", standin_dir, *QUICK, "--input", src), fmt)
    assert sorted(p.name for p in work.iterdir()) == [src.name, dst.name]  # no temporary file left

    # chunks of 3 rows, interleaved: process 0 scores chunks 0, 2, 4, 6, 8 (13 rows), process 1 chunks 1, 3, 5, 7
    shares = [(log / f"{rank}.txt").read_text(encoding="utf-8").splitlines() for rank in (0, 1)]
    passages = [r["passage"].replace("\n", " ") for r in rows]
    assert shares[0] == [p for i, p in enumerate(passages) if i // 3 % 2 == 0]
    assert shares[1] == [p for i, p in enumerate(passages) if i // 3 % 2 == 1]


def test_two_processes_to_stdout(standin_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_input(src, "jsonl", ROWS)
    done = torchrun("--model", standin_dir, *QUICK, "--input", src)
    assert done.returncode == 0, done.stderr
    assert_same_output(done.stdout, one_process(capsys, "--model", standin_dir, *QUICK, "--input", src), "jsonl")
    assert list(tmp_path.iterdir()) == [src]


def test_truncation_and_a_replaced_score_are_said_once(standin_dir, tmp_path, capsys):
    """Rows cut to --max-length, and rows whose score field is replaced, are counted over both processes' chunks and
    said once, by process 0."""
    rows = [dict(r, score=0.5) if i in (2, 23) else dict(r) for i, r in enumerate(ROWS)]  # process 0's, process 1's
    for i in (1, 4, 22):  # in chunks 0 and 1 (process 0 and 1) and 7 (process 1)
        rows[i]["passage"] = " ".join(["word"] * 40)
    src = tmp_path / "in.jsonl"
    write_input(src, "jsonl", rows)
    done = torchrun("--model", standin_dir, *QUICK, "--input", src)
    assert done.returncode == 0, done.stderr
    assert infer_lines(done.stderr) == [
        "infer.py: note: 3 of 25 pairs were longer than 32 tokens and were cut to fit (the longer text, at its end); "
        "--max-length can go up to 512",
        "infer.py: note: 2 of 25 rows had a 'score' field; it holds this model's scores now (rename the field to keep "
        "it)"], done.stderr
    assert_same_output(done.stdout, one_process(capsys, "--model", standin_dir, *QUICK, "--input", src), "jsonl")


def test_ranking_mode_runs_on_process_0(standin_dir, capsys):
    argv = ["--model", standin_dir, *QUICK, "--json", "capital of france", "Paris is in France.", "Bananas."]
    done = torchrun(*argv)
    assert done.returncode == 0, done.stderr
    got, want = json.loads(done.stdout), json.loads(one_process(capsys, *argv))  # printed once
    assert [(r["corpus_id"], r["text"]) for r in got] == [(r["corpus_id"], r["text"]) for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)


BAD_INPUTS = {  # line 11 holds row 10, in chunk 3 (rows 9-11): process 1's share
    "bad-row-in-process-1-share": ("in.jsonl", ":11", "missing field 'passage'"),
    "missing-file": ("missing.jsonl", "", "No such file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_both_processes(standin_dir, tmp_path, case):
    name, line, problem = BAD_INPUTS[case]
    src, dst = tmp_path / name, tmp_path / "out.jsonl"
    if name == "in.jsonl":
        rows = [dict(r) for r in ROWS]
        del rows[10]["passage"]
        write_input(src, "jsonl", rows)
    dst.write_text("precious\n")
    before = sorted(tmp_path.iterdir())
    start = time.monotonic()
    done = torchrun("--model", standin_dir, *QUICK, "--input", src, "--output", dst)
    assert done.returncode != 0
    assert time.monotonic() - start < 90  # no process waits for the others (a collective's timeout is 10 minutes)
    assert_both_failed(done.stderr)
    assert_one_line_error("\n".join(infer_lines(done.stderr)), f"{src}{line}", problem)
    assert done.stdout == ""
    assert dst.read_text() == "precious\n" and sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("rows", ["same-count", "more-rows"])
def test_processes_that_read_different_files_stop(standin_dir, tmp_path, rows):
    """--input names a path; on several machines it may hold different files. Each process scores its share of its
    own copy: with the same row count the output would silently mix the two, with another count process 0 would wait
    10 minutes for the other. The processes compare their files' row counts and digests first."""
    src, other, dst = tmp_path / "in.jsonl", tmp_path / "other.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", ROWS)
    changed = [dict(r) for r in ROWS] + ([dict(ROWS[0])] if rows == "more-rows" else [])
    changed[20]["passage"] = "another passage"
    write_input(other, "jsonl", changed)
    start = time.monotonic()
    done = torchrun("--model", standin_dir, *QUICK, "--input", src, "--output", dst,
                    env_extra={"SHARD_TEST_INPUT_1": str(other)})
    assert done.returncode != 0 and time.monotonic() - start < 90
    assert_both_failed(done.stderr)
    counts = f"process 0: 25 rows, process 1: {len(changed)} rows"
    assert_one_line_error("\n".join(infer_lines(done.stderr)), f"--input {src}", f"the processes read different files ({counts})")
    assert not dst.exists()


def test_rows_added_while_scoring_stop(standin_dir, tmp_path):
    """The rounds are counted before scoring: rows appended meanwhile would be left out of the output. An input that
    changes while it is scored is an error, under torchrun as in one process."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", ROWS)
    dst.write_text("precious\n")
    done = torchrun("--model", standin_dir, *QUICK, "--input", src, "--output", dst,
                    env_extra={"SHARD_TEST_APPEND": f"0:{ROWS[0]['passage']}"})
    assert done.returncode != 0
    assert_both_failed(done.stderr)
    assert_one_line_error("\n".join(infer_lines(done.stderr)), f"--input {src}", "the file changed while it was being scored")
    assert dst.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_standard_input_is_refused(standin_dir, tmp_path):
    done = torchrun("--model", standin_dir, *QUICK, "--input", "-", "--output", tmp_path / "out.jsonl")
    assert_both_failed(done.stderr)
    assert_one_line_error("\n".join(infer_lines(done.stderr)), "--input -", "give a file")
    assert list(tmp_path.iterdir()) == []


# A killed process says nothing. Process 0 reports the loss, or, when torchrun's SIGTERM to the survivors comes first,
# that it was stopped (torchrun's report below names the killed process): one line either way.
STOPPED = r"stopped by SIGTERM \(torchrun sends it to every process when it is stopped or when one of them fails\); " \
          r"no output written"


@pytest.mark.parametrize("how, message, ahead, stall", [
    ("raise", "process 1: RuntimeError: injected crash", "0", ""),
    ("kill", f"lost contact with another process|{STOPPED}", "0", ""),
    ("kill", STOPPED, "0", f"0:{ROWS[6]['passage']}"),  # process 0 still scoring: torchrun's SIGTERM comes first
    ("raise", "process 1: RuntimeError: injected crash", "1", "")],
    ids=["raise", "kill", "kill-while-the-other-scores", "raise-tokenize-ahead"])
def test_a_crash_in_one_process_stops_both(standin_dir, tmp_path, how, message, ahead, stall):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", ROWS)
    dst.write_text("precious\n")
    start = time.monotonic()
    crash = f"1:{how}:{ROWS[10]['passage']}"  # process 1's second chunk, in the round of process 0's rows 6-8
    done = torchrun("--model", standin_dir, *QUICK, "--input", src, "--output", dst,
                    env_extra={"SHARD_TEST_CRASH": crash, "SHARD_TEST_AHEAD": ahead, "SHARD_TEST_STALL": stall})
    assert done.returncode != 0
    assert time.monotonic() - start < 90
    assert_both_failed(done.stderr)
    lines = infer_lines(done.stderr)
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr
    assert dst.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def scoring_a_long_file(standin_dir, tmp_path) -> tuple[subprocess.Popen, Path, Path]:
    """torchrun scoring 10,000 rows into an output that holds "old", caught once its temporary output exists:
    (torchrun, input, output)."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, "jsonl", ROWS * 400)
    dst.write_text("old\n")
    proc = subprocess.Popen(torchrun_command("--model", standin_dir, *QUICK, "--input", src, "--output", dst), cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.jsonl.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.jsonl.*.tmp")), "the temporary output never appeared"
    return proc, src, dst


def test_sigterm_leaves_no_output(standin_dir, tmp_path):
    """SIGTERM to torchrun (what `kill` and job schedulers send) while scoring: nothing left, the old output kept."""
    proc, _, dst = scoring_a_long_file(standin_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert proc.returncode != 0, stderr
    assert infer_lines(stderr) == ["infer.py: stopped by SIGTERM (torchrun sends it to every process when it is stopped "
                                   "or when one of them fails); no output written"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"] and dst.read_text() == "old\n"


def running(text: str) -> list[int]:
    """The processes whose command line holds `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def still_running_after(seconds: float, text: str) -> list[int]:
    """The processes whose command line holds `text` that have not ended within `seconds`; killed (SIGKILL), so that
    a failing test leaves none behind."""
    deadline = time.time() + seconds
    while running(text) and time.time() < deadline:
        time.sleep(0.1)
    left = running(text)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_torchrun_stops_its_processes(standin_dir, tmp_path):
    """torchrun starts its processes in sessions of their own: killed outright, it left them scoring on. They now get
    SIGTERM when it dies, and unwind: no temporary output left, the old output kept."""
    proc, src, dst = scoring_a_long_file(standin_dir, tmp_path)
    assert len(running(str(src))) == 3  # torchrun and its two processes
    proc.kill()
    proc.wait(timeout=60)
    assert still_running_after(60, str(src)) == [], "torchrun's processes outlived it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"] and dst.read_text() == "old\n"


FULL_DISK = "class Full(io.StringIO):\n    def flush(self): raise OSError(28, 'No space left on device')\nsys.stdout = Full()\n"


@pytest.mark.parametrize("status, stdout, want", [(0, "", 0), (3, "", 3), (0, FULL_DISK, 120)])
def test_the_exit_after_the_process_group_flushes_and_keeps_the_status(status, stdout, want):
    """A process torchrun started ends with os._exit once its process group is destroyed (the interpreter's teardown
    may abort there): what it printed still comes out, its status is kept, and a failed flush is still a failure."""
    code = f"import io, sys\nfrom minilm.cli import exit_after_process_group\n{stdout}print('scored')\n" \
           f"exit_after_process_group({status})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == want, done.stderr
    assert done.stdout == ("" if stdout else "scored\n")
