"""Fetch one media file: yt-dlp (YouTube, any page it knows, direct http URLs) or the Hugging Face hub (hf://), then
ffmpeg into the format the path's extension names, a check by dr's own loader, and a rename once whole.

Images are one frame: the one in the middle of the segment (the first frame when the row gives no segment); M2UGen
took a random frame, which no rerun could reproduce.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from model.data.fetch.outcomes import FAILED, FETCHED, UNAVAILABLE, MediaJobError, Outcome
from model.data.fetch.sources import HF_URL, Source, is_youtube, kind_of
from model.io.files import hub_offline, write_failure, written_atomically
from model.io.http import backoff, failure, timeouts
from model.media.preprocess import MediaError, load_media

RETRIES_ENV, DELAY_ENV = "DR_MEDIA_RETRIES", "DR_MEDIA_DELAY"
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)  # stop the job: no file can land
RETRIES, DELAY = 3, 2.0  # retries after a transient failure; seconds between two requests to one host
MAX_RETRY_AFTER = 600.0
JS_RUNTIMES, NODE_MIN = ("deno", "node", "bun"), 22  # what yt-dlp can run YouTube's player code with, its default first
FFMPEG_HINT = "ffmpeg is not installed: install it (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg)"
JS_HINT = (
    "YouTube sources need a JavaScript runtime for yt-dlp: install Deno (`pip install deno`, or https://deno.com) "
    "or Node.js 22+; {n} YouTube source(s) skipped"
)
LICENCE_NOTE = (
    "note: the media belong to their owners; fetch and use them for research under their terms "
    "(YouTube's, AudioSet's CC BY 4.0 annotations, each hosted set's licence)"
)
# yt-dlp's words for a video that will not come back; the reason recorded for each
_PERMANENT = (
    (re.compile(r"private video", re.I), "private"),
    (re.compile(r"confirm your age|age[- ]restricted|inappropriate for some users", re.I), "age-restricted"),
    (re.compile(r"not a bot|sign in to confirm|cookies", re.I), "needs sign-in (pass --cookies)"),
    (re.compile(r"members[- ]only|join this channel", re.I), "members only"),
    (re.compile(r"removed|terminated|unavailable|no longer available|does not exist", re.I), "removed"),
    (re.compile(r"copyright|blocked it in your country|not available in your country", re.I), "blocked"),
)


class Unavailable(Exception):
    """Permanent: not retried, journaled with its reason, skipped by reruns unless --retry-failed."""


class Failed(Exception):
    """Transient (retried) unless `retry` is False; `retry_after` is the host's Retry-After in seconds."""

    def __init__(self, reason: str, retry: bool = True, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry, self.retry_after = retry, retry_after


def ffmpeg_hint() -> str | None:
    """One line saying how to install ffmpeg, or None when it is there."""
    return None if shutil.which("ffmpeg") else FFMPEG_HINT


def js_runtime() -> str | None:
    """The JavaScript runtime yt-dlp can use for YouTube, looked for where yt-dlp looks (this Python's scripts
    folder, where `pip install deno` puts it, then PATH); Node.js only from version 22, yt-dlp's minimum."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    for name in JS_RUNTIMES:
        exe = shutil.which(name, path=search)
        if exe and (name != "node" or _major_version(exe) >= NODE_MIN):
            return name
    return None


def _major_version(exe: str) -> int:
    try:
        said = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.match(r"v?(\d+)", said.strip())
    return int(match[1]) if match else 0


class HostGate:
    """Politeness: requests to one host start at least `delay` seconds apart, whatever the number of workers."""

    def __init__(self, delay: float | None = None) -> None:
        self.delay = float(os.environ.get(DELAY_ENV, DELAY)) if delay is None else delay
        self.next_slot: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, url: str) -> None:
        host = urlparse(
            os.environ.get("HF_ENDPOINT", "https://huggingface.co") if url.startswith("hf://") else url
        ).netloc
        with self.lock:
            slot = max(time.monotonic(), self.next_slot.get(host, 0.0))
            self.next_slot[host] = slot + self.delay
        time.sleep(max(0.0, slot - time.monotonic()))


def fetch(source: Source, media_root: Path, gate: HostGate, cookies: Path | None = None) -> Outcome:
    """Fetch, convert, verify and place one file; retried with backoff while the failure may pass. Raises
    MediaJobError on a full disk (the job stops; nothing is journaled for this file)."""
    retries = int(os.environ.get(RETRIES_ENV, RETRIES))
    work = work_dir(media_root) / hashlib.sha1(source.path.encode()).hexdigest()[:16]
    for attempt in range(retries + 1):
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.mkdir(parents=True)
            _fetch_once(source, media_root / source.path, work, gate, cookies)
            return Outcome(source.path, FETCHED, "", source.url)
        except Unavailable as e:
            return Outcome(source.path, UNAVAILABLE, str(e), source.url)
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise _disk_error(e, media_root / source.path) from e
            failed = Failed(failure(e))
        except Failed as e:
            failed = e
        except (
            Exception
        ) as e:  # what yt-dlp or the hub client raises besides its documented errors: retried, then failed
            failed = Failed(failure(e))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not failed.retry or attempt == retries:
            return Outcome(source.path, FAILED, str(failed), source.url)
        if failed.retry_after is not None:
            time.sleep(min(failed.retry_after, MAX_RETRY_AFTER))
        else:
            backoff(attempt)
    raise AssertionError("unreachable")


def work_dir(media_root: Path) -> Path:
    """Where downloads land before they are converted (wiped at the start of each job and each attempt)."""
    return Path(media_root) / ".dr-media" / "work"


def _disk_error(err: OSError, dest: Path) -> MediaJobError:
    return MediaJobError(f"{dest}: cannot write it ({write_failure(err)}); what is journaled is kept, rerun to resume")


def _fetch_once(source: Source, dest: Path, work: Path, gate: HostGate, cookies: Path | None) -> None:
    if source.url.startswith("hf://"):
        raw, cut = _from_hub(source.url, work, gate), False
    else:
        gate.wait(source.url)
        raw, cut = _from_ytdlp(source, work, cookies)
    out = work / ("out" + dest.suffix.lower())
    _convert(source, raw, out, cut)
    try:
        load_media(source.kind, out)
    except MediaError as e:
        raise Failed(f"not a readable {source.kind} ({e.reason[:160]})") from e
    except (RuntimeError, ValueError) as e:
        raise Failed(f"not a readable {source.kind} ({failure(e)})") from e
    with written_atomically(dest) as tmp:
        os.replace(out, tmp)


# ------------------------------------------------------------------------------------------------------------ yt-dlp
def _from_ytdlp(source: Source, work: Path, cookies: Path | None) -> tuple[Path, bool]:
    """(downloaded file, whether yt-dlp already cut it to the segment)."""
    import yt_dlp
    from yt_dlp.utils import download_range_func

    formats = {"audio": "bestaudio/best", "video": "bv*[height<=?720]+ba/b[height<=?720]/b"}
    options = {
        "outtmpl": str(work / "media.%(ext)s"),
        "format": formats.get(source.kind, "bv*[height<=?720]/b[height<=?720]/b"),
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "noplaylist": True,
        "retries": 0,  # dr retries, so that Retry-After and the per-host delay apply
        "fragment_retries": 0,
        "extractor_retries": 0,
        "socket_timeout": timeouts()[1],
        "logger": _QuietLogger(),
    }
    if cookies:
        options["cookiefile"] = str(cookies)
    runtime = js_runtime()
    if is_youtube(source.url) and runtime:
        options["js_runtimes"] = {runtime: {}}
    cut = source.start is not None and source.end is not None
    if cut:
        options["download_ranges"] = download_range_func(None, [(source.start, source.end)])
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(source.url, download=True)
    except yt_dlp.utils.DownloadError as e:
        raise _ytdlp_failure(e) from e
    files = [Path(d["filepath"]) for d in (info or {}).get("requested_downloads", []) if d.get("filepath")]
    if not files or not files[0].is_file():
        raise Failed("yt-dlp wrote no file")
    if files[0].stat().st_size == 0:
        raise Failed("empty download (zero length)")
    return files[0], cut


class _QuietLogger:
    """yt-dlp prints errors itself besides raising them; dr reports each once, in its own words."""

    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


def _ytdlp_failure(err: Exception) -> Exception:
    from yt_dlp.networking.exceptions import HTTPError

    cause = (getattr(err, "exc_info", None) or (None, None))[1]
    while cause is not None and not isinstance(cause, (HTTPError, OSError)) and getattr(cause, "cause", None):
        cause = cause.cause  # yt-dlp wraps a page's HTTP error in its extractor's
    text = " ".join(str(getattr(err, "msg", "") or err).split()).removeprefix("ERROR: ")
    if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
        return cause
    if re.search(r"No space left|File too large|Errno 2[78]\b", text):
        return OSError(errno.EFBIG, "File too large")
    if isinstance(cause, HTTPError):
        return _http_failure(cause.status, cause.response.headers.get("Retry-After"))
    status = re.search(r"HTTP Error (\d{3})", text)
    if status:
        return _http_failure(int(status[1]), None)
    if "Unsupported URL" in text:
        return Failed("not media (a web page yt-dlp cannot read)")
    if "Did not get any data blocks" in text or "downloaded file is empty" in text:
        return Failed("empty download (zero length)")
    short = re.search(r"(\d+) bytes read, (\d+) more expected", text)
    if short or re.search(r"content too short|incomplete|truncat", text, re.I):
        return Failed(
            f"truncated download ({short[1]} bytes of {int(short[1]) + int(short[2])})"
            if short
            else "truncated download"
        )
    if re.search(r"try again later|rate[- ]limit|too many requests", text, re.I):
        return Failed("rate-limited by the host (try again later)")  # YouTube words it "Video unavailable. ..."
    for pattern, reason in _PERMANENT:
        if pattern.search(text):
            return Unavailable(reason)
    return Failed(text[:200] or type(err).__name__)


def _http_failure(status: int, retry_after: str | None) -> Exception:
    if status in (404, 410):
        return Unavailable(f"not found (HTTP {status})")
    if status in (401, 403):
        return Unavailable(f"forbidden (HTTP {status}): needs sign-in or access")
    wait = None
    if retry_after and retry_after.strip().isdigit():
        wait = float(retry_after.strip())
    if status == 429 or status >= 500:
        return Failed(f"HTTP {status}", retry_after=wait)
    return Unavailable(f"refused (HTTP {status})")


# --------------------------------------------------------------------------------------------------------------- hub
def _from_hub(url: str, work: Path, gate: HostGate) -> Path:
    """hf://datasets/OWNER/REPO/FILE[#MEMBER]: the file through huggingface_hub's cache (a ZIP is fetched once for
    all its members, and a cached one costs no request, so no wait), a member taken by its path in the ZIP or,
    failing that, by its file name."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from model.io.http import bounded_hub

    if hub_offline():
        raise Failed("offline (HF_HUB_OFFLINE=1)", retry=False)
    match = HF_URL.match(url)
    bounded_hub()

    def download(cached: bool) -> Path:
        return Path(
            hf_hub_download(
                match["repo"],
                match["file"],
                repo_type="dataset",
                endpoint=os.environ.get("HF_ENDPOINT"),
                etag_timeout=timeouts()[1],
                local_files_only=cached,
            )
        )

    try:
        local = download(cached=True)
    except LocalEntryNotFoundError:
        local = None
    try:
        if local is None:
            gate.wait(url)
            local = download(cached=False)
    except LocalEntryNotFoundError as e:  # the hub's answer (its cause), or none: it could not be reached
        response = getattr(e.__cause__, "response", None)
        status = getattr(response, "status_code", None)
        if status is None:
            raise Failed(failure(e)) from e
        raise _http_failure(status, response.headers.get("Retry-After")) from e
    except GatedRepoError as e:
        raise Unavailable("needs sign-in (a gated repo: run `hf auth login`)") from e
    except (RepositoryNotFoundError, RemoteEntryNotFoundError) as e:
        raise Unavailable("not found on the hub") from e
    except HfHubHTTPError as e:
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status is None:
            raise Failed(failure(e)) from e
        raise _http_failure(status, response.headers.get("Retry-After")) from e
    if not match["member"]:
        return local
    try:
        with zipfile.ZipFile(local) as archive:
            names = archive.namelist()
            member = match["member"]
            if member not in names:
                by_name = [n for n in names if n.rsplit("/", 1)[-1] == member.rsplit("/", 1)[-1]]
                if len(by_name) != 1:
                    raise Unavailable(
                        f"not in {match['file']}"
                        if not by_name
                        else f"{len(by_name)} files named so in {match['file']}"
                    )
                member = by_name[0]
            target = work / ("member" + Path(member).suffix)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise Failed(f"{match['file']} is not a readable ZIP ({e})") from e
    return target


# ------------------------------------------------------------------------------------------------------------ ffmpeg
def _convert(source: Source, raw: Path, out: Path, already_cut: bool) -> None:
    """ffmpeg: `raw` -> `out` in the format out's extension names, cut to the segment unless yt-dlp did."""
    start = source.start or 0.0
    seek = None if already_cut else (start if source.segment else None)
    length = None if already_cut or source.end is None else source.end - start
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
    if source.kind == "image":
        if kind_of(raw.name) != "image" and source.segment and source.end is not None:
            middle = (source.end - start) / 2
            seek = middle if already_cut else start + middle
        command += [*(["-ss", f"{seek:.3f}"] if seek else []), "-i", str(raw), "-frames:v", "1", "-update", "1"]
    else:
        command += [*(["-ss", f"{seek:.3f}"] if seek else []), "-i", str(raw)]
        command += ["-t", f"{length:.3f}"] if length else []
        if source.kind == "audio":
            command += ["-map", "0:a:0", "-vn"]
        elif raw.suffix.lower() == out.suffix and not (seek or length or already_cut):  # a cut copy keeps edit lists
            command += ["-map", "0:v:0", "-map", "0:a:0?", "-c", "copy"]
        else:
            command += ["-map", "0:v:0", "-map", "0:a:0?"]
    try:
        done = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired as e:
        raise Failed("ffmpeg took over an hour") from e
    if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if re.search(r"No space left|File too large", done.stderr):
            raise OSError(errno.EFBIG, "File too large")
        raise Failed(f"not a readable {source.kind} (ffmpeg: {said[:200]})")
