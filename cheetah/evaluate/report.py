"""Reports: markdown tables and charts comparing models, and the metrics file DVC and the registry read.

Inputs are the dicts `score_demon` and `score_mme` return, one pair per model:
`{"<model>": {"demon": {...} | None, "mme": {...} | None}}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.evaluate.demon import CATEGORIES, TASKS
from cheetah.evaluate.diagnostics import IMAGE_OPTION_TASKS_NOTE, flags, paper_note
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
        rows.append([t + (" †" if paper_note(t) else ""), CATEGORIES[info.category], metric]
                    + [_cell(demon[m]["tasks"].get(t, {}).get("score")) for m in models])
    out += "\n### DEMON by task\n\n" + _table(["Task", "Category", "Metric"] + models, rows,
                                              [":--", ":--", ":--"] + ["--:"] * len(models))
    if any(paper_note(t) for t in tasks):
        out += f"\n† {IMAGE_OPTION_TASKS_NOTE}.\n"
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


# ---------------------------------------------------------------------------------------------------------------
# Telling models apart: MME splits, deltas, answer analysis, flags, examples, provenance
# ---------------------------------------------------------------------------------------------------------------


def content_table(results: Results) -> str:
    """The content scores of the embedded world (cheetah/evaluate/content.py), per task and model, with the parts of
    a difference description (object, change, position) beside them."""
    models = [m for m, r in results.items() if r.get("content")]
    if not models:
        return ""
    tasks = list(dict.fromkeys(t for m in models for t in results[m]["content"]))
    rows = []
    for t in tasks:
        entries = [results[m]["content"].get(t) for m in models]
        parts = [k for k in ("object", "change", "position") if any(e and k in e for e in entries)]
        rows.append([t, "content"] + [_cell(e and e["content"]) for e in entries])
        rows += [["", k] + [_cell(e and e.get(k)) for e in entries] for k in parts]
    return ("### Content: does an answer say what the task is about?\n\n"
            "Percent of answers that name what the task asks for, whatever their form (docs/miniature.md): a "
            "difference description the edited object (position, colour, shape) and the change; an option task the "
            "right option and no other; `heldout_differences`: the synthetic pairs training held out.\n\n"
            + _table(["Task", "Check"] + models, rows, [":--", ":--"] + ["--:"] * len(models)))


def probe_table(results: Results) -> str:
    """The representation probe on what each model's VPG-C adds (cheetah/evaluate/recovery.py)."""
    models = [m for m, r in results.items() if r.get("probe")]
    if not models:
        return ""
    names = list(dict.fromkeys(n for m in models for n in results[m]["probe"]))
    rows = [[n, a] + [_cell(results[m]["probe"].get(n, {}).get(a)) for m in models]
            for n in names for a in ("mean", "shape", "color", "texture")]
    return ("### What VPG-C adds: the representation probe\n\n"
            "Held-out accuracy (%) of the probe reading each grid cell's object of one size from what VPG-C adds to "
            "the first image's tokens of a difference prompt; a backbone without VPG-C adds zeros (the majority "
            "class). Compare with the visual prompt's `probe.qformer_*` in metrics/base.json.\n\n"
            + _table(["Probe", "Attribute"] + models, rows, [":--", ":--"] + ["--:"] * len(models)))


def mme_split_table(results: Results) -> str:
    """MME-format scores over the questions about large objects (primary) and about small ones (detail)."""
    models = [m for m, r in results.items() if (r.get("mme") or {}).get("splits")]
    if not models:
        return ""
    splits = {m: results[m]["mme"]["splits"] for m in models}
    names = [s for s in ("primary", "detail") if any(s in v for v in splits.values())]
    subtasks = [t for t in SUBTASKS if any(t in v.get(s, {}).get("subtasks", {}) for v in splits.values()
                                           for s in names)]
    rows = []
    for split in names:
        for t in subtasks:
            rows.append([split, t] + [_cell(splits[m].get(split, {}).get("subtasks", {}).get(t)) for m in models])
        top = max(splits[m][split]["max"] for m in models if split in splits[m])
        rows.append([f"**{split}**", f"total (/{top})"] + [_cell(splits[m].get(split, {}).get("total"))
                                                          for m in models])
        rows.append([f"**{split}**", "accuracy (%)"] + [_cell(splits[m].get(split, {}).get("acc")) for m in models])
    return ("### MME by split: primary (large objects, what captions describe) and detail (small objects)\n\n"
            "Each subtask's score (acc + acc+, at most 200) over the images whose two questions are about a large "
            "object (primary) or a small one (detail). A model that ignores the image scores 50 per subtask "
            "(one constant answer: acc 50 %, acc+ 0).\n\n"
            + _table(["Split", "Subtask"] + models, rows, [":--", ":--"] + ["--:"] * len(models)))


def _delta(value: float | None, base: float | None) -> str:
    return "–" if value is None or base is None else f"{value - base:+.2f}"


def delta_tables(results: Results) -> str:
    """Every model's difference from the first model (e.g. VPG-C minus the backbone), per category, task and MME
    total, with the sample counts the numbers rest on."""
    models = list(results)
    if len(models) < 2:
        return ""
    first, others = models[0], models[1:]
    rows = []
    demon = {m: results[m].get("demon") or {} for m in models}
    for c in CATEGORIES:
        if any(c in d.get("categories", {}) for d in demon.values()):
            rows.append([f"category: {CATEGORIES[c]}", "–"] + [_delta(demon[m].get("categories", {}).get(c),
                                                                        demon[first].get("categories", {}).get(c))
                                                               for m in others])
    if any("average" in d for d in demon.values()):
        rows.append(["**DEMON average**", "–"] + [_delta(demon[m].get("average"), demon[first].get("average"))
                                                  for m in others])
    for t in TASKS:
        if any(t in d.get("tasks", {}) for d in demon.values()):
            n = next((d["tasks"][t].get("n") for d in demon.values() if t in d.get("tasks", {})), None)
            rows.append([t, "–" if n is None else str(n)]
                        + [_delta(demon[m].get("tasks", {}).get(t, {}).get("score"),
                                  demon[first].get("tasks", {}).get(t, {}).get("score")) for m in others])
    mme = {m: results[m].get("mme") or {} for m in models}
    for t in SUBTASKS:
        if any(t in r.get("subtasks", {}) for r in mme.values()):
            n = next((r["details"][t]["n_questions"] for r in mme.values() if t in r.get("details", {})), None)
            rows.append([f"MME {t}", "–" if n is None else str(n)]
                        + [_delta(mme[m].get("subtasks", {}).get(t), mme[first].get("subtasks", {}).get(t))
                           for m in others])
    for split in ("primary", "detail"):
        if any(split in r.get("splits", {}) for r in mme.values()):
            rows.append([f"MME {split} total", str(next(r["splits"][split]["n_questions"] for r in mme.values()
                                                         if split in r.get("splits", {})))]
                        + [_delta(mme[m].get("splits", {}).get(split, {}).get("total"),
                                  mme[first].get("splits", {}).get(split, {}).get("total")) for m in others])
    if not rows:
        return ""
    return (f"### Differences from {first}\n\nEach model's score minus {first}'s; n is the number of samples "
            "(MME: questions) a number rests on.\n\n"
            + _table(["What", "n"] + [f"{m} − {first}" for m in others], rows,
                     [":--", "--:"] + ["--:"] * len(others)))


def _distribution(stats: Mapping[str, Any], limit: int = 4) -> str:
    dist = stats.get("distribution")
    if not dist:
        return "–"
    items = list(dist.items())
    shown = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def answer_tables(results: Results, reference: Mapping[str, Any] | None = None) -> str:
    """Per task and model: how varied the answers were (share of distinct answers, share of the most frequent one)
    and, for closed questions, which options were chosen beside the right ones; with the no-vision reference."""
    models = [m for m, r in results.items() if r.get("answers")]
    if not models:
        return ""
    rows = []
    for bench, order in (("demon", list(TASKS)), ("mme", list(SUBTASKS))):
        tasks = [t for t in order if any(t in (results[m]["answers"].get(bench) or {}) for m in models)]
        for t in tasks:
            stats = {m: results[m]["answers"][bench].get(t) for m in models}
            any_stats = next(s for s in stats.values() if s)
            if bench == "demon":
                ref = (reference or {}).get("demon", {}).get(t)
                ref_cell = "–" if ref is None else f"{ref['score']:.2f}"
            else:
                ref_cell = "–" if reference is None else f"{reference.get('mme', 50.0):.2f}"
            truth = _distribution({"distribution": any_stats.get("truth")}) if any_stats.get("truth") else "–"
            rows.append([f"{'MME ' if bench == 'mme' else ''}{t}", str(any_stats["n"]), ref_cell, truth]
                        + ["–" if s is None else f"{s['distinct_share']:.0f}% / {s['top_share']:.0f}%"
                           + (f"; {_distribution(s)}" if s.get("distribution") else "") for s in stats.values()])
    return ("### How the models answered\n\n"
            "Per model: distinct answers as a share of the samples / the share of the most frequent answer; for closed "
            "questions, how often each option was chosen (as the scorer reads the answer). *No-vision* is the best "
            "score of one answer repeated for every sample (DEMON: the best of the task's right answers; MME: any "
            "constant answer) — what a model earns without looking at the images.\n\n"
            + _table(["Task", "n", "No-vision", "Right answers"] + models, rows,
                     [":--", "--:", "--:", ":--"] + [":--"] * len(models)))


def flag_section(results: Results) -> str:
    """The tasks that cannot tell these models apart as they stand, with the reason (first in the report)."""
    found = flags(results)
    if not found:
        return ""
    lines = [f"- **{task}**: {'; '.join(reasons)}" for task, reasons in found.items()]
    return "### Flags\n\nTasks whose numbers do not measure what they should for these models:\n\n" + \
        "\n".join(lines) + "\n"


def provenance_section(results: Results, provenance: Mapping[str, Any] | None) -> str:
    """What produced these numbers: commit, pipeline hashes, parameters, and per model its weights and decoding."""
    if not provenance:
        return ""
    lineage = provenance.get("lineage", {})
    lines = ["### Provenance\n", f"- code: git commit `{lineage.get('git_commit', 'unknown')}`"
             + (f" with uncommitted changes ({lineage['git_uncommitted']})" if lineage.get("git_dirty") == "true"
                else "")]
    for key in ("dvc_lock_hash", "data_hash", "backbone_hash"):
        if key in lineage:
            lines.append(f"- {key}: `{lineage[key]}`")
    for name, info in provenance.get("models", {}).items():
        ident = info.get("identity", {})
        weights = ident.get("vpgc_sha256") or "none (the backbone alone)"
        backbone = ident.get("backbone", {})
        lines.append(f"- model **{name}**: `{info.get('spec')}`; VPG-C weights sha256 `{weights}`; backbone "
                     f"`{backbone.get('source')}` (weights sha256 `{backbone.get('weights_sha256')}`); decoding "
                     f"{json.dumps(info.get('decoding'), sort_keys=True)}")
        training = info.get("training")
        if training:
            lines.append(f"  - trained: {json.dumps(training, sort_keys=True)}")
    for section, values in provenance.get("params", {}).items():
        lines.append(f"- params `{section}`: {json.dumps(values, sort_keys=True)}")
    return "\n".join(lines) + "\n"


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
        for split, entry in (mme.get("splits") or {}).items():  # the embedded benchmark's primary / detail
            out["mme"][split] = {"total": entry["total"], "acc": entry["acc"]}
    return out


def write_report(out_dir: str | Path, results: Results, metrics_path: str | Path | None = None,
                 metrics_model: str | None = None, title: str = "Evaluation",
                 sections: Sequence[str] = (), reference: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write `report.md` (flags first, all tables, the charts, then `sections`: markdown such as qualitative
    examples, and the provenance), `demon_categories.png` and the figures of `cheetah.evaluate.figures` (MME chart,
    `dvc plots` tables) into `out_dir`, and, when `metrics_path` is given, the metrics JSON of `metrics_model`
    (default: the last model, e.g. the challenger after the baselines). `reference` (the no-vision scores of
    `cheetah.evaluate.diagnostics`) and `provenance` (what produced the numbers, `cheetah.evaluate.run.provenance`)
    add their sections; models' `answers` add the answer analysis."""
    from cheetah.evaluate.figures import write_figures

    out_dir = Path(out_dir)
    written, charts = write_figures(out_dir, results)
    parts = [f"# {title}\n", flag_section(results), demon_tables(results), mme_table(results),
             mme_split_table(results), content_table(results), probe_table(results), delta_tables(results),
             answer_tables(results, reference), charts, *sections, provenance_section(results, provenance)]
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


def read_model_scores(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`cheetah score report`'s models: `NAME=scores.json[,scores.json]` (`score demon` / `score mme` output) ->
    {name: {"demon": scores, "mme": scores}}."""
    from cheetah.io import DataError, read_json

    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise DataError(f"model spec {spec!r} must look like NAME=scores.json[,scores.json]")
        entry: dict[str, Any] = {}
        for path in paths.split(","):
            scores = read_json(path)
            # `score demon` output has "tasks", `score mme` output has "subtasks".
            kind = "demon" if isinstance(scores, dict) and "tasks" in scores else \
                "mme" if isinstance(scores, dict) and "subtasks" in scores else None
            if kind is None:
                raise DataError(f"{path}: neither `cheetah score demon` nor `cheetah score mme` output")
            entry[kind] = scores
        results[name] = entry
    return results
