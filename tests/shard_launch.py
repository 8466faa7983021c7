"""infer.py as tests/test_shard.py starts it under torchrun: chunks of 3 rows (so a few dozen rows make several
rounds), and two hooks around the scoring of a chunk (infer.score_chunk), set by environment variables:

  SHARD_TEST_LOG=DIR          each process appends the passages it scores to DIR/RANK.txt
  SHARD_TEST_CRASH=R:HOW:TEXT process R, about to score the passage TEXT, raises RuntimeError (HOW=raise) or kills
                              itself with SIGKILL (HOW=kill)
  SHARD_TEST_STALL=R:TEXT     process R, about to score the passage TEXT, sleeps 120 s
  SHARD_TEST_AHEAD=1          tokenize the next chunk in a worker thread (infer.TOKENIZE_AHEAD)
  SHARD_TEST_APPEND=R:TEXT    process R, about to score the passage TEXT, appends a copy of that row to the input
  SHARD_TEST_INPUT_1=PATH     process 1 reads PATH where the command line says --input (as if on another machine)
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infer  # noqa: E402

infer.CHUNK_ROWS = 3
infer.TOKENIZE_AHEAD = os.environ.get("SHARD_TEST_AHEAD") == "1"
score_chunk = infer.score_chunk


def hooked_score_chunk(model, chunk, *args):
    rank = os.environ["RANK"]
    crash_rank, how, text = os.environ.get("SHARD_TEST_CRASH", "::").split(":", 2)
    stall_rank, stall_text = (os.environ.get("SHARD_TEST_STALL") or ":").split(":", 1)
    if stall_rank == rank and any(pair.passage == stall_text for pair in chunk):
        time.sleep(120)
    append_rank, append_text = (os.environ.get("SHARD_TEST_APPEND") or ":").split(":", 1)
    if append_rank == rank and any(pair.passage == append_text for pair in chunk):
        with open(sys.argv[sys.argv.index("--input") + 1], "a", encoding="utf-8") as f:
            f.write(next(pair.source for pair in chunk if pair.passage == append_text) + "\n")
    if crash_rank == rank and any(pair.passage == text for pair in chunk):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected crash at {text!r}")
    if "SHARD_TEST_LOG" in os.environ:
        with open(Path(os.environ["SHARD_TEST_LOG"]) / f"{rank}.txt", "a", encoding="utf-8") as log:
            log.writelines(pair.passage.replace("\n", " ") + "\n" for pair in chunk)
    return score_chunk(model, chunk, *args)


infer.score_chunk = hooked_score_chunk
if os.environ["RANK"] == "1" and "SHARD_TEST_INPUT_1" in os.environ:
    sys.argv[sys.argv.index("--input") + 1] = os.environ["SHARD_TEST_INPUT_1"]
infer.main_exit()
