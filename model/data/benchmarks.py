"""Converters from each multiple-choice benchmark's published file to dr's multiple-choice rows
(model/data/multiple_choice.py describes the row format), and the prompt templates the benchmarks ask with.

Formats read (from the benchmarks' public repositories; where a file exists in several forms, each is accepted):

- MuChoMusic (mulab-mir/muchomusic): the published `muchomusic.csv` (`question`, `correct_answer`,
  `distractor_{1,2,3}_answer`, `dataset` musiccaps|sdd, `dataset_identifier`, `genre`, `music_reasoning` and
  `music_knowledge` as Python list literals), or the JSON list its `prepare_prompts.py` writes (`id`, `prompt`,
  `answers`, `answer_orders`, `audio_path`, `dataset`, `genre`, `reasoning`, `knowledge`). The CSV names no audio
  file: its path is `--audio-pattern` over `{dataset}` and `{audio_id}` (the YouTube id for MusicCaps, the track id
  for Song Describer, derived as the repository's `load_questions_from_csv` does). The correct answer is listed first
  in the CSV, so options are shuffled with a fixed seed per question (as `prepare_prompts.py` shuffles them).
- RUListening / RUL-MuChoMusic (yongyizang/AreYouReallyListening, `RUL-MuchoMusic.json`): an object keyed by
  question id, each `{question, correct_answer, distractors, caption, PI}`; the audio is `{question_id}.mp3`, as its
  example scripts read it. By default all five options are asked at once (the repository's "one-shot" form);
  `leave_one_out` writes its recommended form instead: one row per distractor left out (four options each),
  grouped, the question's answer being the majority vote of its rows. Options are shuffled with a fixed seed per
  row.
- MMAU test-mini (Sakshi113/MMAU, `mmau-test-mini.json`): a list of `{id, audio_id, question, choices, answer,
  task, category, sub-category, ...}`, `answer` being the text of one choice; only `task == "music"` rows are kept
  unless every task is asked for.
- MMAR (ddlBoJack/MMAR, `MMAR-meta.json`): a list of `{id, audio_path, question, choices, answer, modality,
  category, sub-category, ...}`; only `modality == "music"` rows are kept (MMAR's published "Music" column) unless
  every modality is asked for. `answer` may be the choice text or its letter.

Assumption, documented: MMAU and MMAR publish no prompt template of their own; dr uses the one of lmms-eval's MMAR
task (instruction line, question, one "A. text" line per option, "The best answer is:").
"""

from __future__ import annotations

import ast
import csv
import json
import random
import string
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from model.data.catalog import DatasetError, read_json
from model.text.prompt import TAGS

LETTERS = string.ascii_uppercase  # option labels, as the prompts list them
MAX_CATEGORY_CELL = 2000  # MuChoMusic's longest category list is under 100 characters


class BenchmarkFormatError(DatasetError):
    """A benchmark file that does not have the format its converter reads; the message names the file and row."""


# ------------------------------------------------------------------------------------------------ prompt templates
def muchomusic_prompt(question: str, options: Sequence[str]) -> str:
    """MuChoMusic's `prepare_prompts.get_prompts` (no in-context examples), spacing included."""
    listed = "".join(f"({LETTERS[j]}) {option} " for j, option in enumerate(options))
    return f"Question: {question}\n Options: {listed}\n The correct answer is: "


def rulistening_prompt(question: str, options: Sequence[str]) -> str:
    """RUListening's example evaluation prompt (ExampleAudioEval/qwen_2_audio.py): its one-shot form (five options)
    ends "... [[D]] or [[E]].", its leave-one-out form (four) "... [[C]], [[D]]."."""
    listed = " ".join(f"({LETTERS[j]}) {option}" for j, option in enumerate(options))
    letters = [f"[[{LETTERS[j]}]]" for j in range(len(options))]
    examples = ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(options) == 5 else ", ".join(letters)
    return (
        f"Provide your best guess of this question. Think step by step.\n\nQuestion: {question}\n\n"
        f"Options: {listed}\n\nWrite out your guess in the format of [[Letter]], such as {examples}."
    )


def lmms_eval_prompt(question: str, options: Sequence[str]) -> str:
    """lmms-eval's MMAR prompt, used for MMAU and MMAR (neither publishes one)."""
    letters = ", ".join(LETTERS[: len(options) - 1]) + f", or {LETTERS[len(options) - 1]}"
    listed = "\n".join(f"{LETTERS[j]}. {option}" for j, option in enumerate(options))
    return (
        "Listen to the audio and answer the following multiple-choice question. "
        f"Respond with only the letter ({letters}) of the correct option.\n{question}\n{listed}\nThe best answer is:"
    )


# ------------------------------------------------------------------------------------------------------ converting
def mc_row(
    row_id: str,
    audio: str,
    question: str,
    options: Sequence[str],
    answer: int,
    categories: Sequence[str],
    prompt: Callable[[str, Sequence[str]], str],
) -> dict:
    """One row in dr's format plus the multiple-choice keys."""
    return {
        "id": row_id,
        "input": TAGS["audio"],
        "instruction": prompt(question, options),
        "output": options[answer],
        "mm_names": ["audio"],
        "mm_paths": [audio],
        "options": list(options),
        "answer": answer,
        "categories": list(categories),
    }


def _shuffled(row_id: str, correct: str, distractors: Sequence[str], seed: int) -> tuple[list[str], int]:
    """Options in an order fixed by (seed, row id), so that the correct answer is not always first; its index."""
    options = [correct, *distractors]
    order = list(range(len(options)))
    random.Random(f"{seed}:{row_id}").shuffle(order)
    return [options[k] for k in order], order.index(0)


def _fail(path: Path, where: int | str, message: str) -> BenchmarkFormatError:
    return BenchmarkFormatError(f"{path}:{where}: {message}")


def _text(raw: dict, keys: Sequence[str], path: Path, where: int | str) -> str:
    for key in keys:
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise _fail(path, where, f"no {' / '.join(keys)} field with text")


def _answer_index(answer: object, options: Sequence[str], path: Path, where: int | str) -> int:
    """The correct option from an answer given as its text, its letter or its 0-based index."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str):
        text = answer.strip()
        for j, option in enumerate(options):
            if text == option.strip():
                return j
        lowered = [o.strip().lower() for o in options]
        if lowered.count(text.lower()) == 1:
            return lowered.index(text.lower())
        letter = text.strip("()[]. ").upper()
        if len(letter) == 1 and letter in LETTERS[: len(options)]:
            return LETTERS.index(letter)
    raise _fail(path, where, f"answer {answer!r} is none of the {len(options)} options")


def _list_literal(value: object, path: Path, where: int) -> list[str]:
    """MuChoMusic stores category lists as Python literals ("['melody']"); empty cells are no categories. A cell
    longer than MAX_CATEGORY_CELL is refused unparsed: Python's parser recurses (RecursionError) or runs out of stack
    (MemoryError) on a long chain such as `1+1+...` or `---...1`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    if len(text) > MAX_CATEGORY_CELL:
        raise _fail(
            path, where, f"category cell of {len(text)} characters: too long for a list (at most {MAX_CATEGORY_CELL})"
        )
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise _fail(path, where, f"category cell {_preview(text)} is not a list") from e
    if not isinstance(parsed, (list, tuple)):
        raise _fail(path, where, f"category cell {_preview(text)} is not a list")
    return [str(v) for v in parsed]


def _preview(text: str, width: int = 60) -> str:
    return repr(text) if len(text) <= width else f"{text[:width]!r}... ({len(text)} characters)"


def _muchomusic_categories(reasoning: list[str], knowledge: list[str], genre: str) -> list[str]:
    return (
        [f"reasoning: {r}" for r in reasoning]
        + [f"knowledge: {k}" for k in knowledge]
        + ([f"genre: {genre}"] if genre else [])
    )


MUCHOMUSIC_AUDIO = "{dataset}/{audio_id}.wav"


def _questions(path: Path) -> Iterator[tuple[int, dict]]:
    """(index, question) of a benchmark's JSON list, each checked to be an object (a one-line error naming the row)."""
    raw_rows = read_json(path)
    if not isinstance(raw_rows, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of questions, got {type(raw_rows).__name__}")
    for i, raw in enumerate(raw_rows):
        if not isinstance(raw, dict):
            raise _fail(path, i, f"expected an object, got {type(raw).__name__}")
        yield i, raw


def convert_muchomusic(path: Path, audio_pattern: str = MUCHOMUSIC_AUDIO, seed: int = 0, **_: object) -> list[dict]:
    """muchomusic.csv (or prepare_prompts.py's JSON) -> rows; see the module docstring for the fields read."""
    if path.suffix.lower() == ".csv":
        return _muchomusic_csv(path, audio_pattern, seed)
    rows = []
    for i, raw in _questions(path):
        answers, orders = raw.get("answers"), raw.get("answer_orders")
        if not isinstance(answers, list) or not isinstance(orders, list) or 0 not in orders:
            raise _fail(path, i, "needs `answers` and `answer_orders` (which holds 0, the correct answer)")
        question = _question_from_prompt(_text(raw, ("prompt",), path, i))
        options = [str(a) for a in answers]
        categories = _muchomusic_categories(
            _list_literal(raw.get("reasoning"), path, i),
            _list_literal(raw.get("knowledge"), path, i),
            str(raw.get("genre") or ""),
        )
        row_id = _text(raw, ("id",), path, i)
        audio = _text(raw, ("audio_path",), path, i)
        rows.append(mc_row(row_id, audio, question, options, orders.index(0), categories, muchomusic_prompt))
    return rows


def _question_from_prompt(prompt: str) -> str:
    """The question inside a prepared MuChoMusic prompt ("Question: ...\\n Options: ..."); the prompt is rebuilt."""
    body = prompt.split("Question:", 1)[-1]
    return body.split("Options:", 1)[0].strip()


def _muchomusic_csv(path: Path, audio_pattern: str, seed: int) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise BenchmarkFormatError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkFormatError(f"{path}: not a readable CSV ({e})") from e
    rows = []
    for i, raw in enumerate(records, start=2):  # line numbers: the header is line 1
        question = _text(raw, ("question",), path, i)
        correct = _text(raw, ("correct_answer",), path, i)
        distractors = [_text(raw, (f"distractor_{k}_answer",), path, i) for k in (1, 2, 3)]
        dataset = _text(raw, ("dataset",), path, i)
        identifier = _text(raw, ("dataset_identifier",), path, i).removesuffix(".json")
        # as the repository's load_questions_from_csv: Song Describer ids are track ids, MusicCaps ones end in _<n>
        audio_id = identifier if dataset == "sdd" else "_".join(identifier.split("_")[:-1]) or identifier
        row_id = str(raw.get("id") or i - 2)
        options, answer = _shuffled(row_id, correct, distractors, seed)
        categories = _muchomusic_categories(
            _list_literal(raw.get("music_reasoning"), path, i),
            _list_literal(raw.get("music_knowledge"), path, i),
            raw.get("genre") or "",
        )
        audio = audio_pattern.format(dataset=dataset, audio_id=audio_id)
        rows.append(mc_row(row_id, audio, question, options, answer, categories, muchomusic_prompt))
    return rows


def convert_rulistening(path: Path, seed: int = 0, leave_one_out: bool = False, **_: object) -> list[dict]:
    """RUL-MuchoMusic.json -> rows (all five options, or leave-one-out groups; audio `{question_id}.mp3`)."""
    raw_rows = read_json(path)
    if not isinstance(raw_rows, dict):
        raise BenchmarkFormatError(f"{path}: expected an object keyed by question id, got {type(raw_rows).__name__}")
    rows = []
    for qid, raw in raw_rows.items():
        if not isinstance(raw, dict):
            raise _fail(path, qid, f"expected an object, got {type(raw).__name__}")
        distractors = raw.get("distractors")
        if not isinstance(distractors, list) or not distractors or not all(isinstance(d, str) for d in distractors):
            raise _fail(path, qid, "`distractors` must be a non-empty list of strings")
        question, correct = _text(raw, ("question",), path, qid), _text(raw, ("correct_answer",), path, qid)
        if not leave_one_out:
            options, answer = _shuffled(qid, correct, distractors, seed)
            rows.append(mc_row(qid, f"{qid}.mp3", question, options, answer, (), rulistening_prompt))
            continue
        for left_out in range(len(distractors)):
            row_id = f"{qid}/loo{left_out}"
            kept = [d for j, d in enumerate(distractors) if j != left_out]
            options, answer = _shuffled(row_id, correct, kept, seed)
            rows.append(
                {**mc_row(row_id, f"{qid}.mp3", question, options, answer, (), rulistening_prompt), "group": qid}
            )
    return rows


def _choices_benchmark(path: Path, filter_key: str, keep_all: bool, audio_keys: Sequence[str]) -> list[dict]:
    """MMAU / MMAR: a list of {question, choices, answer, audio, category, sub-category, ...}."""
    rows = []
    for i, raw in _questions(path):
        if not keep_all and str(raw.get(filter_key, "")).lower() != "music":
            continue
        choices = raw.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise _fail(path, i, "`choices` must be a list of at least two strings")
        answer = _answer_index(raw.get("answer"), choices, path, i)
        categories = [f"{key}: {raw[key]}" for key in ("category", "sub-category") if raw.get(key)]
        audio = _text(raw, audio_keys, path, i).removeprefix("./")
        row_id = _text(raw, ("id",), path, i)
        question = _text(raw, ("question",), path, i)
        rows.append(mc_row(row_id, audio, question, choices, answer, categories, lmms_eval_prompt))
    return rows


def convert_mmau(path: Path, keep_all: bool = False, **_: object) -> list[dict]:
    """mmau-test-mini.json -> rows; music questions only unless `keep_all`."""
    return _choices_benchmark(path, "task", keep_all, ("audio_id", "audio_path", "audio"))


def convert_mmar(path: Path, keep_all: bool = False, **_: object) -> list[dict]:
    """MMAR-meta.json -> rows; music-only questions unless `keep_all`."""
    return _choices_benchmark(path, "modality", keep_all, ("audio_path", "audio_id", "audio"))


CONVERTERS: dict[str, Callable[..., list[dict]]] = {
    "muchomusic": convert_muchomusic,
    "rulistening": convert_rulistening,
    "mmau_music": convert_mmau,
    "mmar_music": convert_mmar,
}


def convert(benchmark: str, source: str | Path, out: str | Path, **options: object) -> list[dict]:
    """Converts a benchmark file and writes the rows to `out` (JSON list); returns the rows."""
    if benchmark not in CONVERTERS:
        raise DatasetError(f"{benchmark}: not a benchmark dr converts ({', '.join(CONVERTERS)})")
    rows = CONVERTERS[benchmark](Path(source), **options)
    if not rows:
        raise BenchmarkFormatError(f"{source}: no {benchmark} questions found")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return rows
