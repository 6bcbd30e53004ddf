"""Charts of an evaluation, and the tables `dvc plots` draws from.

Inputs are the results `cheetah.evaluate.report` reads: `{"<model>": {"demon": score_demon(...) | None,
"mme": score_mme(...) | None}}`. Written into the report folder:

    demon_categories.png          DEMON by category, one bar per model (`report.category_chart`)
    mme_subtasks.png              MME by subtask (acc + acc+, at most 200 each), one bar per model
    plots/demon_<model>.csv       `category,score`: the DEMON categories and their average, for `dvc plots`
    plots/mme_<model>.csv         `subtask,score`, for `dvc plots`

dvc.yaml's top-level `plots` compares the `base` and `vpgc` tables side by side (and across revisions with
`dvc plots diff`). PNGs carry no "Software" entry, so their bytes depend on the numbers only.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.evaluate.demon import CATEGORIES
from cheetah.evaluate.mme import SUBTASKS
from cheetah.io import atomic_write_bytes, atomic_write_text

Results = Mapping[str, Mapping[str, Any]]
PLOTS_DIR = "plots"
MME_CHART = "mme_subtasks.png"
MME_SUBTASK_MAX = 200.0  # acc + acc+, each in percent


def bar_chart(title: str, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str,
              ymax: float) -> bytes:
    """PNG bytes of a grouped bar chart: `groups` on the x axis, one bar per entry of `series` in each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.0), dpi=100)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, values, width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace(" ", "\n", 1) for g in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, ymax)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def mme_chart(results: Results) -> bytes | None:
    """MME subtask scores, one bar per model; None when no model has MME scores."""
    models = [m for m, r in results.items() if r.get("mme")]
    if not models:
        return None
    subtasks = [s for s in SUBTASKS if any(s in results[m]["mme"]["subtasks"] for m in models)]
    series = {m: [results[m]["mme"]["subtasks"].get(s, 0.0) for s in subtasks] for m in models}
    return bar_chart("MME by subtask", subtasks, series, f"score (acc + acc+, /{MME_SUBTASK_MAX:.0f})",
                     MME_SUBTASK_MAX)


def plot_tables(results: Results) -> dict[str, list[dict[str, Any]]]:
    """{"demon_<model>.csv" | "mme_<model>.csv": rows} for every model with scores of that benchmark."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for model, r in results.items():
        if r.get("demon"):
            demon = r["demon"]
            rows = [{"category": CATEGORIES[c], "score": demon["categories"][c]}
                    for c in CATEGORIES if c in demon["categories"]]
            tables[f"demon_{model}.csv"] = rows + [{"category": "Average", "score": demon["average"]}]
        if r.get("mme"):
            subtasks = r["mme"]["subtasks"]
            tables[f"mme_{model}.csv"] = [{"subtask": s, "score": subtasks[s]} for s in SUBTASKS if s in subtasks]
    return tables


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_figures(out_dir: str | Path, results: Results) -> tuple[dict[str, Path], str]:
    """Write the MME chart and the `dvc plots` tables into `out_dir`; returns what was written and the markdown
    that shows the charts in the report (`report.write_report` calls it, and writes the DEMON chart itself)."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    shown = []
    if any(r.get("demon") for r in results.values()):
        shown.append("![DEMON by category](demon_categories.png)")
    png = mme_chart(results)
    if png is not None:
        written["mme_chart"] = atomic_write_bytes(out_dir / MME_CHART, png)
        shown.append(f"![MME by subtask]({MME_CHART})")
    for name, rows in plot_tables(results).items():
        if rows:
            written[f"plot:{name}"] = atomic_write_text(out_dir / PLOTS_DIR / name, _csv(rows))
    markdown = "### Charts\n\n" + "\n\n".join(shown) + "\n" if shown else ""
    return written, markdown
