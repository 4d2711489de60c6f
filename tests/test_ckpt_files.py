"""The rich progress shared by checkpoint commands: huggingface_hub's bars drawn through tqdm's rich bars."""

from __future__ import annotations

import io
import warnings

from rich.console import Console

from ckpt.files import byte_progress, hub_tqdm


def test_hub_bars_draw_on_the_shared_console_with_totals_grown_later_and_no_warning() -> None:
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with byte_progress(Console(file=out, width=120)) as progress:
            # as snapshot_download makes its byte bars: total 0, grown by each file's size once it is known
            bar = hub_tqdm(progress)(total=0, desc="Downloading bytes", unit="B", unit_scale=True)
            bar.total = 2_000_000
            bar.update(500_000)
            bar.close()
    assert not caught
    [line] = [line for line in out.getvalue().splitlines() if line.strip()]
    assert line.startswith("Downloading bytes") and " 25% " in line and "0.5/2.0 M" in line
