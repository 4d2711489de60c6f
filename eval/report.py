"""One report per prediction file, shown side by side: rich tables, a paper-ready Markdown table, JSON, a bar chart.

Multiple-choice results (`choice`: {"dataset", "results": {run: {mode: eval.choice report}}, "reference": [...]})
get their own table (accuracy, 95% bootstrap interval, chance, unparsed, missing), a per-category table, and a chart
panel; published numbers of other models are shown apart and marked as not computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from eval.protocols import LABELS

WIDE = {"cider"}  # metrics not on a 0-1 scale (CIDEr reaches ~10): drawn on an axis of their own
PUBLISHED = "published (check the source), not computed here"


def _protocols(runs: dict[str, dict]) -> list[str]:
    return [p for p in LABELS if any(p in r["metrics"] for r in runs.values())]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


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


def _choice_rows(choice: dict) -> list[list[str]]:
    rows = []
    for run, modes in choice["results"].items():
        for mode, r in modes.items():
            counts = [str(r[k]) for k in ("n", "unparsed", "missing")]
            rows.append([run, mode, _pct(r["accuracy"]), _ci(r["ci95"]), _pct(r["chance"]), *counts])
    return rows


CHOICE_COLUMNS = ("run", "mode", "accuracy", "95% CI", "chance", "scored", "unparsed", "missing")


def _categories(choice: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Category names and the (run, mode) columns with real audio that have them."""
    columns = [(run, mode) for run, modes in choice["results"].items() for mode in modes if "audio" not in mode]
    cats = sorted({c for run, mode in columns for c in choice["results"][run][mode]["categories"]})
    return cats, columns


def _category_cell(choice: dict, run: str, mode: str, cat: str) -> str:
    r = choice["results"][run][mode]["categories"].get(cat)
    return "" if r is None else f"{_pct(r['accuracy'])} (n={r['n']})"


def choice_tables(choice: dict) -> list[Table]:
    """Accuracy per (run, mode); accuracy per category; published numbers, each with its source."""
    t = Table(title=f"multiple choice: {choice['dataset']}")
    for col in CHOICE_COLUMNS:
        t.add_column(col, justify="left" if col in ("run", "mode") else "right")
    for row in _choice_rows(choice):
        t.add_row(*row)
    out = [t]
    cats, columns = _categories(choice)
    if cats:
        c = Table(title=f"multiple choice per category: {choice['dataset']}")
        c.add_column("category")
        for run, mode in columns:
            c.add_column(f"{run}\n{mode}", justify="right")
        for cat in cats:
            c.add_row(cat, *(_category_cell(choice, run, mode, cat) for run, mode in columns))
        out.append(c)
    if choice.get("reference"):
        ref = Table(title=f"{PUBLISHED}: {choice['dataset']}")
        for col in ("model", "accuracy", "source"):
            ref.add_column(col, justify="right" if col == "accuracy" else "left")
        for r in choice["reference"]:
            ref.add_row(r["model"], f"{r['accuracy']:.1f}%", r["source"])
        out.append(ref)
    return out


def markdown(runs: dict[str, dict], choice: dict | None = None) -> str:
    """GitHub/paper Markdown: one table per protocol, best value of each metric in bold; multiple choice after."""
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
    if choice:
        parts.append(_choice_markdown(choice))
    return "\n\n".join(parts) + "\n"


def _table_md(head: list[str], rows: list[list[str]], align: str) -> list[str]:
    """`align`: one letter per column, l (left) or r (right)."""
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


def _choice_markdown(choice: dict) -> str:
    lines = [f"**multiple choice: {choice['dataset']}**", ""]
    lines += _table_md(list(CHOICE_COLUMNS), _choice_rows(choice), "ll" + "r" * (len(CHOICE_COLUMNS) - 2))
    cats, columns = _categories(choice)
    if cats:
        head = ["category", *(f"{run} ({mode})" for run, mode in columns)]
        rows = [[cat, *(_category_cell(choice, run, mode, cat) for run, mode in columns)] for cat in cats]
        lines += ["", f"**per category: {choice['dataset']}**", "", *_table_md(head, rows, "l" + "r" * len(columns))]
    if choice.get("reference"):
        rows = [[r["model"], f"{r['accuracy']:.1f}%", r["source"]] for r in choice["reference"]]
        lines += ["", f"**{PUBLISHED}** (other protocols; context, not a like-for-like comparison)", ""]
        lines += _table_md(["model", "accuracy", "source"], rows, "lrl")
    return "\n".join(lines)


def _bars(
    ax, labels: list[str], series: dict[str, list], errors: dict[str, list] | None = None, missing: str | None = "n/a"
) -> None:
    """Grouped bars, one colour per series, the value written above each bar (above its error bar, if any); a zero
    is an outlined sliver, so it shows; a missing value gets `missing` in place of a bar."""
    from matplotlib.patches import Patch

    width = 0.8 / max(1, len(series))
    top = max([v for vals in series.values() for v in vals if v is not None] or [1.0])
    crowded = len(series) * len(labels) > 12
    for i, (name, vals) in enumerate(series.items()):
        for j, v in enumerate(vals):
            x = j + i * width
            err = (errors or {}).get(name, [None] * len(vals))[j]
            if v is None:
                if missing:
                    ax.annotate(
                        missing,
                        (x, 0),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="dimgray",
                        rotation=90 if crowded else 0,
                    )
                continue
            ax.bar(
                x,
                v,
                width,
                color=f"C{i}",
                edgecolor="black",
                linewidth=0.6,
                yerr=None if err is None else [[err[0]], [err[1]]],
                capsize=3,
            )
            ax.annotate(
                f"{v:.3f}" if top <= 1.5 else f"{v:.2f}",
                (x, v + (err[1] if err else 0)),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if crowded else 0,
            )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4 + width * (len(series) - 1))
    ax.set_ylim(0, 1.15 if top <= 1.0 else top * 1.2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(
        handles=[Patch(facecolor=f"C{i}", edgecolor="black", label=n) for i, n in enumerate(series)],
        fontsize="small",
        loc="upper right",
    )


def _choice_panel(ax, choice: dict) -> None:
    """Accuracy per mode (a bar per run, its 95% interval as an error bar), the chance rate as a line, and the
    published numbers as hatched grey bars of their own, labelled as not computed here."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    modes = list(dict.fromkeys(m for modes in choice["results"].values() for m in modes))
    series = {run: [res.get(m, {}).get("accuracy") for m in modes] for run, res in choice["results"].items()}
    errors = {run: [_err(res.get(m)) for m in modes] for run, res in choice["results"].items()}
    references = choice.get("reference") or []
    _bars(ax, modes, series, errors, missing=None)
    handles = ax.get_legend().legend_handles
    width = 0.8 / max(1, len(series))
    center = width * (len(series) - 1) / 2
    for k, r in enumerate(references):
        x = len(modes) + k + center
        ax.bar(x, r["accuracy"] / 100, 0.5, color="lightgray", hatch="//", edgecolor="black", linewidth=0.6)
        ax.annotate(
            f"{r['accuracy'] / 100:.3f}",
            (x, r["accuracy"] / 100),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if references:
        ticks = [j + center for j in range(len(modes) + len(references))]
        ax.set_xticks(ticks, modes + [f"{r['model']}\n(published)" for r in references], fontsize=8)
        ax.set_xlim(-0.6, ticks[-1] + 0.6)
        handles.append(Patch(facecolor="lightgray", hatch="//", edgecolor="black", label=PUBLISHED))
    chance = next((r["chance"] for res in choice["results"].values() for r in res.values() if r["chance"]), None)
    if chance is not None:
        ax.axhline(chance, color="firebrick", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="firebrick", linestyle="--", label=f"chance ({100 * chance:.1f}%)"))
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title(f"multiple choice: {choice['dataset']}")
    ax.legend(handles=handles, fontsize="small", loc="upper right")


def _err(r: dict | None) -> list | None:
    if not r or r["accuracy"] is None or r["ci95"][0] is None:
        return None
    return [r["accuracy"] - r["ci95"][0], r["ci95"][1] - r["accuracy"]]


def figure(runs: dict[str, dict], choice: dict | None = None):
    """One row of panels per protocol (0-1 metrics; CIDEr beside them on its own axis) and one for multiple choice;
    a bar per prediction file, value labels on every bar, "n/a" where a metric is unavailable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = _protocols(runs)
    rows = len(protos) + (1 if choice else 0)
    fig = plt.figure(figsize=(11, 3.8 * max(1, rows)))
    grid = fig.add_gridspec(max(1, rows), 5)
    for row, p in enumerate(protos):
        narrow = [k for k in LABELS[p] if k not in WIDE]
        wide = [k for k in LABELS[p] if k in WIDE]
        ax = fig.add_subplot(grid[row, :4] if wide else grid[row, :])
        series = {name: [r["metrics"].get(p, {}).get(k) for k in narrow] for name, r in runs.items()}
        _bars(ax, [LABELS[p][k] for k in narrow], series)
        ax.set_title(f"protocol: {p}")
        if wide:
            side = fig.add_subplot(grid[row, 4])
            wide_series = {name: [r["metrics"].get(p, {}).get(k) for k in wide] for name, r in runs.items()}
            _bars(side, [LABELS[p][k] for k in wide], wide_series)
            side.get_legend().remove()
            side.set_title("own scale")
    if choice:
        _choice_panel(fig.add_subplot(grid[rows - 1, :]), choice)
    fig.tight_layout()
    return fig


def chart(runs: dict[str, dict], path: str | Path, choice: dict | None = None) -> Path:
    """`figure` written as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(runs, choice)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def write(runs: dict[str, dict], out: str | Path, meta: dict, choice: dict | None = None) -> dict[str, Path]:
    """The JSON report at `out`, with the Markdown and PNG beside it (same stem)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {**meta, "runs": runs, **({"multiple_choice": choice} if choice else {})}
    out.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(markdown(runs, choice), encoding="utf-8")
    return {"json": out, "markdown": md, "chart": chart(runs, out.with_suffix(".png"), choice)}
