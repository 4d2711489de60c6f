"""The feature cache's file digests remembered on disk (model/media/file_hashes.py): a later process reads no bytes of
an unchanged file, and any rewrite, even one that restores size and mtime, is hashed again."""

from __future__ import annotations

import json
import os
import time

import pytest
from synth import sha256

from model.io import files as io_files
from model.media import file_hashes
from model.media.features import FeatureCache, look_up
from model.media.file_hashes import HASHES_FILE, FileHashes


@pytest.fixture
def two_files(tmp_path):
    """Two small files of different content, their ctimes already in the past."""
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"a" * 10)
    b.write_bytes(b"b" * 10)
    time.sleep(0.01)
    return a, b


@pytest.fixture
def settled_at_once(monkeypatch):
    """Any file counts as settled once its ctime is in the past (the test writes and hashes within milliseconds)."""
    monkeypatch.setattr(file_hashes, "SETTLED_NS", 0)


def test_a_later_process_takes_an_unchanged_files_digest_from_disk(tmp_path, reads, settled_at_once):
    media = tmp_path / "a.wav"
    media.write_bytes(b"RIFF" + bytes(range(256)) * 40)
    time.sleep(0.01)
    first = FileHashes(tmp_path / "cache")
    assert first.digest(media) == sha256(media) and reads[0] == 1
    assert first.digest(media) == sha256(media) and reads[0] == 1  # remembered in this process
    first.save()
    later = FileHashes(tmp_path / "cache")  # a new process's
    assert later.digest(media) == sha256(media) and reads[0] == 1  # no byte read


def test_a_rewritten_file_is_hashed_again_though_its_size_and_mtime_are_restored(tmp_path, reads, settled_at_once):
    media = tmp_path / "a.wav"
    media.write_bytes(b"a" * 4096)
    time.sleep(0.01)
    first = FileHashes(tmp_path / "cache")
    old = first.digest(media)
    first.save()
    before = os.stat(media)
    time.sleep(0.05)
    media.write_bytes(b"b" * 4096)  # same size
    os.utime(media, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime: only the ctime tells
    later = FileHashes(tmp_path / "cache")
    assert later.digest(media) == sha256(media) != old and reads[0] == 2


def test_a_file_changed_just_before_its_hashing_is_not_kept_on_disk(tmp_path, reads):
    """Within SETTLED_NS of its ctime a file could change again within the same clock tick: kept in memory only."""
    media = tmp_path / "fresh.wav"
    media.write_bytes(b"x" * 100)
    hashes = FileHashes(tmp_path / "cache")
    assert hashes.digest(media) == sha256(media)
    hashes.save()
    assert not (tmp_path / "cache" / HASHES_FILE).exists()
    assert FileHashes(tmp_path / "cache").digest(media) == sha256(media) and reads[0] == 2


def test_a_bad_memo_costs_a_rehash_and_an_unwritable_root_only_the_speed_up(
    tmp_path, reads, settled_at_once, monkeypatch
):
    media = tmp_path / "a.wav"
    media.write_bytes(b"y" * 100)
    time.sleep(0.01)
    root = tmp_path / "cache"
    root.mkdir()
    st = os.stat(media)
    wrong = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, "0" * 64]
    (root / HASHES_FILE).write_text(json.dumps({str(media.resolve()): wrong[:5] + ["short"]}))  # malformed
    assert FileHashes(root).digest(media) == sha256(media) and reads[0] == 1
    (root / HASHES_FILE).write_text("{not json")
    assert FileHashes(root).digest(media) == sha256(media) and reads[0] == 2
    right = [*wrong[:5], sha256(media)]
    (root / HASHES_FILE).write_text(json.dumps({str(media.resolve()): right, "padding": "x" * 200}))
    assert FileHashes(root).digest(media) == sha256(media) and reads[0] == 2  # a good memo is used
    monkeypatch.setattr(io_files, "MEMO_BYTES", 100)  # a memo over the bound is not read at all
    assert FileHashes(root).digest(media) == sha256(media) and reads[0] == 3
    blocked = FileHashes(tmp_path / "a.wav" / "cache")  # its root is under a file: cannot be written
    assert blocked.digest(media) == sha256(media)
    blocked.save()


def test_a_jobs_lookups_remember_the_digests_for_the_next_job(tmp_path, reads, settled_at_once):
    """`look_up` saves the digests it computed: the next job's lookups of the same cached files hash none."""
    files = [tmp_path / f"m{i}.wav" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 2048)
    time.sleep(0.01)
    look_up(FeatureCache(tmp_path / "cache", "fake-v1"), "audio", files)
    assert reads[0] == 3
    again = look_up(FeatureCache(tmp_path / "cache", "fake-v1"), "audio", files)
    assert reads[0] == 3 and len(again.misses) == 3  # no features were stored: misses, but known by content


def test_a_save_soon_after_the_last_waits_for_the_next(tmp_path, two_files, settled_at_once):
    """A job's lookups save at most every SAVE_EVERY_S (each save rewrites the memo); its final save writes the rest."""
    a, b = two_files
    hashes = FileHashes(tmp_path / "cache")
    hashes.digest(a)
    hashes.save(60.0)  # the first save is not held back
    hashes.digest(b)
    hashes.save(60.0)
    memo = lambda: json.loads((tmp_path / "cache" / HASHES_FILE).read_text())  # noqa: E731
    assert list(memo()) == [str(a.resolve())]
    hashes.save()
    assert list(memo()) == [str(a.resolve()), str(b.resolve())]


def test_hash_file_gives_the_memos_record_and_known_takes_it_back_only_for_the_same_file(tmp_path, reads):
    """What a decoding process hashes (`hash_file`) and the job's process remembers (`remember`), then finds by a
    stat (`known`): the record is the file's identity and hashlib's sha256, and it answers only for that file as it
    was (a rewrite of the same size, with its mtime set back, is not known)."""
    media = tmp_path / "link" / ".." / "a.wav"
    (tmp_path / "link").mkdir()
    media.write_bytes(b"z" * 3000)
    key, record, settled = file_hashes.hash_file(media)
    st = os.stat(media)
    assert key == str((tmp_path / "a.wav").resolve())
    assert record == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, sha256(media)]
    assert not settled and reads[0] == 1  # written just now: within SETTLED_NS of its ctime
    hashes = FileHashes(tmp_path / "cache")
    assert hashes.known(media) is None
    hashes.remember(key, record, settled)
    assert hashes.known(media) == sha256(media) and hashes.digest(media) == sha256(media) and reads[0] == 1
    assert hashes.known(tmp_path / "gone.wav") is None
    time.sleep(0.05)
    media.write_bytes(b"w" * 3000)
    os.utime(media, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hashes.known(media) is None
    with pytest.raises(file_hashes.MediaError, match="no such file"):
        file_hashes.hash_file(tmp_path / "gone.wav")
    os.mkfifo(tmp_path / "fifo.wav")
    with pytest.raises(file_hashes.MediaError, match="not a regular file"):
        file_hashes.hash_file(tmp_path / "fifo.wav")  # never blocks: opened non-blocking, checked before a read
    assert hashes.known(tmp_path / "fifo.wav") is None


def test_only_settled_records_are_saved(tmp_path, two_files, settled_at_once):
    """`remember`'s settled flag (hash_file's) decides what a save keeps on disk for the next process."""
    a, b = two_files
    hashes = FileHashes(tmp_path / "cache")
    for path, settled in ((a, True), (b, False)):
        key, record, _ = file_hashes.hash_file(path)
        hashes.remember(key, record, settled)
    hashes.save()
    later = FileHashes(tmp_path / "cache")
    assert later.known(a) == sha256(a) and later.known(b) is None
