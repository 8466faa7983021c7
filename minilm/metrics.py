"""Reranking metrics: MRR@10, NDCG@10 and R@1 over the candidates of each query. Small and numpy only.

Candidates are grouped by query (a qid, or the query text) and ranked by descending score. Equal scores count against
the model: among them the least relevant comes first, so a tie (duplicate passages, a model that scores everything
alike) never earns a hit that the file's order gave it. (sentence-transformers' CrossEncoderRerankingEvaluator puts
ties in reverse input order for MRR and averages them for NDCG.) A candidate is relevant when its label is at least
0.5 (MRR and recall); NDCG uses the label itself as the gain, so graded labels count as graded. Queries without a
relevant candidate have no defined MRR or NDCG and are left out of the means (and counted as `skipped`;
sentence-transformers counts them as 0). R@1 is recall: the share of a query's relevant candidates ranked first (a
perfect ranking of a query with two relevant candidates has R@1 0.5).
"""

import numpy as np

RELEVANT = 0.5


def has_relevant(labels) -> bool:
    """Whether any query can be scored: MRR and NDCG are undefined without a relevant candidate."""
    return any(label >= RELEVANT for label in labels)


def mrr_at_k(ranked_labels: np.ndarray, k: int = 10) -> float:
    hits = np.flatnonzero(ranked_labels[:k] >= RELEVANT)
    return 1.0 / (hits[0] + 1) if hits.size else 0.0


def ndcg_at_k(ranked_labels: np.ndarray, k: int = 10) -> float:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # position 1 -> 1, position 2 -> 1/log2(3), ...
    dcg = (ranked_labels[:k] * discounts[: len(ranked_labels[:k])]).sum()
    ideal = np.sort(ranked_labels)[::-1][:k]
    return float(dcg / (ideal * discounts[: len(ideal)]).sum())


def recall_at_k(ranked_labels: np.ndarray, k: int = 1) -> float:
    relevant = ranked_labels >= RELEVANT
    return float(relevant[:k].sum() / relevant.sum())


def rerank_metrics(groups, labels, scores) -> dict:
    """Mean MRR@10, NDCG@10 and R@1 over queries. `groups`, `labels`, `scores`: one entry per candidate."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    by_query = {}
    for i, g in enumerate(groups):
        by_query.setdefault(g, []).append(i)
    per_query = []
    for idx in by_query.values():
        ranked = labels[idx][np.lexsort((labels[idx], -scores[idx]))]  # by score, then the lower label first
        if (ranked >= RELEVANT).any():
            per_query.append((mrr_at_k(ranked), ndcg_at_k(ranked), recall_at_k(ranked)))
    mrr, ndcg, r1 = np.mean(per_query, axis=0) if per_query else (float("nan"),) * 3
    return {"mrr@10": float(mrr), "ndcg@10": float(ndcg), "r@1": float(r1), "queries": len(per_query),
            "skipped": len(by_query) - len(per_query)}
