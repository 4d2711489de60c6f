"""The dataset catalog (one table), the row format and its validation, and the dataset media check.

Rows follow the original's JSON files: a list of `{id, input, instruction, output, mm_names, mm_paths}`, where each
`<Audio>`/`<Image>`/`<Video>` placeholder in `input` stands for the next entry of `mm_names`/`mm_paths` (paths are
relative to the dataset's media root). A path that leaves the media root (absolute, or climbing out with `..`) makes
its row invalid unless allowed (`outside_media_root`): the original read it, so a hostile row file could make a job
read any file of the machine (`/etc/passwd`) and report what it made of it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.config import HF_DATA_REPO, HF_WEB
from model.io.files import hub_offline
from model.media.preprocess import MODALITIES, MediaError, load_media, probe_media
from model.text.prompt import PLACEHOLDERS
from model.text.prompt import SPLIT as PLACEHOLDER_RE

HF_DATA_URL = f"{HF_WEB}/datasets/{HF_DATA_REPO}/tree/main/data"

# (name, split) -> (JSON file, media root), both relative to the data root. Test sets and media roots are those of
# the original's inference_deepresonance.py, training sets those of its dataset/catalog.py (its "../data/" prefix
# dropped). alpaca is text only.
CATALOG: dict[tuple[str, str], tuple[str, str | None]] = {
    ("musicqa", "test"): ("musicqa_test.json", "MusicQA/audios"),
    ("musiccaps", "test"): ("musiccaps_test.json", "MusicCaps/eval_audios"),
    ("music4way_musiccaps", "test"): ("music4way_musiccaps_test.json", "music4way/test/audios"),
    ("music4way_mi2t", "test"): ("music4way_mi2t_test.json", "music4way/test"),
    ("music4way_mv2t", "test"): ("music4way_mv2t_test.json", "music4way/test"),
    ("music4way_any2t", "test"): ("music4way_any2t_test.json", "music4way/test"),
    ("musicnet", "test"): ("musicnet_test.json", "MusicNet/eval_audios"),
    ("gtzan", "test"): ("gtzan_test.json", "GTZAN/eval_audios"),
    ("mtg", "test"): ("mtg_test.json", "MTG/eval_audios"),
    ("musicinstruct_long", "test"): ("musicinstruct_long_test.json", "MusicInstruct/eval_audios"),
    ("musicinstruct_short", "test"): ("musicinstruct_short_test.json", "MusicInstruct/eval_audios"),
    # multiple-choice benchmarks, as `dr data convert` writes them (model/data/benchmarks.py); media roots are the
    # folders their audio paths are relative to
    ("muchomusic", "test"): ("muchomusic_test.json", "MuChoMusic/audio"),
    ("rulistening", "test"): ("rulistening_test.json", "RUListening/audio"),
    ("mmau_music", "test"): ("mmau_music_test.json", "MMAU"),
    ("mmar_music", "test"): ("mmar_music_test.json", "MMAR"),
    ("alpaca", "train"): ("alpaca.json", None),
    ("coco", "train"): ("coco.json", "coco/images"),
    ("musiccaps", "train"): ("musiccaps.json", "musiccaps/audios"),
    ("musicqa_mtt", "train"): ("musicqa-mtt.json", "musicqa/audios"),
    ("music4way_m2t", "train"): ("music4way_m2t.json", "music4way/train/audios"),
    ("music4way_i2t", "train"): ("music4way_i2t.json", "music4way/train/images"),
    ("music4way_v2t", "train"): ("music4way_v2t.json", "music4way/train/videos"),
    ("music4way_mi2t", "train"): ("music4way_mi2t.json", "music4way/train"),
    ("music4way_mv2t", "train"): ("music4way_mv2t.json", "music4way/train"),
}


class DatasetError(ValueError):
    """A dataset that cannot be used at all (unknown name, missing or malformed file); one-line message."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    json_path: Path
    media_root: Path


@dataclass(frozen=True)
class Row:
    """One validated row. `id` is kept as a string (result files key answers by it); rows without one (the
    original's training loader never reads it) get their 0-based index."""

    id: str
    input: str
    instruction: str
    output: str
    mm_names: tuple[str, ...] = ()
    mm_paths: tuple[str, ...] = ()


def dataset_names(split: str | None = None) -> list[str]:
    return sorted({name for name, s in CATALOG if split is None or s == split})


def resolve_dataset(
    name_or_path: str | Path, data_root: str | Path = "data", media_root: str | Path | None = None, split: str = "test"
) -> DatasetSpec:
    """A catalog name (for `split`) or a path to a row-format JSON file -> where its rows and media are.

    A file's media root defaults to the file's folder; `media_root` overrides either.
    """
    text = str(name_or_path)
    if (text, split) in CATALOG:
        json_name, root = CATALOG[(text, split)]
        spec = DatasetSpec(text, Path(data_root) / json_name, Path(data_root) / (root or ""))
    elif text.endswith(".json") or Path(text).is_file():
        path = Path(text)
        spec = DatasetSpec(path.stem, path, path.parent)
    else:
        raise DatasetError(f"{text}: not a {split} dataset name ({', '.join(dataset_names(split))}) nor a JSON file")
    return spec if media_root is None else DatasetSpec(spec.name, spec.json_path, Path(media_root))


def read_json(path: str | Path) -> object:
    """A JSON file's value, or a DatasetError of one line naming the file: missing, unreadable, not UTF-8, empty,
    malformed (where), or nested too deeply for the parser (a hostile file of 100,000 `[`: RecursionError)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DatasetError(f"{path}: unreadable ({e.strerror or e})") from e
    if not text.strip():
        raise DatasetError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read") from None


def check_text(text: str, what: str) -> None:
    """Text the tokenizer and the result files can take: valid Unicode (JSON's "\\ud800" escapes, and command-line
    bytes that are not UTF-8, decode to lone surrogates, which sentencepiece rejects mid-run)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode ({e.reason}: {text[e.start : e.end]!r} at character {e.start})"
        ) from None


def outside_media_root(path: str) -> str | None:
    """Why a row's media path leaves the media root, or None when it stays inside. The rule is lexical (no file is
    touched): a symlink inside the root is followed, as media folders are often links to another disk."""
    if os.path.isabs(path):
        return "an absolute path"
    if os.path.normpath(path).split(os.sep)[0] == os.pardir:
        return "climbs out of it with '..'"
    return None


def _validate(raw: object, index: int, allow_outside_media_root: bool = False) -> Row:
    """Raw JSON row -> Row, or ValueError saying what is wrong. A missing id becomes the row's index."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    missing = [k for k in ("input", "instruction", "output", "mm_names", "mm_paths") if k not in raw]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    row_id = raw.get("id", str(index))
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise ValueError(f"id must be a string or integer, got {type(row_id).__name__}")
    for key in ("input", "instruction", "output"):
        if not isinstance(raw[key], str):
            raise ValueError(f"{key} must be a string, got {type(raw[key]).__name__}")
    for key in ("mm_names", "mm_paths"):
        if not isinstance(raw[key], list) or not all(isinstance(v, str) for v in raw[key]):
            raise ValueError(f"{key} must be a list of strings")
    for key in ("input", "instruction", "output", "mm_paths"):
        for text in raw[key] if key == "mm_paths" else [raw[key]]:
            check_text(text, key)
    if isinstance(row_id, str):
        check_text(row_id, "id")
    names, paths = raw["mm_names"], raw["mm_paths"]
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r} in mm_names (expected {', '.join(MODALITIES)})")
    if len(paths) != len(names):
        raise ValueError(f"mm_paths has {len(paths)} entries but mm_names has {len(names)}")
    wanted = [PLACEHOLDERS[p] for p in PLACEHOLDER_RE.findall(raw["input"])]
    if wanted != names:
        raise ValueError(f"placeholders in input ask for {wanted} but mm_names is {names}")
    for i, path in enumerate(paths):
        outside = None if allow_outside_media_root else outside_media_root(path)
        if outside:
            raise ValueError(
                f"mm_paths[{i}] {path!r} is outside the media root ({outside}); --allow-outside-media-root reads it"
            )
    return Row(str(row_id), raw["input"], raw["instruction"], raw["output"], tuple(names), tuple(paths))


def load_rows(path: str | Path, allow_outside_media_root: bool = False) -> tuple[list[Row], list[str]]:
    """Read and validate a row-format JSON list -> (valid rows, one `file:row: reason` line per invalid row).

    `row` is the 0-based index in the list (the row's id, when it has one, starts the reason). A second row with the
    same (id, instruction) is invalid too: results are keyed by that pair, so its answer would overwrite the first.
    Raises DatasetError if the file is unusable.
    """
    path = Path(path)
    raw_rows = read_json(path)
    if not isinstance(raw_rows, list):
        raise DatasetError(f"{path}: expected a JSON list of rows, got {type(raw_rows).__name__}")
    rows: list[Row] = []
    errors: list[str] = []
    first_index: dict[tuple[str, str], int] = {}
    for i, raw in enumerate(raw_rows):
        try:
            row = _validate(raw, i, allow_outside_media_root)
        except ValueError as e:
            named = f"id {raw['id']!r}: " if isinstance(raw, dict) and "id" in raw else ""
            errors.append(f"{path}:{i}: {named}{e}")
            continue
        key = (row.id, row.instruction)
        if key in first_index:
            errors.append(f"{path}:{i}: id {row.id!r} with the same instruction as row {first_index[key]}")
            continue
        first_index[key] = i
        rows.append(row)
    return rows, errors


def media_files(rows: Sequence[Row]) -> int:
    """How many media files the rows name (a file named by two rows counts twice)."""
    return sum(len(row.mm_names) for row in rows)


def media_path(row: Row, i: int, media_root: str | Path) -> Path:
    """Path of the row's i-th media file (os.path.join semantics, as the original: absolute paths win). Rows whose
    paths leave the media root are invalid (`outside_media_root`) unless loaded with `allow_outside_media_root`."""
    return Path(os.path.join(media_root, row.mm_paths[i]))


@dataclass
class CheckReport:
    """What `check_dataset` found: row errors, per-modality media counts and one line per media problem."""

    spec: DatasetSpec
    rows: int = 0
    rows_complete: int = 0  # valid rows whose media files are all present and readable (the coverage)
    row_errors: list[str] = field(default_factory=list)
    media: dict[str, Counter] = field(default_factory=lambda: {m: Counter() for m in MODALITIES})
    media_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.row_errors and not self.media_errors


def check_dataset(
    spec: DatasetSpec,
    decode: bool = False,
    progress: Callable[[Iterable], Iterable] = iter,
    allow_outside_media_root: bool = False,
) -> CheckReport:
    """Validate every row and look at every distinct media file once: present, missing or unreadable.

    `decode=False` opens each file and reads its header (fast); `decode=True` runs the full ImageBind preprocessing.
    """
    rows, errors = load_rows(spec.json_path, allow_outside_media_root)
    report = CheckReport(spec, rows=len(rows) + len(errors), row_errors=errors)
    files = {(name, media_path(row, i, spec.media_root)) for row in rows for i, name in enumerate(row.mm_names)}
    bad = set()
    for modality, path in progress(sorted(files)):
        try:
            (load_media if decode else probe_media)(modality, path)
            report.media[modality]["present"] += 1
        except MediaError as e:
            missing = not path.is_file()
            report.media[modality]["missing" if missing else "unreadable"] += 1
            report.media_errors.append(str(e))
            bad.add(path)
    report.rows_complete = sum(
        not any(media_path(row, i, spec.media_root) in bad for i in range(len(row.mm_paths))) for row in rows
    )
    return report


def download_data(data_root: str | Path = "data") -> Path:
    """Fetch the released text files (`data/` of the Hugging Face dataset repo) into data_root; returns data_root.

    Raises DatasetError (one line: what could not be fetched and where to put it by hand) when the hub is unreachable
    or HF_HUB_OFFLINE is set.
    """
    from huggingface_hub import snapshot_download

    from model.io.http import retrying, timeouts

    data_root = Path(data_root)
    by_hand = f"download its files from {HF_DATA_URL} by hand and put them in {data_root}/"
    what = f"data/ of the Hugging Face dataset repo {HF_DATA_REPO}"
    if hub_offline():
        raise DatasetError(f"could not fetch {what}: offline (HF_HUB_OFFLINE=1); {by_hand}")
    endpoint = os.environ.get("HF_ENDPOINT")  # read now: huggingface_hub reads it once, at import
    try:
        snapshot = Path(
            retrying(
                lambda: snapshot_download(
                    HF_DATA_REPO,
                    repo_type="dataset",
                    allow_patterns="data/*",
                    endpoint=endpoint,
                    etag_timeout=timeouts()[1],
                )
            )
        )
    except Exception as e:  # timeouts, refused connections, HTTP errors, a repo without data/
        reason = " ".join(str(e).split())[:300]
        raise DatasetError(f"could not fetch {what} ({type(e).__name__}: {reason}); {by_hand}") from e
    shutil.copytree(snapshot / "data", data_root, dirs_exist_ok=True)
    return data_root
