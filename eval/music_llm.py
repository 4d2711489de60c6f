"""The music-LLM protocol behind the MU-LLaMA / M2UGen / MusiLingo tables (M2UGen's public evaluate.py recipe).

Per row, averaged over rows. Its BLEU is NLTK's `sentence_bleu` called on raw strings, so it counts *character*
n-grams (spaces included), not words: that is what the published "B-U" and "BLEU-4" numbers are, and the keys say so.
"""

from __future__ import annotations

import warnings
from statistics import fmean

from eval import needs

LABELS = {
    "bleu_u_char": "B-U (char)",
    "bleu4_char": "BLEU-4 (char)",
    "meteor": "METEOR",
    "rouge_l_recall": "ROUGE-L (R)",
    "bertscore_recall": "BERTScore (R)",
}


def bleu_char(cand: str, ref: str, weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)) -> float:
    """NLTK sentence BLEU over the characters of raw strings (no smoothing), as the recipe calls it."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():  # NLTK warns on every row without some n-gram overlap
        warnings.simplefilter("ignore")
        return sentence_bleu([ref], cand, weights=weights)


def bleu_rouge(cands: list[str], refs: list[str]) -> dict[str, float]:
    from rouge_score.rouge_scorer import RougeScorer

    rouge = RougeScorer(["rougeL"], use_stemmer=True)
    return {
        "bleu_u_char": fmean(bleu_char(c, r) for c, r in zip(cands, refs, strict=True)),
        "bleu4_char": fmean(bleu_char(c, r, (0, 0, 0, 1)) for c, r in zip(cands, refs, strict=True)),
        "rouge_l_recall": fmean(rouge.score(r, c)["rougeL"].recall for c, r in zip(cands, refs, strict=True)),
    }


def meteor(cands: list[str], refs: list[str]) -> dict[str, float]:
    """NLTK METEOR (WordNet synonyms) on `wordpunct_tokenize` tokens."""
    needs.wordnet()
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.meteor_score import meteor_score

    tok = wordpunct_tokenize
    return {"meteor": fmean(meteor_score([tok(r)], tok(c)) for c, r in zip(cands, refs, strict=True))}
