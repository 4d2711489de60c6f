"""`dr ckpt download` against a local HTTP server that answers like the Hugging Face hub and like a plain file host.

The server implements the endpoints huggingface_hub 2.4 calls for a dataset repo: the revision info
(/api/datasets/{repo}/revision/{rev}), the recursive tree listings (/api/datasets/{repo}/tree/{rev}[/{path}]) and
HEAD/GET on /datasets/{repo}/resolve/{rev}/{path} with ETag, X-Repo-Commit, Content-Length and Range support.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from typer.testing import CliRunner

from ckpt.download import download
from ckpt.layout import HF_DATA_REPO, IMAGEBIND_FILE, layout
from deepresonance_cli.app import app
from model.io.errors import CkptError
from model.io.manifest import read_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _torch_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _delta_bytes() -> bytes:
    torch.manual_seed(0)
    return _torch_bytes({"llama_proj.weight": torch.randn(64, 32), "llama_proj.bias": torch.randn(64)})


def _imagebind_bytes() -> bytes:
    torch.manual_seed(1)
    heads = ("modality_heads.audio.2.weight", "modality_heads.vision.2.weight")
    return _torch_bytes({k: torch.randn(32, 48) for k in heads} | {"modality_trunks.audio.w": torch.randn(2000)})


@dataclass
class Served:
    """One file: its bytes, what the listing claims (lfs sha256), and how many GETs to cut off half way."""

    data: bytes
    lfs: bool = True
    listed_sha256: str | None = None
    cuts: int = 0

    def sha256(self) -> str:
        return self.listed_sha256 or hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeHub:
    url: str
    files: dict[str, Served]  # repo path (or "/imagebind_huge.pth" for the plain URL) -> file
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range

    def gets(self, suffix: str) -> list[str | None]:
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith(suffix)]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    api = f"/api/datasets/{HF_DATA_REPO}/"
    resolve = re.compile(rf"^/datasets/{re.escape(HF_DATA_REPO)}/resolve/[^/]+/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _json(self, payload: object) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _serve(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            if path.startswith(api + "revision/"):
                return self._json({"id": HF_DATA_REPO, "sha": COMMIT, "private": False})
            if path.startswith(api + "tree/"):
                folder = path[len(api + "tree/") :].partition("/")[2]  # empty: the whole repo
                return self._json([self._entry(p) for p in hub.files if p.startswith(folder + "/" if folder else "")])
            match = resolve.match(path)
            name = match.group(1) if match else path
            if name not in hub.files:
                self.send_error(404)
                return
            self._send_file(name, hub.files[name], body)

        def _entry(self, path: str) -> dict[str, object]:
            f = hub.files[path]
            entry: dict[str, object] = {"type": "file", "path": path, "size": len(f.data), "oid": "b" * 40}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256(), "size": len(f.data), "pointerSize": 134}
            return entry

        def _send_file(self, name: str, f: Served, body: bool) -> None:
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(f.data) - 1}/{len(f.data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(f.data) - start))
            self.send_header("ETag", f'"{f.sha256() if f.lfs else "b" * 40}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            rest = f.data[start:]
            if f.cuts > 0:  # send half of the body, then drop the connection
                f.cuts -= 1
                self.wfile.write(rest[: len(rest) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(rest)

    return Handler


def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the test session's offline mode (conftest), which huggingface_hub read at import."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # handler set below, once the hub object exists
    hub = FakeHub(url=f"http://127.0.0.1:{server.server_port}", files={})
    server.RequestHandlerClass = _handler(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    _online(monkeypatch)
    yield hub
    server.shutdown()
    server.server_close()


def _serve_delta(hub: FakeHub, variant: str, **kwargs: object) -> bytes:
    folder = layout("x").delta_repo_path(variant)
    data = _delta_bytes()
    hub.files[f"{folder}/pytorch_model.pt"] = Served(data, **kwargs)
    hub.files[f"{folder}/config.json"] = Served(b'{"hidden_size": 64}', lfs=False)
    return data


def test_delta_transfer_cut_half_way_is_resumed(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub keeps what it received in whole chunks (10 MB); small chunks make this 10 kB file resumable
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1024)
    data = _serve_delta(hub, "alpha", cuts=1)
    [final] = download("alpha", tmp_path)
    assert final == layout(tmp_path).delta_dir("alpha")
    assert (final / "pytorch_model.pt").read_bytes() == data
    assert (final / "config.json").read_text() == '{"hidden_size": 64}'
    ranges = hub.gets("pytorch_model.pt")
    assert ranges[0] is None and re.fullmatch(r"bytes=\d+-", ranges[1]) and int(ranges[1][6:-1]) > 0
    assert read_manifest(final)["pytorch_model.pt"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not any(layout(tmp_path).staging.rglob("*.pt"))

    hub.log.clear()
    download("alpha", tmp_path)  # already in place: nothing is transferred again
    assert hub.gets("pytorch_model.pt") == []


def test_corrupt_delta_is_caught_and_not_placed(hub: FakeHub, tmp_path: Path) -> None:
    _serve_delta(hub, "beta", listed_sha256="f" * 64)
    with pytest.raises(CkptError, match="corrupt download pytorch_model.pt .*sha256"):
        download("beta", tmp_path)
    assert not (layout(tmp_path).delta_dir("beta") / "pytorch_model.pt").exists()


def test_delta_that_does_not_load_is_corrupt(hub: FakeHub, tmp_path: Path) -> None:
    folder = layout("x").delta_repo_path("alpha")
    hub.files[f"{folder}/pytorch_model.pt"] = Served(b"<html>not a checkpoint</html>")
    with pytest.raises(CkptError, match="corrupt download pytorch_model.pt"):
        download("alpha", tmp_path)


def test_imagebind_cut_off_then_resumed_by_the_next_call(hub: FakeHub, tmp_path: Path) -> None:
    data = _imagebind_bytes()
    hub.files["/" + IMAGEBIND_FILE] = Served(data, cuts=1)
    url = hub.url + "/" + IMAGEBIND_FILE
    paths = layout(tmp_path)
    part = paths.imagebind.with_name(IMAGEBIND_FILE + ".part")
    with pytest.raises(CkptError, match="run again to resume"):
        download("imagebind", tmp_path, imagebind_url=url, retries=0)
    assert 0 < part.stat().st_size < len(data) and not paths.imagebind.exists()

    [final] = download("imagebind", tmp_path, imagebind_url=url, retries=0)
    assert final.read_bytes() == data and not part.exists()
    assert hub.gets(IMAGEBIND_FILE)[1] == f"bytes={len(data) // 2}-"
    assert read_manifest(final.parent)[IMAGEBIND_FILE] == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_imagebind_retries_within_one_call(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _imagebind_bytes()
    hub.files["/" + IMAGEBIND_FILE] = Served(data, cuts=2)
    monkeypatch.setenv("DR_IMAGEBIND_URL", hub.url + "/" + IMAGEBIND_FILE)
    [final] = download("imagebind", tmp_path, retries=2)
    assert final.read_bytes() == data
    assert len(hub.gets(IMAGEBIND_FILE)) == 3


@pytest.mark.parametrize("bad", ["not a torch file", "wrong sha256"])
def test_corrupt_imagebind_is_caught(hub: FakeHub, tmp_path: Path, bad: str) -> None:
    data = b"\x00" * 5000 if bad == "not a torch file" else _imagebind_bytes()
    hub.files["/" + IMAGEBIND_FILE] = Served(data)
    with pytest.raises(CkptError, match="corrupt download of ImageBind-huge"):
        download("imagebind", tmp_path, imagebind_url=hub.url + "/" + IMAGEBIND_FILE, imagebind_sha256="0" * 64)
    paths = layout(tmp_path)
    assert not paths.imagebind.exists() and not paths.imagebind.with_name(IMAGEBIND_FILE + ".part").exists()


def test_offline_names_each_piece_and_how_to_place_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["ckpt", "download", "all", "--root", str(tmp_path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    paths = layout(tmp_path)
    assert len(lines) == 3
    for line, variant in zip(lines[:2], ("alpha", "beta"), strict=True):
        assert f"{variant} delta" in line and paths.delta_web_url(variant) in line
        assert str(paths.delta_dir(variant)) in line
    assert "imagebind_huge.pth by hand to" in lines[2] and str(paths.imagebind) in lines[2]


def test_unreachable_network_is_one_line_per_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _online(monkeypatch)
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(CkptError) as info:
        download("all", tmp_path, endpoint=closed, imagebind_url=closed + "/x.pth", retries=0)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all("could not fetch" in line and "by hand" in line for line in lines)


def test_only_the_files_not_in_place_are_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    data = _serve_delta(hub, "alpha")
    [final] = download("alpha", tmp_path)
    (final / "config.json").unlink()
    hub.log.clear()
    download("alpha", tmp_path)
    assert hub.gets("config.json") == [None] and hub.gets("pytorch_model.pt") == []
    assert (final / "config.json").read_text() == '{"hidden_size": 64}'
    assert (final / "pytorch_model.pt").read_bytes() == data

    hub.log.clear()
    download("alpha", tmp_path, force=True)  # --force fetches every file again
    assert hub.gets("config.json") == [None] and hub.gets("pytorch_model.pt") == [None]
