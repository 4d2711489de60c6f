"""One `dr data media` run: which files a dataset names, which of them the table can fetch, the workers, the report."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from model.data.catalog import DatasetSpec, load_rows
from model.data.fetch.download import JS_HINT, LICENCE_NOTE, HostGate, fetch, ffmpeg_hint, js_runtime, work_dir
from model.data.fetch.outcomes import (
    FAILED,
    FETCHED,
    NO_SOURCE,
    PRESENT,
    UNAVAILABLE,
    Journal,
    MediaJobError,
    MediaLock,
    Outcome,
    Report,
)
from model.data.fetch.sources import Source, is_youtube, normal_path, read_sources, select
from model.media.preprocess import MediaError, probe_media

SHOWN = 20  # bad-input lines printed; the JSON report lists them all


def run_media(
    spec: DatasetSpec,
    sources_path: Path,
    jobs: int = 4,
    cookies: Path | None = None,
    retry_failed: bool = False,
    say: Callable[[str], None] = print,
    done: Callable[[Outcome, int], None] = lambda outcome, total: None,
) -> Report:
    """Fetch what the dataset's rows name and the table lists; returns the report. `say` gets the one-line notes
    (licence, bad input, a missing JavaScript runtime), `done` each outcome as it comes with the number of files
    named. Raises MediaJobError when the job cannot start or go on (ffmpeg missing, the root locked, a full disk)
    and SourcesError / DatasetError for unusable inputs."""
    rows, row_errors = load_rows(spec.json_path)
    wanted: dict[str, str] = {}
    for row in rows:
        for name, path in zip(row.mm_names, row.mm_paths, strict=True):
            wanted[normal_path(path)] = name
    sources, errors = read_sources(sources_path)
    kept, not_named = select(sources, wanted, sources_path)
    report = Report(spec.name, str(spec.media_root), rows=len(rows) + len(row_errors))
    report.ignored_rows = sum(1 for s in sources if s.path not in wanted)
    report.input_errors = row_errors + errors + not_named
    hint = ffmpeg_hint()
    if hint:
        raise MediaJobError(hint)
    by_path = {s.path: s for s in kept}
    skipped_youtube = {s.path for s in kept if is_youtube(s.url)} if js_runtime() is None else set()
    root = Path(spec.media_root)
    with MediaLock(root):
        say(LICENCE_NOTE)
        for line in report.input_errors[:SHOWN]:
            say(line)
        if len(report.input_errors) > SHOWN:
            say(f"... and {len(report.input_errors) - SHOWN} more such lines (all of them in the JSON report)")
        if skipped_youtube:
            say(JS_HINT.format(n=len(skipped_youtube)))
        shutil.rmtree(work_dir(root), ignore_errors=True)  # what a killed run left half downloaded
        journal = Journal(root)
        todo: list[Source] = []
        there: set[str] = set()  # paths whose file is whole and readable now
        for path in sorted(wanted):
            outcome = _settled(path, wanted[path], root, by_path.get(path), journal, retry_failed, skipped_youtube)
            if outcome is None:
                todo.append(by_path[path])
                continue
            report.add(outcome)
            there |= {path} if outcome.status == PRESENT else set()
            done(outcome, len(wanted))
        for outcome in _fetch_all(todo, root, jobs, cookies, journal):
            report.add(outcome)
            there |= {outcome.path} if outcome.status == FETCHED else set()
            done(outcome, len(wanted))
        shutil.rmtree(work_dir(root), ignore_errors=True)
    report.missing = sorted(set(wanted) - there)
    report.rows_complete = sum(all(normal_path(p) in there for p in row.mm_paths) for row in rows)
    return report


def _settled(
    path: str,
    modality: str,
    root: Path,
    source: Source | None,
    journal: Journal,
    retry_failed: bool,
    skipped: set[str],
) -> Outcome | None:
    """The outcome of a path that needs no fetching (there already, no source, known unavailable), else None."""
    dest = root / path
    if dest.is_file():
        try:
            probe_media(modality, dest)
            return Outcome(path, PRESENT)
        except MediaError:
            pass  # unreadable: fetched again over it (when the table lists it)
    if source is None:
        return Outcome(path, NO_SOURCE)
    last = journal.last.get(path)
    if last is not None and last.status == UNAVAILABLE and not retry_failed and last.url == source.url:
        return last
    if path in skipped:
        return Outcome(path, FAILED, "no JavaScript runtime for YouTube", source.url)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # a temporary a kill left behind
        stale.unlink(missing_ok=True)
    return None


def _fetch_all(todo: list[Source], root: Path, jobs: int, cookies: Path | None, journal: Journal):
    """Outcomes as workers finish them, each journaled first. On a full disk (MediaJobError) or an interrupt the
    queue is dropped, the running files finish unjournaled, and the error propagates."""
    gate = HostGate()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        pending = {pool.submit(fetch, source, root, gate, cookies) for source in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    outcome = future.result()
                    journal.record(outcome)
                    yield outcome
        except BaseException:  # a full disk, or Ctrl-C: the queue is dropped, running files finish
            for future in pending:
                future.cancel()
            raise
