"""Reports of several prediction files side by side: Markdown, rich tables, JSON + PNG written together."""

from __future__ import annotations

import json

from rich.console import Console

from eval import report

RUNS = {
    "alpha": {
        "counts": {"scored": 3, "missing": 0},
        "metrics": {
            "music-llm": {
                "bleu_u_char": 0.5,
                "bleu4_char": 0.25,
                "meteor": 0.4,
                "rouge_l_recall": 0.3,
                "bertscore_recall": None,
            }
        },
    },
    "beta": {
        "counts": {"scored": 2, "missing": 1},
        "metrics": {
            "music-llm": {
                "bleu_u_char": 0.6,
                "bleu4_char": 0.125,
                "meteor": 0.1,
                "rouge_l_recall": 0.3,
                "bertscore_recall": None,
            }
        },
    },
}


def test_markdown_is_one_table_per_protocol_with_best_in_bold():
    assert report.markdown(RUNS) == (
        "**music-llm**\n\n"
        "| Model | B-U (char) | BLEU-4 (char) | METEOR | ROUGE-L (R) | BERTScore (R) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| alpha | 0.5000 | **0.2500** | **0.4000** | **0.3000** | n/a |\n"
        "| beta | **0.6000** | 0.1250 | 0.1000 | **0.3000** | n/a |\n"
    )


def test_table_has_a_row_per_run_and_the_missing_counts():
    console = Console(width=200, record=True)
    for t in report.tables(RUNS):
        console.print(t)
    text = console.export_text()
    assert "protocol: music-llm" in text and "protocol: coco" not in text
    lines = [ln for ln in text.splitlines() if "alpha" in ln or "beta" in ln]
    assert [[c.strip() for c in ln.split("│")[1:-1]] for ln in lines] == [
        ["alpha", "0.5000", "0.2500", "0.4000", "0.3000", "n/a", "3", "0"],
        ["beta", "0.6000", "0.1250", "0.1000", "0.3000", "n/a", "2", "1"],
    ]


def test_write_puts_json_markdown_and_png_side_by_side(tmp_path):
    files = report.write(RUNS, tmp_path / "sub" / "r.json", {"dataset": "d.json"})
    assert json.loads(files["json"].read_text()) == {"dataset": "d.json", "runs": RUNS}
    assert files["markdown"].read_text() == report.markdown(RUNS)
    assert files["chart"] == tmp_path / "sub" / "r.png"
    assert files["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files["chart"].stat().st_size > 5000
