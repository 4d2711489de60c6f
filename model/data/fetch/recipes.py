"""Recipes: a sources table for `dr data media` from the public metadata people have. One table, RECIPES, below.

Each recipe reads its metadata into entries (fields such as `ytid`, `start`, `end`) and formats a media path and a
URL from them with a pattern. The patterns are options because the names the released DeepResonance test files use
for their media cannot all be known offline: the defaults follow the public code that made each set (MusicCaps
loaders and MuChoMusic name a clip `{ytid}.wav`; M2UGen's downloaders write `{ytid}.mp3`, `{ytid}.mp4` and
`{ytid}.jpg`; MusicQA's audio is one ZIP whose members its loader matches by file name).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from model.data.benchmarks import MUCHOMUSIC_AUDIO
from model.data.fetch.sources import Source, kind_of, parse_source, write_sources

YOUTUBE = "https://www.youtube.com/watch?v={ytid}"
MUSICQA_ZIP = "hf://datasets/mu-llama/MusicQA/audios.zip#{name}"
# the columns segment CSVs name the YouTube id and the segment by: MusicCaps, AudioSet, M2UGen's filtered.csv
YTID, START, END = ("ytid", "YTID", "youtube_id"), ("start_s", "start_seconds"), ("end_s", "end_seconds")

Entry = tuple[str, int, dict]  # (metadata file, line, fields)


class RecipeError(ValueError):
    """Metadata a recipe cannot read at all, or an unknown recipe; one-line message naming the file."""


@dataclass(frozen=True)
class Recipe:
    about: str  # what metadata it reads, for --help and errors
    entries: Callable[[list[Path]], Iterator[Entry]]
    pattern: str  # default media path
    url: str  # default URL; "{url}" when the metadata gives one per entry (empty: none)


def _records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV with a header row, or of an AudioSet segments file (`# YTID, start_seconds, ...`
    comment header, quoted label lists)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not readable ({e})") from e
    header: list[str] | None = None
    for line, cells in enumerate(csv.reader(text.splitlines(), skipinitialspace=True), start=1):
        if not cells or not "".join(cells).strip():
            continue
        if cells[0].startswith("#"):
            if any(c.strip().lstrip("# ") in YTID for c in cells):
                header = [c.strip().lstrip("# ") for c in cells]
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        yield line, dict(zip(header, (c.strip() for c in cells), strict=False))


def _field(row: dict[str, str], names: tuple[str, ...], path: Path, line: int) -> str:
    for name in names:
        if row.get(name):
            return row[name]
    raise RecipeError(f"{path}:{line}: no {' or '.join(names)} column")


def _segments(paths: list[Path]) -> Iterator[Entry]:
    """YouTube segments: MusicCaps' musiccaps-public.csv, AudioSet's segment CSVs, M2UGen's filtered.csv."""
    for path in paths:
        for line, row in _records(path):
            ytid = _field(row, YTID, path, line)
            start, end = _field(row, START, path, line), _field(row, END, path, line)
            yield str(path), line, {"ytid": ytid, "start": start, "end": end}


def _m2ugen(paths: list[Path]) -> Iterator[Entry]:
    """filtered.csv (the segments), then optionally MUImage/MUVideo instruction or caption JSON files naming the
    files (`input_file`/`output_file`, or the keys); without them each segment names `{ytid}.mp3` (MUCaps). Fields:
    ytid, start, end, name, kind (so `{kind}s/{name}` puts them in audios/, images/, videos/)."""
    csvs, names = [p for p in paths if p.suffix.lower() != ".json"], [p for p in paths if p.suffix.lower() == ".json"]
    segments = {e[2]["ytid"]: e for e in _segments(csvs)}
    if not names:
        for where, line, fields in segments.values():
            yield where, line, {**fields, "name": f"{fields['ytid']}.mp3", "kind": "audio"}
        return
    for path in names:
        for i, name in _json_names(path):
            ytid = PurePosixPath(name).stem
            if ytid in segments:
                yield str(path), i, {**segments[ytid][2], "name": name, "kind": kind_of(name) or ""}
            else:
                yield str(path), i, {"ytid": ytid, "name": name, "missing": f"{ytid} is in none of {csvs}"}


def _json_names(path: Path) -> Iterator[tuple[int, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not readable JSON ({e})") from e
    items = enumerate(data) if isinstance(data, list) else enumerate({"input_file": k} for k in data)
    for i, item in items:
        for key in ("input_file", "output_file"):
            if isinstance(item, dict) and isinstance(item.get(key), str):
                yield i, item[key]


def _muchomusic(paths: list[Path]) -> Iterator[Entry]:
    """muchomusic.csv, plus musiccaps-public.csv for the MusicCaps clips' segments. Its Song Describer tracks have
    no per-track URL: --url-pattern gives them one (e.g. a mirror of the MTG-Jamendo audio)."""
    questions = [p for p in paths if p.name.lower().startswith("muchomusic")] or paths[:1]
    segments = {e[2]["ytid"]: e[2] for e in _segments([p for p in paths if p not in questions])}
    seen = set()
    for path in questions:
        for line, row in _records(path):
            dataset = _field(row, ("dataset",), path, line)
            identifier = _field(row, ("dataset_identifier",), path, line).removesuffix(".json")
            # as multiple_choice.convert_muchomusic names the audio: MusicCaps identifiers end in _<question number>
            audio_id = identifier if dataset == "sdd" else "_".join(identifier.split("_")[:-1]) or identifier
            if (dataset, audio_id) in seen:
                continue
            seen.add((dataset, audio_id))
            fields = {"dataset": dataset, "audio_id": audio_id, "url": ""}
            if dataset == "musiccaps":
                if audio_id not in segments:
                    fields["missing"] = f"MusicCaps clip {audio_id}: pass musiccaps-public.csv for its segment"
                else:
                    seg = segments[audio_id]
                    fields.update(ytid=audio_id, start=seg["start"], end=seg["end"], url=YOUTUBE.format(ytid=audio_id))
            yield str(path), line, fields


def _musicqa(paths: list[Path]) -> Iterator[Entry]:
    """A MusicQA row-format JSON (e.g. musicqa_test.json): each audio path it names, from the hosted audios.zip."""
    for path in paths:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecipeError(f"{path}: not readable JSON ({e})") from e
        for i, row in enumerate(rows if isinstance(rows, list) else []):
            for media in row.get("mm_paths", []) if isinstance(row, dict) else []:
                yield str(path), i, {"path": media, "name": PurePosixPath(media).name}


RECIPES: dict[str, Recipe] = {
    "musiccaps": Recipe("musiccaps-public.csv (ytid, start_s, end_s)", _segments, "{ytid}.wav", YOUTUBE),
    "audioset": Recipe("AudioSet segment CSVs (YTID, start_seconds, end_seconds)", _segments, "{ytid}.wav", YOUTUBE),
    "m2ugen": Recipe("M2UGen's filtered.csv [+ MUImage/MUVideo JSON]", _m2ugen, "{name}", YOUTUBE),
    "muchomusic": Recipe("muchomusic.csv + musiccaps-public.csv", _muchomusic, MUCHOMUSIC_AUDIO, "{url}"),
    "musicqa": Recipe("a MusicQA row-format JSON (hosted audios.zip)", _musicqa, "{path}", MUSICQA_ZIP),
}


def build(
    recipe: str, metadata: list[Path], pattern: str | None = None, url_pattern: str | None = None
) -> tuple[list[Source], list[str]]:
    """The sources a recipe makes of its metadata, and one `file:line: reason` note per entry it could not use."""
    if recipe not in RECIPES:
        raise RecipeError(f"{recipe}: not a recipe ({', '.join(RECIPES)})")
    spec = RECIPES[recipe]
    for path in metadata:
        if not Path(path).is_file():
            raise RecipeError(f"{path}: no such file")
    sources: list[Source] = []
    notes: list[str] = []
    seen: set[str] = set()
    for where, line, fields in spec.entries([Path(p) for p in metadata]):
        if "missing" in fields:
            notes.append(f"{where}:{line}: {fields['missing']}")
            continue
        try:
            # --url-pattern replaces the recipe's URL, or only gives one where the metadata has none ("{url}")
            url_format = url_pattern if url_pattern and (spec.url != "{url}" or not fields["url"]) else spec.url
            raw = {"path": (pattern or spec.pattern).format(**fields), "url": url_format.format(**fields)}
            raw.update(start=fields.get("start", ""), end=fields.get("end", ""))
            if not raw["url"]:
                raise ValueError("no URL for it in the metadata: pass --url-pattern")
            source = parse_source(raw, line)
        except (KeyError, IndexError) as e:
            raise RecipeError(f"--pattern / --url-pattern: {e} is not a field of {recipe} ({', '.join(fields)})") from e
        except ValueError as e:
            notes.append(f"{where}:{line}: {e}")
            continue
        if source.path not in seen:
            seen.add(source.path)
            sources.append(source)
    return sources, notes


def write_recipe(
    recipe: str, metadata: list[Path], out: Path, pattern: str | None = None, url_pattern: str | None = None
) -> tuple[int, list[str]]:
    """`build`, then the table written whole to `out`; returns (rows written, notes)."""
    sources, notes = build(recipe, metadata, pattern, url_pattern)
    write_sources(out, sources)
    return len(sources), notes
