"""The text-collapse metrics of the `lm` family: how diverse the samples of a generation are, and how much of
the real text's tail they keep. Each is a function of decoded texts (the samples' continuations) and, for
two, of the real training text's word counts.

Words: lowercased runs of letters, digits and apostrophes (`WORD`), so "Lily's" is one word and punctuation
none. Every metric is in [0, 1] or in nats, as the family's other metrics are.

- self_bleu (Zhu et al. 2018, "Texygen"): the mean over samples of BLEU-4 of the sample against every other
  sample as its references, by sacrebleu (Post 2018) with its default 13a tokenizer, scaled to [0, 1].
  Higher: the samples repeat each other.
- ttr: type-token ratio, distinct words / words, pooled over the samples (it falls with the number of
  words, so compare runs with the same `eval_samples` and similar lengths).
- unigram_entropy: H(p̂) = -Σ p̂(w) log p̂(w) of the samples' word frequencies, in nats.
- unigram_kl: KL(p̂_samples ‖ p̂_real) in nats, p̂_real the real training text's word frequencies with one
  count added to every word of either text (so a word the real text lacks costs a finite, large amount).
- zipf_exponent: s of the least-squares fit log f(r) = c - s log r over every word's rank r and count f in
  the samples (Zipf 1949; Holtzman et al. 2020 compare generated and human text by it); 0 when the samples
  hold fewer than two distinct words.
- rare_word_recall: of the real training text's rare words — those past frequency rank `rare_rank` — the
  share that appears at least once in the samples (the tail that Shumailov et al. 2024 see vanish first).
  Left out when the real text has no word past that rank.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def word_counts(texts) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        counts.update(words(t))
    return counts


def self_bleu(texts: list[str]) -> float:
    """Mean BLEU-4 (sacrebleu, in [0, 1]) of each text against all the others; nan for fewer than two."""
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        return float("nan")
    bleu = BLEU(effective_order=True)  # sentence-level BLEU: n-gram orders a short text lacks are left out, not zero
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return float(np.mean(scores)) / 100.0


def ttr(counts: Counter) -> float:
    n = sum(counts.values())
    return len(counts) / n if n else 0.0


def unigram_entropy(counts: Counter) -> float:
    c = np.fromiter(counts.values(), dtype=float)
    if not len(c):
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def unigram_kl(counts: Counter, real: Counter) -> float:
    """KL(p̂_samples ‖ p̂_real), p̂_real add-one smoothed over the words of both texts."""
    if not counts:
        return 0.0
    vocab = sorted(set(real) | set(counts))  # a fixed order: the sum must not depend on the hash seed
    r = np.array([real.get(w, 0) for w in vocab], dtype=float) + 1.0
    s = np.array([counts.get(w, 0) for w in vocab], dtype=float)
    p, q = s / s.sum(), r / r.sum()
    kept = p > 0
    return float((p[kept] * np.log(p[kept] / q[kept])).sum())


def zipf_exponent(counts: Counter) -> float:
    """s of the least-squares line log f = c - s log r over ranks r = 1.. of the word counts f (0 for fewer
    than two distinct words: no line to fit)."""
    f = np.sort(np.fromiter(counts.values(), dtype=float))[::-1]
    if len(f) < 2:
        return 0.0
    slope = np.polyfit(np.log(np.arange(1, len(f) + 1)), np.log(f), 1)[0]
    return float(-slope)


def rare_words(real: Counter, rare_rank: int) -> set[str]:
    """The real text's words past frequency rank `rare_rank` (ties broken by the word, so the set is fixed)."""
    ranked = sorted(real.items(), key=lambda kv: (-kv[1], kv[0]))
    return {w for w, _ in ranked[rare_rank:]}


def rare_word_recall(counts: Counter, rare: set[str]) -> float:
    return len(rare & counts.keys()) / len(rare)


def text_metrics(texts: list[str], real: Counter, rare: set[str]) -> dict[str, float]:
    """Every metric above of the sample texts, against the real text's word counts and rare words."""
    counts = word_counts(texts)
    out = {
        "self_bleu": self_bleu(texts), "ttr": ttr(counts), "unigram_entropy": unigram_entropy(counts),
        "unigram_kl": unigram_kl(counts, real), "zipf_exponent": zipf_exponent(counts),
    }
    if rare:
        out["rare_word_recall"] = rare_word_recall(counts, rare)
    return out
