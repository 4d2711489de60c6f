"""The captioning protocol: pycocoevalcap's PTB tokenizer, corpus BLEU-1..4 over words, METEOR 1.5, ROUGE-L, CIDEr.

SPICE is left out: it downloads Stanford CoreNLP on first use.
"""

from __future__ import annotations

from eval import needs

LABELS = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "meteor_1_5": "METEOR 1.5",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr",
    "bertscore_f1": "BERTScore (F1)",
}


def scores(cands: list[str], refs: list[str]) -> dict[str, float]:
    """One reference per candidate; corpus-level BLEU as COCOEvalCap reports it."""
    needs.java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()  # one JVM with a 2 GB heap, stopped when the object goes
    m, _ = meteor.compute_score(gts, res)
    del meteor
    rouge, cider = Rouge().compute_score(gts, res)[0], Cider().compute_score(gts, res)[0]
    return {f"bleu{n + 1}": b for n, b in enumerate(bleu)} | {"meteor_1_5": m, "rouge_l": rouge, "cider": cider}
