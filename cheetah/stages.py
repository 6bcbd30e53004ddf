"""The pipeline's stages as functions: typed parameters in, a `StageResult` (metrics, artifacts, what to print) out.

They do not track: `cheetah.tracking.track_stage` runs each of them inside its MLflow run and logs what it returns,
the same way for every stage (the CLI calls it, so `dvc repro` and the Prefect flow do too). The work itself lives
in the packages (`cheetah.world`, `cheetah.synthesize`, ...); this module only says what each stage returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cheetah.config import ConfigError, Params
from cheetah.io import DataError
from cheetah.pipeline.dag import RECEIPT
from cheetah.tracking import StageResult


def world(p: Params) -> StageResult:
    """`cheetah world`: the embedded world's source corpus in `world.out`."""
    from cheetah.world import write_corpus

    out = write_corpus(p.world)
    return StageResult({"n": p.world.n}, printed={"out": str(out), "n": p.world.n, "seed": p.world.seed,
                                                  "image_size": p.world.image_size})


def synthesize(p: Params, backbone: str | None = None) -> StageResult:
    """`cheetah synthesize`: the synthetic set in `synthesize.out`, its statistics and contact sheets."""
    from cheetah.synthesize import synthesize as run
    from cheetah.synthesize.contact_sheet import SHEETS_DIR
    from cheetah.synthesize.pipeline import default_backbone

    stats = run(p.synthesize, default_backbone(p, backbone))
    numbers = {k: v for k, v in stats.items() if k != "settings"}
    out = Path(p.synthesize.out)
    return StageResult(numbers, [(out / "stats.json", None), (out / SHEETS_DIR, SHEETS_DIR)], printed=numbers)


def validate(p: Params, suite: str, path: str, docs: bool = True) -> StageResult:
    """`cheetah validate SUITE PATH`: a Great Expectations suite; `metrics["success"]` is 1 when it passed."""
    from cheetah.validate import run_suite

    result = run_suite(suite, path, p.validate, docs=docs)
    report = Path(p.validate.docs_dir) / (suite if result.success else f"{suite}-failed")
    return StageResult({"success": int(result.success), "failed_expectations": len(result.failures)},
                       [(report, report.name)], printed=result.summary())


def benchmarks(p: Params, demon_dir: str | None = None, mme_dir: str | None = None) -> StageResult:
    """`cheetah benchmarks`: the embedded DEMON- and MME-format benchmarks, under `world.benchmarks` unless told
    otherwise (never into the real benchmarks `evaluate.*_dir` may name)."""
    from cheetah.evaluate.embedded import write_embedded_benchmarks

    p.evaluate.demon_dir = demon_dir or f"{p.world.benchmarks}/demon"
    p.evaluate.mme_dir = mme_dir or f"{p.world.benchmarks}/mme"
    written = write_embedded_benchmarks(p.world, p.evaluate)
    return StageResult({"demon_per_task": p.evaluate.demon_per_task, "mme_per_subtask": p.evaluate.mme_per_subtask},
                       printed={k: str(v) for k, v in written.items()})


def language(p: Params) -> StageResult:
    """`cheetah language`: the embedded language model in `language.out`."""
    from cheetah.train.language import pretrain_language

    metrics = pretrain_language(p)
    return StageResult(metrics, [(p.language.metrics, "language")], printed=metrics)


def middle(p: Params) -> StageResult:
    """`cheetah middle`: the embedded language model, reading the middle layer too, in `middle.out`."""
    from cheetah.train.middle_layer import train_middle

    metrics = train_middle(p)
    return StageResult(metrics, [(p.middle.metrics, "middle")], printed=metrics)


def base(p: Params) -> StageResult:
    """`cheetah base`: the backbone in `base.out` (pretrained, random or a checkpoint brought in)."""
    from cheetah.train.base import base_stage

    metrics = base_stage(p)
    return StageResult(metrics, [(p.base.metrics, "base")], printed=metrics)


def train(p: Params, restart: bool = False) -> StageResult | None:
    """`cheetah train` on this rank: VPG-C weights in `train.out`, the learning curve; None on ranks other than 0."""
    from cheetah.model.weights import CARD_FILE
    from cheetah.train.vpgc import train_vpgc

    metrics = train_vpgc(p, restart=restart)
    if metrics is None:
        return None
    cfg = p.train
    files = (cfg.curve, cfg.curve_image, Path(cfg.out) / CARD_FILE, Path(cfg.state_dir) / "deepspeed_config.json")
    return StageResult(metrics, [(f, "train") for f in files], printed=metrics)


def train_launch(p: Params, argv: list[str]) -> int | None:
    """After the checks that would otherwise fail on every rank (`preflight`, before the tracking run starts): under
    `train.launcher`, run `cheetah <argv>` again under it (what `dvc repro` and the Prefect flow do) and return its
    exit status; None: train in this process."""
    from cheetah.train import distributed
    from cheetah.train.vpgc import preflight

    if distributed.launched():
        return None
    preflight(p, distributed.launcher_world_size(p.train.launcher),
              distributed.launcher_ranks_per_node(p.train.launcher))
    return distributed.relaunch(p.train.launcher, argv) if p.train.launcher else None


def train_plan(p: Params, world_size: int | None, lengths: str) -> dict[str, Any]:
    """`cheetah train --plan`: the estimated memory per rank (`lengths`: "SYN,CAP" tokens per sample)."""
    from cheetah.train import distributed
    from cheetah.train.plan import plan_memory

    parts = lengths.split(",")
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        raise ConfigError(f"--lengths {lengths!r}: expected SYN,CAP token counts, e.g. 128,64")
    world_size = world_size or distributed.launcher_world_size(p.train.launcher) or 1
    return plan_memory(p, world_size, lengths=(int(parts[0]), int(parts[1])))


def evaluate(p: Params, models: list[str] | None = None, benchmark: str = "all", data_dir: str | None = None,
             restart: bool = False) -> StageResult:
    """`cheetah evaluate`: predictions, scores, the report and `evaluate.metrics` (on rank 0; the other ranks
    return a result with nothing to print)."""
    from cheetah.evaluate.run import evaluate as run, parse_model_specs

    if data_dir is not None:
        if benchmark == "all":
            raise DataError("--data-dir needs --benchmark demon or --benchmark mme (it replaces that one's folder)")
        setattr(p.evaluate, f"{benchmark}_dir", data_dir)
    result = run(p, parse_model_specs(models) if models else None, benchmark=benchmark, restart=restart)
    if result.get("rank", 0) != 0:
        return StageResult({})
    metrics = result["metrics"]
    out = Path(p.evaluate.out)
    artifacts: list[tuple[Any, str | None]] = [(path, "evaluate") for path in result["paths"].values()]
    artifacts += [(out / name / f, f"evaluate/{name}") for name in result["models"]
                  for f in ("demon_scores.json", "mme_scores.json")]
    # The other models' numbers under their names (base.demon.average), beside the evaluated model's.
    numbers = {**{k: v for k, v in metrics.items() if k != "baselines"}, **metrics.get("baselines", {})}
    return StageResult(numbers, artifacts, printed={"metrics": metrics, "paths": result["paths"]})


def register(p: Params, metrics: str | None = None, vpgc_dir: str | None = None, out: str = RECEIPT) -> StageResult:
    """`cheetah register`: the MLflow model version, its aliases and the receipt (registration logs the model into
    the stage's run)."""
    from cheetah.registry import register as run

    receipt = run(p, metrics_path=metrics, vpgc_dir=vpgc_dir, out=out)
    numbers = {k: v for k, v in receipt.items() if k in ("version", "promoted")}
    return StageResult({k: int(v) for k, v in numbers.items()}, printed=receipt)
