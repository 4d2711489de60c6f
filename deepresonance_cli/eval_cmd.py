"""`dr eval`: score prediction files against a dataset's references, and answer multiple-choice rows with the model;
the metrics live in `eval/`, the likelihood scorer in `model/generate/likelihood.py`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import eval as metrics
from deepresonance_cli.errors import fail
from eval import report


class Protocol(str, Enum):
    music_llm = "music-llm"
    coco = "coco"
    all = "all"


class Mode(str, Enum):
    generative = "generative"
    likelihood = "likelihood"


class Control(str, Enum):
    silence = "silence"
    noise = "noise"


Opt = typer.Option


def eval_command(
    predictions: Annotated[
        list[Path] | None,
        typer.Argument(exists=True, dir_okay=False, help="{id: {instruction: answer}} JSON files (dr infer's)."),
    ] = None,
    dataset: Annotated[str, Opt(help="A test set of the catalog (model/data/catalog.py) or a rows JSON file.")] = ...,
    data_root: Annotated[Path, Opt(help="Root of the catalog's dataset files.")] = Path("data"),
    protocol: Annotated[Protocol, Opt(help="music-llm (peer tables), coco (captioning) or all.")] = Protocol.music_llm,
    bertscore_model: Annotated[str, Opt(help="Hub name (local cache) or model folder.")] = metrics.DEFAULT_MODEL,
    out: Annotated[Path, Opt(help="JSON report; .md and .png are written beside.")] = Path("results/eval_report.json"),
    mode: Annotated[
        list[Mode] | None,
        Opt(
            help="Answer the multiple-choice rows (or, for a classification set such as gtzan, its label set) with "
            "the model: generative (options in the prompt, answer parsed) or likelihood (each option's "
            "log-probability); repeat for both.",
        ),
    ] = None,
    control: Annotated[
        list[Control] | None,
        Opt(help="Also ask the same questions with silence or noise instead of the audio; repeat for both."),
    ] = None,
    variant: Annotated[str, Opt(help="alpha or beta (with --mode).")] = "alpha",
    ckpt_root: Annotated[Path, Opt(help="Checkpoint root laid out as the original's ckpt/ folder.")] = Path("ckpt"),
    base: Annotated[Path | None, Opt(help="Vicuna folder (default: under --ckpt-root).")] = None,
    delta: Annotated[Path | None, Opt(help="Delta folder (default: the variant's under --ckpt-root).")] = None,
    device: Annotated[str | None, Opt(help="cpu, cuda, cuda:1 (default: cuda when available).")] = None,
    dtype: Annotated[str | None, Opt(help="float32, bfloat16 or float16 (default: bfloat16 on CUDA).")] = None,
    batch_size: Annotated[int | None, Opt(help="Rows (generative) or option sequences (likelihood) per batch.")] = None,
    media_root: Annotated[Path | None, Opt(help="Media folder (default: the catalog's).")] = None,
    cache_dir: Annotated[
        Path | None, Opt(help="Encoder-feature cache (default: .features beside the dataset file).")
    ] = None,
    max_new_tokens: Annotated[int, Opt(help="Generative answers: greedy, at most this many tokens.")] = 32,
    limit: Annotated[int | None, Opt(help="Only the first N multiple-choice rows.")] = None,
    answers_dir: Annotated[Path, Opt(help="Where generative answers go (resumable, as dr infer).")] = Path("results"),
    reference_table: Annotated[
        bool, Opt(help="Show other models' published accuracy (with sources), marked as not computed here.")
    ] = False,
    reference_file: Annotated[
        Path | None, Opt(help="More published rows: a JSON list of {dataset, model, accuracy (%), source}.")
    ] = None,
) -> None:
    """Score prediction files side by side and/or answer multiple-choice rows: table here, JSON + Markdown + PNG."""
    console = Console()
    console = console if console.is_terminal else Console(width=200)  # logs and pipes get whole tables
    from model.data.catalog import DatasetError, resolve_dataset

    try:
        spec = resolve_dataset(dataset, data_root, media_root, split="test")
    except DatasetError as e:
        raise typer.BadParameter(str(e), param_hint="--dataset") from None
    path = spec.json_path
    if not path.is_file():
        raise typer.BadParameter(f"no dataset file {path} (`dr data download` fetches them)", param_hint="--dataset")
    predictions, modes, controls = predictions or [], mode or [], control or []
    if not predictions and not modes:
        raise typer.BadParameter("give prediction files, or --mode to answer with the model", param_hint="PREDICTIONS")
    from model.data.multiple_choice import classification_rows, has_choices, load_choice_rows

    multiple_choice = has_choices(path)
    if multiple_choice:
        choice_rows, errors = load_choice_rows(path)
        for line in errors:
            console.print(f"skipped invalid row {line}", style="yellow", markup=False)
    else:
        choice_rows = classification_rows(_rows(path))
    choice_rows = choice_rows[:limit] if limit is not None else choice_rows
    if modes and not choice_rows:
        raise typer.BadParameter(f"{path}: no multiple-choice or label-set rows to answer", param_hint="--mode")

    names = [p.stem if [q.stem for q in predictions].count(p.stem) == 1 else str(p) for p in predictions]
    loaded = {n: metrics.read_predictions(p) for n, p in zip(names, predictions, strict=True)}  # all checked first
    runs = {}
    if not multiple_choice:  # a benchmark's metric is its accuracy; text metrics are for captioning-style sets
        rows = metrics.read_references(path)
        for (n, preds), p in zip(loaded.items(), predictions, strict=True):
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task(f"{p.name}: {len(rows)} rows", total=None)

                def step(name: str, done: int, total: int, task=task, progress=progress, p=p) -> None:
                    progress.update(task, completed=done, total=total, description=f"{p.name}: {name}")

                runs[n] = metrics.evaluate(preds, rows, protocol.value, bertscore_model, on_step=step)
            if runs[n]["counts"].get("not_text"):
                first = runs[n]["counts"]["not_text_rows"][0]
                console.print(
                    f"{p}: {runs[n]['counts']['not_text']} answer(s) are not text and count as missing "
                    f"(first: id {first['id']!r} holds a {first['type']})",
                    style="yellow",
                    markup=False,
                )
    results: dict[str, dict] = {}
    if choice_rows:
        from eval.choice import score_generative

        for n, preds in loaded.items():
            results[n] = {"generative": score_generative(preds, choice_rows)}
    if modes:
        label = variant if delta is None else delta.name
        options = dict(ckpt_root=ckpt_root, base=base, delta=delta, device=device, dtype=dtype, batch_size=batch_size)
        cache = cache_dir or spec.json_path.parent / ".features"
        results[label] = answer_with_model(
            choice_rows, spec, modes, controls, variant, label, options, cache, max_new_tokens, answers_dir, console
        )
    choice = None
    if results:
        from eval.choice import references

        extra = metrics.load_json(reference_file) if reference_file else []
        if not isinstance(extra, list) or not all(isinstance(r, dict) for r in extra):
            fail(f"{reference_file}: expected a JSON list of {{dataset, model, accuracy, source}} objects")
        wanted = {spec.name, spec.name.removesuffix("_test")}
        published = [r for name in wanted for r in references(name, extra)] if reference_table or extra else []
        choice = {"dataset": spec.name, "questions": len(choice_rows), "results": results, "reference": published}

    for t in report.tables(runs) + (report.choice_tables(choice) if choice else []):
        console.print(t)
    for note in dict.fromkeys(n for r in runs.values() for n in r["notes"]):
        console.print(note, style="yellow", markup=False)
    files = report.write(runs, out, {"dataset": str(path), "protocol": protocol.value}, choice)
    console.print("wrote " + ", ".join(str(f) for f in files.values()))


def _rows(path: Path) -> list:
    from model.data.catalog import load_rows

    return load_rows(path)[0]


def answer_with_model(
    choice_rows: list,
    spec,
    modes: list[Mode],
    controls: list[Control],
    variant: str,
    label: str,
    options: dict,
    cache_dir: Path,
    max_new_tokens: int,
    answers_dir: Path,
    console: Console,
) -> dict[str, dict]:
    """Every asked (mode, audio) pair on the same questions: {mode key: eval.choice report}. Generative answers are
    greedy and go through `run_inference` (journal, resume, media errors) into `<answers-dir>/<dataset>_<label>_choice
    [_<control>].json`; likelihood scores are computed afresh."""
    from deepresonance_cli.infer import default_device, load
    from eval.choice import ablate, control_audio, mode_key, score_generative, score_likelihood
    from model.config import GenerationConfig
    from model.engine.sizing import default_slots
    from model.generate.likelihood import score_rows
    from model.infer.job import run_inference
    from model.infer.journal import write_results
    from model.infer.kept_engine import KeptEngine
    from model.media.features import FeatureCache

    device = default_device(options["device"])
    model = load(options["ckpt_root"], variant, options["base"], options["delta"], device, options["dtype"])
    batch_size = options["batch_size"] or default_slots(device, "eval")
    cache = FeatureCache.for_encoder(cache_dir, model.visual_encoder)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    kept = KeptEngine()  # the real audio's and each control's answers: one engine where their shapes agree
    out: dict[str, dict] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        for audio in ["real", *(c.value for c in controls)]:
            rows = choice_rows if audio == "real" else ablate(choice_rows, control_audio(audio, answers_dir))
            for m in modes:
                task = progress.add_task(f"{spec.name}: {mode_key(m.value, audio)}", total=len(rows))
                advance = lambda n, task=task: progress.advance(task, n)  # noqa: E731
                if m is Mode.likelihood:
                    scores = score_rows(model, rows, spec.media_root, cache, batch_size, on_progress=advance)
                    out.update({mode_key(k, audio): v for k, v in score_likelihood(scores, rows).items()})
                else:
                    suffix = "" if audio == "real" else f"_{audio}"
                    answers = answers_dir / f"{spec.name}_{label}_choice{suffix}.json"
                    plain = [r.row for r in rows]
                    run_inference(
                        model, plain, spec.media_root, answers, gen, batch_size, cache, on_progress=advance, kept=kept
                    )
                    out[mode_key("generative", audio)] = score_generative(write_results(answers, plain), rows)
                    console.print(f"answers: {answers}", highlight=False)
    return out
