"""The knowledge on two retrieval engines: ledger_bot's hand-written BM25 against SQLite FTS5.

    .venv/bin/python tests/bench/retrieval_engines.py          # the table in README › Repository tools
    .venv/bin/python tests/bench/retrieval_engines.py --all    # every FTS5 variant tried

Runs ``--eval`` offline on tests/eval/shipped.yaml and tests/eval/golden.yaml once per engine,
with ``KnowledgeBase``'s index swapped for an FTS5 table (ledger_bot.FullText) built from the
same sections. Issue 22 moves the knowledge onto FTS5 only if this shows no loss.

FTS5 variants (``--all``): ``terms`` (the sections' ``_terms``, stopwords out, one column),
``porter`` (the same, stemmed), ``raw`` (the text as written), ``trigram``, and ``label<w>``
(label and text in two columns, the label weighted w; ``label3`` is the one in the README).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

import ledger_bot as lb  # noqa: E402

EVALS = ("tests/eval/shipped.yaml", "tests/eval/golden.yaml")
MEASURES = ("recall_at_k", "mrr", "ndcg_at_k", "recall")
UNICODE = "unicode61 tokenchars '_'"


def fts5_engine(variant: str):
    """A ``KnowledgeBase.__init__`` and ``scores`` pair that rank with FTS5 (``variant``)."""
    def init(self, sections):
        self.sections, self._tokens = sections, None
        self._lock = lb.threading.Lock()
        if variant.startswith("label"):
            rows = ((" ".join(lb._terms(s.label)), " ".join(lb._terms(s.text))) for s in sections)
            self.fts = lb.FullText(("label", "text"), rows, tokenizer=UNICODE)
            self.weights = (float(variant[5:]), 1.0)
            return
        text = {"terms": lambda s: " ".join(lb._terms(s.label + " " + s.text)),
                "porter": lambda s: " ".join(lb._terms(s.label + " " + s.text)),
                "raw": lambda s: s.label + " " + s.text, "trigram": lambda s: s.label + " " + s.text}[variant]
        tokenizer = {"porter": "porter " + UNICODE, "trigram": "trigram"}.get(variant, UNICODE)
        self.fts = lb.FullText(("text",), ((text(s),) for s in sections), tokenizer=tokenizer)
        self.weights = ()

    def scores(self, query):
        terms = [t for t in lb._terms(query) if variant != "trigram" or len(t) >= 3]
        hits = self.fts.search(lb.fts_match(terms), weights=self.weights)
        return [(hit.score, hit.row) for hit in hits]

    return init, scores


def measure(path: str) -> dict[str, float]:
    spec = lb.load_eval(ROOT / path)
    settings = lb.load_config({}, lb.KnowledgeSettings)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        lb.run_eval(settings, spec, ROOT / path, report=report, out=io.StringIO())
        summary = json.loads(report.read_text())["summary"]
    return {name: round(summary[name], 3) for name in MEASURES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every FTS5 variant, not only label3")
    args = parser.parse_args()
    original_init, original_rank = lb.KnowledgeBase.__init__, lb.KnowledgeBase.rank
    print("| eval | engine | recall@5 | MRR | nDCG@5 | prompt recall |\n|---|---|---|---|---|---|")
    for variant in ["hand-written BM25", *(["terms", "porter", "raw", "trigram", "label2", "label3", "label5"]
                                          if args.all else ["label3"])]:
        if variant != "hand-written BM25":
            init, scores = fts5_engine(variant)
            lb.KnowledgeBase.__init__ = init  # type: ignore[method-assign]
            lb.KnowledgeBase.rank = lambda self, q, scores=scores: [self.sections[i] for _, i in scores(self, q)]  # type: ignore[method-assign]
            lb.KnowledgeBase.index = property(lambda self, scores=scores: _Ranker(self, scores))  # type: ignore[attr-defined]
        for path in EVALS:
            m = measure(path)
            name = variant if variant == "hand-written BM25" else f"FTS5 bm25 ({variant})"
            print(f"| `{Path(path).name}` | {name} | " + " | ".join(f"{m[k]:.3f}" for k in MEASURES) + " |")
        lb.KnowledgeBase.__init__, lb.KnowledgeBase.rank = original_init, original_rank  # type: ignore[method-assign]
        if hasattr(lb.KnowledgeBase, "index"):
            del lb.KnowledgeBase.index
    return 0


class _Ranker:
    """What ``choose_knowledge`` reads from ``KnowledgeBase.index``: ``sections`` and ``rank``
    (the RELEVANCE_CUTOFF applied as BM25.rank applies it)."""

    def __init__(self, kb, scores):
        self.sections, self._kb, self._scores = kb.sections, kb, scores

    def rank(self, query):
        scored = self._scores(self._kb, query)
        best = scored[0][0] if scored else 0.0
        return [self.sections[i] for s, i in scored if s >= lb.RELEVANCE_CUTOFF * best]


if __name__ == "__main__":
    sys.exit(main())
