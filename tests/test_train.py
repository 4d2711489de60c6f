"""Training on the tiny set: what each stage updates, resuming, the saved delta, mixing, schedule, DeepSpeed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import synth
import torch

from model.config import GenerationConfig, TrainConfig
from model.generate.base import generate
from model.network.checkpoint import DELTA_PT, load_model, read_delta
from model.train.batch_sampler import MixedBatchSampler
from model.train.checkpoints import find_checkpoint
from model.train.distributed import deepspeed_config
from model.train.loop import Trainer, train
from model.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]

# each row is told apart by its instruction and media: greedy decoding must give its own target back
MUSIC = [
    ("audio", "a1.wav", 220.0, "Describe the music in detail.", "A calm piano piece in C major with a slow tempo."),
    ("audio", "a2.wav", 880.0, "What is the tempo?", "The tempo is fast."),
    ("audio", "a3.wav", 440.0, "What is the mood of this song?", "A sad melody in a minor key."),
]
MIXED = [
    ("image", "i1.png", None, "What instrument is playing?", "The electric guitar plays over loud drums."),
    ("video", "v1.mp4", None, "Describe the video.", "This is an energetic rock song."),
    (None, None, None, "Name a genre.", "The genre is jazz."),
]


def write_train_data(root: Path) -> list[str]:
    """Two row-format datasets (music: 3 audio rows; mixed: image, video, text) with synthesized media."""
    synth.write_image(root / "i1.png")
    synth.write_video(root / "v1.mp4", seconds=1.0)
    for _, name, freq, *_ in MUSIC:
        synth.write_wav(root / name, seconds=1.0, freq=freq)
    files = []
    for name, table in (("music", MUSIC), ("mixed", MIXED)):
        rows = [
            synth.make_row(str(i), [(m, p)] if m else [], instruction=q, output=a)
            for i, (m, p, _, q, a) in enumerate(table)
        ]
        files.append(str(synth.write_dataset(root, rows, f"{name}.json")))
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_train_data(tmp_path_factory.mktemp("train_data"))


def run(
    tiny_layout,
    data,
    out: Path,
    stage: int,
    variant: str = "beta",
    resume: Path | None = None,
    init: Path | None = None,
    **overrides,
) -> Trainer:
    """A Trainer on the test data; lr 1e-2 with no 10-step warm-up floor, so a few steps move every parameter."""
    cfg = TrainConfig.for_stage(stage, **{"datasets": data, "warmup_min_steps": 0, "lr": 1e-2, **overrides})
    return Trainer(
        cfg,
        variant=variant,
        base=tiny_layout.vicuna,
        imagebind=tiny_layout.imagebind,
        out=out,
        cache_dir=Path(data[0]).parent / ".features",
        resume=resume,
        init=init,
    )


def changed_params(trainer: Trainer) -> set[str]:
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.fit(progress=False)
    return {k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])}


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_stage1_updates_only_projector_and_fusion(tiny_layout, data, tmp_path, variant):
    trainer = run(tiny_layout, data, tmp_path, stage=1, variant=variant, max_steps=3)
    changed = changed_params(trainer)
    expected = {k for k, _ in trainer.model.named_parameters() if k.startswith(("llama_proj.", "preencoding."))}
    assert changed == expected
    assert any(k.startswith("preencoding.") for k in changed) == (variant == "beta")
    assert set(read_delta(tmp_path)) == expected  # no LoRA keys: stage 2 can start from it


@pytest.mark.parametrize("embeddings", [True, False])
def test_stage2_updates_lora_projector_fusion_and_embeddings(tiny_layout, data, tmp_path, embeddings):
    trainer = run(tiny_layout, data, tmp_path, stage=2, max_steps=3, train_embeddings=embeddings)
    changed = changed_params(trainer)
    names = [k for k, _ in trainer.model.named_parameters()]
    lora = {k for k in names if ".lora_" in k}
    head = {k for k in names if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    expected = lora | {k for k in names if k.startswith(("llama_proj.", "preencoding."))}
    assert len(head) == 2 and lora
    assert changed == (expected | head if embeddings else expected)


def test_bfloat16_keeps_trained_weights_in_float32(tiny_layout, data, tmp_path):
    cfg = TrainConfig.for_stage(2, datasets=data, max_steps=2, warmup_min_steps=0)
    trainer = Trainer(
        cfg,
        variant="beta",
        base=tiny_layout.vicuna,
        imagebind=tiny_layout.imagebind,
        out=tmp_path,
        cache_dir=Path(data[0]).parent / ".features",
        dtype=torch.bfloat16,
        device="cpu",
    )
    dtypes = {k: p.dtype for k, p in trainer.model.named_parameters()}
    assert {dtypes[k] for k in trainer.trainable} == {torch.float32}
    assert {d for k, d in dtypes.items() if k not in trainer.trainable} == {torch.bfloat16}
    history = trainer.fit(progress=False).history
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)


def test_resume_continues_the_same_run(tiny_layout, data, tmp_path):
    """Dropout (LoRA, fusion), data order, AdamW and the schedule all continue; the starting delta is remembered."""
    steps, init = 6, tiny_layout.delta_dir("beta")
    options = dict(stage=2, max_steps=steps, train_embeddings=False)
    full = run(tiny_layout, data, tmp_path / "full", init=init, **options).fit(progress=False)
    half = run(tiny_layout, data, tmp_path / "split", init=init, save_every=2, **options)
    assert half.fit(stop_after=steps // 2, progress=False).step == steps // 2
    assert find_checkpoint(tmp_path / "split").name == f"checkpoint-{steps // 2:06d}"
    resumed = run(tiny_layout, data, tmp_path / "split", resume=tmp_path / "split", **options)
    assert resumed.step == steps // 2
    rest = resumed.fit(progress=False)
    assert [h["step"] for h in rest.history] == list(range(steps // 2 + 1, steps + 1))
    for a, b in zip(full.history[steps // 2 :], rest.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == pytest.approx(b["lr"])
    want, got = read_delta(tmp_path / "full"), read_delta(tmp_path / "split")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    embeddings = [k for k, v in resumed.model.named_parameters() if k.endswith("embed_tokens.weight")]
    from_init = read_delta(init)[embeddings[0]]  # frozen here, so it must come from the remembered --init
    torch.testing.assert_close(resumed.model.state_dict()[embeddings[0]], from_init, rtol=0, atol=0)


def test_resume_refuses_changed_options(tiny_layout, data, tmp_path):
    run(tiny_layout, data, tmp_path, stage=1, max_steps=2).fit(stop_after=1, progress=False)
    with pytest.raises(ValueError, match="lr: 0.01 -> 0.001"):
        run(tiny_layout, data, tmp_path, stage=1, max_steps=2, lr=1e-3, resume=tmp_path)


def test_saved_delta_has_the_original_keys_and_loads(tiny_layout, data, tmp_path):
    trainer = run(tiny_layout, data, tmp_path, stage=2, max_steps=1)
    trainer.fit(progress=False)
    state = torch.load(tmp_path / DELTA_PT, map_location="cpu", weights_only=True)  # as the original loads it
    prefix = "llama_model.base_model.model."
    assert f"{prefix}model.layers.0.self_attn.q_proj.lora_A.default.weight" in state
    assert f"{prefix}model.layers.1.self_attn.o_proj.lora_B.default.weight" in state
    assert {f"{prefix}model.embed_tokens.weight", f"{prefix}lm_head.weight", "llama_proj.weight"} <= set(state)
    assert "preencoding.layers.0.linear1.weight" in state
    assert not any(k.startswith("visual_encoder.") or ".base_layer." in k for k in state)
    model = load_model(tiny_layout.vicuna, tmp_path, None, variant="beta")
    own = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


def test_sampler_mixes_like_the_original():
    lengths = [list(range(10)), list(range(3)), list(range(5))]
    sampler = MixedBatchSampler(lengths, batch_size=2, seed=12)
    batches = sampler.epoch(0)
    assert len(batches) == len(sampler) == 3 * math.ceil(10 / 2)
    offsets = [0, 10, 13]
    for i, batch in enumerate(batches):  # round-robin, each batch from one dataset
        d = i % 3
        assert all(offsets[d] <= j < offsets[d] + len(lengths[d]) for j in batch) and len(batch) == 2
    first = [j for i, b in enumerate(batches) if i % 3 == 0 for j in b]
    assert sorted(first) == list(range(10))  # the largest dataset is seen once per epoch
    assert Counter(j for i, b in enumerate(batches) if i % 3 == 1 for j in b).keys() == {10, 11, 12}  # small: repeated
    assert batches == MixedBatchSampler(lengths, 2, seed=12).epoch(0) and batches != sampler.epoch(1)


def test_sampler_ranks_split_each_global_batch():
    lengths = [list(range(12)), list(range(8))]
    whole = MixedBatchSampler(lengths, batch_size=4, seed=3).epoch(2)
    parts = [MixedBatchSampler(lengths, 4, seed=3, rank=r, world_size=2).epoch(2) for r in range(2)]
    assert [a + b for a, b in zip(*parts, strict=True)] == whole


def test_length_grouping_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [torch.randint(10, 500, (512,), generator=g).tolist()]

    def padding(group_size: int) -> int:
        batches = MixedBatchSampler(lengths, batch_size=8, seed=1, group_size=group_size).epoch(0)
        return sum(max(lengths[0][i] for i in b) * len(b) - sum(lengths[0][i] for i in b) for b in batches)

    assert padding(16) < 0.2 * padding(1)


def test_schedule_is_deepspeeds_warmup_decay():
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ds = lr_schedules.WarmupDecayLR(opt, total_num_steps=100, warmup_max_lr=1.0, warmup_num_steps=10)
    for step in range(100):
        ds.step()  # DeepSpeed's value for step `step` (last_batch_iteration = step)
        assert lr_factor(step, 100, 10) == pytest.approx(ds.get_lr()[0], abs=1e-12)
    assert lr_factor(100, 100, 10) == 0 and lr_factor(5, 100, 10, "linear") == 0.5


def test_deepspeed_config_takes_batch_and_clipping_from_the_recipe(tmp_path):
    cfg = TrainConfig.for_stage(2, micro_batch_size=4, grad_accum=2)
    packaged = deepspeed_config(REPO / "deepresonance_cli" / "deepspeed_zero2.json", cfg)
    assert packaged["zero_optimization"]["stage"] == 2 and packaged["bf16"]["enabled"]
    assert (packaged["train_micro_batch_size_per_gpu"], packaged["gradient_accumulation_steps"]) == (4, 2)
    assert packaged["gradient_clipping"] == 1.0
    (tmp_path / "opt.json").write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        deepspeed_config(tmp_path / "opt.json", cfg)
    (tmp_path / "mb.json").write_text('{"train_micro_batch_size_per_gpu": 8}')
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(tmp_path / "mb.json", cfg)


@pytest.mark.slow
def test_model_learns_and_reproduces_targets(tiny_layout, data, tmp_path):
    trainer = run(tiny_layout, data, tmp_path, stage=2, max_steps=120, warmup_type="linear")
    history = trainer.fit(progress=False).history
    start, end = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert end < 0.05 * start
    model = load_model(tiny_layout.vicuna, tmp_path, tiny_layout.imagebind, variant="beta").eval()
    examples = trainer.data.examples(range(len(trainer.data.rows)))
    targets = [ex.output for ex in examples]
    answers = generate(
        model, [replace(ex, output=None) for ex in examples], GenerationConfig(do_sample=False, max_new_tokens=40)
    )
    assert answers == targets


def _deepspeed_ready() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # any import failure means it cannot run here
        return f"deepspeed does not import here ({type(err).__name__}: {err})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_deepspeed_ready() is not None, reason=str(_deepspeed_ready()))
def test_deepspeed_two_ranks_on_cpu_resume_exactly(tiny_root, tiny_layout, data, tmp_path):
    """`torchrun` x2 -> `dr train --deepspeed zero2` (ZeRO-2, bf16, gloo): 4 steps == 2 steps, stop, resume, 2 steps.

    Batches mix text-only and media rows across ranks, so this also checks that ranks reduce the same gradients.
    The first DeepSpeed run on a machine JIT-compiles its shm op (about a minute, then cached).
    """

    def launch(out: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "deepresonance_cli.app",
            "train",
            "--variant",
            "beta",
            "--stage",
            "2",
            "--out",
            str(out),
            "--ckpt-root",
            str(tiny_root),
            "--datasets",
            ",".join(data),
            "--max-steps",
            "4",
            "--lr",
            "1e-2",
            "--deepspeed",
            "zero2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
            *extra,
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    launch(tmp_path / "full")
    launch(tmp_path / "split", "--stop-after", "2")
    state = tmp_path / "split" / "checkpoint-000002"
    assert {p.name for p in (state / "deepspeed" / "state").iterdir()} >= {
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    launch(tmp_path / "split", "--resume", str(tmp_path / "split"))
    want, got = read_delta(tmp_path / "full"), read_delta(tmp_path / "split")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    model = load_model(tiny_layout.vicuna, tmp_path / "full", None, "beta")  # a bf16 delta loads into float32
    assert model.llama_proj.weight.dtype == torch.float32


def test_train_function_writes_the_final_delta(tiny_layout, data, tmp_path):
    cfg = TrainConfig.for_stage(1, datasets=data, max_steps=2, warmup_min_steps=0)
    result = train(
        cfg,
        progress=False,
        variant="alpha",
        base=tiny_layout.vicuna,
        imagebind=tiny_layout.imagebind,
        out=tmp_path,
        cache_dir=tmp_path / "cache",
    )
    assert result.step == result.total_steps == 2 and len(result.history) == 2
    assert (tmp_path / DELTA_PT).is_file() and (tmp_path / "trainer_state.pt").is_file()
    assert any((tmp_path / "logs").iterdir())  # TensorBoard events
