"""Score a labelled pair file with a cross-encoder and print MRR@10, NDCG@10 and R@1.

    python -m minilm.evaluate --model runs/ft --data test.jsonl

The file is JSONL/TSV/CSV with query/passage (or sentence_0/sentence_1), label and optionally qid; candidates are
grouped by qid, or by query text when there is none (see minilm/metrics.py for the definitions). Bad data or a
checkpoint that cannot be loaded: one error line and exit status 2.
"""

import hashlib
import sys

import numpy as np
import torch

from .checkpoint import CheckpointError
from .cli import ArgumentParser, whole_number
from .crossencoder import CrossEncoder
from .data import FORMATS, DataError, detect_format, read_ranking_pairs
from .metrics import RELEVANT, has_relevant, rerank_metrics


CHUNK_PAIRS = 4096  # pairs tokenized and scored at a time: the encodings of a large file are never all held at once


def evaluate(ce, pairs, batch_size: int = 32, show_progress_bar: bool = False) -> dict:
    """Metrics of CrossEncoder `ce` on labelled `pairs` (data.Pair); raw logits rank the same as any monotone activation.
    Besides the metrics: `pairs`; `truncated`, the pairs cut to fit the model's max_length; and `repeated`, the rows
    that repeat an earlier one of their query (same passage and label: counted again, as sentence-transformers does).

    Each distinct model input (token ids and types, after truncation) is scored once: two copies scored apart (or in
    one padded batch) can differ in their last bits, and the metrics' tie rule would not see their tie; texts that
    differ only past the cut, or in what the tokenizer drops (spaces, accents), are the same input. Inputs are known
    by a digest of their ids, so that only one chunk's encodings are held at a time."""
    from tqdm.auto import tqdm

    score_of = {}  # digest of a model input -> its score
    inputs, truncated = [], 0  # each pair's digest
    with torch.inference_mode(), tqdm(total=len(pairs), desc="Scoring", unit="pair", disable=not show_progress_bar) as bar:
        for start in range(0, len(pairs), CHUNK_PAIRS):
            encodings = ce.tokenizer.encode([(p.query, p.passage) for p in pairs[start : start + CHUNK_PAIRS]])
            digests = [hashlib.blake2b(np.array([*e.ids, -1, *e.type_ids], np.int64).tobytes(), digest_size=16).digest()
                       for e in encodings]
            new = {d: e for d, e in zip(digests, encodings) if d not in score_of}  # the first of each
            bar.update(len(encodings) - len(new))
            scores = ce.score_encodings(list(new.values()), batch_size, progress=bar).tolist() if new else []
            score_of.update(zip(new, scores))
            inputs += digests
            truncated += sum(e.truncated for e in encodings)
    scores = np.array([score_of[d] for d in inputs], dtype=np.float32)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are NaN or infinite: the model's "
                         "weights are broken, or too large for its precision")
    groups = [p.qid if p.qid is not None else p.query for p in pairs]
    metrics = rerank_metrics(groups, [p.label for p in pairs], scores)
    return {**metrics, "pairs": len(pairs), "truncated": truncated,
            "repeated": len(pairs) - len({(group, p.passage) for group, p in zip(groups, pairs)})}


def format_metrics(m: dict) -> str:
    skipped = f", {m['skipped']} without a relevant passage left out" if m["skipped"] else ""
    queries = f"{m['queries']} quer{'ies' if m['queries'] != 1 else 'y'}"
    line = f"MRR@10 {m['mrr@10']:.4f} | NDCG@10 {m['ndcg@10']:.4f} | R@1 {m['r@1']:.4f} | {queries}{skipped}"
    if "pairs" not in m:  # rerank_metrics' own
        return line
    notes = [f"{m['truncated']} cut to fit max_length"] if m["truncated"] else []
    notes += [f"{m['repeated']} repeating an earlier row, counted again"] if m["repeated"] else []
    return f"{line} ({m['pairs']} pair{'s' if m['pairs'] != 1 else ''}{''.join(f'; {note}' for note in notes)})"


def main(argv=None):
    parser = ArgumentParser(prog="python -m minilm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cross-encoder/ms-marco-MiniLM-L6-v2", help="local dir, name under weights/, or Hub id")
    parser.add_argument("--data", required=True, help="labelled pairs: .jsonl, .tsv or .csv, or - (standard input)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="the format of --data when its extension does not say (a pipe: <(zcat test.tsv.gz))")
    parser.add_argument("--batch-size", type=whole_number(1), default=32)
    parser.add_argument("--max-length", type=whole_number(5), default=None, help="tokens per pair (default: the checkpoint's, 512)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    args = parser.parse_args(argv)

    def fail(message):  # like argparse's own errors, without the pointer to --help: the arguments were fine
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    try:
        try:
            pairs = read_ranking_pairs(args.data, detect_format(args.data, args.format, "--format"))
        except DataError as e:
            fail(e)
        if not has_relevant(p.label for p in pairs):
            fail(f"{args.data}: no query has a relevant passage (label >= {RELEVANT}): nothing to rank")
        try:
            ce = CrossEncoder.from_pretrained(args.model, device=args.device, max_length=args.max_length)
        except (CheckpointError, ValueError, OSError) as e:
            fail(e)
        try:
            m = evaluate(ce, pairs, args.batch_size, show_progress_bar=sys.stderr.isatty())
        except ValueError as e:  # scores that are not numbers
            fail(e)
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    print(format_metrics(m))


if __name__ == "__main__":
    sys.exit(main())
