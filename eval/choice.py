"""Multiple-choice scores: answers parsed to options, accuracy with a 95% bootstrap interval, per category, the chance
rate, the audio-ablation controls, and published numbers of other models for reference.

Parsing a generated answer to an option (`parse_answer`), first rule that applies:

1. `[[X]]`, the format RUListening's prompt asks for: the last such letter.
2. The whole answer is one option letter, optionally in brackets and followed by "." or ")": `B`, `(B)`, `B.`.
3. The answer starts with a letter label: `B) ...`, `(B) ...`, `B. ...`, `B: ...`.
4. A letter after "answer is", "answer:" or "option" (any case; the letter itself upper case): the first one.
5. The answer's text equals one option's (case, punctuation and spacing ignored).
6. Exactly one option's text occurs in the answer as whole words, an option inside a longer matching option not
   counting ("rock" inside "latin rock").

Letters count only up to the number of options (a "D" with three options is no letter). An answer no rule maps is
"unparsed": reported, and scored wrong (the chance rate is what guessing would get).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RESAMPLES = 10_000
CONTROL_SECONDS = 10.0  # RUListening's noise control: 10 s at 16 kHz
CONTROL_RATE = 16_000
NOISE_STD = 0.1  # RUListening draws unit-variance noise, which a 16-bit file clips; 0.1 keeps it Gaussian


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _letter(letter: str, n: int) -> int | None:
    index = LETTERS.find(letter)
    return index if 0 <= index < n else None


def parse_answer(answer: str, options: Sequence[str]) -> int | None:
    """The option a generated answer names (rules in the module docstring), or None when it names none."""
    n, text = len(options), answer.strip()
    bracketed = re.findall(r"\[\[([A-Z])\]\]", text)
    if bracketed:
        return _letter(bracketed[-1], n)
    whole = re.fullmatch(r"[(\[]?([A-Z])[)\]]?[.)]?", text)
    if whole:
        return _letter(whole.group(1), n)
    label = re.match(r"[(\[]?([A-Z])(?:[)\]]|[.:])(?:\s|$)", text)
    if label and _letter(label.group(1), n) is not None:
        return _letter(label.group(1), n)
    for match in re.finditer(r"(?i:answer is|answer:|option)\s*[(\[]?([A-Z])\b", text):
        if _letter(match.group(1), n) is not None:
            return _letter(match.group(1), n)
    normed, opts = _norm(text), [_norm(o) for o in options]
    if normed in opts and opts.count(normed) == 1:
        return opts.index(normed)
    inside = [j for j, o in enumerate(opts) if o and re.search(rf"\b{re.escape(o)}\b", normed)]
    longest = [j for j in inside if not any(k != j and opts[j] in opts[k] for k in inside)]
    return longest[0] if len(longest) == 1 else None


def bootstrap_ci(correct: Sequence[bool], level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> list:
    """Percentile bootstrap interval of the accuracy. Resampling n right/wrong outcomes with replacement and taking
    the mean is exactly a Binomial(n, accuracy) draw divided by n, so the resamples are drawn that way (no n x
    resamples index matrix). Empty input: [None, None]."""
    n = len(correct)
    if n == 0:
        return [None, None]
    means = np.random.default_rng(seed).binomial(n, sum(correct) / n, size=resamples) / n
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(means, [tail, 100 - tail])]


def accuracy(correct: Sequence[bool], categories: Sequence[Sequence[str]], options: Sequence[int]) -> dict:
    """Accuracy, its 95% interval, the chance rate (mean of 1/options), and the same per category."""
    report = _summary(correct, options)
    per: dict[str, list[int]] = {}
    for i, cats in enumerate(categories):
        for cat in cats:
            per.setdefault(cat, []).append(i)
    report["categories"] = {
        cat: _summary([correct[i] for i in idx], [options[i] for i in idx]) for cat, idx in sorted(per.items())
    }
    return report


def _summary(correct: Sequence[bool], options: Sequence[int]) -> dict:
    n = len(correct)
    return {
        "accuracy": sum(correct) / n if n else None,
        "ci95": bootstrap_ci(correct),
        "n": n,
        "correct": int(sum(correct)),
        "chance": float(np.mean([1 / k for k in options])) if n else None,
    }


def grade(rows: Sequence, picks: Sequence[int | None]) -> dict:
    """Accuracy of picked options (None: unparsed, wrong) per question. Rows sharing a `group` are one question
    asked several times (RUListening's leave-one-out form): the option text most of its rows pick is its answer,
    unparsed rows not voting, as RUListening's evaluation counts it."""
    questions: dict[object, list[tuple]] = {}
    for k, (r, pick) in enumerate(zip(rows, picks, strict=True)):
        questions.setdefault(("group", r.group) if r.group else ("row", k), []).append((r, pick))
    correct, cats, sizes = [], [], []
    for members in questions.values():
        first = members[0][0]
        votes = Counter(r.options[p] for r, p in members if p is not None)
        agreed = votes.most_common(1)[0][0] if votes else None
        correct.append(agreed is not None and agreed == first.row.output)
        cats.append(first.categories)
        sizes.append(len(first.options))
    return accuracy(correct, cats, sizes)


def score_generative(predictions: Mapping[str, Mapping[str, str]], rows: Sequence) -> dict:
    """`{id: {instruction: answer}}` (what `dr infer` writes) against `model.data.multiple_choice.ChoiceRow`s.

    A row without an answer (not run, or its media failed) is left out and counted as missing; unparsed answers are
    scored wrong and counted (both in rows)."""
    answered, picks, unparsed = [], [], 0
    for r in rows:
        answer = predictions.get(r.row.id, {}).get(r.row.instruction)
        if isinstance(answer, str):
            answered.append(r)
            picks.append(parse_answer(answer, r.options))
            unparsed += picks[-1] is None
    missing = len(rows) - len(answered)
    return {**grade(answered, picks), "answering": "generative", "unparsed": unparsed, "missing": missing}


def score_likelihood(scores: Sequence, rows: Sequence) -> dict[str, dict]:
    """`model.generate.likelihood.score_rows` output against the rows: the `acc` and the `acc_norm` pick, as two
    modes. Rows whose media failed (a MediaError in place of scores) are left out and counted as missing."""
    kept = [(s, r) for s, r in zip(scores, rows, strict=True) if hasattr(s, "logprobs")]
    missing = len(rows) - len(kept)
    out = {}
    for name, attr in (("likelihood", "pick"), ("likelihood (norm)", "pick_norm")):
        picks = [getattr(s, attr) for s, _ in kept]
        out[name] = {**grade([r for _, r in kept], picks), "answering": name, "unparsed": 0, "missing": missing}
    return out


# ------------------------------------------------------------------------------------------ audio-ablation controls
def control_audio(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """A 10 s, 16 kHz mono file of silence or Gaussian noise (RUListening's control), written once into `folder`."""
    import soundfile as sf

    if kind not in ("silence", "noise"):
        raise ValueError(f"{kind}: expected silence or noise")
    path = Path(folder) / f"control_{kind}_{seed}.wav"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        count = int(CONTROL_SECONDS * CONTROL_RATE)
        samples = np.zeros(count) if kind == "silence" else np.random.default_rng(seed).normal(0, NOISE_STD, count)
        sf.write(path, samples.clip(-1, 1).astype(np.float32), CONTROL_RATE, subtype="PCM_16")
    return path.resolve()


def ablate(rows: Sequence, audio: Path) -> list:
    """The same questions with every audio item replaced by `audio` (absolute, so it wins over the media root);
    images and videos are kept."""
    out = []
    for r in rows:
        paths = tuple(str(audio) if m == "audio" else p for m, p in zip(r.row.mm_names, r.row.mm_paths, strict=True))
        out.append(replace(r, row=replace(r.row, mm_paths=paths)))
    return out


def mode_key(answering: str, audio: str) -> str:
    return answering if audio == "real" else f"{answering}, {audio} audio"


# ------------------------------------------------------------------------------------------------ published numbers
# Accuracy (%) other models report, each with where a reader finds it: `source` names the table, `url` opens it (issue
# 27 re-checked every value against its source). Shown only with --reference-table, marked as published and not
# computed here. Protocols differ from dr's (prompts, parsing, option order), so they are context, not a like-for-like
# comparison. MMAU changed its questions (v05.15.25): every MMAU row names its version, as the same model scores
# differently on the two.
_QWEN3_OMNI = "QwenLM/Qwen3-Omni README, music results table"
_QWEN3_OMNI_URL = "https://github.com/QwenLM/Qwen3-Omni"
_MUCHOMUSIC = "mulab-mir/muchomusic results (Weck et al., MuChoMusic, ISMIR 2024, arXiv:2408.01337)"
_MUCHOMUSIC_URL = "https://github.com/mulab-mir/muchomusic"
_AF3 = "Goel et al., Audio Flamingo 3, arXiv:2507.08128, Table 2"
_AF3_URL = "https://arxiv.org/abs/2507.08128"
_MMAU_BOARD = "MMAU v05.15.25 leaderboard, music"
_MMAU_BOARD_URL = "https://sakshi113.github.io/mmau_homepage/#leaderboard"
_MMAR = "ddlBoJack/MMAR README, results table, music"
_MMAR_URL = "https://github.com/ddlBoJack/MMAR"


def _rows(dataset: str, source: str, url: str, scores: dict[str, float], **extra: str) -> list[dict]:
    return [
        {"dataset": dataset, "model": m, "accuracy": a, "source": source, "url": url, **extra}
        for m, a in scores.items()
    ]


REFERENCE: list[dict] = [
    *_rows("muchomusic", _MUCHOMUSIC, _MUCHOMUSIC_URL,
           {"Qwen-Audio": 51.4, "M2UGen": 42.9, "SALMONN": 41.8, "MU-LLaMA": 32.4, "MusiLingo": 21.1}),
    *_rows("muchomusic", _AF3, _AF3_URL, {"Audio Flamingo 3": 47.4}),
    # RUL-MuchoMusic (RUListening's MuChoMusic); the Qwen2.5-Omni report itself has no MuChoMusic row
    *_rows("rulistening", _QWEN3_OMNI, _QWEN3_OMNI_URL, {"Qwen3-Omni-30B-A3B-Instruct": 52.0, "Qwen2.5-Omni-7B": 47.3}),
    *_rows("gtzan", _QWEN3_OMNI, _QWEN3_OMNI_URL,
           {"Qwen3-Omni-30B-A3B-Instruct": 93.0, "CLaMP 3": 87.9, "Qwen2.5-Omni-7B": 81.7}),
    *_rows("mmau_music", "MMAU original test-mini: Sakshi et al., MMAU, arXiv:2410.19168, test-mini results (music)",
           "https://arxiv.org/abs/2410.19168", {"Qwen2-Audio-Instruct": 50.98}, version="original test-mini"),
    *_rows("mmau_music", _MMAU_BOARD, _MMAU_BOARD_URL,
           {"Kimi-Audio": 66.77, "Qwen2.5-Omni-7B": 65.90, "Qwen2-Audio-Instruct": 56.29, "M2UGen": 37.13,
            "MU-LLaMA": 32.34}, version="v05.15.25"),
    *_rows("mmau_music", f"MMAU v05.15.25: {_AF3}", _AF3_URL, {"Audio Flamingo 3": 73.95}, version="v05.15.25"),
    *_rows("mmar_music", _MMAR, _MMAR_URL,
           {"Qwen2.5-Omni-7B": 40.8, "SALMONN": 29.6, "Qwen2-Audio-Instruct": 24.3, "MU-LLaMA": 13.6}),
]  # fmt: skip


def references(dataset: str, extra: Sequence[dict] = ()) -> list[dict]:
    """Published rows for a dataset (catalog name), the built-in ones and any given; each keeps its source."""
    return [
        {**r, "computed_here": False}
        for r in [*REFERENCE, *extra]
        if r.get("dataset") == dataset and isinstance(r.get("accuracy"), (int, float)) and r.get("source")
    ]
