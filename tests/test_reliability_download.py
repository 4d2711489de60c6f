"""Issue 14, cases 5 and 13: a host that accepts connections and never answers, and an offline machine, end each
download in bounded time with one line naming what could not be fetched and how to place it by hand."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from deepresonance_cli.app import app

runner = CliRunner()


@pytest.fixture
def silent() -> Iterator[str]:
    """http://127.0.0.1:PORT of a server that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, silent: str) -> str:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", silent)
    monkeypatch.setenv("DR_HTTP_TIMEOUT", "0.5")
    return silent


def one_line(result) -> str:
    from deepresonance_cli.errors import describe as flatten

    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return flatten(result.exception)
    return " ".join(result.output.split())


def test_delta_download_from_a_silent_host_times_out_and_says_how_to_place_it(online, tmp_path):
    start = time.monotonic()
    result = runner.invoke(app, ["ckpt", "download", "alpha", "--root", str(tmp_path)])
    elapsed = time.monotonic() - start
    assert result.exit_code == 1 and elapsed < 60, (elapsed, result.output)
    text = one_line(result)
    assert "could not fetch the DeepResonance alpha delta" in text and "Timeout" in text
    assert "by hand into" in text and str(tmp_path) in text


def test_imagebind_download_from_a_silent_host_times_out_and_claims_no_partial_file(online, tmp_path):
    start = time.monotonic()
    url = online + "/imagebind_huge.pth"
    result = runner.invoke(app, ["ckpt", "download", "imagebind", "--root", str(tmp_path), "--imagebind-url", url])
    elapsed = time.monotonic() - start
    assert result.exit_code == 1 and elapsed < 60, (elapsed, result.output)
    text = one_line(result)
    assert "could not fetch ImageBind-huge" in text and f"download {url} by hand" in text
    assert ".part" not in text and not list(tmp_path.rglob("*.part"))  # nothing was kept, and none is claimed


def test_data_download_from_a_silent_host_times_out_with_one_line(online, tmp_path):
    start = time.monotonic()
    result = runner.invoke(app, ["data", "download", "--data-root", str(tmp_path / "data")])
    elapsed = time.monotonic() - start
    assert result.exit_code == 1 and elapsed < 60, (elapsed, result.output)
    text = one_line(result)
    assert "could not fetch data/ of the Hugging Face dataset repo" in text and "by hand" in text


def test_vicuna_offline_fails_at_once_without_retry_lines(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "llama").mkdir()
    start = time.monotonic()
    result = runner.invoke(app, ["ckpt", "vicuna", "--llama", str(tmp_path / "llama"), "--out", str(tmp_path / "v")])
    assert result.exit_code == 1 and time.monotonic() - start < 5
    text = one_line(result)
    assert "could not fetch the Vicuna delta lmsys/vicuna-7b-delta-v0: offline" in text and "--delta DIR" in text
    assert "Retry" not in result.output
