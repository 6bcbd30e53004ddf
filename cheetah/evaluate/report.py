"""Reports: markdown tables and charts comparing models, and the metrics file DVC and the registry read.

Inputs are the dicts `score_demon` and `score_mme` return, one pair per model:
`{"<model>": {"demon": {...} | None, "mme": {...} | None}}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.evaluate.demon import CATEGORIES, TASKS
from cheetah.evaluate.mme import COGNITION, PERCEPTION, SUBTASKS
from cheetah.io import atomic_write_bytes, atomic_write_text, write_metrics

Results = Mapping[str, Mapping[str, Any]]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def demon_tables(results: Results) -> str:
    """Per-category and per-task markdown tables (columns = models; "–" where a model has no score)."""
    models = [m for m, r in results.items() if r.get("demon")]
    if not models:
        return ""
    demon = {m: results[m]["demon"] for m in models}
    cats = [c for c in CATEGORIES if any(c in d["categories"] for d in demon.values())]
    rows = [[CATEGORIES[c]] + [_cell(demon[m]["categories"].get(c)) for m in models] for c in cats]
    rows.append(["**Average**"] + [_cell(demon[m].get("average")) for m in models])
    out = "### DEMON by category\n\n" + _table(["Category"] + models, rows, [":--"] + ["--:"] * len(models))
    tasks = [t for t in TASKS if any(t in d["tasks"] for d in demon.values())]
    rows = []
    for t in tasks:
        info = TASKS[t]
        metric = "ROUGE-L" if info.metric == "rouge_l" else "Acc"
        rows.append([t, CATEGORIES[info.category], metric]
                    + [_cell(demon[m]["tasks"].get(t, {}).get("score")) for m in models])
    out += "\n### DEMON by task\n\n" + _table(["Task", "Category", "Metric"] + models, rows,
                                              [":--", ":--", ":--"] + ["--:"] * len(models))
    return out + no_option_table(results)


_RULES = {"official": "the official rule: the first option, as evaluate.py's argmax of an all-zero row",
          "strict": "the strict rule: exact match"}


def no_option_table(results: Results) -> str:
    """Per multi-choice task and model: how many answers matched no option (and so were judged by the rule)."""
    models = [m for m, r in results.items() if r.get("demon")]
    demon = {m: results[m]["demon"] for m in models}
    tasks = [t for t in TASKS if any("no_option" in d["tasks"].get(t, {}) for d in demon.values())]
    if not tasks:
        return ""
    rows = []
    for t in tasks:
        cells = []
        for m in models:
            entry = demon[m]["tasks"].get(t)
            cells.append("–" if entry is None or "no_option" not in entry else f"{entry['no_option']} / {entry['n']}")
        rows.append([t] + cells)
    rules = sorted({d.get("option_rule", "official") for d in demon.values()})
    how = "; ".join(f"{m}: {_RULES.get(d.get('option_rule', 'official'), d.get('option_rule'))}"
                    for m, d in demon.items()) if len(rules) > 1 else _RULES.get(rules[0], rules[0])
    return ("\n### DEMON multi-choice answers that matched no option\n\n"
            f"Answers sharing no term with any option (or options without any TF-IDF vocabulary); judged by {how}.\n\n"
            + _table(["Task"] + models, rows, [":--"] + ["--:"] * len(models)))


def mme_table(results: Results) -> str:
    """Per-subtask scores with the perception and cognition totals (columns = models)."""
    models = [m for m, r in results.items() if r.get("mme")]
    if not models:
        return ""
    mme = {m: results[m]["mme"] for m in models}
    subtasks = [s for s in SUBTASKS if any(s in r["subtasks"] for r in mme.values())]
    rows = [[s] + [_cell(mme[m]["subtasks"].get(s)) for m in models] for s in subtasks]
    for label, key, group in (("Perception", "perception", PERCEPTION), ("Cognition", "cognition", COGNITION)):
        if any(s in subtasks for s in group):
            top = max(mme[m][f"{key}_max"] for m in models)
            rows.append([f"**{label}** (/{top})"] + [_cell(mme[m].get(key)) for m in models])
    return "### MME\n\n" + _table(["Subtask"] + models, rows, [":--"] + ["--:"] * len(models))


def category_chart(results: Results) -> bytes | None:
    """PNG bytes of a grouped bar chart: DEMON categories on the x axis, one bar per model. None without DEMON."""
    from cheetah.evaluate.figures import bar_chart

    models = [m for m, r in results.items() if r.get("demon")]
    if not models:
        return None
    cats = [c for c in CATEGORIES if any(c in results[m]["demon"]["categories"] for m in models)]
    series = {m: [results[m]["demon"]["categories"].get(c, 0.0) for c in cats] for m in models}
    return bar_chart("DEMON by category", [CATEGORIES[c] for c in cats], series, "score (%)", 100)


def metrics_dict(demon: Mapping[str, Any] | None = None, mme: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics of one model, nested for DVC, one name per quantity (`demon.average`, `mme.perception`, …).
    Totals that do not exist (no cognition subtask evaluated) are left out rather than written as null."""
    out: dict[str, Any] = {}
    if demon:
        out["demon"] = {"average": demon["average"], "categories": dict(demon["categories"]),
                        "tasks": {t: v["score"] for t, v in demon["tasks"].items()}}
    if mme:
        out["mme"] = {k: mme[k] for k in ("perception", "cognition") if mme.get(k) is not None}
        out["mme"]["subtasks"] = dict(mme["subtasks"])
    return out


def write_report(out_dir: str | Path, results: Results, metrics_path: str | Path | None = None,
                 metrics_model: str | None = None, title: str = "Evaluation",
                 sections: Sequence[str] = ()) -> dict[str, Path]:
    """Write `report.md` (all tables, the charts, then `sections`: markdown such as qualitative examples),
    `demon_categories.png` and the figures of `cheetah.evaluate.figures` (MME chart, `dvc plots` tables) into
    `out_dir`, and, when `metrics_path` is given, the metrics JSON of `metrics_model` (default: the last model,
    e.g. the challenger after the baselines)."""
    from cheetah.evaluate.figures import write_figures

    out_dir = Path(out_dir)
    written, charts = write_figures(out_dir, results)
    parts = [f"# {title}\n", demon_tables(results), mme_table(results), charts, *sections]
    written["report"] = atomic_write_text(out_dir / "report.md", "\n".join(p for p in parts if p))
    png = category_chart(results)
    if png is not None:
        written["chart"] = atomic_write_bytes(out_dir / "demon_categories.png", png)
    if metrics_path is not None:
        model = metrics_model or list(results)[-1]
        if model not in results:
            raise KeyError(f"no results for model {model!r}; have {list(results)}")
        r = results[model]
        written["metrics"] = write_metrics(metrics_path, metrics_dict(r.get("demon"), r.get("mme")))
    return written
