"""One report per prediction file, shown side by side: rich tables, a paper-ready Markdown table, JSON, a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from eval.protocols import LABELS


def _protocols(runs: dict[str, dict]) -> list[str]:
    return [p for p in LABELS if any(p in r["metrics"] for r in runs.values())]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def tables(runs: dict[str, dict]) -> list[Table]:
    """One table per protocol: a row per prediction file, a column per metric, plus scored/missing rows."""
    out = []
    for p in _protocols(runs):
        t = Table(title=f"protocol: {p}")
        for col in ("run", *LABELS[p].values(), "scored", "missing"):
            t.add_column(col, justify="left" if col == "run" else "right")
        for name, r in runs.items():
            vals = [_fmt(r["metrics"].get(p, {}).get(k)) for k in LABELS[p]]
            t.add_row(name, *vals, str(r["counts"]["scored"]), str(r["counts"]["missing"]))
        out.append(t)
    return out


def markdown(runs: dict[str, dict]) -> str:
    """GitHub/paper Markdown: one table per protocol, best value of each metric in bold."""
    parts = []
    for p in _protocols(runs):
        keys = list(LABELS[p])
        best = {k: max((r["metrics"].get(p, {}).get(k) for r in runs.values()), key=lambda v: v or -1) for k in keys}
        head = ["Model", *LABELS[p].values()]
        lines = [f"**{p}**", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(keys)]
        for name, r in runs.items():
            cells = []
            for k in keys:
                v = r["metrics"].get(p, {}).get(k)
                cells.append(f"**{_fmt(v)}**" if v is not None and v == best[k] and len(runs) > 1 else _fmt(v))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def chart(runs: dict[str, dict], path: str | Path) -> Path:
    """Grouped bars (one colour per prediction file), one panel per protocol; missing metrics are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = _protocols(runs)
    fig, axes = plt.subplots(len(protos), 1, figsize=(10, 3.5 * len(protos)), squeeze=False)
    width = 0.8 / len(runs)
    for ax, p in zip(axes[:, 0], protos, strict=True):
        for i, (name, r) in enumerate(runs.items()):
            vals = [r["metrics"].get(p, {}).get(k) for k in LABELS[p]]
            xs = [j + i * width for j, v in enumerate(vals) if v is not None]
            ax.bar(xs, [v for v in vals if v is not None], width, label=name)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(LABELS[p]))], list(LABELS[p].values()))
        ax.set_title(f"protocol: {p}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write(runs: dict[str, dict], out: str | Path, meta: dict) -> dict[str, Path]:
    """The JSON report at `out`, with the Markdown and PNG beside it (same stem)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "runs": runs}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(markdown(runs), encoding="utf-8")
    return {"json": out, "markdown": md, "chart": chart(runs, out.with_suffix(".png"))}
