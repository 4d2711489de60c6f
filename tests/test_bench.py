"""`dr bench infer`'s report: `bench_infer` run for real with tiny sizes on the CPU, its ratios and MusicCaps
projection recomputed by hand from the seconds it measured, and the CLI shell around it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from benchmarks import infer as infer_bench
from benchmarks import job as job_bench
from benchmarks.engine import bench_engine
from benchmarks.job import bench_job
from benchmarks.job_workload import floor, job_model, mix_rows
from benchmarks.workloads import realistic_lengths
from deepresonance_cli import bench as bench_cli
from deepresonance_cli.app import app
from model.config import LLAMA_TINY
from model.engine.kv_cache import BLOCK
from model.network.deepresonance import Example

NEW_TOKENS = 8
MUSICCAPS_ROWS = 2858  # the MusicCaps test split the projection is for
runner = CliRunner()


@pytest.fixture(scope="module")
def report() -> dict:
    """One real run: the original's way at batch 1, `generate` at batches 1 and 3, the static loop at batch 31
    (2858 / 31 leaves a remainder of 0.81 of a batch, so the last, partial batch shows in the projection). One
    intra-op thread: the ops are tiny, and threads only contend with other jobs on these cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return infer_bench.bench_infer(
            (1, 3),
            (31,),
            log=lambda line: None,
            sizes=LLAMA_TINY,
            encoder_size="tiny",
            device="cpu",
            new_tokens=NEW_TOKENS,
        )
    finally:
        torch.set_num_threads(threads)


def close(reported: float, derived: float) -> bool:
    """Equal up to the report's rounding: 0.1 for rates, ratios and projected seconds, and seconds to the microsecond,
    which on a fast machine (a ~1.5 ms encoder call) moves a rate derived from them by up to about 0.05%."""
    return abs(reported - derived) <= 0.05 + 1e-3 * abs(derived)


def test_ratios_and_musiccaps_projection_follow_from_the_measured_seconds(report):
    """Tokens/s of a decode row is tokens made over its seconds, and its ratio to the original is that over the
    original's (batch 1) tokens/s; clips/s is 3 clips per audio row over the encoder's seconds. The MusicCaps job:
    dr encodes 2858 rows x 3 clips at its batched rate, then decodes ceil(2858 / b) batches at its fastest path's
    seconds per batch of b; the original encodes and decodes one row at a time, 2858 times."""
    rows = report["results"]
    assert report["device"] == "cpu" and len(rows) == 6
    original, decoders, (enc_original, enc_dr) = rows[0], rows[:4], rows[4:]
    s0 = original["seconds"]
    assert original["batch"] == 1 and original["name"].startswith("original")
    for r in decoders:
        assert close(r["tokens_per_s"], NEW_TOKENS * r["batch"] / r["seconds"]), r
        assert close(r["rows_per_s"], r["batch"] / r["seconds"]), r
        assert close(r["ratio_to_original"], r["batch"] * s0 / r["seconds"]), r
    assert [r["batch"] for r in decoders[1:]] == [1, 3, 31]
    assert (enc_original["batch"], enc_dr["batch"]) == (1, 64)
    assert close(enc_original["clips_per_s"], 3 / enc_original["seconds"])
    assert close(enc_dr["clips_per_s"], 64 * 3 / enc_dr["seconds"])

    best = max(decoders[1:], key=lambda r: r["batch"] / r["seconds"])
    dr_job = (
        MUSICCAPS_ROWS * 3 * enc_dr["seconds"] / (64 * 3) + math.ceil(MUSICCAPS_ROWS / best["batch"]) * best["seconds"]
    )
    original_job = MUSICCAPS_ROWS * (enc_original["seconds"] + s0)
    projected = report["musiccaps_job_seconds_steady"]
    assert projected["dr_batch"] == best["batch"]
    assert close(projected["dr"], dr_job) and close(projected["original"], original_job)


def test_bench_infer_cli_writes_the_report_and_prints_every_measure(report, monkeypatch, tmp_path):
    """The shell around `bench_infer` (the run above: this machine has no GPU to give it): the batches are parsed
    and passed on, the JSON lands where asked, and the table shows each measure of each path and the projection."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(infer_bench, "bench_infer", lambda *batches: asked.append(batches) or report)
    out = tmp_path / "infer.json"
    result = runner.invoke(app, ["bench", "infer", "--out", str(out), "--batches", "1,3", "--static-batches", "31"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == report and asked == [((1, 3), (31,))]
    for r in report["results"]:
        for key in ("seconds", "tokens_per_s", "rows_per_s", "clips_per_s", "ratio_to_original", "first_call_seconds"):
            if r[key]:
                assert str(r[key]) in result.output, (r["name"], key)
    for value in report["musiccaps_job_seconds_steady"].values():
        assert str(value) in result.output


# `bench_engine` at tiny sizes on the CPU: 12 rows through 4 slots, a 96-token budget
TINY_ENGINE_BENCH = dict(rows=12, slots=4, budget=96, sizes=LLAMA_TINY, device="cpu", log=lambda line: None)
PROMPTS = ("short", "long", "varied")


def test_bench_engine_runs_every_row_to_its_own_length_and_times_one_slot(tmp_path):
    """`bench_engine` for real on the CPU (tiny sizes, the engine only): each job's useful tokens are the drawn
    lengths clipped to the budget (the engine itself checks every row ended exactly there), start-up ends inside the
    job, and the one-slot figure is reported."""
    budget = TINY_ENGINE_BENCH["budget"]
    report = bench_engine(**TINY_ENGINE_BENCH, tails=(0.0, 0.25), workdir=str(tmp_path), only_engine=True)
    for job in report["jobs"]:
        (engine,) = job["results"]
        assert engine["useful_tokens"] == sum(min(n, budget) for n in realistic_lengths(12, job["tail"]))
        assert 0 < engine["startup_s"] <= engine["wall_s"]
    assert report["engine_batch1"]["tokens_per_s"] > 0 and report["engine_batch1"]["first_call_s"] > 0
    assert report["engine_startup_s"] > 0 and report["engine_startup_s"] >= report["engine_build_s"]


def test_bench_engine_runs_the_same_lengths_on_long_and_varied_prompts(tmp_path):
    """The engine also answers the first job's lengths on multiple-choice-sized prompts (170 positions, within a
    filler word) and on prompts drawn from 16-210 positions, every row ended at its own length (engine_run checks)."""
    report = bench_engine(**TINY_ENGINE_BENCH, tails=(0.0,), workdir=str(tmp_path), only_engine=True, prompts=PROMPTS)
    shapes = report["prompt_shapes"]
    assert set(shapes) == {"long", "varied"}
    assert 168 <= shapes["long"]["mean_prompt_positions"] <= 172
    low, high = shapes["varied"]["prompt_positions_range"]
    assert 14 <= low < 40 and 150 < high <= 212  # 12 draws from 16-210, text-only rows under an audio prompt's length
    useful = sum(min(n, TINY_ENGINE_BENCH["budget"]) for n in realistic_lengths(12, 0.0))
    assert all(r["useful_tokens"] == useful and r["useful_tokens_per_s"] > 0 for r in shapes.values())
    pool = round(report["pool_blocks"] * BLOCK / 1024, 1)  # 1 KiB a tiny position (2 layers, a key and a value of 64)
    assert all(r["pool_mib"] == pool > 0 for r in shapes.values())


@pytest.mark.slow
def test_bench_engine_compares_every_decoder_on_the_same_rows(tmp_path):
    """The whole table on the CPU (tiny sizes): every decoder runs each job (the static loop the no-tail one only)
    with the useful tokens of its own rows, and both batch-1 figures are there for the side-by-side ratio."""
    budget = TINY_ENGINE_BENCH["budget"]
    report = bench_engine(**TINY_ENGINE_BENCH, compare_rows=(4, 4, 4), workdir=str(tmp_path))
    for job in report["jobs"]:
        lengths = [min(n, budget) for n in realistic_lengths(12, job["tail"])]
        useful = {r["decoder"]: r["useful_tokens"] for r in job["results"]}
        expected = {"engine (sdpa)": sum(lengths), "generate (batch 64)": sum(lengths[:4])}
        expected["transformers continuous batching"] = sum(lengths[:4])
        if not job["tail"]:
            expected["static (batch 64)"] = sum(lengths[:4])
        assert useful == expected
    for key in ("engine_batch1", "static_batch1"):
        assert report[key]["tokens_per_s"] > 0


# `bench_job` at tiny sizes on the CPU: 12 rows of each mix (the catalog's has image and video rows), 4 slots,
# answers of at most 12 tokens, one-second media
TINY_JOB_BENCH = dict(
    rows=12, batch=4, budget=12, seconds=1.0, sizes=LLAMA_TINY, encoder_size="tiny", device="cpu", log=lambda line: None
)


@pytest.fixture(scope="module")
def job_report(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench_job(**TINY_JOB_BENCH, workdir=str(tmp_path_factory.mktemp("job")))
    finally:
        torch.set_num_threads(threads)


def test_bench_job_answers_every_row_of_each_mix_to_its_oracle_length(job_report):
    """Both mixes, musiccaps first; each whole job answers all 12 rows and makes exactly the tokens of the rows'
    drawn lengths (clipped to the budget: the musiccaps rows' 64 become 12), the engine alone runs the same rows
    and tokens, the floor is positive, and the ratios are the seconds' ratios. The musiccaps mix keeps the fields
    of earlier reports."""
    assert list(job_report["mixes"]) == ["musiccaps", "catalog"]
    for name, mix in job_report["mixes"].items():
        data, drawn = mix_rows(12, name)
        useful = sum(min(n, 12) for n in drawn)
        whole, alone, least = mix["whole_job"], mix["engine_only"], mix["floor"]
        assert whole["rows"] == alone["rows"] == 12 and whole["failed"] == 0, name
        cached = mix["whole_job_features_cached"]
        files = {(m, path) for r in data for m, path in zip(r.mm_names, r.mm_paths, strict=True)}
        assert whole["encoded_files"] == len(files) and cached["encoded_files"] == 0, name  # the rerun: all cached
        assert cached["rows"] == 12 and cached["generated_tokens"] == useful and cached["failed"] == 0, name
        assert mix["useful_tokens"] == whole["useful_tokens"] == alone["useful_tokens"] == least["useful_tokens"]
        assert whole["generated_tokens"] == useful == mix["useful_tokens"], name
        assert 0 < whole["first_rows_s"] <= whole["wall_s"] and 0 < alone["first_rows_s"] <= alone["wall_s"]
        assert close(whole["useful_tokens_per_s"], useful / whole["wall_s"])
        assert close(alone["useful_tokens_per_s"], useful / alone["wall_s"])
        assert whole["slots"] == alone["slots"] == least["slots"] == 4
        # a tiny position: a key and a value of 64 fp32 numbers in each of 2 layers, 1 KiB; no CUDA, no peak
        assert whole["pool_mib"] == alone["pool_mib"] == round(whole["pool_blocks"] * BLOCK / 1024, 1) > 0, name
        assert "peak_reserved_mib" not in whole, name
        assert least["floor_s"] > 0 and close(least["useful_tokens_per_s"], useful / least["floor_s"])
        assert close(mix["whole_job_over_engine_only"], whole["wall_s"] / alone["wall_s"])
        assert close(mix["whole_job_over_floor"], whole["wall_s"] / least["floor_s"])
    caps = job_report["mixes"]["musiccaps"]["whole_job"]
    assert job_report["wall_seconds"] == caps["wall_s"] and job_report["answered"] == 12
    assert job_report["rows_per_s"] == caps["rows_per_s"] and job_report["failed"] == 0


def test_floor_of_two_rows_by_hand(tmp_path, monkeypatch):
    """Two rows (a caption of 3 tokens, an image+audio question of 5) on 4 slots: 8 tokens are 2 decode steps, each
    reading every weight once; the rows read their prompt plus the tokens so far at each token; each token and each
    prompt position is 2 FLOP per matrix weight (not the input embedding, a lookup). Decoding takes the longer of its
    reads and its matrix work: the reads at the H200's rates, the matrix work on a card slowed 10^6 times. Weights
    counted from the tiny shapes, prompt positions from `prepare`."""
    import benchmarks.job_workload as workload

    model = job_model(tmp_path, LLAMA_TINY, "tiny", "cpu")
    data = [mix_rows(1, "musiccaps")[0][0], next(r for r in mix_rows(12, "catalog")[0] if r.input == "<Image><Audio>")]
    features = {
        "audio": torch.zeros(3, model.visual_encoder.out_dim),
        "image": torch.zeros(1, model.visual_encoder.out_dim),
    }
    examples = [Example(r.input, r.instruction, [(m, features[m]) for m in r.mm_names]) for r in data]
    p1, p2 = model.prepare(examples).sizes
    h, ffn, layers = (LLAMA_TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    vocab = len(model.tokenizer)
    weights = 2 * vocab * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h  # embed, lm_head, layers, final norm
    matrix = weights - vocab * h
    position_bytes = 2 * layers * h * 4  # K and V, fp32
    read = sum(p1 + k for k in range(1, 4)) + sum(p2 + k for k in range(1, 6))
    for flops in (790e12, 790e6):
        monkeypatch.setattr(workload, "MATRIX_FLOPS", flops)
        seconds = {
            "decode_weight_reads_s": 2 * weights * 4 / 4.3e12,
            "decode_cache_reads_s": read * position_bytes / 4.3e12,
            "decode_matrix_s": 8 * 2 * matrix / flops,
            "prefill_matrix_s": (p1 + p2) * 2 * matrix / flops,
        }
        got = floor(model, data, [3, 5], slots=4)
        for key, expected in seconds.items():
            assert got[key] == pytest.approx(expected, rel=1e-3), key
        reads = seconds["decode_weight_reads_s"] + seconds["decode_cache_reads_s"]
        decoding = reads if flops == 790e12 else seconds["decode_matrix_s"]
        assert decoding == max(reads, seconds["decode_matrix_s"])  # each case takes its branch
        assert got["floor_s"] == pytest.approx(decoding + seconds["prefill_matrix_s"], rel=1e-3)
    assert got["mean_prompt_positions"] == pytest.approx((p1 + p2) / 2, abs=0.05) and got["useful_tokens"] == 8


def test_bench_job_cli_writes_the_report_and_prints_every_figure(job_report, monkeypatch, tmp_path):
    """The shell around `bench_job`: `--mix` picks the mixes, the JSON lands where asked, and the table shows each
    mix's whole job, engine alone and floor with their ratios."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_cli.console, "width", 160)  # the table's every column in full
    monkeypatch.setattr(job_bench, "bench_job", lambda **kw: asked.append(kw["mixes"]) or job_report)
    out = tmp_path / "job.json"
    result = runner.invoke(app, ["bench", "job", "--out", str(out), "--mix", "catalog"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == job_report and asked == [("catalog",)]
    runner.invoke(app, ["bench", "job", "--out", str(out)])
    assert asked[-1] == ("musiccaps", "catalog")
    for mix in job_report["mixes"].values():
        for figure in (mix["whole_job_over_engine_only"], mix["whole_job_over_floor"], mix["floor"]["floor_s"]):
            assert str(figure) in result.output
        for measure in ("whole_job", "engine_only", "floor"):
            assert str(mix[measure]["useful_tokens_per_s"]) in result.output
    assert runner.invoke(app, ["bench", "job", "--mix", "jazz"]).exit_code != 0
