"""dr infer / dr ask on a tiny checkpoint set and synthesized media: resumable, nothing lost, bad input reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synth import infer_args, make_row, write_dataset, write_garbage, write_image, write_video, write_wav
from typer.testing import CliRunner

from ckpt.layout import layout
from deepresonance_cli.app import app
from model.config import GenerationConfig
from model.data.catalog import load_rows
from model.generate.base import generate
from model.infer.job import run_inference
from model.media.features import FeatureCache
from model.media.preprocess import load_media
from model.network.checkpoint import load_model
from model.network.deepresonance import Example

runner = CliRunner()


def media_dataset(folder: Path, n: int) -> Path:
    """n rows over a few shared media files: audio, image + audio, video, text only."""
    write_wav(folder / "a0.wav", 1.0, 220)
    write_wav(folder / "a1.wav", 7.0, 440)
    write_image(folder / "i0.png")
    write_video(folder / "v0.mp4", seconds=2.0, fps=4)
    kinds = [
        [("audio", "a0.wav")],
        [("audio", "a1.wav"), ("image", "i0.png")],
        [("video", "v0.mp4")],
        [],
    ]
    rows = [make_row(f"r{i}", kinds[i % 4], instruction=f"Question {i % 3}?") for i in range(n)]
    return write_dataset(folder, rows)


def wait_for_journal(out: Path, lines: int, seconds: float = 240) -> None:
    """Until the job's journal holds `lines` lines: the moment to interrupt it mid-run."""
    journal = out.with_suffix(".jsonl")
    deadline = time.time() + seconds
    while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < lines):
        time.sleep(0.05)


def journal_lines(out: Path) -> list[dict]:
    """The journal's row entries (its first line is the run's identity)."""
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    return [e for e in lines if "run" not in e]


def test_infer_answers_every_row_and_reruns_skip_finished(tiny_root, tmp_path):
    dataset = media_dataset(tmp_path / "data", 10)
    out = tmp_path / "res" / "toy.json"
    result = runner.invoke(app, infer_args(tiny_root, dataset, out, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    assert "decoder: engine" in result.output
    answers = json.loads(out.read_text())
    rows, _ = load_rows(dataset)
    assert {(r.id, r.instruction) for r in rows} == {(i, q) for i, qs in answers.items() for q in qs}
    again = runner.invoke(app, infer_args(tiny_root, dataset, out, "--batch-size", "4"))
    assert again.exit_code == 0
    assert json.loads(out.read_text()) == answers
    assert len(journal_lines(out)) == 10  # nothing answered twice


def several(tiny_root: Path, tmp_path: Path, *datasets: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """`dr infer` over several datasets (result files by default under the working directory's results/)."""
    named = [arg for d in datasets for arg in ("--dataset", str(d))]
    return ["infer", *named, "--ckpt-root", str(tiny_root), "--greedy", "--max-new-tokens", "6", *extra]


def test_several_datasets_are_answered_by_one_loaded_model_as_each_alone(
    tiny_root, tmp_path, monkeypatch, engine_builds
):
    """`--dataset` repeated: one model load, one engine (the two datasets' rows round to one shape: the second reuses
    the first's, model/infer/kept_engine.py), and each dataset's result file is what a call of its own writes."""
    from deepresonance_cli import infer

    first = media_dataset(tmp_path / "one", 6)
    second = media_dataset(tmp_path / "two", 5).rename(tmp_path / "two" / "other_test.json")
    alone = {}
    for dataset in (first, second):
        out = tmp_path / "alone" / f"{dataset.stem}.json"
        assert runner.invoke(app, infer_args(tiny_root, dataset, out)).exit_code == 0
        alone[dataset.stem] = json.loads(out.read_text())
    loads = []
    real = infer.load
    monkeypatch.setattr(infer, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    engine_builds.clear()  # those of the calls above, one dataset each
    monkeypatch.chdir(tmp_path)
    cache = ("--cache-dir", str(tmp_path / "cache"))
    result = runner.invoke(app, several(tiny_root, tmp_path, first, second, extra=cache))
    assert result.exit_code == 0, result.output
    assert len(loads) == 1 and len(engine_builds) == 1
    for dataset in (first, second):
        together = json.loads((tmp_path / "results" / f"{dataset.stem}_alpha.json").read_text())
        assert together == alone[dataset.stem] and len(together) == len(load_rows(dataset)[0])


@pytest.mark.parametrize("case", ["one --out for two", "a dataset twice"])
def test_several_datasets_that_would_share_a_result_file_stop_before_loading(tiny_root, tmp_path, monkeypatch, case):
    from deepresonance_cli import infer

    first = media_dataset(tmp_path / "one", 2)
    second = media_dataset(tmp_path / "two", 2).rename(tmp_path / "two" / "other_test.json")
    monkeypatch.setattr(infer, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    if case == "one --out for two":
        args = several(tiny_root, tmp_path, first, second, extra=("--out", str(tmp_path / "r.json")))
        said = "--out"
    else:
        args = several(tiny_root, tmp_path, first, first)
        said = "given twice"
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not (tmp_path / "results").exists() and not (tmp_path / "r.json").exists()


def test_batched_results_equal_batch_size_one(tiny_root, tmp_path):
    dataset = media_dataset(tmp_path / "data", 8)
    outs = []
    for bs in ("1", "8"):
        out = tmp_path / f"bs{bs}" / "toy.json"
        assert (
            runner.invoke(app, infer_args(tiny_root, dataset, out, "--batch-size", bs, "--variant", "beta")).exit_code
            == 0
        )
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1]


def test_bad_rows_and_bad_media_are_reported_and_the_run_completes(tiny_root, tmp_path):
    folder = tmp_path / "data"
    write_wav(folder / "ok.wav", 1.0)
    write_garbage(folder / "broken.wav")
    rows = [
        make_row("good", [("audio", "ok.wav")]),
        make_row("missing", [("audio", "nope.wav")]),
        make_row("corrupt", [("audio", "broken.wav")]),
        {**make_row("invalid", [("audio", "ok.wav")]), "mm_names": []},
    ]
    dataset = write_dataset(folder, rows)
    out = tmp_path / "res" / "toy.json"
    result = runner.invoke(app, infer_args(tiny_root, dataset, out))
    assert result.exit_code == 0, result.output
    assert list(json.loads(out.read_text())) == ["good"]
    assert "missing" in result.output and "nope.wav" in result.output
    assert "corrupt" in result.output and "broken.wav" in result.output
    assert f"{dataset}:3" in result.output.replace("\n", "")


def test_feature_cache_hit_skips_the_encoder(tiny_layout, tmp_path):
    dataset = media_dataset(tmp_path / "data", 4)
    rows, _ = load_rows(dataset)
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    calls = []
    encoder = model.visual_encoder
    original = encoder.embed
    encoder.embed = lambda modality, x: calls.append(x.shape[0]) or original(modality, x)
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False)
    first = run_inference(model, rows, dataset.parent, tmp_path / "a" / "r.json", gen, cache=cache)
    assert first.answered == 4 and sum(calls) == 4  # four distinct media files
    calls.clear()
    second = run_inference(model, rows, dataset.parent, tmp_path / "b" / "r.json", gen, cache=cache)
    assert second.answered == 4 and calls == []


@pytest.mark.parametrize(
    "flags,gen",
    [
        (["--greedy"], GenerationConfig(max_new_tokens=6, do_sample=False, decoder="engine")),
        (
            ["--temperature", "1.5", "--top-p", "0.9", "--top-k", "20", "--seed", "4"],
            GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, top_k=20, seed=4),
        ),
    ],
)
def test_ask_prints_the_librarys_answer_for_own_files(tiny_root, tiny_layout, tmp_path, flags, gen):
    """`dr ask` prints exactly the answer `generate` gives the same files and settings (LoRA merged, as every CLI
    load does), so a dropped print, a lost option or a different prompt shows; stdout holds nothing else."""
    wav, png = write_wav(tmp_path / "m.wav", 1.0), write_image(tmp_path / "p.png")
    args = ["ask", "Describe the music.", "--audio", str(wav), "--image", str(png), "--ckpt-root", str(tiny_root)]
    result = runner.invoke(app, [*args, "--max-new-tokens", "6", *flags])
    assert result.exit_code == 0, result.output
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    model.merge_lora()
    media = [("audio", load_media("audio", wav)), ("image", load_media("image", png))]
    answer = generate(model, [Example("<Audio><Image>", "Describe the music.", media)], gen)[0]
    assert answer.strip() and result.stdout == answer + "\n"


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    dataset = media_dataset(tmp_path / "data", 1)
    proc = subprocess.run(
        [sys.executable, "-m", "deepresonance_cli.app", *infer_args(tmp_path / "nockpt", dataset, tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "nockpt" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(tiny_root, tmp_path):
    dataset = media_dataset(tmp_path / "data", 50)
    out = tmp_path / "res" / "toy.json"
    cmd = [sys.executable, "-m", "deepresonance_cli.app", *infer_args(tiny_root, dataset, out, "--batch-size", "2")]
    cmd[cmd.index("6")] = "24"  # longer answers: the kill lands mid-run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_journal(out, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {(e["id"], e["instruction"]): e["answer"] for e in journal_lines(out)}
    assert 6 <= len(before) < 50, "the kill should land mid-run"
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    entries = journal_lines(out)
    keys = [(e["id"], e["instruction"]) for e in entries]
    assert len(keys) == len(set(keys)) == 50
    final = json.loads(out.read_text())
    assert sum(len(v) for v in final.values()) == 50
    assert all(final[i][q] == a for (i, q), a in before.items())


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_infer_loads_each_variant(tiny_root, tmp_path, variant):
    dataset = media_dataset(tmp_path / "data", 2)
    out = tmp_path / "res" / "toy.json"
    assert runner.invoke(app, infer_args(tiny_root, dataset, out, "--variant", variant)).exit_code == 0
    other = "beta" if variant == "alpha" else "alpha"
    wrong = runner.invoke(
        app,
        infer_args(
            tiny_root,
            dataset,
            out,
            "--variant",
            variant,
            "--delta",
            str(Path(tiny_root) / f"deepresonance_{other}_delta_ckpt/deepresonance/7b_tiva_v0"),
        ),
    )
    assert wrong.exit_code != 0


@pytest.mark.slow
def test_torchrun_shards_rows_by_rank_and_merges_one_result(tiny_root, tmp_path):
    dataset = media_dataset(tmp_path / "data", 9)
    out = tmp_path / "res" / "toy.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "deepresonance_cli.app",
        *infer_args(tiny_root, dataset, out, "--device", "cpu"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = [journal_lines(out.with_name(f"toy.rank{r}.json")) for r in (0, 1)]
    assert len(shards[0]) == 5 and len(shards[1]) == 4  # rows[rank::2]
    keys = [(e["id"], e["instruction"]) for shard in shards for e in shard]
    assert len(set(keys)) == 9
    assert sum(len(v) for v in json.loads(out.read_text()).values()) == 9


def test_next_batch_media_load_while_this_batch_decodes(tiny_layout, tmp_path, monkeypatch):
    import threading

    import model.infer.job as inference

    rows, _ = load_rows(media_dataset(tmp_path / "data", 4))
    media_calls, overlapped = [], []
    second_batch_media = threading.Event()
    real_decode_media, real_generate = inference.decode_media, inference.generate

    def decode_media(model, group, *args, **kwargs):
        media_calls.append([r.id for r in group])
        if len(media_calls) == 2:
            second_batch_media.set()
        return real_decode_media(model, group, *args, **kwargs)

    def generate(model, examples, gen):
        if len(overlapped) == 0:  # the first batch: the second's media must be on their way before it finishes
            overlapped.append(second_batch_media.wait(timeout=30))
        return real_generate(model, examples, gen)

    monkeypatch.setattr(inference, "decode_media", decode_media)
    monkeypatch.setattr(inference, "generate", generate)
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, decoder="generate")
    summary = run_inference(model, rows, tmp_path / "data", tmp_path / "out" / "r.json", gen, batch_size=2)
    assert summary.answered == 4 and len(media_calls) == 2 and overlapped == [True]


@pytest.mark.parametrize(("decoder", "groups"), [("engine", [2, 3, 2]), ("generate", [3, 3, 1])])
def test_an_engine_jobs_first_media_group_is_small(tiny_layout, tmp_path, monkeypatch, decoder, groups):
    """An engine job loads a small first media group (FIRST_GROUP rows), so its engine starts on rows whose media
    came quickly, then whole engine-fulls; a static decoder's groups are its batches. Answers do not depend on it."""
    import model.infer.job as inference

    rows, _ = load_rows(media_dataset(tmp_path / "data", 7))
    sizes = []
    real_decode_media = inference.decode_media

    def decode_media(model, group, *args, **kwargs):
        sizes.append(len(group))
        return real_decode_media(model, group, *args, **kwargs)

    monkeypatch.setattr(inference, "decode_media", decode_media)
    monkeypatch.setattr(inference, "FIRST_GROUP", 2)
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, decoder=decoder)
    summary = run_inference(model, rows, tmp_path / "data", tmp_path / "small" / "r.json", gen, batch_size=3)
    assert summary.answered == 7 and sizes == groups
    monkeypatch.setattr(inference, "FIRST_GROUP", 3)
    run_inference(model, rows, tmp_path / "data", tmp_path / "whole" / "r.json", gen, batch_size=3)
    answers = lambda name: sorted(map(json.dumps, journal_lines(tmp_path / name / "r.json")))  # noqa: E731
    assert answers("small") == answers("whole")


def test_a_jobs_encoder_calls_take_at_most_call_files(tiny_layout, tmp_path, monkeypatch):
    """A job's groups are its slot count (512 on CUDA), its encoder calls at most CALL_FILES files of them: the
    activations of a whole group's videos did not fit beside the engine's pool on an 80 GB card. Answers do not
    depend on it."""
    from model.media.encoder import CALL_FILES

    folder = tmp_path / "data"
    for i in range(7):  # a file of its own content a row: none shared
        write_wav(folder / f"a{i}.wav", 1.0, 220 + 30 * i)
    rows, _ = load_rows(write_dataset(folder, [make_row(f"r{i}", [("audio", f"a{i}.wav")]) for i in range(7)]))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False)
    calls = []
    encode = model.visual_encoder.embed

    def counted(modality, inputs):
        calls.append(len(inputs))
        return encode(modality, inputs)

    monkeypatch.setattr(model.visual_encoder, "embed", counted)
    monkeypatch.setitem(CALL_FILES, "audio", 2)
    run_inference(model, rows, tmp_path / "data", tmp_path / "capped" / "r.json", gen, batch_size=5)
    assert max(calls) == 2 and sum(calls) == 7, calls
    monkeypatch.setitem(CALL_FILES, "audio", 64)
    calls.clear()
    run_inference(model, rows, tmp_path / "data", tmp_path / "whole" / "r.json", gen, batch_size=5)
    assert max(calls) > 2, calls
    answers = lambda name: sorted(map(json.dumps, journal_lines(tmp_path / name / "r.json")))  # noqa: E731
    assert answers("capped") == answers("whole")


def test_an_engine_job_is_sized_before_its_media_loader_starts(tiny_layout, tmp_path, monkeypatch):
    """The engine's pool is a share of the free memory: sized once the loader encodes, it would follow the encoder's
    activations, and its compiled step's shapes (which the compile cache keys on) would change from run to run."""
    import model.infer.job as inference
    from model.infer import kept_engine

    events = []
    real_size, real_prefetch = kept_engine.engine_size, inference.Prefetch

    def engine_size(*args, **kwargs):
        events.append("size")
        return real_size(*args, **kwargs)

    class Prefetch(real_prefetch):
        def __init__(self, *args, **kwargs):
            events.append("loader")  # its first loads start here
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kept_engine, "engine_size", engine_size)
    monkeypatch.setattr(inference, "Prefetch", Prefetch)
    rows, _ = load_rows(media_dataset(tmp_path / "data", 3))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False)
    assert run_inference(model, rows, tmp_path / "data", tmp_path / "r.json", gen, batch_size=2).answered == 3
    assert events == ["size", "loader"]


def test_an_engine_job_compiles_its_prefill_only_when_its_prompts_are_long_enough(tiny_layout, tmp_path, monkeypatch):
    """The prefill's compiled layer costs a process its build (a trace and its kernels' first load) and saves a few
    microseconds a prompt position: a job whose prompts hold fewer than COMPILE_PREFILL_POSITIONS positions keeps
    the eager layers (compile_prefill False), a larger one leaves the engine its default (None: where the step is
    compiled, which a GPU's is). Answers do not depend on it."""
    from model.engine import model_runner
    from model.infer import kept_engine

    chosen = []
    real = kept_engine.Engine

    def engine(*args, **kwargs):
        chosen.append(kwargs["compile_prefill"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kept_engine, "Engine", engine)
    rows, _ = load_rows(media_dataset(tmp_path / "data", 3))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    positions = sum(model.prompt_length(r.input, r.instruction, [model.clips(m) for m in r.mm_names]) for r in rows)
    gen = GenerationConfig(max_new_tokens=4, do_sample=False)
    for name, threshold in (("short", positions + 1), ("long", positions)):
        monkeypatch.setattr(model_runner, "COMPILE_PREFILL_POSITIONS", threshold)
        run_inference(model, rows, tmp_path / "data", tmp_path / name / "r.json", gen, batch_size=2)
    assert chosen == [False, None]
    answers = lambda name: sorted(map(json.dumps, journal_lines(tmp_path / name / "r.json")))  # noqa: E731
    assert answers("short") == answers("long")


@pytest.mark.slow
def test_job_killed_while_rows_finish_out_of_order_resumes_exactly(stopping_root, tmp_path):
    """Answers of different lengths (the stopping model) finish out of order in the engine; a job killed mid-run and
    rerun ends with every row answered once, and the same answers as an uninterrupted run."""
    dataset = media_dataset(tmp_path / "data", 40)
    out, clean = tmp_path / "res" / "toy.json", tmp_path / "clean" / "toy.json"
    base = [sys.executable, "-m", "deepresonance_cli.app"]
    cmd = base + infer_args(stopping_root, dataset, out, "--batch-size", "3")
    cmd[cmd.index("6")] = "24"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_journal(out, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [e["id"] for e in journal_lines(out)]
    assert 8 <= len(first) < 40, "the kill should land mid-run"
    rows, _ = load_rows(dataset)
    paths = layout(stopping_root)
    model = load_model(paths.vicuna, paths.delta_dir("alpha"), paths.imagebind)
    submitted = sorted(
        rows, key=lambda r: model.prompt_length(r.input, r.instruction, [model.clips(m) for m in r.mm_names])
    )
    assert first != [r.id for r in submitted][: len(first)], "rows should finish out of submission order"
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    clean_cmd = base + infer_args(stopping_root, dataset, clean, "--batch-size", "3")
    clean_cmd[clean_cmd.index("6")] = "24"
    assert subprocess.run(clean_cmd, env=env, capture_output=True, timeout=300).returncode == 0
    keys = [(e["id"], e["instruction"]) for e in journal_lines(out)]
    assert len(keys) == len(set(keys)) == 40
    assert json.loads(out.read_text()) == json.loads(clean.read_text())


def test_ctrl_c_inside_a_finalizer_still_stops_the_job(tiny_layout, tmp_path):
    """A SIGINT that Python handles while a finalizer runs in the main thread: the default handler's KeyboardInterrupt
    would be raised inside the finalizer and dropped ("Exception ignored"), and the job would run to its end. The
    job stops after the rows that had finished, every one of them journaled."""
    rows, _ = load_rows(media_dataset(tmp_path / "data", 12))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    out = tmp_path / "out" / "r.json"

    class SignalledWhileFinalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))  # Python runs the signal's handler here, inside the finalizer

    def on_progress(n: int) -> None:
        SignalledWhileFinalized()  # finalized at once, in the main thread

    gen = GenerationConfig(max_new_tokens=3, do_sample=False)
    with pytest.raises(KeyboardInterrupt):
        run_inference(model, rows, tmp_path / "data", out, gen, batch_size=2, on_progress=on_progress)
    kept = journal_lines(out)
    assert 1 <= len(kept) < 12 and all("answer" in e or "error" in e for e in kept)


def test_progress_is_told_the_rows_to_answer(tiny_layout, tmp_path):
    rows, _ = load_rows(media_dataset(tmp_path / "data", 6))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=3, do_sample=False)
    out = tmp_path / "out" / "r.json"
    totals, done = [], []
    run_inference(model, rows[:4], tmp_path / "data", out, gen, on_total=totals.append, on_progress=done.append)
    run_inference(model, rows, tmp_path / "data", out, gen, on_total=totals.append, on_progress=done.append)
    assert totals == [4, 2] and sum(done) == 6


@pytest.mark.slow
def test_ctrl_c_keeps_finished_answers_and_says_how_to_go_on(tiny_root, tmp_path):
    """A job far longer than the moment it is interrupted at (on a loaded 2-core machine a 40-row job once ended
    between this test seeing its first rows and sending the signal)."""
    dataset = media_dataset(tmp_path / "data", 400)
    out = tmp_path / "res" / "toy.json"
    cmd = [sys.executable, "-m", "deepresonance_cli.app", *infer_args(tiny_root, dataset, out, "--batch-size", "2")]
    cmd[cmd.index("6")] = "24"
    proc = subprocess.Popen(cmd, env={**os.environ, "COLUMNS": "200"}, stderr=subprocess.PIPE, text=True)
    wait_for_journal(out, 4)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-2000:]  # where the interrupt went, if it was lost
    kept = sum(len(v) for v in json.loads(out.read_text()).values())
    assert 4 <= kept < 400
    assert f"interrupted: {kept} answers are kept in {out}" in " ".join(stderr.split())
    assert "rerun the same command to go on" in " ".join(stderr.split())


def test_feature_cache_goes_beside_a_dataset_file_given_by_path(tiny_root, tmp_path, monkeypatch):
    dataset = media_dataset(tmp_path / "elsewhere", 2)
    monkeypatch.chdir(tmp_path)
    args = infer_args(tiny_root, dataset, tmp_path / "res" / "r.json")
    at = args.index("--cache-dir")
    del args[at : at + 2]
    assert runner.invoke(app, args).exit_code == 0
    assert any((dataset.parent / ".features").iterdir()) and not (tmp_path / "data").exists()


@pytest.fixture
def logged_decoders(monkeypatch):
    """`dr infer` as a long job on a GPU, with DecodeProcesses on threads (the real class and process-side
    functions) logging what was done with them: (the log, the job's answers without decoders)."""
    import concurrent.futures

    from model.media import decoders

    events = []

    class Decoders(decoders.DecodeProcesses):
        def __init__(self, workers):
            events.append("started")
            super().__init__(workers)

        def find(self, *args):
            events.append("found")
            return super().find(*args)

        def write(self, *args):
            events.append("written")
            return super().write(*args)

        def close(self):
            events.append("closed")
            super().close()

    threads = lambda workers, **kwargs: concurrent.futures.ThreadPoolExecutor(workers)  # noqa: E731
    monkeypatch.setattr(decoders, "ProcessPoolExecutor", threads)
    monkeypatch.setattr(decoders, "CALLER_DECODES", 0)  # every group through them, started or not
    monkeypatch.setattr(decoders, "processes_for", lambda files, device: 2)
    monkeypatch.setattr(decoders, "DecodeProcesses", Decoders)
    return events


def test_infer_starts_its_decoding_processes_before_loading_the_model_and_the_job_uses_them(
    tiny_root, tmp_path, monkeypatch, logged_decoders
):
    """`dr infer` starts the decoding processes before it loads the model (their start, a forkserver importing torch,
    overlaps the load), the job looks its media up and stores their features through them instead of starting its
    own, answering as a job without them, and they are closed once, after the job, or when loading fails."""
    import deepresonance_cli.infer as cli
    from model.media import decoders

    events = logged_decoders
    real_load = cli.load

    def load(*args, **kwargs):
        events.append("load")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cli, "load", load)
    dataset = media_dataset(tmp_path / "data", 4)
    out = tmp_path / "res" / "toy.json"
    result = runner.invoke(app, infer_args(tiny_root, dataset, out, "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    assert events[:2] == ["started", "load"] and "found" in events and "written" in events
    assert events.count("started") == 1 and events.count("closed") == 1 and events[-1] == "closed"
    assert len(list((out.parent / "cache").rglob("*.safetensors"))) == 4  # a0.wav, a1.wav, i0.png, v0.mp4
    monkeypatch.setattr(decoders, "processes_for", lambda files, device: 0)
    plain = tmp_path / "plain" / "toy.json"
    assert runner.invoke(app, infer_args(tiny_root, dataset, plain, "--batch-size", "2")).exit_code == 0
    assert json.loads(out.read_text()) == json.loads(plain.read_text())
    monkeypatch.setattr(decoders, "processes_for", lambda files, device: 2)
    events.clear()
    failed = runner.invoke(app, infer_args(tmp_path / "no-ckpt", dataset, tmp_path / "res2" / "toy.json"))
    assert failed.exit_code != 0 and events == ["started", "load", "closed"]


@pytest.mark.slow
def test_infer_starts_its_decoding_processes_before_it_imports_the_models_packages(tiny_root, tmp_path):
    """In a fresh `dr infer` process the decoding processes start before transformers and peft are imported (5 s of
    a 2-core CPU's 7 s of imports), so their start overlaps the imports as well as the model's load; so does the read
    of the LLaMA weights (on a GPU; here with the CPU allowed), which the load then takes."""
    dataset = media_dataset(tmp_path / "data", 2)
    args = infer_args(tiny_root, dataset, tmp_path / "res" / "toy.json")
    code = f"""
import json, sys
import model.media.decoders as decoders
seen = []
real = decoders.start_decoders
def start(files, device):
    seen.append(sorted(m for m in ("peft", "transformers") if m in sys.modules))
    return real(files, device)
decoders.start_decoders = start
import model.io.early_read as early_read
read = []
class Seen(early_read.EarlyRead):
    def __init__(self, *args, **kwargs):
        read.append(sorted(m for m in ("peft", "transformers") if m in sys.modules))
        super().__init__(*args, **kwargs)
    def take(self):
        state = super().take()
        read.append(state is not None)
        return state
early_read.EarlyRead = Seen
from typer.testing import CliRunner
import deepresonance_cli.infer
from deepresonance_cli.app import app
deepresonance_cli.infer.EARLY_READ_DEVICES = ("cuda", "cpu")
result = CliRunner().invoke(app, {args!r})
print(json.dumps({{"exit_code": result.exit_code, "output": result.output[-2000:], "seen": seen, "read": read}}))
"""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, str(Path(__file__).parent)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exit_code"] == 0, report["output"]
    assert report["seen"][0] == []  # the CLI's call (the job asks again, a CPU job's having started none)
    # both reads (the LLaMA's, ImageBind's) begun before the model's packages, then taken by the load (and closed)
    assert report["read"][:4] == [[], [], True, True]


def test_a_feature_file_the_decoding_processes_cannot_write_fails_the_job(
    tiny_layout, tmp_path, monkeypatch, logged_decoders
):
    """A full disk under the feature cache, met by a decoding process: the job fails with that error instead of
    finishing without its features stored. One row, one write: the job's wait for its stores is what sees it."""
    from model.media import decoders

    def full(entry, features, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(decoders, "write_entry", full)
    rows, _ = load_rows(media_dataset(tmp_path / "data", 1))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    cache = FeatureCache.for_encoder(tmp_path / "cache", model.visual_encoder)
    gen = GenerationConfig(max_new_tokens=3, do_sample=False)
    with pytest.raises(OSError, match="No space left"):
        run_inference(model, rows, tmp_path / "data", tmp_path / "out" / "r.json", gen, batch_size=2, cache=cache)
    assert "written" in logged_decoders and logged_decoders[-1] == "closed"


@pytest.mark.slow
def test_a_job_decoding_in_processes_answers_as_one_decoding_in_threads(tiny_layout, tmp_path, monkeypatch):
    """A long GPU job decodes its media in processes (model/media/decoders.py); forced here on the CPU, the same rows
    (audio, image, video, a corrupt file) get the same answers and the same one-line errors as with threads."""
    from model.media import decoders

    folder = tmp_path / "data"
    rows, _ = load_rows(media_dataset(folder, 8))
    write_garbage(folder / "broken.wav")
    rows += load_rows(write_dataset(folder, [make_row("corrupt", [("audio", "broken.wav")])], "bad.json"))[0]
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False)
    threads = run_inference(model, rows, folder, tmp_path / "threads" / "r.json", gen, batch_size=4)
    monkeypatch.setattr(decoders, "processes_for", lambda files, device: 2)
    monkeypatch.setattr(decoders, "CALLER_DECODES", 0)  # every file through the pool, started or not
    processes = run_inference(model, rows, folder, tmp_path / "processes" / "r.json", gen, batch_size=4)
    assert threads.answered == processes.answered == 8
    assert processes.failed == threads.failed and "broken.wav" in processes.failed[0]
    answers = lambda name: sorted(map(json.dumps, journal_lines(tmp_path / name / "r.json")))  # noqa: E731
    assert answers("processes") == answers("threads")
