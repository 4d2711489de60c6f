"""What the metrics need on this machine, checked up front: a missing piece costs one clear line, not a traceback."""

from __future__ import annotations

import shutil


class Missing(RuntimeError):
    """A metric's local requirement is absent; the message says what and how to provide it."""


def java() -> None:
    if shutil.which("java") is None:
        raise Missing(
            "coco BLEU/METEOR/ROUGE-L/CIDEr skipped: pycocoevalcap runs Java (PTB tokenizer, METEOR 1.5) and `java` "
            "is not on PATH; install a JRE, e.g. `apt-get install -y default-jre-headless`"
        )


def wordnet() -> None:
    import nltk

    try:
        nltk.data.find("corpora/wordnet/lexnames")
    except LookupError:
        raise Missing(
            "METEOR (NLTK) skipped: NLTK's WordNet is not installed; run `python -m eval.wordnet` "
            "(unpacks Debian's wordnet packages into $NLTK_DATA or <venv>/nltk_data)"
        ) from None
