"""`dr`'s own entry point (deepresonance_cli/app.py `main`) ends its process without the interpreter's teardown
(deepresonance_cli/process.py `exit_now`): these run it in fresh processes and check that what a normal exit gives
is still given: the exit status, text written but not yet flushed, the exit handlers' work, a thread Python waits
for, and a collector that still runs. Then the warning where every process would compile its imports again."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_main(tmp_path: Path, before: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh process that runs `before`, then `dr ARGV` through `main`, with `env` added to its environment; its
    output buffered as a user's is (no PYTHONUNBUFFERED, which CI may set)."""
    script = textwrap.dedent(before) + f"\nsys.argv = ['dr', *{list(argv)!r}]\nimport deepresonance_cli.app\n"
    script = "import sys\n" + script + "deepresonance_cli.app.main()\n"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"} | env
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False
    )


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["version"], 0),
        (["no-such-command"], 2),  # click's usage error
        (["infer", "--dataset", "missing.json", "--ckpt-root", "none"], 1),  # dr's one-line error
    ],
    ids=["done", "usage", "error"],
)
def test_the_exit_status_is_the_commands(tmp_path, argv, status):
    assert run_main(tmp_path, "", *argv).returncode == status


def test_a_message_given_to_system_exit_is_printed_with_status_1(tmp_path):
    before = """
        import typer
        import deepresonance_cli.app as dr
        @dr.app.command("stop")
        def stop() -> None:
            raise SystemExit("stopped here")
    """
    done = run_main(tmp_path, before, "stop")
    assert (done.returncode, done.stderr.strip()) == (1, "stopped here")


def test_text_not_yet_flushed_still_reaches_a_pipe(tmp_path):
    before = """
        import atexit
        atexit.register(sys.stdout.write, ';written at exit, unflushed')
    """
    done = run_main(tmp_path, before, "version")
    assert done.stdout.startswith("dr ") and done.stdout.endswith(";written at exit, unflushed")


def test_exit_handlers_run(tmp_path):
    before = """
        import atexit, pathlib
        atexit.register(pathlib.Path('handler.txt').write_text, 'ran')
    """
    run_main(tmp_path, before, "version")
    assert (tmp_path / "handler.txt").read_text() == "ran"


def test_a_thread_python_waits_for_finishes_its_work(tmp_path):
    before = """
        import pathlib, threading, time
        import deepresonance_cli.app as dr
        def late() -> None:
            time.sleep(1.0)
            pathlib.Path('thread.txt').write_text('finished')
        @dr.app.command("start")
        def start() -> None:
            threading.Thread(target=late).start()
    """
    run_main(tmp_path, before, "start")
    assert (tmp_path / "thread.txt").read_text() == "finished"


def test_the_interpreters_teardown_is_skipped(tmp_path):
    """What the 1.4-1.5 s went to: freeing every module's objects. A module-level object's finalizer runs at a normal
    exit (checked first, with `exit_now` replaced by sys.exit) and not at `main`'s."""
    before = textwrap.dedent(
        """
        import pathlib
        class Noted:
            def __del__(self) -> None:
                pathlib.Path('torn_down.txt').write_text('freed at teardown')
        kept = Noted()
        """
    )
    normal_exit = "import deepresonance_cli.process as process\nprocess.exit_now = sys.exit\n"
    done = run_main(tmp_path, before + normal_exit, "version")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "torn_down.txt").exists()
    (tmp_path / "torn_down.txt").unlink()
    assert run_main(tmp_path, before, "version").returncode == 0
    assert not (tmp_path / "torn_down.txt").exists()


def test_an_idle_executors_threads_end_and_the_teardown_is_still_skipped(tmp_path):
    """An executor left open (Inductor's compile threads are one) keeps non-daemon worker threads waiting for work;
    they are told to end and joined, as at a normal exit, and the process still leaves out the teardown."""
    before = """
        import pathlib
        from concurrent.futures import ThreadPoolExecutor
        import deepresonance_cli.app as dr
        class Noted:
            def __del__(self) -> None:
                pathlib.Path('torn_down.txt').write_text('freed at teardown')
        kept = Noted()
        pool = ThreadPoolExecutor(2)
        @dr.app.command("compile")
        def compile_() -> None:
            pool.submit(pathlib.Path('work.txt').write_text, 'done').result()
    """
    done = run_main(tmp_path, before, "compile")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "work.txt").read_text() == "done"
    assert not (tmp_path / "torn_down.txt").exists()


def test_cycles_are_still_collected_while_a_command_runs(tmp_path):
    before = """
        import gc, pathlib, weakref
        import deepresonance_cli.app as dr
        @dr.app.command("cycles")
        def cycles() -> None:
            class Node:
                pass
            node = Node()
            node.self = node
            alive = weakref.ref(node)
            del node
            kept = [[] for _ in range(100_000)]  # allocations enough for the collector's own schedule, no gc.collect()
            pathlib.Path('cycle.txt').write_text('collected' if alive() is None else f'alive, {len(kept)} kept')
    """
    run_main(tmp_path, before, "cycles")
    assert (tmp_path / "cycle.txt").read_text() == "collected"


def test_a_process_that_would_compile_its_imports_again_is_told_how_to_avoid_it(tmp_path):
    """No bytecode where this Python looks (an empty PYTHONPYCACHEPREFIX) and none may be written: one warning line
    naming the packages and the remedy, and the command still runs."""
    done = run_main(tmp_path, "", "version", PYTHONPYCACHEPREFIX=str(tmp_path / "empty"), PYTHONDONTWRITEBYTECODE="1")
    assert done.returncode == 0 and done.stdout.startswith("dr ")
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "no bytecode for torch or transformers" in warnings[0] and "PYTHONPYCACHEPREFIX" in warnings[0]


def test_no_warning_where_the_first_process_writes_the_bytecode(tmp_path):
    """The same empty folder with writes allowed: this process compiles and writes, the next reads; nothing to say."""
    prefix = tmp_path / "pycache"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    script = "import sys; sys.argv = ['dr', 'version']; import deepresonance_cli.app as dr; dr.main()"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env | {"PYTHONPYCACHEPREFIX": str(prefix)},
        check=False,
    )
    assert done.returncode == 0 and "warning:" not in done.stderr
    assert any(prefix.rglob("*.pyc"))  # written for the next process
