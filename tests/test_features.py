"""model/media/features.py: the encoder-feature cache and batched encoding, with a fake encoder that counts calls."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import synth
import torch

from model.media import feature_files
from model.media import features as features_module
from model.media.features import FeatureCache, encode_files
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

    def __call__(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
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


def test_a_batchs_stores_run_while_the_next_batch_encodes(tmp_path, audio_files, monkeypatch):
    """The encoder waits for no store: a store of batch 1 is still under way when batch 2 is encoded (waiting for a
    batch's stores before the next call kept the GPU idle through every write). All stores end before the call
    returns, and a failed one fails it."""
    import threading

    second_call = threading.Event()
    seen = []
    real_put = FeatureCache.put

    class Encoder(FakeEncoder):
        def __call__(self, modality, inputs):
            if self.calls:
                second_call.set()
            return super().__call__(modality, inputs)

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
    monkeypatch.setitem(features_module.CALL_FILES, "audio", 2)
    encoder = FakeEncoder()
    capped = encode_files(encoder, None, "audio", audio_files, batch_size=4)
    assert encoder.calls == [("audio", 2), ("audio", 2), ("audio", 1)]
    monkeypatch.setitem(features_module.CALL_FILES, "audio", 64)
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


@pytest.mark.slow
def test_decoding_processes_give_the_threads_inputs_and_errors(tmp_path):
    """A long job's media decode in processes (model/media/decoders.py): the pool starts without holding up its
    caller, each file's encoder input is the one the threads give, bit for bit, and a bad file's MediaError comes
    back across the process boundary naming it."""
    import multiprocessing

    from model.media.decoders import DecodeProcesses, in_threads

    paths = [synth.write_wav(tmp_path / f"{i}.wav", seconds=1.0 + i, freq=200.0 * (i + 1)) for i in range(3)]
    paths.append(synth.write_garbage(tmp_path / "bad.wav"))
    threads = in_threads(2)("audio", paths)
    begin = time.monotonic()
    with DecodeProcesses(2) as decode:
        # the forkserver imports torch before the first process exists (seconds): not on the caller's thread, which
        # builds the engine meanwhile
        assert time.monotonic() - begin < 0.5
        decode.starting.join()  # a call before the pool is up would decode on this thread
        processes = list(decode("audio", paths))  # taken before the pool closes
        assert len(multiprocessing.active_children()) == 2
    for a, b in zip(threads[:3], processes[:3], strict=True):
        assert torch.equal(a, b)
    assert isinstance(processes[3], MediaError) and processes[3].path == str(paths[3])
    assert processes[3].reason == threads[3].reason


def test_a_small_call_while_the_decoding_processes_start_is_decoded_by_the_caller(tmp_path, monkeypatch):
    """The pool's start (the forkserver importing torch: seconds) does not hold up a job's first media group: a call
    of at most CALLER_DECODES files made before the pool is up is decoded on the calling thread, as the threads would
    decode it, and no worker is started (a larger call waits for the pool: the slow test of the processes)."""
    import multiprocessing
    import threading

    from model.media import decoders

    up = threading.Event()
    monkeypatch.setattr(decoders.DecodeProcesses, "_start", lambda self: up.wait(30))
    paths = [synth.write_wav(tmp_path / f"{i}.wav", seconds=1.0, freq=300.0 * (i + 1)) for i in range(3)]
    paths.append(synth.write_garbage(tmp_path / "bad.wav"))
    expected = decoders.in_threads(2)("audio", paths)
    decode = decoders.DecodeProcesses(2)
    pooled = []
    threads = ThreadPoolExecutor(2)
    decode.pool.submit = lambda fn, modality, files: pooled.append(len(files)) or threads.submit(fn, modality, files)
    try:
        got = decode("audio", paths)
        assert not multiprocessing.active_children() and not pooled
        monkeypatch.setattr(decoders, "CALLER_DECODES", len(paths) - 1)
        assert [type(x) for x in decode("audio", paths)] == [type(x) for x in got] and pooled == [1, 1, 1, 1]
    finally:
        threads.shutdown()
        up.set()
        decode.close()
    for a, b in zip(expected[:3], got[:3], strict=True):
        assert torch.equal(a, b)
    assert isinstance(got[3], MediaError) and got[3].reason == expected[3].reason


def test_a_call_to_the_decoding_processes_returns_before_its_files_are_decoded(tmp_path, monkeypatch):
    """A job's loader looks up its next group while the processes decode this one: a call returns at once, each
    chunk of files comes back as one stacked tensor (model/media/decoders.py: a tensor a file cost the job a socket
    handshake each) and the sequence gives every file's input, or its error, in order, as the threads would."""
    import threading

    from model.media import decoders

    paths = [synth.write_wav(tmp_path / f"{i}.wav", seconds=1.0, freq=250.0 * (i + 1)) for i in range(6)]
    paths.insert(2, synth.write_garbage(tmp_path / "bad.wav"))
    expected = decoders.in_threads(2)("audio", paths)
    go = threading.Event()
    real = decoders.load_or_error
    monkeypatch.setattr(decoders, "load_or_error", lambda m, p: go.wait(30) and real(m, p))
    monkeypatch.setattr(decoders.DecodeProcesses, "_start", lambda self: None)
    decode = decoders.DecodeProcesses(1)
    chunks = []
    with ThreadPoolExecutor(2) as threads:

        def submit(fn, modality, files):
            chunks.append(threads.submit(fn, modality, files))
            return chunks[-1]

        decode.pool.submit = submit
        decode.starting.join()
        got = decode("audio", paths)
        assert len(got) == len(paths) and not any(c.done() for c in chunks)  # nothing decoded yet
        go.set()
        stacked = [c.result()[0] for c in chunks]
        assert [len(s) for s in stacked] == [2, 3, 1]  # 7 files, 1 process: chunks of 7 // 2 = 3, one bad file
        assert [type(x) for x in got] == [type(x) for x in expected]
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else (a.path, a.reason) == (b.path, b.reason)
    decode.close()


def test_decoding_processes_run_one_intra_op_thread_at_the_jobs_priority():
    """Each decoding process is one of many: one intra-op thread (not one per core each), and the job's own CPU
    priority (a lower one slowed the engine's build beside them instead of speeding it)."""
    import model.media.decoders as decoders

    with decoders.DecodeProcesses(2) as decode:
        nice = [decode.pool.submit(os.nice, 0) for _ in range(4)]
        threads = [decode.pool.submit(torch.get_num_threads) for _ in range(4)]
        assert {f.result() for f in nice} == {os.nice(0)}
        assert {f.result() for f in threads} == {1}


def test_decoded_chunks_are_one_tensor_each_and_arrive_in_order_as_far_as_asked(tmp_path):
    """`decode_chunk` stacks a chunk's good inputs and keeps each bad file's error in its place; `Arriving` waits
    only for the chunks an index reaches (a later chunk that failed is not raised for an earlier file)."""
    from concurrent.futures import Future

    from model.media.decoders import Arriving, decode_chunk, load_or_error

    paths = [synth.write_wav(tmp_path / f"{i}.wav", seconds=1.0, freq=400.0 + 100 * i) for i in range(3)]
    paths.insert(1, synth.write_garbage(tmp_path / "bad.wav"))
    stacked, rows = decode_chunk("audio", paths)
    assert stacked.shape[0] == 3 and rows[0] == 0 and isinstance(rows[1], MediaError) and rows[2:] == [1, 2]
    for p, row in zip(paths, rows, strict=True):
        if isinstance(row, int):
            assert torch.equal(stacked[row], load_or_error("audio", p))
    done, failed = Future(), Future()
    done.set_result((stacked, rows))
    failed.set_exception(RuntimeError("a worker died"))
    arriving = Arriving([done, failed], len(paths) + 2)
    assert torch.equal(arriving[3], stacked[2]) and arriving[1] is rows[1] and len(arriving[0:4]) == 4
    with pytest.raises(RuntimeError, match="a worker died"):
        arriving[4]
    with pytest.raises(IndexError):
        arriving[6]
    assert decode_chunk("audio", [paths[1]])[0] is None


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
