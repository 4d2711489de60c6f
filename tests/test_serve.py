"""`dr serve` on a tiny model over loopback: the `openai` client gets `dr ask`'s answers, 200 concurrent requests are
not mixed up, bad input gets one-line 4xx errors, a full server says 429, a client that goes away frees its slot."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import openai
import pytest
import soundfile as sf
from synth import write_garbage, write_image, write_wav
from typer.testing import CliRunner

from ckpt.layout import layout
from deepresonance_cli.app import app as cli
from deepresonance_cli.infer import load
from deepresonance_cli.serve import demo_checkpoints
from model.config import GenerationConfig
from model.engine.scheduler import Engine
from model.generate.base import generate, generate_ids
from model.media.preprocess import load_media
from model.network.deepresonance import Example
from model.serve.app import Limits, create_app, running
from model.serve.worker import EngineWorker, TextStream

MODEL = "deepresonance-alpha"
KEY = "test-key-1234"


@contextmanager
def server(root: Path, slots: int = 8, max_pending: int = 256, api_key: str | None = None, limits=Limits(), **options):
    """(base URL, worker) of a live server on 127.0.0.1 (a free port) over the tiny model in `root`; `options` go to
    create_app (host, cors_origins)."""
    model = load(root, "alpha", None, None, "cpu", None)
    worker = EngineWorker(model, Engine.sized(model, model.config.max_length, 32, slots), max_pending)
    with running(create_app(worker, MODEL, api_key, limits, **options)) as url:
        yield url, worker


@pytest.fixture(scope="module")
def live(stopping_root):
    """A server over the tiny model whose answers end at different lengths (so slots free and refill)."""
    with server(stopping_root, slots=16) as (url, worker):
        yield url, worker


@pytest.fixture(scope="module")
def guarded(tiny_root):
    """A server with an API key, small limits and room for one request at a time."""
    limits = Limits(max_body_bytes=256 * 1024, max_media=2)
    with server(tiny_root, max_pending=1, api_key=KEY, limits=limits) as (url, worker):
        yield url, worker


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return {"wav": write_wav(folder / "m.wav", 2.0, 330), "png": write_image(folder / "p.png")}


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def audio_part(path: Path, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": fmt}}


def image_part(path: Path, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(path)}"}}


def user(*parts: dict, text: str = "Describe the music.") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def wait_idle(worker: EngineWorker, timeout: float = 30.0) -> None:
    """Waits until no request is admitted and the engine holds no row (a cancelled one goes at its next sync)."""
    deadline = time.monotonic() + timeout
    while (worker.pending or worker.engine.pending) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.pending == 0 and worker.engine.pending == 0


@contextmanager
def held(worker: EngineWorker):
    """Holds the engine before its next decode steps, so requests stay in flight, until a command (the cancel of a
    client that left) waits for the worker or the block ends."""
    gate = threading.Event()
    advance = worker.engine.advance
    worker.engine.advance = lambda: gate.wait(30) and advance()
    try:
        yield
        deadline = time.monotonic() + 10
        while worker.commands.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.set()
        worker.engine.advance = advance


@contextmanager
def paced(worker: EngineWorker, seconds: float):
    """Spaces the engine's syncs `seconds` apart, so streamed pieces reach a client one by one."""
    advance = worker.engine.advance
    worker.engine.advance = lambda: time.sleep(seconds) or advance()
    try:
        yield
    finally:
        worker.engine.advance = advance


ASK_SETTINGS = {
    "greedy": (["--greedy"], {"temperature": 0}),
    "sampled": (
        ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"],
        {"temperature": 0.8, "top_p": 0.9, "seed": 7},
    ),
}


@pytest.mark.parametrize("setting", ASK_SETTINGS)
def test_openai_client_answers_equal_dr_ask(live, stopping_root, media, setting):
    """Non-streaming and streaming answers (audio + image, as `dr ask` orders them) are `dr ask`'s, greedy and
    sampled with a seed: the prompt, the sampling settings and the random stream are all the same."""
    flags, options = ASK_SETTINGS[setting]
    question = "What instruments play, and what is the mood?"
    args = ["ask", question, "--audio", str(media["wav"]), "--image", str(media["png"])]
    result = CliRunner().invoke(
        cli, [*args, "--ckpt-root", str(stopping_root), "--device", "cpu", "--max-new-tokens", "24", *flags]
    )
    assert result.exit_code == 0, result.output
    expected = result.stdout.removesuffix("\n")
    assert expected
    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = user(audio_part(media["wav"]), image_part(media["png"]), text=question)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, **options)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stream=True, **options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert sum(bool(c.choices[0].delta.content) for c in chunks) >= 1


def test_200_concurrent_requests_are_each_answered_as_alone(live, stopping_root, tmp_path):
    """200 requests at once (20 distinct prompts, some with audio, different max_tokens, a third streamed) share the
    running batch; each answer is the one its prompt gets alone, and the server is idle and healthy after."""
    url, worker = live
    model = worker.model
    prompts = []
    for i in range(20):
        wav = write_wav(tmp_path / f"{i}.wav", 1.0, 200 + 40 * i) if i % 2 == 0 else None
        prompts.append((f"Question {i}: what plays here?", wav, 8 + (i % 5) * 6))
    expected = [
        generate(
            model,
            [Example("<Audio>" if wav else "", q, [("audio", load_media("audio", wav))] if wav else [])],
            GenerationConfig(max_new_tokens=k, do_sample=False),
        )[0]
        for q, wav, k in prompts
    ]
    assert len(set(expected)) >= 15  # distinct enough that a mix-up shows
    order = [i for i in range(20) for _ in range(10)]
    random.Random(0).shuffle(order)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def ask(n: int, i: int) -> str:
        q, wav, k = prompts[i]
        messages = user(audio_part(wav), text=q) if wav else [{"role": "user", "content": q}]
        if n % 3 == 0:
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=k, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        reply = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=k, temperature=0)
        return reply.choices[0].message.content

    async def everyone() -> list[str]:
        async with client:
            return await asyncio.wait_for(asyncio.gather(*(ask(n, i) for n, i in enumerate(order))), 240)

    answered_before = worker.stats["answered"]
    start = time.monotonic()
    answers = asyncio.run(everyone())
    assert time.monotonic() - start < 240
    assert [a == expected[i] for a, i in zip(answers, order, strict=True)] == [True] * 200
    wait_idle(worker)
    assert worker.stats["answered"] - answered_before == 200
    health = httpx2.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["pending"] == 0


def _post(url: str, body: dict | bytes, key: str | None = KEY, timeout: float = 30) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx2.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=timeout)
    return httpx2.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def test_api_key_is_required_when_set(guarded):
    url, _ = guarded
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 4}
    for key in (None, "wrong", KEY + "x", KEY[:-1]):
        for response in (
            _post(url, ask, key),
            httpx2.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]["message"]
    assert _post(url, ask).status_code == 200
    models = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx2.get(f"{url}/health").status_code == 200  # a load balancer's probe needs no key
    assert "<title>" in httpx2.get(f"{url}/").text


def _bad_requests(media: dict, tmp: Path) -> dict[str, tuple[int, dict | bytes, str]]:
    garbage = write_garbage(tmp / "g.wav")
    big = write_wav(tmp / "big.wav", 10.0)  # 320 KB, over the 256 KiB limit once base64'd
    long_text = " ".join(f"word{i}" for i in range(600))

    def chat(messages, **options) -> dict:
        return {"model": MODEL, "messages": messages, **options}

    return {
        "bad base64": (
            400,
            chat(user({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})),
            "base64",
        ),
        "undecodable wav": (400, chat(user(audio_part(garbage))), "unreadable audio"),
        "unsupported audio format": (400, chat(user(audio_part(media["wav"], "aac"))), "unsupported audio format"),
        "remote image URL": (
            400,
            chat(user({"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}})),
            "only data: URLs",
        ),
        "server file path": (
            400,
            chat(user({"type": "image_url", "image_url": {"url": "file:///etc/hostname"}})),
            "only data: URLs",
        ),
        "unsupported image type": (400, chat(user(image_part(media["png"], "image/svg+xml"))), "unsupported type"),
        "too many media": (400, chat(user(*[audio_part(media["wav"])] * 3)), "more than 2 media"),
        "no text": (400, chat(user(audio_part(media["wav"]), text=" ")), "no text"),
        "prompt too long": (400, chat(user(text=long_text)), "positions"),
        "max_tokens over the server's": (400, chat(user(), max_tokens=999), "max_tokens 999"),
        "several answers": (400, chat(user(), n=2), "n > 1"),
        "history": (400, chat([*user(), {"role": "assistant", "content": "x"}]), "one user message"),
        "unknown model": (404, {**chat(user()), "model": "gpt-4"}, "not served here"),
        "body over the limit": (413, chat(user(audio_part(big))), "over this server's"),
        "not JSON": (422, b"{not json", "json"),
        "no messages": (422, {"model": MODEL}, "messages"),
        "unknown part type": (422, chat([{"role": "user", "content": [{"type": "file", "file": {}}]}]), "content"),
        "temperature out of range": (422, chat(user(), temperature=5), "temperature"),
    }


def test_bad_requests_get_one_line_reasons(guarded, media, tmp_path):
    url, worker = guarded
    for name, (status, body, words) in _bad_requests(media, tmp_path).items():
        response = _post(url, body)
        assert response.status_code == status, (name, response.text)
        message = response.json()["error"]["message"]
        assert words.lower() in message.lower() and "\n" not in message, (name, message)
    wait_idle(worker)
    assert httpx2.get(f"{url}/health").json()["status"] == "ok"


def test_full_server_says_429_and_a_client_that_leaves_frees_its_slot(guarded):
    """With room for one request: a second gets 429 with Retry-After while the first decodes; the first client
    leaving (streaming, then non-streaming) cancels its row instead of letting it run to its end."""
    url, worker = guarded
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 32}
    before = dict(worker.stats)
    with held(worker), httpx2.Client(timeout=30) as client:
        headers = {"Authorization": f"Bearer {KEY}"}
        with client.stream("POST", f"{url}/v1/chat/completions", json={**ask, "stream": True}, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held open: a dropped line iterator closes the connection when collected
            assert next(lines).startswith("data: ")  # the role chunk: the request is in the engine
            busy = _post(url, ask)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
            assert "busy" in busy.json()["error"]["message"]
    wait_idle(worker)
    assert worker.stats["cancelled"] == before["cancelled"] + 1
    with held(worker):
        with pytest.raises(httpx2.ReadTimeout):
            _post(url, ask, timeout=1.0)
    wait_idle(worker)
    assert worker.stats["cancelled"] == before["cancelled"] + 2
    assert worker.stats["answered"] == before["answered"]
    assert _post(url, ask).status_code == 200  # and the server goes on


def test_text_stream_holds_back_what_may_change():
    """Deltas never send the start of the "\\n###" stop or a character still missing bytes; they add up to the
    final answer."""
    texts = iter(
        ["A calm", "A calm\n", "A calm\n#", "A calm\n##", "A calm\ufffd", "A calm\u00e9 piece", "A calm\u00e9 piece"]
    )
    stream = TextStream(lambda ids: next(texts))
    deltas = [stream.delta([], done) for done in (False,) * 6 + (True,)]
    assert deltas == ["A calm", "", "", "", "", "\u00e9 piece", ""]


def test_serve_refuses_to_open_to_other_machines_without_a_key(tiny_root):
    result = CliRunner().invoke(cli, ["serve", "--ckpt-root", str(tiny_root), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output


def test_an_engine_failure_is_reported_not_hung(tiny_root):
    """A worker whose engine raises answers the requests it held with the error, /health says 503, and later
    requests are refused at once."""
    with server(tiny_root) as (url, worker):

        def broken():
            raise RuntimeError("device lost")

        worker.engine.advance = broken
        ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 4}
        first = _post(url, ask, key=None)
        assert first.status_code == 503 and "device lost" in first.json()["error"]["message"]
        health = httpx2.get(f"{url}/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        again = _post(url, ask, key=None)
        assert again.status_code == 503 and "device lost" in again.json()["error"]["message"]


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it): Playwright drives it, downloads nothing
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"), reason="needs Debian's chromium (CI has it)")
def test_page_in_a_real_browser_streams_the_answer(guarded, media, tmp_path):
    """The page at / in headless Chromium: pick a synthesized wav, give the API key, ask (greedy); the answer appears
    in pieces as it streams (the engine's syncs paced 0.2 s apart) and ends as the API's answer to the same request.
    The screenshot goes to $DR_ARTIFACTS when set."""
    from playwright.sync_api import sync_playwright

    url, worker = guarded
    question = "Which instruments play?"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    messages = user(audio_part(media["wav"]), text=question)
    expected = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    expected = expected.choices[0].message.content
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function(f"document.getElementById('model').textContent === '{MODEL}'", timeout=30_000)
            page.set_input_files("#audio", str(media["wav"]))
            page.fill("#question", question)
            page.fill("#temperature", "0")
            page.evaluate(
                """() => { const answer = document.getElementById('answer'); window.seen = new Set();
                new MutationObserver(() => window.seen.add(answer.textContent))
                  .observe(answer, {childList: true, characterData: true, subtree: true}); }"""
            )
            with paced(worker, 0.2):
                page.click("#send")
                page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
            shown = page.eval_on_selector("#answer", "e => e.textContent")
            seen = page.evaluate("() => [...window.seen].filter(t => t.length)")
            screenshot = tmp_path / "serve_page.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert shown == expected
    assert len(seen) >= 2 and all(shown.startswith(t) for t in seen)  # it grew in pieces, each a prefix of the end
    if os.environ.get("DR_ARTIFACTS"):
        out = Path(os.environ["DR_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, out / screenshot.name)
    wait_idle(worker)


@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"), reason="needs Debian's chromium (CI has it)")
def test_page_records_a_clip_in_the_browser(live, tmp_path):
    """Record (Chromium's fake microphone, a tone), stop, ask: the page sends the recording as a 16-bit wav of about
    the time recorded, which the server decodes and answers ('done', not an error)."""
    from playwright.sync_api import sync_playwright

    url, _ = live
    flags = [*CHROMIUM_FLAGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=flags
        )
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/chat/completions") else None)
            page.goto(f"{url}/")
            page.click("#record")
            page.wait_for_timeout(1200)
            page.click("#record")
            page.wait_for_function("document.getElementById('recorded').textContent.startsWith('recorded')")
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        finally:
            browser.close()
    (audio,) = [part for part in json.loads(sent[0])["messages"][0]["content"] if part["type"] == "input_audio"]
    assert audio["input_audio"]["format"] == "wav"
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])))
    assert 0.5 < len(samples) / rate < 5 and abs(samples).max() > 0.01  # about the time recorded, not silence


def test_bench_serve_runs_on_cpu_with_tiny_sizes(tmp_path):
    """`dr bench serve` end to end with a tiny LLM and ImageBind on the CPU: the GPU run's code path, command line
    included, short of the sizes."""
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--device", "cpu", "--tiny", "--clients", "1,3", "--requests-per-client", "2"]
    result = CliRunner().invoke(
        cli, [*args, "--slots", "2", "--budget", "12", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [level["clients"] for level in report["levels"]] == [1, 3]
    for level, requests in zip(report["levels"], (2, 6), strict=True):
        assert level["requests"] == requests and level["answers_short_of_max_tokens"] == 0
        first, last = level["time_to_first_token_s"], level["time_to_last_token_s"]
        assert 0 < first["p50"] <= first["p95"] and first["p50"] <= last["p50"] <= last["p95"]
        assert level["requests_per_s"] > 0


def test_a_row_ends_once_its_text_holds_the_answer_end(tiny_root):
    """A model may spell the answer's end "\\n###" in pieces no stop id sequence matches. The engine sees it in the
    decoded text (model/text/stopping.py) and ends the row there (finish "stop", the slot freed) with the answer the
    whole run would have given. Here one token of the greedy answer decodes as "\\n###"."""
    with server(tiny_root) as (url, worker):
        tok, model = worker.model.tokenizer, worker.model
        full = generate_ids(model, [Example("", "Hi?")], GenerationConfig(max_new_tokens=32, do_sample=False))[0]
        marker = next(t for k, t in enumerate(full) if k >= 9 and t not in full[:k])
        cut = full.index(marker)
        decode = tok.decode

        def spelled(ids: list[int]) -> str:
            if marker not in ids:
                return decode(ids)
            k = ids.index(marker)
            return decode(ids[:k]) + "\n###" + decode(ids[k + 1 :])

        tok.decode = spelled
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = dict(model=MODEL, messages=[{"role": "user", "content": "Hi?"}], max_tokens=32, temperature=0)
        reply = client.chat.completions.create(**ask)
        assert reply.choices[0].message.content == decode(full[:cut])
        assert reply.choices[0].finish_reason == "stop" and cut < reply.usage.completion_tokens < 32
        chunks = list(client.chat.completions.create(**ask, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == decode(full[:cut])
        assert chunks[-1].choices[0].finish_reason == "stop"
        wait_idle(worker)
        assert worker.stats["answered"] == 2


def _finished_demo(folder: Path, tiny_root: Path) -> Path:
    """A folder laid out as `dr demo` leaves it (checkpoints, stage-2 delta, the trained answers' file), made from
    the tiny set instead of training."""
    shutil.copytree(tiny_root, folder / "ckpt")
    shutil.copytree(layout(tiny_root).delta_dir("alpha"), folder / "alpha_stage2")
    (folder / "results").mkdir()
    (folder / "results" / "trained_alpha.json").write_text("{}")
    return folder


def test_demo_model_is_trained_once_then_reused(tiny_root, tmp_path, monkeypatch):
    calls = []

    def fake_run_demo(out, variant, quick, **kwargs):
        calls.append((out, variant, quick))
        _finished_demo(out, tiny_root)

    monkeypatch.setattr("demo.pipeline.run_demo", fake_run_demo)
    first = demo_checkpoints(tmp_path / "demo", "alpha")
    second = demo_checkpoints(tmp_path / "demo", "alpha")
    assert calls == [(tmp_path / "demo", "alpha", True)]
    assert first == second == (tmp_path / "demo" / "ckpt", tmp_path / "demo" / "alpha_stage2")


def test_dr_serve_demo_serves_the_demo_model(tiny_root, tmp_path):
    """`dr serve --demo` as a user starts it (a process, uvicorn in the foreground) over a finished demo folder."""
    demo = _finished_demo(tmp_path / "demo", tiny_root)
    command = [sys.executable, "-m", "deepresonance_cli.app", "serve", "--demo", "--demo-dir", str(demo), "--port", "0"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "dr serve exited"
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = found and found[1]
        assert url, "dr serve did not start"
        assert httpx2.get(f"{url}/health").json()["model"] == "deepresonance-alpha-demo"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="deepresonance-alpha-demo", messages=[{"role": "user", "content": "Hi?"}], max_tokens=4
        )
        assert reply.usage.completion_tokens > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_media_decoding_has_a_time_limit(tiny_root, media, monkeypatch):
    """A clip whose decoding outlasts --decode-timeout gets 400 and gives its admission back."""

    def slow_load(modality, path):
        time.sleep(2)
        return load_media(modality, path)

    monkeypatch.setattr("model.serve.decoding.load_media", slow_load)
    with server(tiny_root, limits=Limits(decode_timeout_s=0.3)) as (url, worker):
        response = _post(url, {"model": MODEL, "messages": user(audio_part(media["wav"]))}, key=None)
        assert response.status_code == 400 and "took over 0.3 s" in response.json()["error"]["message"]
        assert worker.pending == 0 and worker.stats["refused"] == 1
