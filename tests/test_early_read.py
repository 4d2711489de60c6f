"""The LLaMA weights read before the model's imports (model/io/early_read.py): every tensor as safetensors itself
reads it, a damaged folder left to the ordinary load, and a model built from them the same as from_pretrained's."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.io import early_read
from model.io.early_read import EarlyRead, safetensors_files, split_by_bytes


def some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=g),
        "i64": torch.arange(-4, 5),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_every_tensor_is_read_as_safetensors_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(early_read, "CHUNK", 8)  # pieces smaller than a tensor (used on a GPU only; kept honest)
    save_file(some_tensors(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    expected = load_file(str(tmp_path / "model.safetensors"))
    read = EarlyRead(tmp_path, "cpu", threads=3)
    state = read.take()
    assert read.failed is None and state is not None
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape, name
        assert torch.equal(state[name], tensor), name
    assert read.take() is None  # handed over once


def test_floating_tensors_arrive_in_the_dtype_asked_for(tmp_path: Path) -> None:
    save_file(some_tensors(), str(tmp_path / "model.safetensors"))
    expected = load_file(str(tmp_path / "model.safetensors"))
    state = EarlyRead(tmp_path, "cpu", torch.bfloat16).take()
    assert state is not None
    for name, tensor in expected.items():
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor  # integers and flags as they are
        assert state[name].dtype == want.dtype and torch.equal(state[name], want), name


def test_an_index_folder_is_read_shard_by_shard(tmp_path: Path) -> None:
    tensors = some_tensors()
    names = sorted(tensors)
    shards = {"a.safetensors": names[:3], "b.safetensors": names[3:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / early_read.SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    assert safetensors_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    state = EarlyRead(tmp_path, "cpu").take()
    assert state is not None and all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_only_the_files_from_pretrained_reads_are_read(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert safetensors_files(tmp_path) is None
    read = EarlyRead(tmp_path, "cpu")
    assert read.take() is None and "no safetensors weights" in read.failed
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / early_read.SAFE_INDEX).write_text(json.dumps({"weight_map": {"v": "other.safetensors"}}))
    assert safetensors_files(tmp_path) == [tmp_path / "model.safetensors"]  # transformers' first choice


def test_bytes_are_split_evenly_and_each_share_keeps_file_order() -> None:
    spans = [
        (Path("f"), early_read.Span(f"t{i}", torch.uint8, (n,), 100 + 10 * i, 100 + 10 * i + n))
        for i, n in enumerate([5, 9, 1, 4, 6, 3])
    ]
    shares = split_by_bytes(spans, 2)
    assert sorted(s.name for share in shares for _, s in share) == [f"t{i}" for i in range(6)]
    assert [sum(s.end - s.start for _, s in share) for share in shares] == [14, 14]  # 9+4+1 and 6+5+3
    for share in shares:
        assert [s.start for _, s in share] == sorted(s.start for _, s in share)
    assert len(split_by_bytes(spans[:1], 4)) == 1


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if how == "cut":
        path.write_bytes(data[:-3])
    elif how == "long header":
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif how == "not json":
        path.write_bytes(data[:8] + b"{" * length + data[8 + length :])
    elif how in ("dtype", "offsets", "before data"):
        entry = header["w"]
        if how == "dtype":
            entry["dtype"] = "Q9"
        elif how == "offsets":
            entry["data_offsets"] = [0, 4]  # 4 bytes for 6 floats
        else:
            entry["data_offsets"] = [-8, 16]
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= length  # the header keeps its length: only the entry is wrong
        text = text.ljust(length)
        path.write_bytes(data[:8] + text + data[8 + length :])
    elif how == "tiny":
        path.write_bytes(data[:5])


@pytest.mark.parametrize("how", ["cut", "long header", "not json", "dtype", "offsets", "before data", "tiny"])
def test_a_damaged_file_gives_nothing_and_says_which(tmp_path: Path, how: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"v": torch.ones(2), "w": torch.ones(2, 3)}, str(path))
    damage(path, how)
    read = EarlyRead(tmp_path, "cpu")
    assert read.take() is None
    assert read.failed.startswith(str(path)) or "file ends" in read.failed


def test_a_closed_read_stops_and_gives_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({f"t{i}": torch.ones(64) for i in range(8)}, str(tmp_path / "model.safetensors"))
    reads = []
    monkeypatch.setattr(early_read, "read_into", lambda *args: reads.append(args))
    read = EarlyRead.__new__(EarlyRead)  # built by hand so that the stop comes before the read begins
    read.source, read.device, read.failed, read._state = tmp_path, torch.device("cpu"), None, None
    read._stop = early_read.threading.Event()
    read._stop.set()
    read._read(2)
    assert read._state is None and read.failed == "closed" and not reads


def llm_state(llm) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent ones (the rotary frequencies) included."""
    return dict(llm.named_parameters()) | dict(llm.named_buffers())


def test_a_model_from_the_early_read_is_the_model_from_the_folder(tiny_root: Path, tmp_path: Path, monkeypatch) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM, modeling_utils

    from model.network.pretrained import pretrained_llm

    folder = tmp_path / "vicuna"
    shutil.copytree(tiny_root / "pretrained_ckpt/vicuna_ckpt/7b_v0", folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, repetition_penalty=1.3).save_pretrained(folder)
    warmups = []
    monkeypatch.setattr(modeling_utils, "caching_allocator_warmup", lambda *args: warmups.append(args))
    for dtype in (torch.float32, torch.bfloat16):
        plain = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        early = EarlyRead(folder, "cpu", dtype)  # the tiny set's float32 converted by the read
        built = pretrained_llm(folder, dtype, "sdpa", early)
        assert not warmups  # nothing reserved beside the weights already read (on a GPU: their size again)
        assert early.failed is None and early.take() is None  # the model took the read's tensors
        ours, theirs = llm_state(built), llm_state(plain)
        assert ours.keys() == theirs.keys()
        for name, tensor in theirs.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
        assert built.config.to_diff_dict() == plain.config.to_diff_dict()
        assert built.generation_config.repetition_penalty == 1.3
        assert built.generation_config.to_diff_dict() == plain.generation_config.to_diff_dict()


def test_a_read_elsewhere_or_a_failed_one_leaves_the_load_to_from_pretrained(tiny_root: Path, tmp_path: Path, caplog):
    from model.network.pretrained import DeltaError, load_base

    folder = tiny_root / "pretrained_ckpt/vicuna_ckpt/7b_v0"
    plain = load_base(folder, torch.float32, "sdpa")
    elsewhere = [EarlyRead(tmp_path, "cpu", torch.float32), EarlyRead(folder, "cpu", torch.bfloat16)]
    llm = load_base(folder, torch.float32, "sdpa", "cpu", elsewhere)  # another folder; this one in another dtype
    assert all(torch.equal(t, plain.state_dict()[k]) for k, t in llm.state_dict().items())
    assert elsewhere[1].take() is not None  # left untaken: a bfloat16 read would have rounded the float32 model
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    damage(broken / "model.safetensors", "cut")
    early = EarlyRead(broken, "cpu", torch.float32)
    with caplog.at_level("INFO", logger="model.io.early_read"), pytest.raises(DeltaError, match="model.safetensors"):
        load_base(broken, torch.float32, "sdpa", "cpu", [early])  # the ordinary load's own one line, naming the file
    assert early.failed is not None and f"{broken}: not read early" in caplog.text


def test_load_model_with_the_early_read_answers_as_without(tiny_root: Path) -> None:
    from ckpt.layout import layout
    from model.config import GenerationConfig
    from model.generate.base import generate_ids
    from model.media.encoder import kept_weight
    from model.network.checkpoint import load_model
    from model.network.deepresonance import Example
    from model.network.folders import llm_folder

    paths = layout(tiny_root)
    delta = paths.delta_dir("beta")
    plain = load_model(paths.vicuna, delta, paths.imagebind)
    early = [EarlyRead(llm_folder(paths.vicuna, delta), "cpu", torch.float32)]
    early.append(EarlyRead(paths.imagebind, "cpu", torch.float32, keep=kept_weight))
    fast = load_model(paths.vicuna, delta, paths.imagebind, early=early)
    assert all(read.failed is None and read.take() is None for read in early)  # their tensors went to the model
    assert fast.visual_encoder.weights_file() == plain.visual_encoder.weights_file() is not None
    assert all(torch.equal(t, fast.state_dict()[k]) for k, t in plain.state_dict().items())
    prompts = [Example("", f"Question {i}?", []) for i in range(3)]
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False, decoder="generate")
    assert generate_ids(fast, prompts, greedy) == generate_ids(plain, prompts, greedy)


def test_dr_infer_reads_the_weights_early_and_answers_as_without(tiny_root: Path, tmp_path: Path, monkeypatch) -> None:
    """`dr infer` (on a GPU; here with the CPU allowed) begins the read before the load, which builds the LLaMA from
    it; the answers are those of a run without; a load that fails lets its read go."""
    from synth import infer_args
    from test_infer import media_dataset, runner

    from ckpt.layout import layout
    from deepresonance_cli import infer
    from deepresonance_cli.app import app

    reads: list[EarlyRead] = []
    taken: list[bool] = []
    real_take = EarlyRead.take

    class Counted(EarlyRead):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            reads.append(self)

        def take(self):
            state = real_take(self)
            taken.append(state is not None)
            return state

    monkeypatch.setattr(early_read, "EarlyRead", Counted)
    dataset = media_dataset(tmp_path / "data", 4)
    plain = tmp_path / "plain" / "toy.json"
    assert runner.invoke(app, infer_args(tiny_root, dataset, plain)).exit_code == 0
    assert not reads  # on a CPU the files are mapped, not read
    monkeypatch.setattr(infer, "EARLY_READ_DEVICES", ("cuda", "cpu"))
    out = tmp_path / "early" / "toy.json"
    result = runner.invoke(app, infer_args(tiny_root, dataset, out))
    assert result.exit_code == 0, result.output
    assert "model loaded in" in result.output  # the line benchmarks/profiling/second_process.py times
    assert len(reads) == 2 and all(read.failed is None for read in reads) and taken[:2] == [True, True]
    assert [read.source for read in reads] == [layout(tiny_root).vicuna, layout(tiny_root).imagebind]
    assert json.loads(out.read_text()) == json.loads(plain.read_text())
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root, broken)
    for file in (broken / "deepresonance_alpha_delta_ckpt/deepresonance/7b_tiva_v0").iterdir():
        file.write_bytes(b"no")  # a damaged delta: the load fails before it reaches the LLaMA
    with pytest.raises(ValueError, match="delta"):
        infer.load(broken, "alpha", None, None, "cpu", None)
    assert len(reads) == 4
    assert all(read._stop.is_set() and not read._thread.is_alive() for read in reads[2:])  # closed, not left reading


def test_a_pickle_is_mapped_and_its_kept_tensors_copied_as_the_load_copies_them(tiny_root: Path) -> None:
    from ckpt.layout import layout
    from model.io.files import file_identity
    from model.media.encoder import kept_weight

    path = layout(tiny_root).imagebind
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    read = EarlyRead(path, "cpu", torch.bfloat16, keep=kept_weight)
    state = read.take()
    assert read.failed is None and state is not None and state.keys() == mapped.keys()
    assert read.identity == file_identity(path)
    kept = [name for name in mapped if kept_weight(name)]
    assert 0 < len(kept) < len(mapped)
    for name, tensor in mapped.items():
        if name in kept:
            want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
            assert state[name].dtype == want.dtype and torch.equal(state[name], want), name
            assert state[name].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr(), name  # a copy
        else:
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_the_kept_weights_are_those_the_encoder_keeps() -> None:
    from model.media.encoder import MediaEncoder, kept_weight

    encoder = MediaEncoder("tiny")
    every = set(encoder.imagebind.state_dict())
    encoder.drop_unused_towers()
    assert {name for name in every if kept_weight(name)} == set(encoder.imagebind.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imagebind_from_the_early_read_is_imagebind_from_the_file(tiny_root: Path, tmp_path: Path, dtype) -> None:
    from ckpt.layout import layout
    from model.media.encoder import MediaEncoder, kept_weight

    path = layout(tiny_root).imagebind
    plain = MediaEncoder.load(path, device="cpu", dtype=dtype)
    read = EarlyRead(path, "cpu", dtype, keep=kept_weight)
    read.take = lambda taken=read.take: (state := taken()) and (copies.extend(state.values()) or state)
    copies: list[torch.Tensor] = []
    early = MediaEncoder.load(path, device="cpu", dtype=dtype, early=read)
    assert read.failed is None and copies
    pointers = {t.data_ptr() for t in copies}
    assert all(t.data_ptr() in pointers for t in early.parameters())  # the read's copies, not copied again
    ours, theirs = early.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == t.dtype and torch.equal(ours[k], t) for k, t in theirs.items())
    assert early.fingerprint == plain.fingerprint and early.weights_file() == plain.weights_file() is not None
    moved = tmp_path / "replaced.pth"
    shutil.copy(path, moved)
    read = EarlyRead(moved, "cpu", dtype, keep=kept_weight)
    read._thread.join()  # the read done, the file is then replaced: the weights are no longer the file's
    shutil.copy(path, tmp_path / "new.pth")
    (tmp_path / "new.pth").replace(moved)
    assert MediaEncoder.load(moved, device="cpu", dtype=dtype, early=read).weights_file() is None
    broken = tmp_path / "imagebind.pth"
    broken.write_bytes(path.read_bytes()[:1000])
    read = EarlyRead(broken, "cpu", dtype, keep=kept_weight)
    with pytest.raises(ValueError, match="not a readable ImageBind checkpoint"):  # the load's own line
        MediaEncoder.load(broken, device="cpu", dtype=dtype, early=read)
    assert read.failed is not None


def test_dr_ask_reads_early_answers_as_without_and_lets_the_reads_go_on_bad_media(
    tiny_root: Path, tmp_path: Path, monkeypatch
) -> None:
    from synth import write_garbage, write_wav
    from test_infer import runner

    from deepresonance_cli import infer
    from deepresonance_cli.app import app

    reads: list[EarlyRead] = []

    class Counted(EarlyRead):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            reads.append(self)

    monkeypatch.setattr(early_read, "EarlyRead", Counted)
    wav = write_wav(tmp_path / "m.wav", 1.0)
    args = ["ask", "Describe the music.", "--audio", str(wav), "--ckpt-root", str(tiny_root), "--greedy"]
    plain = runner.invoke(app, [*args, "--max-new-tokens", "6"])
    assert plain.exit_code == 0 and not reads
    monkeypatch.setattr(infer, "EARLY_READ_DEVICES", ("cuda", "cpu"))
    early = runner.invoke(app, [*args, "--max-new-tokens", "6"])
    assert early.exit_code == 0 and early.stdout == plain.stdout
    assert len(reads) == 2 and all(read.failed is None and read._state is None for read in reads)  # taken
    bad = write_garbage(tmp_path / "bad.wav")
    failed = runner.invoke(app, ["ask", "Describe it.", "--audio", str(bad), "--ckpt-root", str(tiny_root)])
    assert failed.exit_code != 0 and len(reads) == 4
    assert all(read._stop.is_set() and not read._thread.is_alive() for read in reads[2:])  # let go, not left reading
