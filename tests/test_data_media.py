"""Issue 26: `dr data media` against a loopback HTTP server these tests start (Range answered with 206, scripted
failures), serving media they synthesize; yt-dlp and ffmpeg do the real fetching and cutting. No real host."""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from synth import make_row, write_dataset, write_image, write_wav
from test_ckpt_download import Served, hub  # noqa: F401  (hub: the local hub-protocol server fixture)
from typer.testing import CliRunner

from ckpt.layout import HF_DATA_REPO
from deepresonance_cli.app import app
from model.data.fetch.download import js_runtime
from model.data.fetch.outcomes import MediaLock
from model.data.fetch.recipes import build
from model.data.fetch.sources import read_sources

runner = CliRunner()
CLIP_SECONDS = 12.0
RED_PER_SECOND = 20  # the synthetic video's red channel is 20 * t: a frame tells its own time


@dataclass
class Step:
    """One scripted answer: `ok` (the bytes, Range honoured), `status` (an error code), `truncated` (half the
    promised body), `slow` (the bytes at `rate` bytes/s)."""

    kind: str = "ok"
    data: bytes = b""
    status: int = 200
    ctype: str = "application/octet-stream"
    retry_after: str | None = None
    rate: float = 0.0


@dataclass
class MediaServer:
    url: str
    plans: dict[str, list[Step]] = field(default_factory=dict)  # path -> steps (each used once; the last stays)
    log: list[tuple[str, str, str | None, int, float]] = field(default_factory=list)  # method, path, Range, status, t
    slow_started: threading.Event = field(default_factory=threading.Event)
    cookies: list[str | None] = field(default_factory=list)  # each request's Cookie header

    def serve(self, path: str, *steps: Step) -> str:
        self.plans[path] = list(steps)
        return self.url + path

    def requests(self, path: str) -> list[tuple[str, str, str | None, int, float]]:
        return [entry for entry in self.log if entry[1] == path]

    def served_ok(self) -> set[str]:
        return {path for _, path, _, status, _ in self.log if status in (200, 206)}


def _handler(server: MediaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?")[0]
            server.cookies.append(self.headers.get("Cookie"))
            plan = server.plans.get(path) or [Step("status", status=404)]
            step = plan.pop(0) if len(plan) > 1 else plan[0]
            if step.kind == "status":
                server.log.append((self.command, path, self.headers.get("Range"), step.status, time.monotonic()))
                self.send_response(step.status)
                if step.retry_after:
                    self.send_header("Retry-After", step.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, start = step.data, 0
            end = len(data) - 1
            match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            status = 206 if match and data else 200
            server.log.append((self.command, path, self.headers.get("Range"), status, time.monotonic()))
            if status == 206:
                start, end = int(match[1]), min(int(match[2] or end), end)
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Type", step.ctype)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(max(0, end - start + 1)))
            self.end_headers()
            if not body:
                return
            rest = data[start : end + 1]
            try:
                if step.kind == "truncated":
                    self.wfile.write(rest[: len(rest) // 2])
                    self.close_connection = True
                elif step.kind == "slow":
                    server.slow_started.set()
                    for i in range(0, len(rest), 4096):
                        self.wfile.write(rest[i : i + 4096])
                        self.wfile.flush()
                        time.sleep(4096 / step.rate)
                else:
                    self.wfile.write(rest)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler


@pytest.fixture
def server() -> Iterator[MediaServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), None)
    httpd.handle_error = lambda request, address: None  # clients closing kept-alive connections: not our concern
    media = MediaServer(url=f"http://127.0.0.1:{httpd.server_port}")
    httpd.RequestHandlerClass = _handler(media)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield media
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-host delay and two retries (backoff waits are 0.05 s, conftest's DR_HTTP_BACKOFF)."""
    monkeypatch.setenv("DR_MEDIA_DELAY", "0")
    monkeypatch.setenv("DR_MEDIA_RETRIES", "2")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """12 s mp4: a 440 Hz tone and 64x48 frames whose red channel is 20 * t (the time in seconds)."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", f"sine=frequency=440:duration={CLIP_SECONDS}",
         "-f", "lavfi", "-i", f"nullsrc=s=64x48:r=10:d={CLIP_SECONDS},geq=r='{RED_PER_SECOND}*T':g=0:b=0",
         "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac", str(path)],
        check=True,
    )  # fmt: skip
    return path.read_bytes()


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_wav(tmp_path_factory.mktemp("wav") / "tone.wav", seconds=3.0).read_bytes()


def dataset(folder: Path, *media: tuple[str, str]) -> Path:
    """One row per (modality, path)."""
    return write_dataset(folder, [make_row(f"r{i}", [m]) for i, m in enumerate(media)])


def table(path: Path, *rows: dict, columns: tuple[str, ...] = ("path", "url", "start", "end", "kind")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def media_args(data: Path, sources: Path, root: Path, *extra: str) -> list[str]:
    return ["data", "media", "--dataset", str(data), "--sources", str(sources), "--media-root", str(root), *extra]


def journal(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / ".dr-media" / "journal.jsonl").read_text().splitlines()]


def final_files(root: Path) -> set[str]:
    """Files under the root a reader would take for media (hidden names and dr's own folder excluded)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def audio_seconds(path: Path) -> float:
    info = sf.info(str(path))
    return info.frames / info.samplerate


def video_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.frames / stream.average_rate) if stream.frames else float(container.duration / 1e6)


# ------------------------------------------------------------------------------------------------- what is fetched
def fetch_all(server: MediaServer, tmp_path: Path, *rows: tuple[str, str, dict]) -> tuple[Path, dict, str]:
    """`dr data media` over (modality, path, source columns) rows; returns (media root, JSON report, output)."""
    data = dataset(tmp_path, *[(modality, path) for modality, path, _ in rows])
    sources = table(tmp_path / "sources.csv", *[{"path": path, **columns} for _, path, columns in rows])
    root = tmp_path / "media"
    result = runner.invoke(app, media_args(data, sources, root, "--report", str(tmp_path / "r.json")))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["files"]["fetched"] == len(rows) and report["rows_complete"] == len(rows), report
    assert final_files(root) == {path for _, path, _ in rows}
    return root, report, result.output


def test_audio_is_cut_to_the_segment_or_transcoded_whole(server, clip, wav, tmp_path):
    url = server.serve("/clip.mp4", Step(data=clip, ctype="video/mp4"))
    tone_url = server.serve("/tone.wav", Step(data=wav, ctype="audio/wav"))
    root, _, output = fetch_all(
        server,
        tmp_path,
        ("audio", "a/cut.wav", {"url": url, "start": "2", "end": "5"}),
        ("audio", "whole.flac", {"url": tone_url}),
    )
    assert abs(audio_seconds(root / "a/cut.wav") - 3.0) < 0.4
    assert abs(audio_seconds(root / "whole.flac") - 3.0) < 0.05 and sf.info(str(root / "whole.flac")).format == "FLAC"
    assert output.count("belong to their owners") == 1


def test_a_video_is_cut_and_an_image_is_the_middle_frame_of_its_segment(server, clip, tmp_path):
    url = server.serve("/clip.mp4", Step(data=clip, ctype="video/mp4"))
    root, _, _ = fetch_all(
        server,
        tmp_path,
        ("video", "v/cut.mp4", {"url": url, "start": "3", "end": "7"}),
        ("image", "i/frame.png", {"url": url, "start": "4", "end": "8"}),
    )
    assert abs(video_seconds(root / "v/cut.mp4") - 4.0) < 0.4
    red = np.asarray(Image.open(root / "i/frame.png").convert("RGB"))[..., 0].mean()
    assert abs(red - RED_PER_SECOND * 6.0) < RED_PER_SECOND * 0.5  # t = 6 s, the middle of 4..8


def test_a_rerun_fetches_nothing_again(server, wav, tmp_path):
    url = server.serve("/t.wav", Step(data=wav))
    data = dataset(tmp_path, ("audio", "t.wav"))
    sources = table(tmp_path / "s.csv", {"path": "t.wav", "url": url})
    root = tmp_path / "media"
    assert runner.invoke(app, media_args(data, sources, root)).exit_code == 0
    before = len(server.log)
    result = runner.invoke(app, media_args(data, sources, root, "--report", str(tmp_path / "r.json")))
    assert result.exit_code == 0 and len(server.log) == before
    assert json.loads((tmp_path / "r.json").read_text())["files"] == {
        "fetched": 0, "present": 1, "unavailable": 0, "failed": 0, "no source": 0
    }  # fmt: skip


# -------------------------------------------------------------------------------------------- transient, permanent
def test_429_is_retried_after_the_retry_after_the_host_asked_for(server, wav, tmp_path):
    url = server.serve("/busy.wav", Step("status", status=429, retry_after="1"), Step(data=wav))
    data = dataset(tmp_path, ("audio", "busy.wav"))
    root = tmp_path / "media"
    result = runner.invoke(app, media_args(data, table(tmp_path / "s.csv", {"path": "busy.wav", "url": url}), root))
    assert result.exit_code == 0, result.output
    times = [t for *_, status, t in server.requests("/busy.wav")]
    statuses = [status for *_, status, _ in server.requests("/busy.wav")]
    assert statuses[0] == 429 and set(statuses[1:]) <= {200, 206}
    assert times[1] - times[0] >= 0.95  # Retry-After: 1, where the backoff alone would wait 0.05 s
    assert journal(root)[-1]["status"] == "fetched"


def test_server_errors_are_retried(server, wav, tmp_path):
    url = server.serve("/flaky.wav", Step("status", status=503), Step("status", status=502), Step(data=wav))
    data = dataset(tmp_path, ("audio", "flaky.wav"))
    root = tmp_path / "media"
    result = runner.invoke(app, media_args(data, table(tmp_path / "s.csv", {"path": "flaky.wav", "url": url}), root))
    assert result.exit_code == 0, result.output
    assert [status for *_, status, _ in server.requests("/flaky.wav")][:2] == [503, 502]
    assert (root / "flaky.wav").is_file()


@pytest.mark.parametrize(
    ("message", "kind", "reason"),
    [
        ("Private video. Sign in if you've been granted access to this video", "Unavailable", "private"),
        (
            "Sign in to confirm your age. This video may be inappropriate for some users.",
            "Unavailable",
            "age-restricted",
        ),
        (
            "Sign in to confirm you're not a bot. Use --cookies-from-browser or --cookies",
            "Unavailable",
            "needs sign-in",
        ),
        ("Video unavailable. This video has been removed by the uploader", "Unavailable", "removed"),
        ("Video unavailable. This content isn't available, try again later.", "Failed", "rate-limited"),
    ],
)
def test_youtube_refusals_are_told_apart(message, kind, reason):
    from yt_dlp.utils import DownloadError

    from model.data.fetch.download import _ytdlp_failure

    outcome = _ytdlp_failure(DownloadError(f"ERROR: [youtube] abcdefghijk: {message}"))
    assert type(outcome).__name__ == kind and str(outcome).startswith(reason)


def test_not_found_and_forbidden_are_permanent_not_retried_and_skipped_on_rerun(server, wav, tmp_path):
    gone = server.serve("/gone.wav", Step("status", status=404))
    private = server.serve("/private.wav", Step("status", status=403))
    good = server.serve("/good.wav", Step(data=wav))
    data = dataset(tmp_path, ("audio", "gone.wav"), ("audio", "private.wav"), ("audio", "good.wav"))
    sources = table(
        tmp_path / "s.csv",
        {"path": "gone.wav", "url": gone},
        {"path": "private.wav", "url": private},
        {"path": "good.wav", "url": good},
    )
    root, report_path = tmp_path / "media", tmp_path / "r.json"
    result = runner.invoke(app, media_args(data, sources, root, "--report", str(report_path)))
    assert result.exit_code == 1  # media are missing
    assert len(server.requests("/gone.wav")) == 1 and len(server.requests("/private.wav")) == 1
    report = json.loads(report_path.read_text())
    # the report's counts are what the server answered: one path served, two refused
    assert report["files"]["fetched"] == len(server.served_ok()) == 1
    assert report["files"]["unavailable"] == 2 == len({p for _, p, _, s, _ in server.log if s in (403, 404)})
    assert report["unavailable"] == {"not found (HTTP 404)": 1, "forbidden (HTTP 403): needs sign-in or access": 1}
    assert sorted(report["missing"]) == ["gone.wav", "private.wav"] and report["rows_complete"] == 1
    assert runner.invoke(app, media_args(data, sources, root)).exit_code == 1
    assert len(server.requests("/gone.wav")) == 1  # journaled as unavailable: not asked again
    runner.invoke(app, media_args(data, sources, root, "--retry-failed"))
    assert len(server.requests("/gone.wav")) == 2 and len(server.requests("/private.wav")) == 2


def test_cookies_are_passed_to_the_host(server, wav, tmp_path):
    url = server.serve("/member.wav", Step(data=wav))
    jar = tmp_path / "cookies.txt"
    jar.write_text("# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tSID\tsecret42\n")
    data = dataset(tmp_path, ("audio", "m.wav"))
    sources = table(tmp_path / "s.csv", {"path": "m.wav", "url": url})
    result = runner.invoke(app, media_args(data, sources, tmp_path / "media", "--cookies", str(jar)))
    assert result.exit_code == 0, result.output
    assert server.cookies and all(c == "SID=secret42" for c in server.cookies)


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (Step("truncated"), "truncated"),
        (Step(data=b"<html><body>Sign up to listen</body></html>", ctype="text/html"), "web page"),
        (Step(data=b""), "zero length"),
    ],
    ids=["truncated", "html", "zero-length"],
)
def test_what_is_not_whole_media_is_retried_then_failed_with_its_reason(
    server, wav, tmp_path, step, reason, monkeypatch
):
    if step.kind == "truncated":
        step.data = wav
    requests = []
    for retries in (0, 2):  # one attempt, then three: three times the requests of one
        monkeypatch.setenv("DR_MEDIA_RETRIES", str(retries))
        url = server.serve(f"/bad{retries}.wav", step)
        data = dataset(tmp_path, ("audio", "bad.wav"))
        root = tmp_path / f"media{retries}"
        result = runner.invoke(app, media_args(data, table(tmp_path / "s.csv", {"path": "bad.wav", "url": url}), root))
        assert result.exit_code == 1
        entry = journal(root)[-1]
        assert entry["status"] == "failed" and reason in entry["reason"], entry
        assert final_files(root) == set()
        requests.append(len(server.requests(f"/bad{retries}.wav")))
    assert requests[1] == 3 * requests[0] > 0, requests


def test_requests_to_one_host_are_spaced_by_the_delay(server, wav, tmp_path, monkeypatch):
    monkeypatch.setenv("DR_MEDIA_DELAY", "1")
    rows = [{"path": f"{i}.wav", "url": server.serve(f"/{i}.wav", Step(data=wav))} for i in range(3)]
    data = dataset(tmp_path, *[("audio", r["path"]) for r in rows])
    root = tmp_path / "media"
    assert runner.invoke(app, media_args(data, table(tmp_path / "s.csv", *rows), root, "--jobs", "3")).exit_code == 0
    firsts = sorted(server.requests(f"/{i}.wav")[0][4] for i in range(3))
    gaps = [b - a for a, b in zip(firsts, firsts[1:], strict=False)]
    assert min(gaps) >= 0.6, gaps  # three workers at once, yet a second apart (less the workers' start-up jitter)


# ------------------------------------------------------------------------------------------------------------- hub
def test_hf_urls_come_through_the_hub_and_a_zip_member_by_its_name(hub, wav, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    archive = tmp_path / "audios.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("audios/deep/song.wav", wav)
        z.writestr("audios/other.wav", wav)
    hub.files["media/plain.wav"] = Served(wav)
    hub.files["media/audios.zip"] = Served(archive.read_bytes())
    base = f"hf://datasets/{HF_DATA_REPO}/media"
    data = dataset(tmp_path, ("audio", "plain.wav"), ("audio", "song.wav"), ("audio", "o.wav"), ("audio", "absent.wav"))
    sources = table(
        tmp_path / "s.csv",
        {"path": "plain.wav", "url": f"{base}/plain.wav"},
        {"path": "song.wav", "url": f"{base}/audios.zip#song.wav"},
        {"path": "o.wav", "url": f"{base}/audios.zip#audios/other.wav"},
        {"path": "absent.wav", "url": f"{base}/nothing.wav"},
    )
    root = tmp_path / "media"
    result = runner.invoke(app, media_args(data, sources, root, "--report", str(tmp_path / "r.json")))
    assert sf.read(root / "plain.wav")[0].shape == sf.read(root / "song.wav")[0].shape
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["files"]["fetched"] == 3 and report["unavailable"] == {"not found (HTTP 404)": 1}, result.output
    assert len([entry for entry in hub.log if entry[1].endswith("/nothing.wav")]) == 1  # permanent: asked once
    assert len(hub.gets("audios.zip")) == 1  # one download for both members


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_rows_are_one_line_each_naming_file_and_line_and_the_rest_goes_on(server, wav, tmp_path):
    url = server.serve("/ok.wav", Step(data=wav))
    data = dataset(tmp_path, ("audio", "ok.wav"), ("audio", "x.wav"), ("audio", "y.wav"))
    sources = table(
        tmp_path / "s.csv",
        {"path": "../escape.wav", "url": url},  # line 2
        {"path": "/abs/x.wav", "url": url},  # 3
        {"path": "x.wav", "url": url, "start": "5", "end": "5"},  # 4
        {"path": "y.wav", "url": "ftp://127.0.0.1/y.wav"},  # 5
        {"path": "other.wav", "url": url},  # 6: not named by the dataset
        {"path": "ok.wav", "url": url},  # 7
    )
    root = tmp_path / "media"
    result = runner.invoke(app, media_args(data, sources, root, "--report", str(tmp_path / "r.json")))
    lines = result.output.splitlines()
    for line_no, words in [(2, "leaves the media root"), (3, "absolute"), (4, "not before end"), (5, "ftp://"),
                           (6, "not named by the dataset")]:  # fmt: skip
        hits = [x for x in lines if x.startswith(f"{sources}:{line_no}: ")]
        assert len(hits) == 1 and words in hits[0], (line_no, result.output)
    assert (root / "ok.wav").is_file() and not (tmp_path / "escape.wav").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["files"]["fetched"] == 1 and report["ignored_table_rows"] == 1 and len(report["input_errors"]) == 5


def test_a_table_without_the_url_column_is_one_line(tmp_path):
    data = dataset(tmp_path, ("audio", "a.wav"))
    sources = table(tmp_path / "s.csv", {"path": "a.wav"}, columns=("path",))
    result = runner.invoke(app, media_args(data, sources, tmp_path / "media"))
    assert result.exit_code == 1 and f"{sources}:1: missing column(s) url" in result.output


def test_youtube_without_a_javascript_runtime_is_one_line_and_no_request(tmp_path, monkeypatch):
    monkeypatch.setattr("model.data.fetch.job.js_runtime", lambda: None)
    data = dataset(tmp_path, ("audio", "yt.wav"))
    sources = table(tmp_path / "s.csv", {"path": "yt.wav", "url": "https://www.youtube.com/watch?v=abcdefghijk"})
    monkeypatch.setattr("yt_dlp.YoutubeDL", None)  # any attempt to fetch would fail loudly
    result = runner.invoke(app, media_args(data, sources, tmp_path / "media", "--report", str(tmp_path / "r.json")))
    assert [x for x in result.output.splitlines() if "Deno" in x] == [
        "YouTube sources need a JavaScript runtime for yt-dlp: install Deno (`pip install deno`, or https://deno.com) "
        "or Node.js 22+; 1 YouTube source(s) skipped"
    ]
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == {"no JavaScript runtime for YouTube": 1}


RUNTIMES = [
    ({}, None),
    ({"node": "v20.11.0"}, None),
    ({"node": "v22.3.0"}, "node"),
    ({"node": "v22.3.0", "deno": "deno 2.9.8"}, "deno"),
]


@pytest.mark.parametrize(("programs", "found"), RUNTIMES)
def test_the_javascript_runtime_is_found_as_yt_dlp_finds_it(tmp_path, monkeypatch, programs, found):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, version in programs.items():
        (folder / name).write_text(f"#!/bin/sh\necho {version}\n")
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(tmp_path / "no-scripts"))
    assert js_runtime() == found


def test_without_ffmpeg_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    data = dataset(tmp_path, ("audio", "a.wav"))
    sources = table(tmp_path / "s.csv", {"path": "a.wav", "url": "http://127.0.0.1:9/a.wav"})
    result = runner.invoke(app, media_args(data, sources, tmp_path / "media"))
    assert result.exit_code == 1 and "apt-get install ffmpeg" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_second_process_on_the_same_media_root_is_refused(tmp_path):
    data = dataset(tmp_path, ("audio", "a.wav"))
    sources = table(tmp_path / "s.csv", {"path": "a.wav", "url": "http://127.0.0.1:9/a.wav"})
    root = tmp_path / "media"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from model.data.fetch.outcomes import "
         "MediaLock; lock = MediaLock(Path(sys.argv[1])).__enter__(); print('held', flush=True); time.sleep(60)",
         str(root)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, media_args(data, sources, root))
        assert result.exit_code == 1
        assert f"another dr data media is fetching into it (pid {holder.pid} on" in result.output
        assert len(result.output.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    with MediaLock(root):  # the OS dropped the killed holder's lock
        pass


# --------------------------------------------------------------------------------------------- kills, full disks
def dr(*argv: str, limit_bytes: int | None = None, **kw) -> subprocess.Popen:
    """`dr` in a fresh process; `limit_bytes` caps every file it (and ffmpeg) writes: a disk that fills up."""

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "deepresonance_cli.app", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=full_disk if limit_bytes else None, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_a_job_killed_mid_download_resumes_without_fetching_anything_twice(server, wav, tmp_path):
    rows = [{"path": f"a{i}.wav", "url": server.serve(f"/a{i}.wav", Step(data=wav))} for i in range(3)]
    rows.append({"path": "z.wav", "url": server.serve("/z.wav", Step("slow", data=wav, rate=20_000))})
    data = dataset(tmp_path, *[("audio", r["path"]) for r in rows])
    sources, root = table(tmp_path / "s.csv", *rows), tmp_path / "media"
    job = dr(*media_args(data, sources, root, "--jobs", "1"))
    assert server.slow_started.wait(120), job.communicate()[0]
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert final_files(root) == {"a0.wav", "a1.wav", "a2.wav"}  # z.wav half-fetched: under no final name
    served_before = {f"/a{i}.wav": len(server.requests(f"/a{i}.wav")) for i in range(3)}
    server.plans["/z.wav"] = [Step(data=wav)]
    result = runner.invoke(app, media_args(data, sources, root, "--report", str(tmp_path / "r.json")))
    assert result.exit_code == 0, result.output
    assert {p: len(server.requests(p)) for p in served_before} == served_before  # nothing fetched twice
    assert json.loads((tmp_path / "r.json").read_text())["files"]["fetched"] == 1
    assert final_files(root) == {"a0.wav", "a1.wav", "a2.wav", "z.wav"}
    paths = [e["path"] for e in journal(root)]  # a2's line may or may not have made it before the kill
    assert (
        paths[-1] == "z.wav" and len(paths) == len(set(paths)) and set(paths) <= {"a0.wav", "a1.wav", "a2.wav", "z.wav"}
    )


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_loses_nothing_journaled(server, wav, tmp_path):
    small = write_wav(tmp_path / "small.wav", seconds=0.2).read_bytes()
    first = {"path": "small.wav", "url": server.serve("/small.wav", Step(data=small))}
    big = {"path": "big.wav", "url": server.serve("/big.wav", Step(data=wav))}
    data = dataset(tmp_path, ("audio", "small.wav"), ("audio", "big.wav"))
    root = tmp_path / "media"
    runner.invoke(app, media_args(data, table(tmp_path / "one.csv", first), root))
    assert final_files(root) == {"small.wav"}
    journaled = (root / ".dr-media" / "journal.jsonl").read_bytes()
    job = dr(*media_args(data, table(tmp_path / "two.csv", first, big), root), limit_bytes=len(wav) // 2)
    output = job.communicate(timeout=240)[0]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert job.returncode == 1 and len(errors) == 1 and "disk is full" in errors[0], output
    assert (root / ".dr-media" / "journal.jsonl").read_bytes() == journaled
    assert final_files(root) == {"small.wav"}


# ---------------------------------------------------------------------------------------------------------- recipes
def test_musiccaps_recipe_writes_youtube_segments(tmp_path):
    meta = tmp_path / "musiccaps-public.csv"
    meta.write_text('ytid,start_s,end_s,caption\n-0Gj8-vB1q4,30,40,"A calm, slow piano."\nabcdefghijk,0,10,x\n')
    sources, notes = build("musiccaps", [meta])
    assert notes == []
    assert [(s.path, s.url, s.start, s.end, s.kind) for s in sources] == [
        ("-0Gj8-vB1q4.wav", "https://www.youtube.com/watch?v=-0Gj8-vB1q4", 30.0, 40.0, "audio"),
        ("abcdefghijk.wav", "https://www.youtube.com/watch?v=abcdefghijk", 0.0, 10.0, "audio"),
    ]


def test_audioset_and_m2ugen_recipes_read_comment_headers_and_instruction_files(tmp_path):
    segments = tmp_path / "balanced_train_segments.csv"
    segments.write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=2, num_segs=2\n"
        '# YTID, start_seconds, end_seconds, positive_labels\n--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_"\n'
        'x1, 30.000, 40.000, "/m/04rlf"\n'
    )
    sources, _ = build("audioset", [segments], pattern="clips/{ytid}.flac")
    assert [(s.path, s.start, s.end) for s in sources] == [("clips/--4gqARaEJE.flac", 0, 10), ("clips/x1.flac", 30, 40)]
    instructions = tmp_path / "MUImageInstructions.json"
    instructions.write_text(json.dumps([{"input_file": "x1.mp3", "output_file": "x1.jpg"}, {"input_file": "zz.mp3"}]))
    sources, notes = build("m2ugen", [segments, instructions])
    assert [(s.path, s.kind, s.start) for s in sources] == [("x1.mp3", "audio", 30), ("x1.jpg", "image", 30)]
    assert len(notes) == 1 and notes[0].startswith(f"{instructions}:1: zz is in none of")
    sources, _ = build("m2ugen", [segments, instructions], pattern="{kind}s/{name}")
    assert [s.path for s in sources] == ["audios/x1.mp3", "images/x1.jpg"]


def test_muchomusic_and_musicqa_recipes(tmp_path):
    questions = tmp_path / "muchomusic.csv"
    questions.write_text(
        "question,dataset,dataset_identifier\nq1,musiccaps,abcdefghijk_3\nq2,sdd,1234\nq3,musiccaps,abcdefghijk_4\n"
    )
    caps = tmp_path / "musiccaps-public.csv"
    caps.write_text("ytid,start_s,end_s\nabcdefghijk,20,30\n")
    sources, notes = build("muchomusic", [questions, caps])
    assert [(s.path, s.url, s.start) for s in sources] == [
        ("musiccaps/abcdefghijk.wav", "https://www.youtube.com/watch?v=abcdefghijk", 20)
    ]
    assert notes == [f"{questions}:3: no URL for it in the metadata: pass --url-pattern"]
    sources, _ = build("muchomusic", [questions, caps], url_pattern="https://mirror.example/{audio_id}.mp3")
    assert sources[1].url == "https://mirror.example/1234.mp3" and sources[0].url.startswith("https://www.youtube")
    rows = write_dataset(tmp_path, [make_row("1", [("audio", "songs/a b.wav")])], "musicqa_test.json")
    (source,), _ = build("musicqa", [rows])
    assert (source.path, source.url) == ("songs/a b.wav", "hf://datasets/mu-llama/MusicQA/audios.zip#a b.wav")


def test_dr_data_sources_writes_a_table_dr_data_media_reads(tmp_path):
    meta = tmp_path / "musiccaps-public.csv"
    meta.write_text("ytid,start_s,end_s\nabcdefghijk,30,40\n../evil,0,10\n")
    out = tmp_path / "sources.csv"
    result = runner.invoke(
        app, ["data", "sources", "musiccaps", str(meta), "--out", str(out), "--pattern", "c/{ytid}.mp3"]
    )
    assert result.exit_code == 0 and "1 sources in" in result.output
    assert f"{meta}:3: path 'c/../evil.mp3' leaves the media root" in result.output
    sources, errors = read_sources(out)
    assert errors == [] and [(s.path, s.url, s.start, s.end, s.kind, s.line) for s in sources] == [
        ("c/abcdefghijk.mp3", "https://www.youtube.com/watch?v=abcdefghijk", 30.0, 40.0, "audio", 2)
    ]
    bad = runner.invoke(app, ["data", "sources", "musiccaps", str(meta), "--out", str(out), "--pattern", "{id}.wav"])
    assert bad.exit_code == 1 and "'id' is not a field of musiccaps" in bad.output


def test_check_shows_how_many_rows_have_all_their_media(tmp_path):
    root = tmp_path / "media"
    write_wav(root / "a.wav")
    write_image(root / "b.png")
    data = write_dataset(
        tmp_path, [make_row("1", [("audio", "a.wav")]), make_row("2", [("image", "b.png"), ("audio", "c.wav")])]
    )
    result = runner.invoke(app, ["data", "check", "--dataset", str(data), "--media-root", str(root)])
    assert "rows with all their media: 1 of 2" in result.output
