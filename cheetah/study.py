"""`cheetah study`: the ablation study of the paper's Table 4 in miniature, with error bars over seeds.

For every seed of `study.seeds`, the arms (ARMS) are built from the pipeline's own stage functions and the
settings of `params.yaml` — only the seed (base.seed, synthesize.seed, train.seed) and the output folders change:

    (a) base                the base backbone (the base stage with this seed, from the language stage's model:
                            one language model for every seed, as the paper's arms share one Vicuna)
    (b) vpgc_captions       VPG-C trained on the caption samples only (the same steps and examples per step)
    (c) vpgc_synthetic      VPG-C trained on captions + attention-guided synthetic pairs (the paper's recipe)
    (d) vpgc_random_target  the same, the edit targets drawn at random (`synthesize.selector: random`)
    (e) blind               the (c) weights given blank images: what a score is worth without vision

Every arm is evaluated on the same embedded DEMON- and MME-format benchmarks (held-out scenes; the blind arm on a
copy whose every image is blank). `metrics/study.json` holds, per arm, DEMON category and MME split (primary:
questions about large objects; detail: about small ones), the mean over seeds, the 95 % confidence interval of the
mean (Student's t), and the value of every seed; `reports/study/` a table and a bar chart with error bars. One
MLflow parent run holds one child run per arm and seed.

Resumable and idempotent: every step (a seed's backbone, synthetic sets, trained weights, evaluations) records in
`<work>/steps/` a fingerprint of what it was made from — the parameters it reads, the fingerprints of its inputs, the
corpus and the code of the stage (as `dvc.yaml` lists it). A rerun reuses every step whose fingerprint is current
and redoes the others (a killed training or evaluation resumes where it stopped); `--restart` redoes all. Design and
why a command rather than a DVC experiment queue or a Prefect flow: docs/study.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cheetah.config import STUDY_ARMS, Params, to_dict
from cheetah.formats import SOURCE_CAPTIONS, SOURCE_SCENES
from cheetah.evaluate.demon import CATEGORIES
from cheetah.io import atomic_dir, atomic_write_json, read_json, write_metrics, write_output_file
from cheetah.model.weights import weights_digest
from cheetah.provenance import PACKAGE_ROOT, code_digest, lineage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the study: how its model is made and how it is evaluated."""

    label: str
    """As in the issue and the paper's Table 4: "(c) VPG-C, captions + synthetic (attention)"."""
    data: str | None = None
    """The synthetic set its VPG-C trains on: made with `synthesize.selector` "attention" or "random"; None: the
    arm trains nothing (the backbone, or another arm's weights)."""
    captions_only: bool = False
    """Train on the caption samples only: synthetic_batch 0, caption_batch synthetic_batch + caption_batch."""
    weights_of: str | None = None
    """Evaluate another arm's weights (the blind arm)."""
    blank: bool = False
    """Evaluate on the blank copy of the benchmarks."""


ARMS: dict[str, Arm] = {
    "base": Arm("(a) base backbone"),
    "vpgc_captions": Arm("(b) VPG-C, captions only", data="attention", captions_only=True),
    "vpgc_synthetic": Arm("(c) VPG-C, captions + synthetic (attention targets)", data="attention"),
    "vpgc_random_target": Arm("(d) VPG-C, captions + synthetic (random targets)", data="random"),
    "blind": Arm("(e) blind: (c) on blank images", weights_of="vpgc_synthetic", blank=True),
}
assert tuple(ARMS) == STUDY_ARMS, f"ARMS must describe every arm of cheetah.config.StudyArm, in order: {STUDY_ARMS}"
DETAIL_CATEGORIES = ("visual_relation_inference", "multi_image_reasoning")
"""The DEMON-format categories whose tasks hinge on the small objects (the edits and the questions are about them)."""
MME_SPLITS = ("primary", "detail")
STUDY_CODE = "cheetah/study.py"
"""The steps' own code beside their stage's: the blank copies (benchmarks; the blind arm's held-out pairs)."""


def step_code(root: str | Path = PACKAGE_ROOT) -> dict[str, tuple[str, ...]]:
    """The code each step runs: its dvc.yaml stage's code dependencies (the paths under cheetah/), so that a change
    there makes the step's results stale exactly when it reruns the stage; the benchmarks and evaluate steps also
    run STUDY_CODE."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    code = {name: tuple(d for d in stages[name]["deps"] if isinstance(d, str) and d.startswith("cheetah/"))
            for name in ("benchmarks", "base", "synthesize", "train", "evaluate")}
    for name in ("benchmarks", "evaluate"):
        code[name] += (STUDY_CODE,)
    return code


BACKBONE_METRICS = ("probe.vit_large", "probe.vit_small", "probe.qformer_large", "probe.qformer_small",
                    "yes_no_primary_accuracy", "yes_no_detail_accuracy", "object_tokens_yes_no_detail_accuracy",
                    "object_tokens_differences_content", "middle_yes_no_detail_accuracy", "middle_differences_content",
                    "caption_exact_match", "caption_rouge_l")
"""What `arms.base.backbone` summarises over seeds from each seed's base-stage metrics (held-out scenes, %)."""
BLANK_RGB = (122, 116, 104)
"""The blank image: the CLIP normalisation mean (BLIP's image processors), i.e. all zeros once normalised."""
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def needed_arms(arms: Sequence[str]) -> list[str]:
    """`arms` and the arms they need (blind evaluates vpgc_synthetic's weights), in ARMS order."""
    wanted = set(arms) | {ARMS[a].weights_of for a in arms if ARMS[a].weights_of}
    return [a for a in ARMS if a in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints and steps
# ---------------------------------------------------------------------------------------------------------------


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Steps:
    """The steps of a study and their records (`<work>/steps/<name>.json`: fingerprint, seconds)."""

    def __init__(self, work: Path, restart: bool = False):
        self.folder = work / "steps"
        self.restart = restart
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}

    def _path(self, name: str) -> Path:
        return self.folder / f"{name.replace('/', '__')}.json"

    def run(self, name: str, fp: str, fn: Callable[[bool], Any]) -> None:
        """Run `fn(stale)` unless `name` finished with fingerprint `fp` (and not restarting); `stale` says an
        earlier record exists with another fingerprint, so what the step left behind must not be resumed."""
        path = self._path(name)
        record = read_json(path) if path.is_file() else None
        if record is not None and record.get("fingerprint") == fp and not self.restart:
            self.reused.append(name)
            self.seconds[name] = record.get("seconds", 0.0)
            return
        stale = self.restart or (record is not None and record.get("fingerprint") != fp)
        if record is not None:
            path.unlink()  # a step that fails now must not look finished
        log.info("study: %s", name)
        started = time.perf_counter()
        fn(stale)
        seconds = round(time.perf_counter() - started, 1)
        atomic_write_json(path, {"step": name, "fingerprint": fp, "seconds": seconds})
        self.ran.append(name)
        self.seconds[name] = seconds


# ---------------------------------------------------------------------------------------------------------------
# Blank images
# ---------------------------------------------------------------------------------------------------------------


def blank_copy(src: str | Path, dst: str | Path, rgb: tuple[int, int, int] = BLANK_RGB) -> Path:
    """A copy of a benchmark (DEMON or MME layout) or synthetic-set folder whose every image is one flat colour of the
    same size; everything else (questions, answers, layout) is copied as it is."""
    from PIL import Image

    src = Path(src)
    with atomic_dir(dst, kind="blank benchmark", protect=[src]) as tmp:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir() or rel.name.startswith(".cheetah-output"):
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                with Image.open(path) as im:
                    size, fmt = im.size, im.format or "PNG"
                Image.new("RGB", size, rgb).save(target, format=fmt)
            else:
                shutil.copyfile(path, target)
    return Path(dst)


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, the 95 % confidence interval of the mean over seeds (Student's t; None with one seed) and the values."""
    n = len(values)
    mean = math.fsum(values) / n
    ci = None
    if n > 1:
        from scipy.stats import t

        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        ci = [round(mean - half, 4), round(mean + half, 4)]
    return {"mean": round(mean, 4), "ci95": ci, "values": [round(v, 4) for v in values]}


def _above(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether a is above b with non-overlapping intervals (with one seed: a higher mean)."""
    if a["ci95"] is None or b["ci95"] is None:
        return a["mean"] > b["mean"]
    return a["ci95"][0] > b["ci95"][1]


CONTENT_EXPECTED = ("content.heldout_differences", "content.World_SpotTheChange")
"""Where (c) must be above (a) on content: the difference descriptions the paper's VPG-C is trained to give."""


def expectations(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's expectations, checked against the measurement (never used to choose anything): (c) above (a),
    with non-overlapping intervals, on the content of the difference descriptions and on the detail categories and
    MME detail; (b) close to (a) (its mean inside (a)'s interval, or the reverse); (c) at or above (d); every arm
    above (e), non-overlapping; and the measures on which the blind arm (e) reaches another arm's interval (its mean
    at or above that arm's lower bound): they do not measure seeing."""
    out: dict[str, Any] = {}

    def rows(arm: str) -> dict[str, Mapping[str, Any]]:
        entry = arms[arm]
        return {f"{group}.{k}": v for group in ("demon", "mme", "content") for k, v in entry.get(group, {}).items()}

    if {"base", "vpgc_synthetic"} <= set(arms):
        a, c = rows("base"), rows("vpgc_synthetic")
        out["c_above_a_on_content"] = {k: _above(c[k], a[k]) for k in CONTENT_EXPECTED if k in a and k in c}
        keys = [f"demon.{k}" for k in DETAIL_CATEGORIES] + ["mme.detail"]
        out["c_above_a_on_detail"] = {k: _above(c[k], a[k]) for k in keys if k in a and k in c}
    if {"base", "vpgc_captions"} <= set(arms):
        a, b = rows("base"), rows("vpgc_captions")

        def close(x: Mapping[str, Any], y: Mapping[str, Any]) -> bool:
            inside = [ci is not None and ci[0] <= m <= ci[1] for m, ci in ((x["mean"], y["ci95"]),
                                                                          (y["mean"], x["ci95"]))]
            return any(inside)

        out["b_close_to_a"] = {k: close(b[k], a[k]) for k in a if k in b}
    if {"vpgc_synthetic", "vpgc_random_target"} <= set(arms):
        c, d = rows("vpgc_synthetic"), rows("vpgc_random_target")
        out["c_at_or_above_d"] = {k: c[k]["mean"] >= d[k]["mean"] for k in c if k in d}
    if "blind" in arms:
        e = rows("blind")
        out["above_blind"] = {arm: {k: _above(r[k], e[k]) for k in e if k in r}
                              for arm in arms if arm != "blind" for r in [rows(arm)]}
        out["does_not_measure_seeing"] = sorted(
            k for k in e if any(k in r and e[k]["mean"] >= (r[k]["ci95"] or [r[k]["mean"]])[0]
                                for arm in arms if arm != "blind" for r in [rows(arm)]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------


def _seeded(params: Params, seed: int, folder: Path) -> Params:
    """params.yaml's settings with this seed, and every output under `folder`."""
    return dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, backbone_dir=str(folder / "backbone")),
        base=dataclasses.replace(params.base, seed=seed, out=str(folder / "backbone"),
                                 metrics=str(folder / "base.json")),
        synthesize=dataclasses.replace(params.synthesize, seed=seed, source=params.world.out),
        train=dataclasses.replace(params.train, seed=seed),
    )


def _arm_train(p: Params, arm: str, folder: Path) -> Params:
    spec = ARMS[arm]
    train = dataclasses.replace(p.train, data=str(folder / f"synthetic-{spec.data}"), out=str(folder / arm / "vpgc"),
                                state_dir=str(folder / arm / "state"), metrics=str(folder / arm / "train.json"),
                                curve=str(folder / arm / "train_curve.csv"),
                                curve_image=str(folder / arm / "train_curve.png"))
    if spec.captions_only:
        train = dataclasses.replace(train, synthetic_batch=0,
                                    caption_batch=p.train.synthetic_batch + p.train.caption_batch)
    return dataclasses.replace(p, train=train)


def _corpus_digest(source: Path) -> str:
    h = hashlib.sha256()
    for name in (SOURCE_CAPTIONS, SOURCE_SCENES):
        if (source / name).is_file():
            h.update(name.encode() + b"\0" + (source / name).read_bytes())
    return h.hexdigest()


def _cell(eval_dir: Path, name: str, blank: bool = False) -> dict[str, Any]:
    """One arm's numbers in one seed's evaluation: DEMON categories and average, MME split totals, the content
    scores (%) and the probe on what VPG-C adds (mean over attributes, %). Not the probe for an arm given `blank`
    images: the probe renders its own scenes, so it would repeat the arm whose weights it borrows."""
    demon = read_json(eval_dir / name / "demon_scores.json")
    mme = read_json(eval_dir / name / "mme_scores.json")
    splits = mme.get("splits") or {}
    cell = {"demon": {**demon["categories"], "average": demon["average"]},
            "mme": {s: splits[s]["total"] for s in MME_SPLITS if s in splits}}
    if (eval_dir / name / "content_scores.json").is_file():
        cell["content"] = {t: v["content"] for t, v in read_json(eval_dir / name / "content_scores.json").items()}
    if (eval_dir / name / "probe.json").is_file() and not blank:
        cell["probe"] = {k: v["mean"] for k, v in read_json(eval_dir / name / "probe.json").items()}
    return cell


def run_study(params: Params, root: str | Path = ".", restart: bool = False, track: bool = True) -> dict[str, Any]:
    """Run (or finish) the study `params.study` describes; write its metrics, table and plot; returns the metrics."""
    from cheetah.evaluate.embedded import write_embedded_benchmarks
    from cheetah.evaluate.run import evaluate
    from cheetah.synthesize import synthesize
    from cheetah.train.base import pretrain_base
    from cheetah.train.vpgc import train_vpgc

    started = time.perf_counter()
    cfg, root = params.study, Path(root)
    arms = needed_arms(cfg.arms)
    work = Path(cfg.work)
    source = Path(params.world.out)
    if not (source / SOURCE_CAPTIONS).is_file():
        from cheetah.pipeline import ensure_source

        ensure_source(params, root)
    corpus = _corpus_digest(source)
    # The middle stage's language model is every seed's starting point, as the paper's Vicuna is: not varied by seed.
    language = weights_digest(params.middle.out) if Path(params.middle.out).is_dir() else None
    steps = Steps(work, restart)
    code = {k: code_digest(v) for k, v in step_code().items()}

    # -- the benchmarks, and their blank copy ------------------------------------------------------------------
    bench = work / "benchmarks"
    ev = dataclasses.replace(params.evaluate, demon_dir=str(bench / "demon"), mme_dir=str(bench / "mme"))
    fp_bench = fingerprint(code["benchmarks"], to_dict(params.world), ev.demon_per_task, ev.mme_per_subtask)

    def make_benchmarks(stale: bool) -> None:
        write_embedded_benchmarks(params.world, ev)
        for kind in ("demon", "mme"):
            blank_copy(bench / kind, work / "benchmarks-blank" / kind)

    steps.run("benchmarks", fp_bench, make_benchmarks)

    cells: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    extra: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    for seed in cfg.seeds:
        folder = work / f"seed{seed}"
        p = _seeded(params, seed, folder)
        fp: dict[str, str] = {}
        fp["base"] = fingerprint(code["base"], corpus, language, to_dict(p.world), to_dict(p.base), p.middle.scale,
                                 p.model.preset, p.model.update_layer)
        steps.run(f"seed{seed}/base", fp["base"], lambda stale: pretrain_base(p))
        for selector in sorted({ARMS[a].data for a in arms if ARMS[a].data}):
            syn = dataclasses.replace(p.synthesize, selector=selector, out=str(folder / f"synthetic-{selector}"))
            fp[selector] = fingerprint(code["synthesize"], fp["base"], to_dict(syn))
            steps.run(f"seed{seed}/synthetic-{selector}", fp[selector],
                      lambda stale, syn=syn: synthesize(syn, p.base.out if syn.selector == "attention" else None))
        for arm in [a for a in arms if ARMS[a].data]:
            pa = _arm_train(p, arm, folder)
            fp[arm] = fingerprint(code["train"], fp[ARMS[arm].data], to_dict(pa.train), to_dict(pa.model))
            steps.run(f"seed{seed}/{arm}", fp[arm], lambda stale, pa=pa: train_vpgc(pa, restart=stale))
        # Every arm describes the same held-out synthetic pairs, those of the paper's data (attention targets); the
        # blind arm sees them blank, like the benchmarks.
        pairs = blank_pairs = None
        if ev.heldout_differences and "attention" in fp:
            pairs, blank_pairs = str(folder / "synthetic-attention"), str(folder / "synthetic-attention-blank")
            if any(ARMS[a].blank for a in arms):
                steps.run(f"seed{seed}/synthetic-attention-blank", fingerprint(fp["attention"], "blank"),
                          lambda stale: blank_copy(pairs, blank_pairs))
        for blank in (False, True):
            names = [a for a in arms if ARMS[a].blank == blank]
            if not names:
                continue
            bench_dir = work / ("benchmarks-blank" if blank else "benchmarks")
            out = folder / ("eval-blind" if blank else "eval")
            pe = dataclasses.replace(p, evaluate=dataclasses.replace(
                ev, demon_dir=str(bench_dir / "demon"), mme_dir=str(bench_dir / "mme"), out=str(out),
                metrics=str(out.with_suffix(".json")), heldout_differences=pairs is not None),
                train=dataclasses.replace(p.train, data=str(blank_pairs if blank else pairs)) if pairs else p.train)
            specs = {a: (p.base.out if a == "base" else
                         str(folder / (ARMS[a].weights_of or a) / "vpgc")) for a in names}
            models = {a: fp["base" if a == "base" else ARMS[a].weights_of or a] for a in names}
            fp_eval = fingerprint(code["evaluate"], fp_bench, blank, to_dict(pe.evaluate), models, fp.get("attention"))
            steps.run(f"seed{seed}/{out.name}", fp_eval,
                      lambda stale, pe=pe, specs=specs: evaluate(pe, specs, restart=stale))
            for a in names:
                cells[a][seed] = _cell(out, a, blank)
        for arm in arms:
            extra[arm][seed] = _arm_record(folder, arm)

    result = _aggregate(params, arms, cells, extra, steps, corpus, code, root)
    result["inputs"]["seconds"] = round(math.fsum(steps.seconds.values()), 1)
    written = write_study(params, result)
    if track:
        _track(params, result, cells, extra, written, root)
    log.info("study: %d step(s) run, %d reused, %.0f s", len(steps.ran), len(steps.reused),
             time.perf_counter() - started)
    return result


def _arm_record(folder: Path, arm: str) -> dict[str, Any]:
    """What else an arm's child run logs: the base stage's metrics, or the training metrics."""
    if arm == "base":
        path = folder / "base.json"
    elif ARMS[arm].data:
        path = folder / arm / "train.json"
    else:
        return {}
    return read_json(path) if path.is_file() else {}


def _aggregate(params: Params, arms: Sequence[str], cells: Mapping[str, Mapping[int, Mapping[str, Any]]],
               extra: Mapping[str, Any], steps: Steps, corpus: str, code: Mapping[str, str], root: Path
               ) -> dict[str, Any]:
    seeds = list(params.study.seeds)
    out: dict[str, Any] = {"seeds": seeds, "arms": {}}
    for arm in arms:
        per_seed = [cells[arm][s] for s in seeds]
        demon_keys = [c for c in CATEGORIES if c in per_seed[0]["demon"]] + ["average"]
        out["arms"][arm] = {
            "label": ARMS[arm].label,
            "demon": {k: summarize([c["demon"][k] for c in per_seed]) for k in demon_keys},
            "mme": {k: summarize([c["mme"][k] for c in per_seed]) for k in MME_SPLITS if k in per_seed[0]["mme"]},
        }
        for group in ("content", "probe"):
            if all(group in c for c in per_seed):
                out["arms"][arm][group] = {k: summarize([c[group][k] for c in per_seed]) for k in per_seed[0][group]}
    if "base" in arms:  # the backbone itself over seeds (metrics/base.json): issue 11's Yes/No target, captions
        found = [extra["base"].get(s, {}) for s in seeds]
        found = [{**m, **{f"probe.{k}": v for k, v in (m.get("probe") or {}).items()}} for m in found]
        out["arms"]["base"]["backbone"] = {k: summarize([m[k] for m in found]) for k in BACKBONE_METRICS
                                           if all(k in m for m in found)}
    out["expectations"] = expectations(out["arms"])
    info = lineage(root, stage="study")
    out["inputs"] = {"command": "cheetah study", "git_commit": info.get("git_commit"), "git_dirty": info.get("git_dirty"),
                     "corpus_sha256": corpus, "code_sha256": dict(code),
                     "params": {k: to_dict(getattr(params, k)) for k in ("world", "model", "base", "synthesize",
                                                                          "train", "evaluate", "study")},
                     "steps_seconds": dict(sorted(steps.seconds.items()))}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Outputs: metrics, table, plot, MLflow
# ---------------------------------------------------------------------------------------------------------------


def _fmt(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "–"
    if entry["ci95"] is None:
        return f"{entry['mean']:.2f}"
    return f"{entry['mean']:.2f} [{entry['ci95'][0]:.2f}, {entry['ci95'][1]:.2f}]"


def study_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per arm, one column per DEMON-format category, the average and each MME-format split."""
    arms = result["arms"]
    first = next(iter(arms.values()))
    demon_keys = list(first["demon"])
    header = ["Arm"] + [CATEGORIES.get(k, "DEMON average") for k in demon_keys] + \
        [f"MME {k} (/800)" for k in first["mme"]]
    rows = [[a["label"]] + [_fmt(a["demon"].get(k)) for k in demon_keys] + [_fmt(a["mme"].get(k)) for k in first["mme"]]
            for a in arms.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    n = len(result["seeds"])
    content = _group_table(arms, "content", "Content (%)")
    probe = _group_table(arms, "probe", "What VPG-C adds: the representation probe (%)")
    blind = (result.get("expectations") or {}).get("does_not_measure_seeing")
    flagged = "" if blind is None else (
        "\nDo not measure seeing (the blind arm reaches another arm's interval): "
        + (", ".join(f"`{k}`" for k in blind) if blind else "none") + ".\n")
    backbone = arms.get("base", {}).get("backbone")
    after = "" if not backbone else (
        "\nThe base backbone itself, held-out scenes (metrics/base.json per seed): " + "; ".join(
            f"{k.replace('_', ' ')} {_fmt(v)} %" for k, v in backbone.items()) + ".\n")
    return (f"Mean over {n} seed(s) {result['seeds']} [95 % confidence interval of the mean, Student's t]; DEMON-format "
            "categories: ROUGE-L F or accuracy (%); MME-format: acc + acc+ summed over existence, count, position "
            "and color (questions about large objects: primary; about small ones: detail).\n\n" + "\n".join(lines) + "\n"
            + content + probe + flagged + after)


def _group_table(arms: Mapping[str, Mapping[str, Any]], group: str, title: str) -> str:
    """One row per arm, one column per measure of `group` (content, probe), or "" where no arm has it."""
    keys = list(dict.fromkeys(k for a in arms.values() for k in a.get(group, {})))
    if not keys:
        return ""
    lines = ["| Arm | " + " | ".join(keys) + " |", "|:--|" + "--:|" * len(keys)]
    lines += ["| " + a["label"] + " | " + " | ".join(_fmt(a.get(group, {}).get(k)) for k in keys) + " |"
              for a in arms.values()]
    return f"\n{title}:\n\n" + "\n".join(lines) + "\n"


def study_chart(result: Mapping[str, Any]) -> bytes:
    """PNG: bars per arm with 95 % CI error bars — DEMON-format categories and average (left), MME splits (right)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    first = next(iter(arms.values()))
    panels = [("demon", list(first["demon"]), "score (%)"), ("mme", list(first["mme"]), "acc + acc+ (/800)")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(arms)
    for ax, (bench, keys, ylabel) in zip(axes, panels):
        for i, (name, arm) in enumerate(arms.items()):
            entries = [arm[bench].get(k) for k in keys]
            means = [e["mean"] if e else 0.0 for e in entries]
            err = [[e["mean"] - e["ci95"][0] if e and e["ci95"] else 0.0 for e in entries],
                   [e["ci95"][1] - e["mean"] if e and e["ci95"] else 0.0 for e in entries]]
            xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, means, width=width, yerr=err, capsize=2, label=arm["label"])
        labels = [CATEGORIES.get(k, "DEMON average" if k == "average" else k) for k in keys]
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([lab.replace(" ", "\n", 1) for lab in labels], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"DEMON-format categories (mean, 95 % CI over {len(result['seeds'])} seeds)")
    axes[1].set_title("MME-format splits")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # bytes depend on the numbers only
    plt.close(fig)
    return buf.getvalue()


def write_study(params: Params, result: Mapping[str, Any]) -> dict[str, Path]:
    report = Path(params.study.report)
    return {"metrics": write_metrics(params.study.metrics, dict(result)),
            "table": write_output_file(report / "study.md", ("# Ablation study\n\n" + study_table(result)).encode(),
                                       "study table"),
            "plot": write_output_file(report / "study.png", study_chart(result), "study chart")}


def _track(params: Params, result: Mapping[str, Any], cells: Mapping[str, Mapping[int, Any]],
           extra: Mapping[str, Mapping[int, Any]], written: Mapping[str, Path], root: Path) -> None:
    """One parent run (the study: its parameters, metrics, table and plot) and one child run per arm and seed."""
    if os.environ.get("CHEETAH_TRACKING", "1") == "0":
        return
    import mlflow

    from cheetah.pipeline import parent_run
    from cheetah.tracking import flat_metrics

    with parent_run(root, params.register.experiment, run_name="study", tags={"cheetah.kind": "study"}):
        mlflow.log_params({k: str(v)[:500] for k, v in to_dict(params.study).items()})
        mlflow.log_metrics(flat_metrics({a: {b: {k: v["mean"] for k, v in r[b].items()} for b in ("demon", "mme")}
                                         for a, r in result["arms"].items()}))
        for path in written.values():
            mlflow.log_artifact(str(path), artifact_path="study")
        for arm, by_seed in cells.items():
            for seed, values in by_seed.items():
                tags = {"cheetah.study.arm": arm, "cheetah.study.seed": str(seed)}
                with mlflow.start_run(run_name=f"{arm} seed {seed}", tags=tags, nested=True):
                    mlflow.log_params({"arm": arm, "seed": seed, "label": ARMS[arm].label})
                    mlflow.log_metrics(flat_metrics({**values, arm: extra.get(arm, {}).get(seed, {})}))
