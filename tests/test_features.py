"""model/media/features.py: the encoder-feature cache and batched encoding, with a fake encoder that counts calls."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import synth
import torch
from synth import sha256

from model.media import feature_files
from model.media import features as features_module
from model.media.decoders import load_or_error
from model.media.encoder import CALL_FILES
from model.media.encoding import encode_files, encode_misses
from model.media.features import FeatureCache
from model.media.preprocess import MediaError


class FakeEncoder:
    """The encoder interface: (modality, [B, ...]) -> [B, k, D], here D = 4 statistics of each clip."""

    fingerprint = "fake-v1"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def weights_file(self) -> None:
        return None

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        self.calls.append((modality, inputs.shape[0]))
        clips = inputs.unsqueeze(1) if modality == "image" else inputs
        flat = clips.flatten(2)
        return torch.stack([flat.mean(-1), flat.std(-1), flat.amin(-1), flat.amax(-1)], dim=-1)


@pytest.fixture
def audio_files(tmp_path):
    return [synth.write_wav(tmp_path / f"a{i}.wav", 0.5, 200.0 + 100 * i) for i in range(5)]


def test_cache_hit_skips_the_encoder(tmp_path, audio_files):
    encoder, cache = FakeEncoder(), FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    first = encode_files(encoder, cache, "audio", audio_files, batch_size=2)
    assert encoder.calls == [("audio", 2), ("audio", 2), ("audio", 1)]
    assert all(f.shape == (3, 4) for f in first)
    again = encode_files(encoder, FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint), "audio", audio_files)
    assert len(encoder.calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_files_are_hashed_and_stored_by_several_threads_at_once(tmp_path, audio_files, monkeypatch):
    """The cache's lookups (a sha256 of every file) and stores (a file each) run in `workers` threads: one thread
    spent 3.4 s of a 2,858-file job's 12 s of media loading on them. Two of them must be under way together."""
    import threading

    together = {"hash": threading.Barrier(2, timeout=10), "put": threading.Barrier(2, timeout=10)}
    real_hash, real_put = FeatureCache.file_hash, FeatureCache.put

    def file_hash(self, path):
        together["hash"].wait()  # broken (BrokenBarrierError) unless a second lookup is under way
        return real_hash(self, path)

    def put(self, *args):
        together["put"].wait()
        return real_put(self, *args)

    monkeypatch.setattr(FeatureCache, "file_hash", file_hash)
    monkeypatch.setattr(FeatureCache, "put", put)
    cache = FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    got = encode_files(FakeEncoder(), cache, "audio", audio_files[:4], batch_size=4, workers=2)
    plain = encode_files(FakeEncoder(), None, "audio", audio_files[:4], batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(got, plain, strict=True))


def test_batched_equals_one_by_one_and_uncached(tmp_path, audio_files):
    batched = encode_files(FakeEncoder(), FeatureCache(tmp_path / "c1", "fake-v1"), "audio", audio_files, 4)
    single = encode_files(FakeEncoder(), FeatureCache(tmp_path / "c2", "fake-v1"), "audio", audio_files, 1)
    plain = encode_files(FakeEncoder(), None, "audio", audio_files, 3)
    for a, b, c in zip(batched, single, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_image_and_video_shapes(tmp_path):
    cache = FeatureCache(tmp_path / "cache", "fake-v1")
    image = encode_files(FakeEncoder(), cache, "image", [synth.write_image(tmp_path / "i.png")])[0]
    video = encode_files(FakeEncoder(), cache, "video", [synth.write_video(tmp_path / "v.mp4", 0.5, 4)])[0]
    assert image.shape == (1, 4) and video.shape == (15, 4)


def test_bad_files_fail_alone(tmp_path, audio_files):
    paths = [audio_files[0], synth.write_garbage(tmp_path / "bad.wav"), tmp_path / "gone.wav", audio_files[1]]
    encoder = FakeEncoder()
    out = encode_files(encoder, FeatureCache(tmp_path / "cache", "fake-v1"), "audio", paths, batch_size=4)
    assert isinstance(out[0], torch.Tensor) and isinstance(out[3], torch.Tensor)
    assert isinstance(out[1], MediaError) and "unreadable" in str(out[1])
    assert isinstance(out[2], MediaError) and "no such file" in str(out[2])
    assert encoder.calls == [("audio", 2)]


def test_same_content_is_encoded_once(tmp_path, audio_files):
    copy = tmp_path / "copy.wav"
    copy.write_bytes(audio_files[0].read_bytes())
    encoder = FakeEncoder()
    out = encode_files(encoder, FeatureCache(tmp_path / "cache", "fake-v1"), "audio", [audio_files[0], copy])
    assert encoder.calls == [("audio", 1)] and torch.equal(out[0], out[1])


def test_corrupt_entry_is_recomputed(tmp_path, audio_files):
    encoder, cache = FakeEncoder(), FeatureCache(tmp_path / "cache", "fake-v1")
    first = encode_files(encoder, cache, "audio", audio_files[:1])[0]
    entry = cache.entry("audio", audio_files[0])
    entry.write_bytes(entry.read_bytes()[:40])  # as if truncated
    assert FeatureCache(tmp_path / "cache", "fake-v1").get("audio", audio_files[0]) is None
    assert not entry.exists()
    again = encode_files(encoder, cache, "audio", audio_files[:1])[0]
    assert len(encoder.calls) == 2 and torch.equal(first, again) and entry.is_file()


def test_keys_separate_encoder_mode_and_content(tmp_path, audio_files):
    root, path = tmp_path / "cache", audio_files[0]
    FeatureCache(root, "fake-v1").put("audio", path, torch.ones(3, 4))
    assert torch.equal(FeatureCache(root, "fake-v1").get("audio", path), torch.ones(3, 4))
    assert FeatureCache(root, "fake-v2").get("audio", path) is None
    assert FeatureCache(root, "fake-v1", dtype=torch.float16).get("audio", path) is None
    assert FeatureCache(root, "fake-v1", pooled=True).get("audio", path) is None
    assert FeatureCache(root, "fake-v1").get("video", path) is None
    assert FeatureCache(root, "fake-v1").get("audio", audio_files[1]) is None
    path.write_bytes(audio_files[2].read_bytes())  # same name, new content
    assert FeatureCache(root, "fake-v1").get("audio", path) is None
    with pytest.raises(MediaError, match="no such file"):
        FeatureCache(root, "fake-v1").get("audio", tmp_path / "gone.wav")


def test_pooled_mode_and_encoder_mismatch(tmp_path, audio_files):
    pooled = FeatureCache.for_encoder(tmp_path / "cache", FakeEncoder(), pooled=True)
    per_clip = encode_files(FakeEncoder(), None, "audio", audio_files[:1])[0]
    out = encode_files(FakeEncoder(), pooled, "audio", audio_files[:1])[0]
    assert out.shape == (1, 4) and torch.allclose(out, per_clip.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="feature cache is for"):
        encode_files(FakeEncoder(), FeatureCache(tmp_path / "cache", "other"), "audio", audio_files[:1])


def test_each_encoder_call_is_queued_before_the_one_before_it_is_read_back(tmp_path, audio_files):
    """Batch k's features are checked and stored only once batch k + 1's call is queued (on a GPU the call returns
    before its work is done): the encoder's stream never waits for the host to read a batch back. The features are
    those of one call a file."""
    log: list[tuple[str, int]] = []

    class Encoder(FakeEncoder):
        def embed(self, modality, inputs):
            log.append(("call", inputs.shape[0]))
            return super().embed(modality, inputs)

    class Stores:
        def put(self, cache, modality, items):
            log.append(("stored", len(items)))

        def wait(self):
            pass

    cache = FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    lookup = features_module.look_up(cache, "audio", audio_files)
    decoded = [load_or_error("audio", p) for p in lookup.first_paths()]
    out = encode_misses(Encoder(), cache, lookup, lambda a, b: decoded[a:b], 2, stores=Stores())
    assert log == [("call", 2), ("call", 2), ("stored", 2), ("call", 1), ("stored", 2), ("stored", 1)]
    alone = encode_files(FakeEncoder(), None, "audio", audio_files)
    assert all(torch.equal(a, b) for a, b in zip(out, alone, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_processes_send_misses_inputs_in_the_encoders_dtype(audio_files, dtype):
    """A chunk's misses come back in the dtype asked for, converted as the encoder converts its inputs (the same
    rounding: bfloat16 halves what crosses back and is copied to the device); a job asks for its encoder's."""
    from types import SimpleNamespace

    from model.data.catalog import Row
    from model.data.row_features import decode_media
    from model.media.decoders import find_chunk

    found = find_chunk("audio", audio_files[:3], None, None, dtype)
    want = torch.stack([load_or_error("audio", p) for p in audio_files[:3]]).to(dtype)
    assert found.inputs.dtype == dtype and torch.equal(found.inputs, want)

    asked = []

    class Decoders:
        def takes(self, files):
            return True

        def find(self, modality, paths, digests, entries, dtype):
            asked.append((modality, len(paths), dtype))
            return []

    model = SimpleNamespace(visual_encoder=SimpleNamespace(dtype=dtype, fingerprint="fake"))
    rows = [Row(str(i), "<Audio>", "Describe.", "", ("audio",), (p.name,)) for i, p in enumerate(audio_files)]
    decode_media(model, rows, audio_files[0].parent, None, decoders=Decoders())
    assert asked == [("audio", len(audio_files), dtype)]


def test_a_batchs_stores_run_while_the_next_batch_encodes(tmp_path, audio_files, monkeypatch):
    """The encoder waits for no store: a store of batch 1 is still under way when batch 2 is encoded (waiting for a
    batch's stores before the next call kept the GPU idle through every write). All stores end before the call
    returns, and a failed one fails it."""
    import threading

    second_call = threading.Event()
    seen = []
    real_put = FeatureCache.put

    class Encoder(FakeEncoder):
        def embed(self, modality, inputs):
            if self.calls:
                second_call.set()
            return super().embed(modality, inputs)

    def put(self, *args):
        seen.append(second_call.wait(timeout=5))  # False after 5 s if the encoder waits for this store
        return real_put(self, *args)

    monkeypatch.setattr(FeatureCache, "put", put)
    cache = FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    encode_files(Encoder(), cache, "audio", audio_files[:4], batch_size=2, workers=2)
    assert seen == [True] * 4
    assert all(cache.get("audio", f) is not None for f in audio_files[:4])

    def full(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureCache, "put", full)
    with pytest.raises(OSError, match="No space"):
        encode_files(FakeEncoder(), FeatureCache(tmp_path / "other", "fake-v1"), "audio", audio_files[:3], 2)


def test_an_encoder_call_takes_at_most_call_files_of_its_kind(tmp_path, audio_files, monkeypatch):
    """Calls are capped per kind (a video's activations are 15 times an audio file's): a larger batch_size is cut
    to CALL_FILES[kind] files a call, and the features do not depend on it."""
    monkeypatch.setitem(CALL_FILES, "audio", 2)
    encoder = FakeEncoder()
    capped = encode_files(encoder, None, "audio", audio_files, batch_size=4)
    assert encoder.calls == [("audio", 2), ("audio", 2), ("audio", 1)]
    monkeypatch.setitem(CALL_FILES, "audio", 64)
    whole = encode_files(encoder, None, "audio", audio_files, batch_size=4)
    assert encoder.calls[3:] == [("audio", 4), ("audio", 1)]
    assert all(torch.equal(a, b) for a, b in zip(capped, whole, strict=True))


def test_failed_write_leaves_nothing(tmp_path, audio_files, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", "fake-v1")

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_files, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.put("audio", audio_files[0], torch.ones(3, 4))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert cache.get("audio", audio_files[0]) is None


def test_encoders_whose_weights_differ_only_mid_file_get_different_entries(tmp_path, audio_files):
    """Two ImageBind files of equal size and equal first and last MiB, differing in an audio-trunk weight in the
    middle: their features differ, so the cache must not serve one encoder's features to the other. (The tiny
    weights are one 7 MB file; the audio weight is saved as a view into the middle of a 3 MiB storage, which
    torch.save writes whole, so it lies at least 1.5 MiB from either end of the file.)"""
    from model.media.encoder import MediaEncoder

    torch.manual_seed(0)
    state = MediaEncoder("tiny").imagebind.state_dict()
    name, mib = "modality_trunks.audio.blocks.0.mlp.fc1.weight", 1 << 20
    weight = state[name]
    storage = torch.zeros(3 * mib // 4)
    middle = storage.numel() // 2
    storage[middle : middle + weight.numel()] = weight.flatten()
    state[name] = storage[middle : middle + weight.numel()].view(weight.shape)
    torch.save(state, tmp_path / "a.pth")
    raw = bytearray((tmp_path / "a.pth").read_bytes())
    at = raw.find(weight.numpy().tobytes())
    raw[at : at + 64] = bytes(64)  # its first 16 weights zeroed
    (tmp_path / "b.pth").write_bytes(raw)
    a_bytes, b_bytes = (tmp_path / "a.pth").read_bytes(), (tmp_path / "b.pth").read_bytes()
    assert len(a_bytes) == len(b_bytes) and a_bytes != b_bytes
    assert a_bytes[:mib] == b_bytes[:mib] and a_bytes[-mib:] == b_bytes[-mib:]

    a, b = MediaEncoder.load(tmp_path / "a.pth"), MediaEncoder.load(tmp_path / "b.pth")
    inputs = torch.randn(1, 3, 1, 128, 204)
    assert not torch.allclose(a("audio", inputs), b("audio", inputs))
    root, path = tmp_path / "cache", audio_files[0]
    cache_a, cache_b = FeatureCache.for_encoder(root, a), FeatureCache.for_encoder(root, b)
    assert cache_a.entry("audio", path) != cache_b.entry("audio", path)
    cache_a.put("audio", path, torch.ones(3, 32))
    assert cache_b.get("audio", path) is None
    again = FeatureCache.for_encoder(root, MediaEncoder.load(tmp_path / "a.pth"))  # the same weights: a hit
    assert torch.equal(again.get("audio", path), torch.ones(3, 32))


@pytest.fixture
def counted_digest(monkeypatch):
    """Every call of weights_digest the feature cache makes, recorded."""
    calls = []
    real = features_module.weights_digest

    def counting(state):
        calls.append(len(state))
        return real(state)

    monkeypatch.setattr(features_module, "weights_digest", counting)
    return calls


@pytest.fixture
def weights(tmp_path):
    from model.media.encoder import MediaEncoder

    torch.manual_seed(0)
    path = tmp_path / "ib.pth"
    torch.save(MediaEncoder("tiny").imagebind.state_dict(), path)
    return path


def test_a_second_start_with_the_same_weights_file_does_not_rehash(tmp_path, weights, counted_digest):
    from model.media.encoder import MediaEncoder

    root = tmp_path / "cache"
    first = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    assert len(counted_digest) == 1
    encoder = MediaEncoder.load(weights)
    second = FeatureCache.for_encoder(root, encoder)
    assert len(counted_digest) == 1
    assert second.weights == first.weights == features_module.weights_digest(encoder.state_dict())


def test_a_touched_file_is_rehashed_and_changed_weights_change_the_key(tmp_path, weights, counted_digest):
    from model.media.encoder import MediaEncoder

    root, st = tmp_path / "cache", weights.stat()
    first = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    assert len(counted_digest) == 2 and touched.weights == first.weights  # same bytes, same key
    # other weights of the same size written over the file, its mtime set back: still rehashed
    state = torch.load(weights, weights_only=True)
    state["modality_heads.audio.2.weight"] += 1
    torch.save(state, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    changed = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    assert len(counted_digest) == 3 and changed.weights != first.weights
    assert changed.entry("audio", weights) != first.entry("audio", weights)


def test_a_file_of_another_size_is_rehashed(tmp_path, weights, counted_digest):
    """The same weights saved with one tensor as a view into a larger storage (torch.save writes it whole): a bigger
    file with the old mtime is rehashed, and its equal tensors keep the key."""
    from model.media.encoder import MediaEncoder

    root, st = tmp_path / "cache", weights.stat()
    first = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    state = torch.load(weights, weights_only=True)
    name = "modality_heads.audio.2.weight"
    storage = torch.zeros(state[name].numel() + 4096)
    storage[: state[name].numel()] = state[name].flatten()
    state[name] = storage[: state[name].numel()].view(state[name].shape)
    torch.save(state, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size > st.st_size
    resized = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    assert len(counted_digest) == 2 and resized.weights == first.weights


def test_encoders_not_from_a_file_or_written_to_are_hashed_every_time(tmp_path, weights, counted_digest):
    from model.media.encoder import MediaEncoder

    root = tmp_path / "cache"
    torch.manual_seed(1)
    random = MediaEncoder("tiny")
    FeatureCache.for_encoder(root, random)
    FeatureCache.for_encoder(root, random)
    assert len(counted_digest) == 2
    loaded = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    edited = MediaEncoder.load(weights)
    with torch.no_grad():
        edited.imagebind.modality_heads.audio[2].weight.add_(1)
    assert edited.weights_file() is None
    again = FeatureCache.for_encoder(root, edited)
    assert len(counted_digest) == 4 and again.weights != loaded.weights


def test_a_converted_encoder_is_remembered_per_dtype(tmp_path, weights, counted_digest):
    from model.media.encoder import MediaEncoder

    root = tmp_path / "cache"
    full = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    half = MediaEncoder.load(weights).to(torch.bfloat16)
    assert half.weights_file() is not None  # a conversion is not an edit
    first = FeatureCache.for_encoder(root, half)
    second = FeatureCache.for_encoder(root, MediaEncoder.load(weights).to(torch.bfloat16))
    assert len(counted_digest) == 2  # float32 once, bfloat16 once
    assert first.weights == second.weights != full.weights
    assert first.weights == features_module.weights_digest(half.state_dict())


def test_an_unreadable_digest_memo_costs_a_rehash(tmp_path, weights, counted_digest):
    from model.media.encoder import MediaEncoder

    root = tmp_path / "cache"
    first = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    (root / features_module.DIGESTS_FILE).write_text("{not json")
    again = FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    assert len(counted_digest) == 2 and again.weights == first.weights
    FeatureCache.for_encoder(root, MediaEncoder.load(weights))
    assert len(counted_digest) == 2  # the memo was rewritten


def test_decoding_processes_run_one_intra_op_thread_at_the_jobs_priority():
    """Each decoding process is one of many: one intra-op thread (not one per core each), and the job's own CPU
    priority (a lower one slowed the engine's build beside them instead of speeding it)."""
    import model.media.decoders as decoders

    with decoders.DecodeProcesses(2) as decode:
        nice = [decode.pool.submit(os.nice, 0) for _ in range(4)]
        threads = [decode.pool.submit(torch.get_num_threads) for _ in range(4)]
        assert {f.result() for f in nice} == {os.nice(0)}
        assert {f.result() for f in threads} == {1}


def test_prefetch_starts_loading_before_it_is_iterated_and_stays_depth_ahead():
    """The job's media loader: the first `depth` groups load as soon as it exists (overlapping the engine's build),
    later ones only as earlier ones are taken, and groups come back in order."""
    import threading

    from model.infer.job import Prefetch

    started: list[int] = []
    release = threading.Event()

    def load(group):
        started.append(group[0])
        release.wait(5)
        return [g * 10 for g in group]

    media = Prefetch([[0], [1], [2], [3]], load, depth=2)
    deadline = time.monotonic() + 5
    while len(started) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started == [0]  # loading began before any iteration
    release.set()
    time.sleep(0.2)
    assert started == [0, 1]  # two ahead, no more, until the caller takes one
    out = list(media)
    media.close()
    assert out == [([0], [0]), ([1], [10]), ([2], [20]), ([3], [30])] and started == [0, 1, 2, 3]


def test_prefetch_stages_overlap_in_group_order_and_hand_off_at_most_handoff_groups():
    """A job's loader decodes a group while the group before it is encoded: stage one of group 1 runs while stage two
    of group 0 does, each stage takes the groups in order, and stage one runs at most HANDOFF groups ahead of stage
    two (the decoded inputs it holds are the large ones)."""
    import threading

    from model.infer import job
    from model.infer.job import Prefetch

    assert job.HANDOFF == 2
    decoded, encoded, overlapped = [], [], []
    decoding = [threading.Event() for _ in range(5)]
    release = threading.Event()

    def decode(group):
        decoded.append(group[0])
        decoding[group[0]].set()
        return group[0] * 10

    def encode(value):
        if value == 0:  # group 0's encoding: group 1 decodes meanwhile, group 2 waits for it (the hand-off)
            overlapped.append(decoding[1].wait(5))
            release.wait(5)
        encoded.append(value)
        return [value + 1]

    media = Prefetch([[g] for g in range(5)], decode, encode, depth=5)
    assert decoding[1].wait(5)
    time.sleep(0.3)
    assert decoded == [0, 1] and encoded == [] and overlapped == [True]
    release.set()
    out = list(media)
    media.close()
    assert out == [([g], [g * 10 + 1]) for g in range(5)]
    assert decoded == [0, 1, 2, 3, 4] and encoded == [0, 10, 20, 30, 40]


def test_prefetch_closes_while_a_stage_waits_for_its_hand_off_and_passes_on_a_stages_error():
    """Closed while stage one waits for its hand-off (stage two still encoding): the waiting group is not decoded
    once the hand-off comes, nor any later one. A stage's error reaches the caller at its group."""
    import threading

    from model.infer.job import Prefetch

    decoded, stuck = [], threading.Event()

    def encode(value):
        stuck.wait(10)
        return value

    media = Prefetch([[g] for g in range(6)], lambda g: decoded.append(g[0]) or g, encode, depth=6)
    time.sleep(0.3)
    assert decoded == [0, 1]  # group 2 waits for group 0's encoding
    closing = threading.Thread(target=media.close)
    closing.start()
    time.sleep(0.2)
    stuck.set()  # the running encode returns and gives its hand-off back
    closing.join(5)
    assert not closing.is_alive() and decoded == [0, 1]

    def decode(group):
        if group[0] == 1:
            raise ValueError("group 1 cannot be decoded")
        return group

    media = Prefetch([[0], [1], [2]], decode, lambda g: g, depth=3)
    items = iter(media)
    assert next(items) == ([0], [0])
    with pytest.raises(ValueError, match="group 1"):
        next(items)
    media.close()


def test_prefetch_says_wait_while_its_caller_is_busy_and_blocks_when_it_is_not():
    """While the engine decodes (`busy`), a group still loading comes back as WAIT instead of holding the engine up;
    once the caller has nothing else to do, the loader is waited for, and every group still comes, in order."""
    import threading

    from model.engine.scheduler import WAIT
    from model.infer.job import Prefetch

    slow = threading.Event()
    media = Prefetch([[0], [1]], lambda g: slow.wait(5) and [g[0] * 10] if g[0] else [0], depth=2)
    busy = [True]
    media.busy = lambda: busy[0]
    items = iter(media)
    assert next(items) == ([0], [0])
    assert next(items) is WAIT and next(items) is WAIT  # group 1 is still loading: the engine decodes on
    busy[0] = False
    threading.Timer(0.2, slow.set).start()
    assert next(items) == ([1], [10])  # nothing else to do: waited for
    assert next(items, None) is None
    media.close()


def test_a_file_is_identified_once_from_its_lookup_to_its_store(tmp_path, audio_files, monkeypatch):
    """Each file's digest (an open, a stat and a path resolution even when remembered) is taken once: the lookup's
    key, the cache read and the store all use it."""
    calls = []
    real_hash = FeatureCache.file_hash
    monkeypatch.setattr(FeatureCache, "file_hash", lambda self, path: calls.append(path) or real_hash(self, path))
    cache = FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    encode_files(FakeEncoder(), cache, "audio", audio_files[:3], batch_size=2)
    assert sorted(map(str, calls)) == sorted(map(str, audio_files[:3]))
    assert all(cache.entry("audio", p).is_file() for p in audio_files[:3])


# The loader's per-file work in the decoding processes (model/media/decoders.py `find_chunk`, `write_entries`;
# model/media/features.py `LookupInProcesses`; model/media/feature_stores.py `ProcessStores`): what it gives must be
# what the threads' path gives.


@pytest.fixture
def threaded_pool(monkeypatch):
    """DecodeProcesses on threads of this process: the real class and process-side functions, no process started."""
    from model.media import decoders

    monkeypatch.setattr(decoders, "ProcessPoolExecutor", lambda workers, **kwargs: ThreadPoolExecutor(workers))


def same(a, b) -> None:
    """Two results of a lookup, a decoding or an encoding: equal tensors (dtype too), errors of the same path and
    reason, or both None."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, MediaError):
        assert isinstance(b, MediaError) and (a.path, a.reason) == (b.path, b.reason)
    else:
        assert a is None and b is None


def same_lookup(got, expected) -> None:
    """(Lookup, inputs) pairs: the same results, content groups, keys and missed contents' inputs."""
    (lookup, inputs), (want, want_inputs) = got, expected
    assert list(map(str, lookup.paths)) == list(map(str, want.paths))
    assert lookup.misses == want.misses and lookup.keys == want.keys
    assert len(lookup.results) == len(want.results) and len(inputs) == len(want_inputs)
    for a, b in zip([*lookup.results, *inputs], [*want.results, *want_inputs], strict=True):
        same(a, b)


def threads_lookup(cache, modality, paths):
    """The threads' path: `look_up`, then the misses decoded in threads."""
    from model.media.decoders import in_threads
    from model.media.features import look_up

    lookup = look_up(cache, modality, paths)
    return lookup, list(in_threads(2)(modality, lookup.first_paths()))


@pytest.fixture
def mixed(tmp_path):
    """Audio files of every kind a lookup meets, in an order that puts copies of one content in different chunks:
    good ones, a copy of one, a corrupt one and its copy, a missing one, one of another type, a FIFO."""
    wavs = [synth.write_wav(tmp_path / f"m{i}.wav", 0.5, 300.0 + 50 * i) for i in range(4)]
    copy, bad = tmp_path / "copy.wav", synth.write_garbage(tmp_path / "bad.wav")
    copy.write_bytes(wavs[1].read_bytes())
    (tmp_path / "bad2.wav").write_bytes(bad.read_bytes())
    (tmp_path / "notes.txt").write_text("not audio")
    os.mkfifo(tmp_path / "fifo.wav")
    names = ["m0", "m1", "bad", "gone", "m2", "notes.txt", "copy", "m3", "fifo", "bad2", "m1"]
    return [tmp_path / (n if "." in n else f"{n}.wav") for n in names]


def cache_with_two_entries(root: Path, paths: list[Path], pooled: bool) -> FeatureCache:
    """A cache holding features of m0 and m1, the two files of the first chunk (distinct values, so a swapped row
    would show)."""
    cache = FeatureCache(root, FakeEncoder.fingerprint, pooled=pooled)
    k = 1 if pooled else 3
    cache.put("audio", paths[0], torch.arange(4.0 * k).view(k, 4))
    cache.put("audio", paths[1], -torch.arange(4.0 * k).view(k, 4))
    return cache


def test_a_chunk_is_checked_hashed_looked_up_and_decoded_in_one_call(tmp_path, audio_files, reads):
    """`find_chunk` (what a decoding process runs), here in this process: a hit comes back with its entry's features
    whatever their shape or dtype, a miss with its decoded input, a bad file with its error; a file whose digest the
    job remembers is not hashed, the others' records are hashlib's sha256 of their bytes; a corrupt or non-finite
    entry is deleted and decoded as a miss; a second file of a content already in the chunk is not read again."""
    from safetensors.torch import save_file

    from model.media.decoders import find_chunk
    from model.media.feature_files import entry_file, write_entry
    from model.media.preprocess import load_media

    cache = FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    entries = cache.entries("audio")
    a, b, c, d, e = audio_files
    garbage, copy = synth.write_garbage(tmp_path / "bad.wav"), tmp_path / "copy.wav"
    copy.write_bytes(e.read_bytes())
    write_entry(entry_file(entries, sha256(a)), torch.arange(12.0).view(3, 4), {})
    write_entry(entry_file(entries, sha256(b)), torch.ones(1, 6, dtype=torch.float16), {})  # another shape, dtype
    write_entry(entry_file(entries, sha256(c)), torch.ones(3, 4), {})
    entry_file(entries, sha256(c)).write_bytes(entry_file(entries, sha256(c)).read_bytes()[:40])  # truncated
    entry_file(entries, sha256(d)).parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": torch.full((3, 4), float("nan"))}, entry_file(entries, sha256(d)))
    paths = [a, garbage, b, c, tmp_path / "gone.wav", d, e, copy]
    digests = [sha256(b) if p == b else None for p in paths]  # b's digest is remembered by the job

    found = find_chunk("audio", paths, digests, entries)
    hashed = [a, garbage, c, d, e, copy]
    assert reads[0] == len(hashed)
    assert {key: record[5] for key, record, _ in found.hashed} == {str(p.resolve()): sha256(p) for p in hashed}
    for p, (_, record, _) in zip(hashed, found.hashed, strict=True):
        st = os.stat(p)
        assert record[:5] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    hits = found.features()
    assert torch.equal(hits[0], torch.arange(12.0).view(3, 4))
    assert hits[1].dtype == torch.float16 and torch.equal(hits[1], torch.ones(1, 6, dtype=torch.float16))
    assert [f[:2] for f in found.files if not isinstance(f, MediaError)] == [
        (sha256(a), True), (sha256(garbage), False), (sha256(b), True), (sha256(c), False), (sha256(d), False),
        (sha256(e), False), (sha256(e), False),
    ]  # fmt: skip
    rows = [f[2] for f in found.files if not isinstance(f, MediaError)]
    assert rows[0] == 0 and rows[2] == 1 and rows[3:] == [0, 1, 2, 2]  # the copy shares e's row
    assert isinstance(rows[1], MediaError) and "unreadable" in rows[1].reason
    assert isinstance(found.files[4], MediaError) and found.files[4].reason == "no such file"
    assert found.inputs.shape[0] == 3
    for row, p in enumerate([c, d, e]):
        assert torch.equal(found.inputs[row], load_media("audio", p))
    assert not entry_file(entries, sha256(c)).exists() and not entry_file(entries, sha256(d)).exists()


def test_a_chunk_without_a_cache_is_decoded_without_hashing(tmp_path, audio_files, reads):
    from model.media.decoders import find_chunk
    from model.media.preprocess import load_media

    copy = tmp_path / "copy.wav"
    copy.write_bytes(audio_files[0].read_bytes())
    found = find_chunk("audio", [audio_files[0], synth.write_garbage(tmp_path / "bad.wav"), copy], None, None)
    assert reads[0] == 0 and found.hashed == [] and found.hits is None
    assert [f[:2] for f in found.files] == [(None, False)] * 3  # each file a content of its own
    assert [f[2] for f in found.files][::2] == [0, 1] and isinstance(found.files[1][2], MediaError)
    assert torch.equal(found.inputs[0], load_media("audio", audio_files[0])) and torch.equal(*found.inputs)


@pytest.mark.parametrize("kind", ["no cache", "per clip", "pooled"])
def test_a_lookup_in_the_processes_gives_what_the_threads_give(tmp_path, mixed, threaded_pool, reads, kind):
    """`LookupInProcesses` (the processes' path) against `look_up` and decoding in threads, on the same files and equal
    caches: the same hits, errors, content groups, keys and missed inputs, chunk after chunk. With a cache, the
    digests the processes computed are remembered, saved for the next job, and not computed again."""
    from model.media import file_hashes
    from model.media.decoders import DecodeProcesses
    from model.media.features import LookupInProcesses

    caches = {}
    for name in ("threads", "processes"):
        caches[name] = None if kind == "no cache" else cache_with_two_entries(tmp_path / name, mixed, kind == "pooled")
    expected = threads_lookup(caches["threads"], "audio", mixed)
    cache = caches["processes"]
    # each path the job does not remember a digest of (m0 and m1 were hashed to be stored) is hashed in its chunk,
    # a path given twice, in two chunks, twice (a job's group names each file once)
    good = [p for p in mixed if p.suffix == ".wav" and p.is_file()]
    unknown = [p for p in good if cache is not None and cache.hashes.known(p) is None]
    before = reads[0]
    with DecodeProcesses(2) as decoders:  # 11 files on 2 "processes": chunks of 2
        got = LookupInProcesses(decoders, cache, "audio", mixed).result()
        same_lookup(got, expected)
        assert any(isinstance(r, torch.Tensor) for r in got[0].results) == (kind != "no cache")
        assert reads[0] - before == len(unknown)  # no cache: nothing hashed
        if cache is None:
            return
        assert len(unknown) == len(good) - 3 and all(cache.hashes.known(p) == sha256(p) for p in good)
        assert not (tmp_path / "processes" / file_hashes.HASHES_FILE).exists()  # written just now: not settled
        again = LookupInProcesses(decoders, cache, "audio", mixed)
        same_lookup(again.result(), expected)
        assert reads[0] - before == len(unknown)  # remembered: sent along, not hashed again


def test_the_digests_a_lookup_in_the_processes_learned_are_saved_for_the_next_job(
    tmp_path, mixed, threaded_pool, reads, monkeypatch
):
    from model.media import file_hashes
    from model.media.decoders import DecodeProcesses
    from model.media.features import LookupInProcesses

    monkeypatch.setattr(file_hashes, "SETTLED_NS", 0)
    time.sleep(0.01)
    good = [p for p in mixed if p.suffix == ".wav" and p.is_file()]  # one file twice, in two chunks: hashed twice
    with DecodeProcesses(2) as decoders:
        LookupInProcesses(decoders, FeatureCache(tmp_path / "cache", "fake-v1"), "audio", mixed).result()
        assert reads[0] == len(good)
        later = FeatureCache(tmp_path / "cache", "fake-v1")  # the next job's
        assert all(later.hashes.known(p) == sha256(p) for p in good)
        LookupInProcesses(decoders, later, "audio", mixed).result()
        assert reads[0] == len(good)


def test_a_lookup_in_the_processes_returns_before_its_files_are_found(tmp_path, monkeypatch, threaded_pool):
    """A job's loader looks up its next group while the processes work on this one: the call returns at once, each
    chunk comes back as at most two tensors (model/media/decoders.py: a tensor a file cost the job a socket
    handshake each), and the result waits for every chunk."""
    import threading

    from model.media import decoders
    from model.media.features import LookupInProcesses

    paths = [synth.write_wav(tmp_path / f"{i}.wav", seconds=1.0, freq=250.0 + 100 * i) for i in range(6)]
    paths.insert(2, synth.write_garbage(tmp_path / "bad.wav"))
    expected = threads_lookup(None, "audio", paths)
    go = threading.Event()
    real = decoders.load_or_error
    monkeypatch.setattr(decoders, "load_or_error", lambda m, p: go.wait(30) and real(m, p))
    with decoders.DecodeProcesses(1) as pool:
        given = LookupInProcesses(pool, None, "audio", paths)
        assert len(given.chunks) == 3 and not any(c.done() for c in given.chunks)  # 7 files: chunks of 7 // 2 = 3
        go.set()
        same_lookup(given.result(), expected)
        assert [c.result().inputs.shape[0] for c in given.chunks] == [2, 3, 1]  # one bad file, no hits
        assert all(c.result().hits is None for c in given.chunks)


def test_a_small_group_while_the_decoding_processes_start_is_done_by_the_caller(tmp_path, monkeypatch):
    """The pool's start (the forkserver importing torch: seconds) does not hold up a job's first media group: a group
    of at most CALLER_DECODES files of a modality, looked up while the pool starts, is done in this process, as the
    threads do it, and no worker is started; a larger one goes to the pool (a submit waits for its start)."""
    import multiprocessing
    import threading
    from types import SimpleNamespace

    from model.data.catalog import load_rows
    from model.data.row_features import decode_media
    from model.media import decoders

    up = threading.Event()
    monkeypatch.setattr(decoders.DecodeProcesses, "_start", lambda self: up.wait(30))
    paths = [synth.write_wav(tmp_path / f"{i}.wav", seconds=1.0, freq=300.0 * (i + 1)) for i in range(3)]
    paths.append(synth.write_garbage(tmp_path / "bad.wav"))
    rows = load_rows(synth.write_dataset(tmp_path, [synth.make_row(p.stem, [("audio", p.name)]) for p in paths]))[0]
    model = SimpleNamespace(visual_encoder=FakeEncoder())
    expected = threads_lookup(FeatureCache(tmp_path / "threads", "fake-v1"), "audio", paths)
    decode = decoders.DecodeProcesses(2)
    pooled, threads = [], ThreadPoolExecutor(2)
    decode.pool.submit = lambda fn, *args: pooled.append(fn.__name__) or threads.submit(fn, *args)
    try:
        media = decode_media(model, rows, tmp_path, FeatureCache(tmp_path / "caller", "fake-v1"), 2, decode)
        assert not multiprocessing.active_children() and not pooled
        same_lookup(media.decoded[0].result(), expected)
        monkeypatch.setattr(decoders, "CALLER_DECODES", len(paths) - 1)
        media = decode_media(model, rows, tmp_path, FeatureCache(tmp_path / "pool", "fake-v1"), 2, decode)
        same_lookup(media.decoded[0].result(), expected)
        assert pooled == ["find_chunk"] * 4
    finally:
        threads.shutdown()
        up.set()
        decode.close()


def test_process_stores_write_what_the_cache_writes_a_batch_at_a_time(tmp_path, audio_files, threaded_pool):
    """`ProcessStores` hands each batch's features to the processes as one tensor (`DecodeProcesses.write`); the
    entries written are those `FeatureCache.put` writes: the same place, features, dtype and metadata."""
    from safetensors import safe_open

    from model.media.decoders import DecodeProcesses, in_threads
    from model.media.feature_stores import ProcessStores
    from model.media.features import look_up

    expected = FeatureCache(tmp_path / "threads", FakeEncoder.fingerprint)
    want = encode_files(FakeEncoder(), expected, "audio", audio_files, batch_size=2)
    cache = FeatureCache(tmp_path / "processes", FakeEncoder.fingerprint)
    handed = []
    with DecodeProcesses(2) as decoders:
        decoders.starting.join()
        real_write = decoders.write
        decoders.write = lambda entries, features, metadata: (
            handed.append(features.shape) or real_write(entries, features, metadata)
        )
        stores = ProcessStores(decoders)
        lookup = look_up(cache, "audio", audio_files)
        decode = in_threads(1)
        got = encode_misses(
            FakeEncoder(), cache, lookup, lambda a, b: decode("audio", lookup.first_paths(a, b)), 2, stores=stores
        )
        stores.wait()
    assert handed == [(2, 3, 4), (2, 3, 4), (1, 3, 4)]
    for path, a, b in zip(audio_files, got, want, strict=True):
        same(a, b)
        entry, want_entry = cache.entry("audio", path), expected.entry("audio", path)
        assert entry.relative_to(cache.root) == want_entry.relative_to(expected.root)
        same(FeatureCache(cache.root, FakeEncoder.fingerprint).get("audio", path), expected.get("audio", path))
        with safe_open(entry, "pt") as f, safe_open(want_entry, "pt") as g:
            assert f.metadata() == g.metadata() and f.metadata()["source"] == str(path)


def test_a_failed_store_in_the_processes_is_raised_at_the_next_put_or_at_wait(tmp_path, audio_files, threaded_pool):
    """A write that failed in a process (a full disk) is never lost: the next batch handed over raises it, and so
    does waiting for the stores; a batch handed over while the pool starts is written, or fails, on this thread."""
    import threading
    from concurrent.futures import wait

    from model.media import decoders
    from model.media.feature_stores import ProcessStores

    def full(entry, features, metadata):
        raise OSError(28, "No space left on device")

    cache = FeatureCache(tmp_path / "cache", FakeEncoder.fingerprint)
    items = [(audio_files[0], sha256(audio_files[0]), torch.ones(3, 4))]
    with pytest.MonkeyPatch.context() as patch, decoders.DecodeProcesses(1) as pool:
        patch.setattr(decoders, "write_entry", full)
        pool.starting.join()
        stores = ProcessStores(pool)
        stores.put(cache, "audio", items)
        wait(stores.writes)
        with pytest.raises(OSError, match="No space"):
            stores.put(cache, "audio", items)
        last = ProcessStores(pool)
        last.put(cache, "audio", items)
        with pytest.raises(OSError, match="No space"):
            last.wait()
    with pytest.MonkeyPatch.context() as patch:
        up = threading.Event()
        patch.setattr(decoders.DecodeProcesses, "_start", lambda self: up.wait(30))
        starting = decoders.DecodeProcesses(1)
        try:
            stores = ProcessStores(starting)
            stores.put(cache, "audio", items)
            assert stores.writes == [] and torch.equal(cache.get("audio", audio_files[0]), torch.ones(3, 4))
            patch.setattr(decoders, "write_entry", full)
            with pytest.raises(OSError, match="No space"):
                stores.put(cache, "audio", items)
        finally:
            up.set()
            starting.close()


@pytest.mark.slow
def test_a_group_found_and_stored_by_real_processes_equals_the_threads(tmp_path, mixed):
    """`DecodeProcesses(2)`: the pool starts without holding up its caller; a group looked up, decoded, encoded and
    stored through the processes gives the threads' results bit for bit (a bad file's MediaError crossing the process
    boundary naming it), and a second lookup of the group gets every good file as a hit, hashing none again."""
    import multiprocessing

    from model.media.decoders import DecodeProcesses
    from model.media.feature_stores import ProcessStores
    from model.media.features import LookupInProcesses

    expected_cache = FeatureCache(tmp_path / "threads", FakeEncoder.fingerprint)
    expected = threads_lookup(expected_cache, "audio", mixed)
    cache = FeatureCache(tmp_path / "processes", FakeEncoder.fingerprint)
    begin = time.monotonic()
    with DecodeProcesses(2) as decoders:
        assert time.monotonic() - begin < 0.5  # the forkserver imports torch on a thread of its own
        decoders.starting.join()
        got = LookupInProcesses(decoders, cache, "audio", mixed).result()
        assert len(multiprocessing.active_children()) == 2
        same_lookup(got, expected)
        want = encode_misses(FakeEncoder(), expected_cache, expected[0], lambda a, b: expected[1][a:b], 2)
        stores = ProcessStores(decoders)
        encoded = encode_misses(FakeEncoder(), cache, got[0], lambda a, b: got[1][a:b], 2, stores=stores)
        stores.wait()
        for a, b in zip(encoded, want, strict=True):
            same(a, b)
        again = LookupInProcesses(decoders, cache, "audio", mixed)
        lookup, inputs = again.result()
        assert all(c.result().hashed == [] for c in again.chunks)
    for r, w in zip(lookup.results, want, strict=True):
        if isinstance(w, torch.Tensor):
            same(r, w)
    assert len(inputs) == 1 and isinstance(inputs[0], MediaError)  # the corrupt content, decoded again
