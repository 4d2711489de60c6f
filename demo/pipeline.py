"""`dr demo` as a function: synthetic data -> tiny model -> stage 1 and stage 2 -> held-out answers -> metrics,
and a held-out multiple-choice set scored by likelihood (with the audio, and with silence in its place).

It runs the same code paths as the real recipe (model/train/loop.py, model/infer/job.py, eval/), only smaller: the
tiny checkpoint set of ckpt/tiny.py (random ImageBind and LLaMA, a tokenizer trained on the demo's texts) and the
synthetic dataset of demo/data.py. The "untrained" model is the tiny set's random delta, answered and scored
exactly like the trained one, so the before/after difference is what the two training stages did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt.layout import layout
from ckpt.tiny import write_tiny_set
from demo import data as demo_data
from model.config import GenerationConfig, TrainConfig
from model.data.catalog import load_rows

# Recipe overrides for a tiny random LLM on CPU: short runs with a high peak lr. Stage 1 aligns the projector (and
# fusion) with the LLM frozen; the embeddings train in both stages, as the original's resize left them trainable.
# Stage 2 adds LoRA. Beta's random post-norm fusion layer wants a lower lr and more steps.
_COMMON = dict(micro_batch_size=16, warmup_type="linear", train_embeddings=True, log_every=100)
STAGE_OPTIONS = {
    "alpha": {1: dict(_COMMON, max_steps=100, lr=1e-2), 2: dict(_COMMON, max_steps=1000, lr=5e-3)},
    "beta": {1: dict(_COMMON, max_steps=100, lr=2e-3), 2: dict(_COMMON, max_steps=2000, lr=1e-3)},
}
QUICK_FRACTION = 0.4  # of the steps, with the smaller quick dataset
MAX_NEW_TOKENS = 40
INFER_BATCH = 16


@dataclass
class DemoResult:
    """Metrics per model ("untrained", "trained"): {"coco": {...}, "music-llm": {...}, "attributes": {...},
    "choice": {mode: accuracy, "chance": rate}}."""

    out: Path
    metrics: dict[str, dict[str, dict[str, float | None]]]
    notes: list[str]
    seconds: dict[str, float]  # wall time of each step
    paths: dict[str, Path]  # what was written where
    commands: list[tuple[str, str]]  # (step, shell command to redo it by hand)
    samples: list[dict[str, str]] = field(default_factory=list)  # a few held-out rows with both answers


def _train(
    stage: int,
    datasets: list[Path],
    variant: str,
    ckpt: Path,
    out: Path,
    cache: Path,
    init: Path | None,
    seed: int,
    quick: bool,
    progress: bool,
) -> str:
    """One training stage through model/train/loop.py. Returns the `dr train` arguments that redo it: its options go
    to a JSON file for --config, and the ones `dr train` has flags for are also given as flags (flags win)."""
    from model.train.loop import train

    options = {**STAGE_OPTIONS[variant][stage], "datasets": [str(d) for d in datasets], "seed": seed}
    if quick:
        options["max_steps"] = int(options["max_steps"] * QUICK_FRACTION)
    config = out.with_name(f"{out.name}_config.json")
    config.write_text(json.dumps(options, indent=2))
    paths = layout(ckpt)
    train(
        TrainConfig.for_stage(stage, **options),
        progress=progress,
        variant=variant,
        base=paths.vicuna,
        imagebind=paths.imagebind,
        out=out,
        init=init,
        cache_dir=cache,
        overwrite=True,  # the demo rebuilds its folder from the seed: an earlier demo's run is replaced
    )
    flags = (
        f"--max-steps {options['max_steps']} --lr {options['lr']} --micro-batch {options['micro_batch_size']} "
        f"--seed {seed} {'--train-embeddings' if options['train_embeddings'] else '--no-train-embeddings'}"
    )
    init_flag = f" --init {init}" if init else ""
    return f"--stage {stage} --config {config} {flags}{init_flag} --out {out} --overwrite"


def _answer(ckpt: Path, delta: Path, variant: str, dataset: Path, cache: Path, out_json: Path) -> dict:
    """Greedy answers for every held-out row (a fresh result file: old journals are removed first)."""
    from model.infer.job import run_inference
    from model.infer.journal import journal_paths, write_results
    from model.media.features import FeatureCache
    from model.network.checkpoint import load_model

    paths = layout(ckpt)
    model = load_model(paths.vicuna, delta, paths.imagebind, variant)
    model.merge_lora()
    rows, errors = load_rows(dataset)
    if errors:
        raise ValueError(f"demo dataset has invalid rows: {errors[0]}")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for journal in journal_paths(out_json):
        journal.unlink()
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    summary = run_inference(
        model, rows, dataset.parent, out_json, gen, INFER_BATCH, FeatureCache.for_encoder(cache, model.visual_encoder)
    )
    if summary.failed:
        raise ValueError(f"demo inference failed on {len(summary.failed)} row(s): {summary.failed[0]}")
    return write_results(out_json, rows)


def _choice(ckpt: Path, delta: Path, variant: str, data: demo_data.DemoData, cache: Path, controls: Path) -> dict:
    """Likelihood multiple choice on the held-out musicmc rows (model/generate/likelihood.py), with the real audio
    and with silence in its place: {mode: eval.choice report}."""
    from eval.choice import ablate, control_audio, mode_key, score_likelihood
    from model.data.multiple_choice import load_choice_rows
    from model.generate.likelihood import score_rows
    from model.media.features import FeatureCache
    from model.network.checkpoint import load_model

    paths = layout(ckpt)
    model = load_model(paths.vicuna, delta, paths.imagebind, variant)
    model.merge_lora()
    rows, errors = load_choice_rows(data.choice_test)
    if errors:
        raise ValueError(f"demo multiple-choice set has invalid rows: {errors[0]}")
    features = FeatureCache.for_encoder(cache, model.visual_encoder)
    out: dict[str, dict] = {}
    for audio in ("real", "silence"):
        asked = rows if audio == "real" else ablate(rows, control_audio("silence", controls))
        scores = score_rows(model, asked, data.root, features, INFER_BATCH)
        out.update({mode_key(k, audio): v for k, v in score_likelihood(scores, asked).items()})
    return out


def _score(predictions: dict, dataset: Path) -> tuple[dict, list[str], dict]:
    """eval/'s coco and music-llm protocols plus the demo's attribute check -> (metrics, notes, eval report)."""
    import eval as metrics
    from eval.inputs import pair

    rows = metrics.load_json(dataset)
    report = metrics.evaluate(predictions, rows, "all")
    cands, refs, _ = pair(predictions, rows)
    return {**report["metrics"], "attributes": demo_data.attribute_accuracy(cands, refs)}, report["notes"], report


def _chance(choice: dict) -> float:
    return next(iter(choice["trained"].values()))["chance"]


def run_demo(
    out: str | Path = "runs/demo",
    variant: str = "alpha",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    on_step: Callable[[str], None] = lambda step: None,
) -> DemoResult:
    """The whole pipeline under `out`; `on_step(name)` is called as each step starts. Deterministic from `seed`."""
    from eval import report as eval_report

    out = Path(out)
    data_dir, ckpt, cache, results = out / "data", out / "ckpt", out / "features", out / "results"
    stage1, stage2 = out / f"{variant}_stage1", out / f"{variant}_stage2"
    seconds: dict[str, float] = {}

    def step(name: str) -> None:
        seconds[name] = time.perf_counter()
        on_step(name)

    step("data")
    data = demo_data.build(data_dir, seed, quick)
    step("tiny model")
    write_tiny_set(ckpt, corpus=data.texts(), seed=seed)
    untrained_delta = layout(ckpt).delta_dir(variant)
    step("answer (untrained)")
    before = _answer(ckpt, untrained_delta, variant, data.test, cache, results / f"untrained_{variant}.json")
    step("stage 1")
    train1 = _train(1, data.stage1, variant, ckpt, stage1, cache, None, seed, quick, progress)
    step("stage 2")
    train2 = _train(2, data.stage1 + data.stage2, variant, ckpt, stage2, cache, stage1, seed, quick, progress)
    step("answer (trained)")
    after = _answer(ckpt, stage2, variant, data.test, cache, results / f"trained_{variant}.json")
    step("multiple choice")
    choice = {
        name: _choice(ckpt, delta, variant, data, cache, results)
        for name, delta in (("untrained", untrained_delta), ("trained", stage2))
    }
    step("evaluate")
    scored = {name: _score(pred, data.test) for name, pred in (("untrained", before), ("trained", after))}
    choice_report = {
        "dataset": data.choice_test.stem,
        "questions": next(iter(choice["trained"].values()))["n"],
        "results": {f"{n}_{variant}": c for n, c in choice.items()},
        "reference": [],
    }
    report_paths = eval_report.write(
        {f"{n}_{variant}": s[2] for n, s in scored.items()},
        results / f"eval_report_{variant}.json",
        {"dataset": str(data.test), "protocol": "all"},
        choice_report,
    )
    seconds["end"] = time.perf_counter()
    names = list(seconds)
    seconds = {a: seconds[b] - seconds[a] for a, b in zip(names, names[1:], strict=False)}

    rows = json.loads(data.test.read_text())
    samples = [
        {
            "instruction": r["instruction"],
            "reference": r["output"],
            "untrained": before[r["id"]][r["instruction"]],
            "trained": after[r["id"]][r["instruction"]],
        }
        for r in rows[:: max(1, len(rows) // 6)]
    ]
    notes = list(dict.fromkeys(n for s in scored.values() for n in s[1]))
    common = f"--ckpt-root {ckpt} --cache-dir {cache}"
    infer = f"dr infer --dataset {data.test} --variant {variant} {common} --greedy --max-new-tokens {MAX_NEW_TOKENS}"
    commands = [
        ("stage 1", f"dr train --variant {variant} {train1} {common}"),
        ("stage 2", f"dr train --variant {variant} {train2} {common}"),
        ("answer (untrained)", f"{infer} --delta {untrained_delta} --out {results / f'untrained_{variant}.json'}"),
        ("answer (trained)", f"{infer} --delta {stage2} --out {results / f'trained_{variant}.json'}"),
        (
            "evaluate",
            f"dr eval {results / f'untrained_{variant}.json'} {results / f'trained_{variant}.json'} "
            f"--dataset {data.test} --protocol all --out {report_paths['json']}",
        ),
        (
            "multiple choice (trained)",
            f"dr eval --dataset {data.choice_test} --mode likelihood --control silence --variant {variant} "
            f"--delta {stage2} {common} --answers-dir {results} --out {results / f'choice_report_{variant}.json'}",
        ),
    ]
    paths = {
        "data": data_dir,
        "checkpoints (tiny set)": ckpt,
        "feature cache": cache,
        "stage 1 delta": stage1,
        "stage 2 delta": stage2,
        "answers": results,
        "eval report": report_paths["json"],
    }
    metrics = {
        name: {**s[0], "choice": {**{k: v["accuracy"] for k, v in choice[name].items()}, "chance": _chance(choice)}}
        for name, s in scored.items()
    }
    return DemoResult(out, metrics, notes, seconds, paths, commands, samples)
