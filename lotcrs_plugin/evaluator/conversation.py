"""The conversation stage's metrics, as CRSLab's conversation systems report them.

- bleu@1, bleu@2: CRSLab's BleuMetric (nltk sentence BLEU with the weight on one n-gram order)
  of each reply against its reference, averaged over replies;
- dist@1..4: CRSLab's distinct-n: the number of distinct word n-grams over all replies divided
  by the number of replies (not a ratio of n-grams; it grows with reply length);
- ppl: exp of the mean negative log-likelihood per reference token (teacher forcing);
- item_share: the share of replies that name the recommended item (its title in a filled slot, or
  written out by the model); ref_item_share: the share of references that name an item (the
  recommendation turns of the data, for comparison).

Words are the importer's lowercased tokens (lotcrs_plugin.data.importers.common.tokenize) of the
reply with its slot filled and of the reference as written.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from lotcrs_plugin import compat

compat.apply()

from crslab.evaluator.metrics.gen import BleuMetric  # noqa: E402

from lotcrs_plugin.data.importers.common import tokenize  # noqa: E402

DIST_ORDERS = (1, 2, 3, 4)
BLEU_ORDERS = (1, 2)


class ConversationMetrics:
    """Add replies (:meth:`add_reply`) and likelihoods (:meth:`add_nll`); :meth:`report`."""

    def __init__(self) -> None:
        self.bleu: dict[int, float] = defaultdict(float)
        self.ngrams: dict[int, set] = defaultdict(set)
        self.replies = 0
        self.named = 0
        self.ref_named = 0
        self.nll = 0.0
        self.tokens = 0

    def add_reply(self, reply: str, reference: str, names_item: bool, reference_names_item: bool) -> None:
        words, ref = tokenize(reply), tokenize(reference)
        hyp, refs = " ".join(words), [" ".join(ref)]
        for k in BLEU_ORDERS:
            self.bleu[k] += BleuMetric.compute(hyp, refs, k).value() if words and ref else 0.0
        for k in DIST_ORDERS:
            self.ngrams[k].update(zip(*(words[i:] for i in range(k))))
        self.replies += 1
        self.named += bool(names_item)
        self.ref_named += bool(reference_names_item)

    def add_nll(self, nll: float, tokens: int) -> None:
        self.nll += float(nll)
        self.tokens += int(tokens)

    @property
    def ppl(self) -> float | None:
        return math.exp(min(self.nll / self.tokens, 700.0)) if self.tokens else None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.replies:
            n = self.replies
            out.update({f"bleu@{k}": self.bleu[k] / n for k in BLEU_ORDERS})
            out.update({f"dist@{k}": len(self.ngrams[k]) / n for k in DIST_ORDERS})
            out.update(item_share=self.named / n, ref_item_share=self.ref_named / n, replies=n)
        if self.tokens:
            out.update(ppl=self.ppl, ppl_tokens=self.tokens)
        return out


__all__ = ["BLEU_ORDERS", "ConversationMetrics", "DIST_ORDERS"]
