"""Issue 14, cases 1, 2 and 10: the inference journal survives torn lines, full disks, second processes and
changed settings; every failure is one line naming the file."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from synth import infer_args, make_row, write_dataset
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.infer.journal import Journal, JournalError, OutputLocked, output_lock, read_journal, write_results

runner = CliRunner()


def text_dataset(folder: Path, n: int) -> Path:
    """n text-only rows whose instructions hold multi-byte UTF-8 (a cut can land inside a character)."""
    rows = [make_row(f"r{i}", text=f"Song {i}.", instruction=f"Wie klingt es? 音楽 {i % 3}") for i in range(n)]
    return write_dataset(folder, rows)


def args(tiny_root: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return infer_args(tiny_root, dataset, out, "--batch-size", "2", *extra, max_new_tokens=4)


def dr(*argv: str, limit_bytes: int | None = None, **kw) -> subprocess.CompletedProcess:
    """`dr` in a fresh process; `limit_bytes` caps every file it writes (RLIMIT_FSIZE: a disk that fills up)."""

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "deepresonance_cli.app", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=full_disk if limit_bytes else None,
        **kw,
    )


def entries(journal: Path) -> list[dict]:
    return [e for e in map(json.loads, journal.read_bytes().decode("utf-8").splitlines()) if "run" not in e]


def answered(out: Path) -> int:
    return sum(len(v) for v in json.loads(out.read_text(encoding="utf-8")).values())


@pytest.mark.parametrize("cut", ["inside a multi-byte character", "on an ASCII byte"])
def test_torn_last_line_is_set_aside_and_every_complete_line_kept(tiny_root, tmp_path, cut):
    dataset = text_dataset(tmp_path / "data", 6)
    out = tmp_path / "res" / "toy.json"
    assert runner.invoke(app, args(tiny_root, dataset, out)).exit_code == 0
    journal = out.with_suffix(".jsonl")
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    start = len(data) - len(last) - 1
    # a full disk cuts the last line short: inside the 3-byte "音", or between two ASCII bytes
    offset = last.index("音".encode()) + 1 if cut.startswith("inside") else last.index(b'"instruction"') + 3
    journal.write_bytes(data[: start + offset])
    before = entries_upto = [json.loads(line) for line in data[:start].decode().splitlines()[1:]]
    assert len(entries_upto) == 5

    result = runner.invoke(app, args(tiny_root, dataset, out))
    assert result.exit_code == 0, result.output
    assert "torn last line" in result.output and "set aside" in result.output
    aside = list(journal.parent.glob("toy.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == last[:offset]
    now = entries(journal)  # every line parses: the new answer did not land on the fragment
    assert now[:5] == before and len(now) == 6
    assert answered(out) == 6


def test_full_disk_is_one_line_naming_the_journal_and_loses_nothing_journaled(tiny_root, tmp_path):
    dataset = text_dataset(tmp_path / "data", 12)
    out = tmp_path / "res" / "toy.json"
    journal = out.with_suffix(".jsonl")
    full = dr(*args(tiny_root, dataset, out), limit_bytes=700)
    assert full.returncode == 1, full.stderr
    lines = full.stderr.strip().splitlines()
    assert "Traceback" not in full.stderr and lines[-1].startswith("error:"), full.stderr
    assert str(journal) in " ".join(full.stderr.split()) and "disk is full" in full.stderr
    assert journal.read_bytes().endswith(b"\n")  # cut back to its last complete line
    kept = entries(journal)
    assert 1 <= len(kept) < 12

    again = dr(*args(tiny_root, dataset, out))
    assert again.returncode == 0, again.stderr
    final = entries(journal)
    assert final[: len(kept)] == kept and len(final) == 12  # only the rows of the failed write were redone
    assert answered(out) == 12


def test_full_disk_while_writing_the_result_keeps_the_journal_and_the_old_file(tmp_path):
    out = tmp_path / "r.json"
    journal = Journal(out.with_suffix(".jsonl"), {"delta": "x"})
    journal.write([{"id": str(i), "instruction": "q", "answer": "a" * 200} for i in range(20)])
    journal.close()
    out.write_text("{}")
    code = (
        "import resource, signal, sys; from pathlib import Path; from model.infer.journal import write_results;"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000));"
        f"write_results(Path({str(out)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and f"JournalError: {out}: could not write (the disk is full)" in proc.stderr
    assert out.read_text() == "{}" and not list(tmp_path.glob("*.tmp"))
    assert len(write_results(out)) == 20


@pytest.mark.slow
def test_second_process_on_the_same_out_says_who_holds_it_and_exits(tiny_root, tmp_path):
    dataset = text_dataset(tmp_path / "data", 40)
    out = tmp_path / "res" / "toy.json"
    cmd = [sys.executable, "-m", "deepresonance_cli.app", *args(tiny_root, dataset, out)]
    cmd[cmd.index("4")] = "32"  # longer answers: the first job is still running when the second starts
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal = out.with_suffix(".jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or len(journal.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # paused mid-job, holding the lock, however fast the machine is
    try:
        assert first.poll() is None, "the first job should still be running"
        second = dr(*args(tiny_root, dataset, out))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    message = " ".join(second.stderr.split())
    assert f"pid {first.pid} on {os.uname().nodename}" in message and "another --out" in message
    assert first.wait(timeout=240) == 0, first.stderr.read()
    keys = [(e["id"], e["instruction"]) for e in entries(journal)]
    assert len(keys) == len(set(keys)) == 40  # every row computed once, by the first job


def test_lock_is_released_by_a_killed_holder(tmp_path):
    out = tmp_path / "r.json"
    code = (
        f"from model.infer.journal import output_lock; output_lock({str(out)!r}).acquire(); print('held', flush=True); "
    )
    code += "import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
        output_lock(out).acquire()
    holder.kill()
    holder.wait()
    with output_lock(out):  # the OS dropped the dead holder's lock: no stale lock file to clean by hand
        pass


def test_lock_is_reentrant_and_held_until_its_last_release(tmp_path):
    out = tmp_path / "r.json"
    probe = (
        "import sys; from model.infer.journal import OutputLocked, output_lock\n"
        f"try:\n    output_lock({str(out)!r}).acquire()\nexcept OutputLocked as e:\n    sys.exit(str(e))"
    )

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stderr

    first = output_lock(out).acquire()
    output_lock(out).acquire()  # again, as run_inference does under `dr infer`
    first.release()
    assert f"pid {os.getpid()} on {os.uname().nodename}" in other_process()  # one hold is left
    first.release()
    assert other_process() == ""
    first.release()  # one release too many does nothing


def test_concurrent_result_writes_never_collide(tmp_path):
    out = tmp_path / "r.json"
    journal = Journal(out.with_suffix(".jsonl"))
    journal.write([{"id": str(i), "instruction": "q", "answer": "a"} for i in range(50)])
    journal.close()
    errors: list[Exception] = []

    def writer() -> None:
        for _ in range(100):
            try:
                write_results(out)
            except Exception as e:  # the race used to raise FileNotFoundError on the shared .tmp name
                errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(json.loads(out.read_text())) == 50


@pytest.mark.parametrize(
    "change",
    [["--max-new-tokens", "5"], ["--variant", "beta"], ["--dtype", "bfloat16"], ["--no-greedy", "--seed", "3"]],
    ids=["generation", "variant+delta", "dtype", "sampling"],
)
def test_resume_with_another_model_or_settings_is_one_line_offering_overwrite(tiny_root, tmp_path, change):
    dataset = text_dataset(tmp_path / "data", 3)
    out = tmp_path / "res" / "toy.json"
    assert runner.invoke(app, args(tiny_root, dataset, out)).exit_code == 0
    argv = args(tiny_root, dataset, out)
    if change[0] == "--max-new-tokens":
        argv[argv.index("--max-new-tokens") + 1] = change[1]
    else:
        argv = [a for a in argv if a != "--greedy" or change[0] != "--no-greedy"] + change
    refused = dr(*argv)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    message = " ".join(refused.stderr.split())
    assert "holds answers of another run" in message and "--overwrite" in message and "--out" in message
    assert len(entries(out.with_suffix(".jsonl"))) == 3  # nothing was touched
    if change[0] != "--max-new-tokens":
        return  # --overwrite and the resume after it: once is enough
    redone = runner.invoke(app, [*argv, "--overwrite"])
    assert redone.exit_code == 0, redone.output
    assert len(entries(out.with_suffix(".jsonl"))) == 3 and answered(out) == 3
    again = runner.invoke(app, argv)  # the new identity resumes as usual
    assert again.exit_code == 0 and len(entries(out.with_suffix(".jsonl"))) == 3


def test_greedy_identity_ignores_sampling_knobs_and_speed_options(tiny_root, tmp_path):
    dataset = text_dataset(tmp_path / "data", 2)
    out = tmp_path / "res" / "toy.json"
    assert runner.invoke(app, args(tiny_root, dataset, out)).exit_code == 0
    same = runner.invoke(app, [*args(tiny_root, dataset, out), "--temperature", "0.7", "--batch-size", "1"])
    assert same.exit_code == 0, same.output
    assert len(read_journal([out.with_suffix(".jsonl")])) == 2


def test_journal_without_identity_is_refused(tmp_path):
    from model.infer.journal import check_identity

    out = tmp_path / "r.json"
    out.with_suffix(".jsonl").write_text(json.dumps({"id": "a", "instruction": "q", "answer": "x"}) + "\n")
    with pytest.raises(JournalError, match="records no run identity"):
        check_identity(out, {"delta": "d"})
