"""`dr ckpt doctor`: is every checkpoint piece in place, complete and consistent, and if not, what fixes it.

Pieces are checked against each other (the delta against the base config and tokenizer and against ImageBind's
output size), never against hard-coded 7B numbers, so the tiny sets pass the same checks as the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from rich.console import Console
from rich.table import Table

from ckpt.expected import BaseShape, Shapes, delta_problems, imagebind_dim
from ckpt.files import byte_progress
from ckpt.layout import VICUNA_DELTA_REPO, CkptLayout, layout
from model.config import Variant
from model.io.errors import CkptError
from model.io.manifest import read_manifest, sha256_file
from model.io.weights import INDEX_FILES, SINGLE_FILES, ShardedWeights, tensor_shapes

Status = Literal["OK", "missing", "corrupt"]
_STYLE = {"OK": "green", "missing": "yellow", "corrupt": "red"}


@dataclass(frozen=True)
class Check:
    piece: str
    path: Path
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status == "OK" for c in self.checks)


def doctor(
    root: str | Path = "ckpt", *, hashes: bool = True, variants: tuple[Variant, ...] = ("alpha", "beta")
) -> Report:
    """Check the layout under `root`; `hashes=False` skips the sha256 pass (sizes and shapes only, seconds)."""
    paths = layout(root)
    base, base_check, tok_check = _check_base(paths, hashes)
    encoder_dim, ib_check = _check_imagebind(paths, hashes)
    checks = [base_check, tok_check, ib_check]
    loadable = base is not None and tok_check.status == "OK"  # the loader's checks need the base and its tokenizer
    checks += [_check_delta(paths, v, base, encoder_dim, hashes, loadable) for v in variants]
    return Report(checks)


def render(report: Report, console: Console | None = None) -> None:
    """The table, then each distinct fix command on its own unwrapped line (to copy and paste)."""
    console = console or Console()
    table = Table(title="dr ckpt doctor", show_lines=True)
    for column in ("piece", "status", "path", "detail"):
        table.add_column(column, overflow="fold")
    for c in report.checks:
        table.add_row(c.piece, f"[{_STYLE[c.status]}]{c.status}[/]", str(c.path), c.detail)
    console.print(table)
    fixes = dict.fromkeys(c.fix for c in report.checks if c.status != "OK")
    for fix in fixes:
        console.print(f"fix: {fix}", soft_wrap=True, highlight=False, markup=False)


def _vicuna_fix(paths: CkptLayout, overwrite: bool) -> str:
    flag = " --overwrite" if overwrite else ""
    return f"dr ckpt vicuna --llama LLAMA_7B_HF_DIR --delta {VICUNA_DELTA_REPO} --out {paths.vicuna}{flag}"


def _check_base(paths: CkptLayout, hashes: bool) -> tuple[BaseShape | None, Check, Check]:
    folder = paths.vicuna
    tok = _check_tokenizer(paths)
    missing = Check("base LLM (Vicuna-7B-v0)", folder, "missing", "", _vicuna_fix(paths, False))
    if not (folder / "config.json").is_file():
        return None, _with(missing, detail="no config.json"), tok[1]
    try:
        config = json.loads((folder / "config.json").read_text())
        hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        weights = ShardedWeights(folder)
    except CkptError as e:  # no weights file, or a listed shard absent: missing; a file that does not read: corrupt
        present = any((folder / f).is_file() for f in SINGLE_FILES + INDEX_FILES)
        absent = "missing" in str(e) or not present
        return None, (_with(missing, detail=str(e)) if absent else _corrupt(missing, str(e), paths)), tok[1]
    except (ValueError, KeyError) as e:
        return None, _corrupt(missing, f"config.json unreadable ({e})", paths), tok[1]
    try:
        problems = _manifest_problems(folder, hashes) or _base_problems(weights.shapes(), hidden, layers, vocab)
    except CkptError as e:
        problems = [str(e)]
    if problems:
        return None, _corrupt(missing, "; ".join(problems), paths), tok[1]
    vocabs = frozenset({vocab} | ({tok[0]} if tok[0] is not None else set()))
    ok = _with(missing, status="OK", detail=f"hidden {hidden}, {layers} layers, vocab {vocab}", fix="")
    return BaseShape(hidden, layers, vocabs), ok, tok[1]


def _base_problems(shapes: Shapes, hidden: int, layers: int, vocab: int) -> list[str]:
    want = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    want[f"model.layers.{layers - 1}.self_attn.q_proj.weight"] = (hidden, hidden)
    problems = [f"{k} is {shapes.get(k, 'absent')}, expected {s}" for k, s in want.items() if shapes.get(k) != s]
    if f"model.layers.{layers}.self_attn.q_proj.weight" in shapes:
        problems.append(f"more than the config's {layers} layers")
    return problems


def _check_tokenizer(paths: CkptLayout) -> tuple[int | None, Check]:
    """The base tokenizer and its length (sentencepiece pieces + added tokens), which the delta's vocab builds on."""
    path = paths.vicuna / "tokenizer.model"
    check = Check("base tokenizer", path, "missing", "", _vicuna_fix(paths, False))
    if not path.is_file():
        return None, check
    try:
        pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        return None, _corrupt(check, f"not a sentencepiece model ({e})", paths)
    length = pieces + len([i for i in _added_token_ids(paths.vicuna) if i >= pieces])
    return length, _with(check, status="OK", detail=f"{length} tokens", fix="")


def _added_token_ids(folder: Path) -> set[int]:
    ids: set[int] = set()
    if (folder / "added_tokens.json").is_file():
        ids |= set(json.loads((folder / "added_tokens.json").read_text()).values())
    if (folder / "tokenizer_config.json").is_file():
        ids |= {
            int(i) for i in json.loads((folder / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        }
    return ids


def _check_imagebind(paths: CkptLayout, hashes: bool) -> tuple[int | None, Check]:
    """The loader's own ImageBind check (model.network.pretrained.imagebind_problems: every key and shape of the size
    the file declares), after the recorded size and sha256."""
    from model.network.pretrained import imagebind_problems as loader_problems

    fix = f"dr ckpt download imagebind --root {paths.root}"
    check = Check("ImageBind-huge", paths.imagebind, "missing", "", fix)
    if not paths.imagebind.is_file():
        return None, check
    problems = _manifest_problems(paths.imagebind_dir, hashes, only=paths.imagebind.name)
    problems = problems or loader_problems(paths.imagebind)
    if problems:
        return None, _with(check, status="corrupt", detail="; ".join(problems[:3]), fix=fix + " --force")
    shapes = tensor_shapes(paths.imagebind)
    dim = imagebind_dim(shapes)
    return dim, _with(check, status="OK", detail=f"{len(shapes)} tensors, output dim {dim}", fix="")


def _check_delta(
    paths: CkptLayout,
    variant: Variant,
    base: BaseShape | None,
    encoder_dim: int | None,
    hashes: bool,
    loadable: bool = True,
) -> Check:
    """Every delta file present (the safetensors dr loads and the pickle the original loads), each through the
    loader's own checks (model.network.checkpoint.check_delta_file) when the base is usable, else the shape rules."""
    from model.network.checkpoint import DELTA_PT, DELTA_ST, check_delta_file

    folder = paths.delta_dir(variant)
    fix = f"dr ckpt download {variant} --root {paths.root}"
    files = [folder / f for f in (DELTA_ST, DELTA_PT) if (folder / f).is_file()]
    check = Check(f"{variant} delta", folder / DELTA_PT, "missing", "", fix)
    if not files:
        return check
    check = _with(check, path=files[0])
    count = 0
    for file in files:
        problems = _manifest_problems(folder, hashes, only=file.name)
        if not problems and base is not None and loadable:
            problems = check_delta_file(file, paths.vicuna, encoder_dim, variant)
        elif not problems:
            try:
                problems = delta_problems(tensor_shapes(file), variant, base, encoder_dim)
            except CkptError as e:
                problems = [str(e)]
        if problems:
            detail = f"{file.name}: " + "; ".join(problems[:3])
            return _with(check, path=file, status="corrupt", detail=detail, fix=fix + " --force")
        count = count or len(tensor_shapes(file))
    known = (("base LLM", base), ("base tokenizer", loadable or base is None), ("ImageBind", encoder_dim))
    unchecked = [what for what, ok in known if ok is None or ok is False]
    note = f" (not checked against {' and '.join(unchecked)}: fix those first)" if unchecked else ""
    return _with(check, status="OK", detail=f"{count} tensors{note}", fix="")


def _manifest_problems(folder: Path, hashes: bool, only: str | None = None) -> list[str]:
    """Sizes (and sha256s) against what download / vicuna recorded when they wrote the files."""
    problems = []
    entries = read_manifest(folder)
    if only is not None:
        entries = {k: v for k, v in entries.items() if k == only}
    with byte_progress() as progress:
        for name, want in entries.items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != want["size"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, {want['size']} recorded")
            elif hashes and sha256_file(path, progress) != want["sha256"]:
                problems.append(f"{name} does not match its recorded sha256")
    return problems


def _with(check: Check, **changes: object) -> Check:
    return Check(**{**check.__dict__, **changes})


def _corrupt(check: Check, detail: str, paths: CkptLayout) -> Check:
    return _with(check, status="corrupt", detail=detail, fix=_vicuna_fix(paths, True))
