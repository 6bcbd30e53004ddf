"""`cheetah <command>`: the one entry point used by people, `dvc.yaml` and the Prefect flow.

Each command reads the sections of `params.yaml` (`--params`) it needs, applies `--set section.key=value`
overrides and then its options, which are generated from those sections' fields (`--train.steps`, with the field's
docstring as help; cheetah/options.py), and calls the stage's function (cheetah/stages.py) inside its MLflow run.
Nothing here holds logic of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from cheetah.config import STUDY_ARMS, ConfigError, Params, load_params
from cheetah.cpu_kernels import pin_cpu_kernels
from cheetah.errors import EXIT_USER_ERROR, CheetahError, record_rank_error
from cheetah.formats import DATASETS
from cheetah.io import DataError, allow_overwrite, lock_scope
from cheetah.pipeline import RECEIPT
from cheetah.pipeline.run import EXIT_STATUS_ENV
from cheetah.progress import LEVELS, LOG_ENV, configure_logging
from cheetah import options, stages
from cheetah.tracking import StageResult, track_stage


_USER_FIXABLE_ERRNO = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}
OVERWRITE_HELP = ("let an output folder replace files its stage did not write (refused otherwise); the replaced "
                  "files are listed in the new folder's .cheetah-output.json")


def _params(args: argparse.Namespace) -> Params:
    """params.yaml + `--set` overrides + the config options given (they win)."""
    return load_params(args.params, [*(args.set or []), *options.overrides(args)])


def _command(sub: argparse._SubParsersAction, name: str, sections: tuple[str, ...] = (),
             aliases: dict[str, str] | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """A command whose options are the fields of the config `sections` it reads (`aliases`: short names kept)."""
    parser = sub.add_parser(name, **kwargs)
    options.add_config_options(parser, sections, aliases)
    return parser


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# The sections of params.yaml each stage's command reads: its options (`--section.field`) and the params logged
# with its MLflow run.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "world": ("world",),
    "language": ("language", "base.init", "world.image_size", "world.heldout_seed", "model.preset"),
    "middle": ("middle", "language.out", "base.init", "model.update_layer", "world.heldout_seed"),
    "base": ("base", "middle.out", "middle.scale", "world", "model"),
    "synthesize": ("synthesize", "model"),
    "validate": ("validate",),
    "train": ("train", "model"),
    "benchmarks": ("world", "evaluate.demon_per_task", "evaluate.mme_per_subtask"),
    "evaluate": ("evaluate", "model"),
    "register": ("register",),
}


def _stage(name: str, p: Params, run: Callable[[], StageResult | None], run_name: str | None = None,
           **tracking: Any) -> StageResult | None:
    """Run a stage (cheetah/stages.py) inside its MLflow run (`track_stage`) and print what it returns."""
    result = track_stage(run_name or name, p, STAGE_SECTIONS[name], run, **tracking)
    if result is not None and result.printed is not None:
        print(result.printed) if isinstance(result.printed, str) else _print_json(result.printed)
    return result


def _cmd_model_summary(args: argparse.Namespace) -> int:
    from cheetah.model.backbones import load_backbone
    from cheetah.model.vpgc import VPGCModel

    p = _params(args)
    backbone = load_backbone(args.preset or p.model.preset, device="meta" if args.meta else "cpu",
                             random_init=args.random or args.meta, backbone_dir=args.backbone_dir)
    model = VPGCModel(backbone, update_layer=p.model.update_layer)
    _print_json(model.summary())
    return 0


def _cmd_model_import(args: argparse.Namespace) -> int:
    from cheetah.model.convert import import_official

    report = import_official(
        cheetah_ckpt=args.cheetah_ckpt, eva_vit=args.eva_vit, blip2_qformer=args.qformer, llm_dir=args.llm,
        out_backbone=args.out_backbone, out_vpgc=args.out_vpgc, template=args.template,
        update_layer=args.update_layer, image_size=args.image_size,
    )
    print(f"chat template: {report['template']} ({report['template_reason']}); the weights card records "
          f"{report['trained_template']} as their training rendering", file=sys.stderr)
    _print_json(report)
    return 0


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="backbones and VPG-C: summary, import of the official checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND", help="what to do")

    s = _command(msub, "summary", ("model.update_layer",), {"update-layer": "model.update_layer"},
                 help="print parameter counts and VPG-C settings as JSON")
    s.add_argument("--preset", help="preset name or local backbone directory (default: model.preset)")
    s.add_argument("--backbone-dir", help="load the preset's weights from this directory (default: none; with "
                                          "--meta or --random none is needed)")
    s.add_argument("--meta", action="store_true", help="build on the meta device: counts without allocating weights")
    s.add_argument("--random", action="store_true", help="random weights instead of loading a directory")
    s.set_defaults(func=_cmd_model_summary)

    i = msub.add_parser("import", help="convert the official Cheetah release into a backbone dir + VPG-C weights")
    i.add_argument("--cheetah-ckpt", required=True, help="released Cheetah .pth (dict with a 'model' entry)")
    i.add_argument("--eva-vit", required=True, help="LAVIS eva_vit_g.pth")
    i.add_argument("--qformer", required=True, help="LAVIS blip2_pretrained_flant5xxl.pth (Q-Former + ln_vision)")
    i.add_argument("--llm", required=True, help="LLaMA/Vicuna directory in Hugging Face format")
    i.add_argument("--out-backbone", required=True, help="folder for the converted backbone (a Hugging Face "
                                                          "InstructBLIP directory with its tokenizer)")
    i.add_argument("--out-vpgc", required=True, help="folder for the converted VPG-C weights and their card")
    i.add_argument("--template", choices=["vicuna", "llama2"], default=None,
                   help="official chat rendering of the LLM (default: detected from it, and printed)")
    i.add_argument("--update-layer", type=int, default=None,
                   help="LLM layer VPG-C corrects (default: the checkpoint's, else L/2)")
    i.add_argument("--image-size", type=int, default=224, help="input resolution of the ViT (default: %(default)s)")
    i.set_defaults(func=_cmd_model_import)


# ---------------------------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------------------------


def _emit(obj: object, out: str | None) -> None:
    from cheetah.io import write_output_file

    if out:  # never over a file the project did not write, unless --overwrite
        write_output_file(out, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), "scores")
    _print_json(obj)


def _cmd_score_mme(args: argparse.Namespace) -> int:
    from cheetah.evaluate.scoring import score_mme

    _emit(score_mme(args.results_dir), args.out)
    return 0


def _cmd_score_demon(args: argparse.Namespace) -> int:
    from cheetah.evaluate.scoring import score_demon

    _emit(score_demon(args.data_dir, args.predictions, split=args.split, datasets=args.tasks,
                      option_rule=args.option_rule), args.out)
    return 0


def _cmd_score_report(args: argparse.Namespace) -> int:
    from cheetah.evaluate.report import read_model_scores, write_report

    written = write_report(args.out, read_model_scores(args.models), metrics_path=args.metrics,
                           metrics_model=args.metrics_model)
    _print_json({k: str(v) for k, v in written.items()})
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="score DEMON/MME predictions in the official formats (any model's)")
    ssub = score.add_subparsers(dest="score_command", required=True, metavar="SCORE_COMMAND",
                                help="what to score or report")

    m = ssub.add_parser("mme", help="official MME calculation over <subtask>.txt results files; prints JSON")
    m.add_argument("--results-dir", required=True, help="folder of <subtask>.txt: image, question, gt, prediction")
    m.add_argument("--out", help="also write the JSON here")
    m.set_defaults(func=_cmd_score_mme)

    d = ssub.add_parser("demon", help="score <predictions>/<Dataset>/pred.json against the data; prints JSON")
    d.add_argument("--data-dir", required=True, help="DEMON root holding <Dataset>/core/core.json")
    d.add_argument("--predictions", required=True, help="folder holding <Dataset>/pred.json")
    d.add_argument("--split", choices=["core", "full"], default="core",
                   help="DEMON-Core (core/core.json) or DEMON-Full (full/full.json) (default: %(default)s)")
    d.add_argument("--tasks", nargs="+", metavar="DATASET", help="only these datasets (default: every pred.json)")
    d.add_argument("--out", help="also write the JSON here")
    d.add_argument("--option-rule", choices=["official", "strict"], default="official",
                   help="multi-choice answers sharing no term with any option: the first option, as the official "
                        "evaluate.py (default), or exact match (strict); their count is reported either way")
    d.set_defaults(func=_cmd_score_demon)

    r = ssub.add_parser("report", help="markdown tables + bar chart comparing models, and a metrics JSON")
    r.add_argument("models", nargs="+", metavar="NAME=SCORES[,SCORES]",
                   help="a model and the JSON files of its `score demon` / `score mme` output")
    r.add_argument("--out", required=True, help="folder for report.md and demon_categories.png")
    r.add_argument("--metrics", help="write this model's metrics JSON (for DVC and the registry) here")
    r.add_argument("--metrics-model", help="which model the metrics file is for (default: the last)")
    r.set_defaults(func=_cmd_score_report)


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


def _cmd_language(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("language", p, lambda: stages.language(p), system_metrics=True)
    return 0


def _cmd_middle(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("middle", p, lambda: stages.middle(p), system_metrics=True)
    return 0


def _cmd_base(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("base", p, lambda: stages.base(p), system_metrics=True)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    p = _params(args)
    if args.plan:
        _print_json(stages.train_plan(p, args.world_size, args.lengths))
        return 0
    status = stages.train_launch(p, args.argv)
    if status is not None:
        return status
    _stage("train", p, lambda: stages.train(p, restart=args.restart), system_metrics=True)
    return 0


def _add_training(sub: argparse._SubParsersAction) -> None:
    g = _command(sub, "language", STAGE_SECTIONS["language"], {"out": "language.out", "steps": "language.steps"},
                 help="pretrain the embedded `tiny` language model on the world's language, in language.out (the "
                      "part Vicuna plays; the base stage starts from it; params: language)")
    g.set_defaults(func=_cmd_language)

    m = _command(sub, "middle", STAGE_SECTIONS["middle"], {"out": "middle.out", "steps": "middle.steps"},
                 help="train the language stage's model further to read the small objects arriving at its middle "
                      "layer, the form of VPG-C's correction, in middle.out (the base stage starts from it; params: "
                      "middle)")
    m.set_defaults(func=_cmd_middle)

    b = _command(sub, "base", STAGE_SECTIONS["base"], {"out": "base.out"},
                 help="the backbone every later stage reads, in base.out: pretrain the embedded `tiny` one, bring in "
                      "a checkpoint, or random weights (params: base.init)")
    b.set_defaults(func=_cmd_base)

    t = _command(sub, "train", STAGE_SECTIONS["train"],
                 {"steps": "train.steps", "data": "train.data", "out": "train.out", "zero-stage": "train.zero_stage",
                  "precision": "train.precision", "random-backbone": "model.random_backbone"},
                 help="train VPG-C with DeepSpeed (params: train, model); resumes a killed run",
                 description="Run as is for one process; under `torchrun --nproc_per_node N` or `deepspeed` for "
                             "several (the global batch stays the same).")
    t.add_argument("--restart", action="store_true",
                   help="start over: remove the checkpoints in train.state_dir instead of resuming from them")
    t.add_argument("--plan", action="store_true",
                   help="print the estimated memory per rank for these settings and exit (meta device: allocates "
                        "nothing, needs no weights)")
    t.add_argument("--world-size", type=int, help="--plan: ranks (default: what train.launcher starts, else 1)")
    t.add_argument("--lengths", default="128,64", metavar="SYN,CAP",
                   help="--plan: tokens per synthetic and per caption sample (default: the paper's %(default)s)")
    t.set_defaults(func=_cmd_train)


# ---------------------------------------------------------------------------------------------------------------
# data: world, synthesize, validate
# ---------------------------------------------------------------------------------------------------------------


def _cmd_world(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("world", p, lambda: stages.world(p))
    return 0


def _add_world(sub: argparse._SubParsersAction) -> None:
    w = _command(sub, "world", STAGE_SECTIONS["world"],
                 {"out": "world.out", "n": "world.n", "seed": "world.seed", "image-size": "world.image_size"},
                 help="write the embedded world's source corpus: images + captions.jsonl (params: world)")
    w.set_defaults(func=_cmd_world)


def _cmd_synthesize(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("synthesize", p, lambda: stages.synthesize(p, args.backbone))
    return 0


def _add_synthesize(sub: argparse._SubParsersAction) -> None:
    s = _command(sub, "synthesize", STAGE_SECTIONS["synthesize"],
                 {k.replace("_", "-"): f"synthesize.{k}" for k in ("source", "out", "n", "captions", "seed", "workers",
                                                                   "executor", "address", "shard_size", "selector")},
                 help="attention-guided synthetic pairs + caption samples (params: synthesize)")
    s.add_argument("--backbone", help="backbone directory for attention selection (default: model.backbone_dir)")
    s.set_defaults(func=_cmd_synthesize)


def _cmd_validate(args: argparse.Namespace) -> int:
    p = _params(args)
    result = _stage("validate", p, lambda: stages.validate(p, args.suite, args.path, docs=not args.no_docs),
                    run_name=f"validate-{args.suite}", extra_params={"suite": args.suite, "path": args.path})
    # A failed suite is bad input, like a malformed record elsewhere: exit 2, which the Prefect flow never retries.
    return 0 if result is not None and result.metrics["success"] else EXIT_USER_ERROR


def _add_validate(sub: argparse._SubParsersAction) -> None:
    v = _command(sub, "validate", STAGE_SECTIONS["validate"],
                 {"docs-dir": "validate.docs_dir", "image-size": "validate.image_size"},
                 help="Great Expectations suites; exits 2 if any expectation fails, with the records named and "
                      "quarantined (params: validate)")
    v.add_argument("suite", choices=DATASETS, help="which suite: the source corpus, the synthetic set, or a DEMON or "
                                                 "MME benchmark folder")
    v.add_argument("path", help="source or synthetic folder, DEMON root (<Dataset>/core/core.json) or MME root")
    v.add_argument("--no-docs", action="store_true", help="skip the HTML data docs (result.json and quarantine only)")
    v.set_defaults(func=_cmd_validate)


# ---------------------------------------------------------------------------------------------------------------
# evaluate, benchmarks
# ---------------------------------------------------------------------------------------------------------------


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cheetah.devices import check_gpu

    p = _params(args)
    check_gpu(p, "evaluate")  # before the tracking run starts
    _stage("evaluate", p, lambda: stages.evaluate(p, args.model, args.benchmark, args.data_dir, restart=args.restart),
           enabled=not args.no_track, system_metrics=True,
           extra_params={"models": ",".join(args.model or []) or "default"})
    return 0


def _cmd_benchmarks(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("benchmarks", p, lambda: stages.benchmarks(p, args.demon_dir, args.mme_dir))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = _command(sub, "evaluate", STAGE_SECTIONS["evaluate"],
                 {k.replace("_", "-"): f"evaluate.{k}" for k in ("batch_size", "device", "out", "metrics", "decoding")},
                 help="generate, score and report DEMON/MME for the base and VPG-C models (params: evaluate); "
                      "resumes a killed run",
                 description="Run as is for one process; under `torchrun --nproc_per_node N` (or `deepspeed "
                             "--no_local_rank`) for one model per device, each rank a shard of the samples.")
    e.add_argument("--benchmark", choices=["demon", "mme", "all"], default="all",
                   help="which benchmark to run (default: %(default)s)")
    e.add_argument("--data-dir", help="data folder of the chosen --benchmark (default: evaluate.demon_dir/mme_dir)")
    e.add_argument("--model", action="append", metavar="NAME=SPEC",
                   help="a model to evaluate: a VPG-C weights dir, backbone dir or preset (repeatable; default: "
                        "base=model.backbone_dir and vpgc=train.out)")
    e.add_argument("--restart", action="store_true", help="discard saved predictions instead of resuming them")
    e.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    e.set_defaults(func=_cmd_evaluate)


def _add_benchmarks(sub: argparse._SubParsersAction) -> None:
    b = _command(sub, "benchmarks", STAGE_SECTIONS["benchmarks"],
                 {"demon-per-task": "evaluate.demon_per_task", "mme-per-subtask": "evaluate.mme_per_subtask"},
                 help="write the embedded DEMON- and MME-format benchmarks from held-out world scenes (params: world, "
                      "evaluate)")
    b.add_argument("--demon-dir", help="where the DEMON-format tasks go (default: <world.benchmarks>/demon)")
    b.add_argument("--mme-dir", help="where the MME-format subtasks go (default: <world.benchmarks>/mme)")
    b.set_defaults(func=_cmd_benchmarks)


def _cmd_study(args: argparse.Namespace) -> int:
    from cheetah.study import run_study

    p = _params(args)
    result = run_study(p, restart=args.restart, track=not args.no_track)
    _print_json({"metrics": p.study.metrics, "report": p.study.report, "expectations": result["expectations"]})
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    s = _command(sub, "study", ("study",), {"seeds": "study.seeds", "arms": "study.arms"},
                 help="the ablation study (paper Table 4 in miniature): every arm trained and evaluated per seed, "
                      "mean and 95%% CI (params: study and the stages'); resumes",
                 description=f"Arms: {', '.join(STUDY_ARMS)} (cheetah/study.py). Steps already done with the same "
                             "inputs are reused. The stages' settings: --set section.key=value.")
    s.add_argument("--restart", action="store_true", help="redo every step instead of reusing finished ones")
    s.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    s.set_defaults(func=_cmd_study)


# ---------------------------------------------------------------------------------------------------------------
# register, predict, pipeline
# ---------------------------------------------------------------------------------------------------------------


def _cmd_register(args: argparse.Namespace) -> int:
    p = _params(args)
    _stage("register", p, lambda: stages.register(p, args.metrics, args.vpgc_dir, args.out))
    return 0


def _add_register(sub: argparse._SubParsersAction) -> None:
    r = _command(sub, "register", STAGE_SECTIONS["register"],
                 {"model-name": "register.model_name", "metric": "register.metric", "margin": "register.margin"},
                 help="log VPG-C as an MLflow model, register a version with lineage tags, alias challenger; champion "
                      "if it wins (params: register)")
    r.add_argument("--vpgc-dir", help="VPG-C weights + card (default: train.out)")
    r.add_argument("--metrics", help="evaluation metrics JSON (default: evaluate.metrics)")
    r.add_argument("--out", default=RECEIPT, help="registration receipt (default: %(default)s)")
    r.set_defaults(func=_cmd_register)


def _cmd_registry(args: argparse.Namespace) -> int:
    from cheetah import registry
    from cheetah.tracking import configure

    p = _params(args)
    configure(p.register.experiment)
    name = p.register.model_name
    if args.registry_command == "history":
        _print_json(registry.history(name))
    elif args.registry_command == "demote":
        _print_json(registry.demote(name, args.version, args.reason, metric=p.register.metric))
    else:
        _print_json(registry.promote(name, args.version, args.reason))
    return 0


def _add_registry(sub: argparse._SubParsersAction) -> None:
    rg = sub.add_parser("registry", help="the model registry's record: history, demote a broken version, promote by "
                                         "hand (params: register)")
    rsub = rg.add_subparsers(dest="registry_command", required=True, metavar="REGISTRY_COMMAND", help="what to do")
    sections, aliases = ("register",), {"model-name": "register.model_name"}
    h = _command(rsub, "history", sections, aliases,
                 help="every version with its aliases, lineage and gate decisions (JSON)")
    d = _command(rsub, "demote", sections, aliases,
                 help="mark a version broken; if it is champion, the best remaining eligible version by its logged "
                      "register.metric takes over")
    pr = _command(rsub, "promote", sections, aliases,
                  help="make a version champion by hand, whatever the gate said (recorded)")
    for command in (d, pr):
        command.add_argument("version", type=int, help="the model version")
        command.add_argument("--reason", required=True, help="why (recorded on the version)")
    for command in (h, d, pr):
        command.set_defaults(func=_cmd_registry)


def _cmd_predict(args: argparse.Namespace) -> int:
    from cheetah.registry import predict
    from cheetah.tracking import configure

    p = _params(args)
    configure(p.register.experiment)
    uri = args.model or f"models:/{p.register.model_name}@champion"
    print(predict(uri, args.instruction, args.image or [], backbone_dir=args.backbone_dir,
                  max_new_tokens=args.max_new_tokens))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = _command(sub, "predict", ("register.model_name", "register.experiment"),
                  help="answer an instruction about images with a registered model (default: "
                       "models:/<register.model_name>@champion)")
    pr.add_argument("--model", help="a registered version, models:/<name>@<alias> or models:/<name>/<version> (its "
                                    "files are checked against the registration first)")
    pr.add_argument("--image", action="append", metavar="PATH", help="an image (repeatable, in order)")
    pr.add_argument("--instruction", required=True,
                    help="the instruction; `<image>` marks where each image goes (added in front when absent)")
    pr.add_argument("--backbone-dir", help="the backbone's directory, if not where the model's card records it")
    pr.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens (default: the model's setting)")
    pr.set_defaults(func=_cmd_predict)


def _cmd_serve(args: argparse.Namespace) -> int:
    from cheetah.registry.serve import serve
    from cheetah.tracking import configure

    p = _params(args)
    configure(p.register.experiment)
    return serve(args.model or f"models:/{p.register.model_name}@champion", host=args.host, port=args.port)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    sv = _command(sub, "serve", ("register.model_name", "register.experiment"),
                  help="MLflow's REST scoring server (`mlflow models serve`) on a registered model whose files were "
                       "checked against its registration (default: models:/<register.model_name>@champion)")
    sv.add_argument("--model", help="a registered version, models:/<name>@<alias> or models:/<name>/<version>")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sv.add_argument("--port", type=int, default=5001, help="port (default: %(default)s)")
    sv.set_defaults(func=_cmd_serve)


def _cmd_pipeline_run(args: argparse.Namespace) -> int:
    from cheetah.pipeline import run_pipeline

    if args.set:
        raise ConfigError("`cheetah pipeline run` runs params.yaml as it is; edit it, or use "
                          "`dvc exp run -S section.key=value` for an experiment")
    return run_pipeline(".", stages=args.stages, force=args.force, params_path=args.params)


def _tolerance(text: str) -> float:
    """A finite, non-negative relative tolerance (NaN would make every comparison pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _cmd_pipeline_source(args: argparse.Namespace) -> int:
    from cheetah.pipeline import ensure_source

    if args.set:
        raise ConfigError("`cheetah pipeline source` follows params.yaml as it is (data.dvc records the corpus it "
                          "asks for); edit it, or run `cheetah world --set ...` by hand and `dvc add data/source`")
    ensure_source(load_params(args.params), ".")
    return 0


def _cmd_pipeline_use(args: argparse.Namespace) -> int:
    from cheetah.pipeline import use_params

    if args.set:
        raise ConfigError("`cheetah pipeline use` copies the file as it is; edit it (or params.yaml afterwards)")
    print(use_params(args.config, "."))
    return 0


def _cmd_pipeline_check(args: argparse.Namespace) -> int:
    from cheetah.pipeline import check

    if args.set:
        raise ConfigError("`cheetah pipeline check` checks params.yaml as it is committed; it takes no --set")
    problems = check(load_params(args.params), ".", reproduced=args.reproduced, tolerance=args.tolerance)
    if problems:
        raise DataError("the recorded results are not those of the committed code (rerun `make run` and commit "
                        "dvc.lock, data.dvc and metrics/ with the change):\n  " + "\n  ".join(problems))
    print("recorded results match the committed code, parameters and data" +
          (" (reproduced)" if args.reproduced else ""))
    return 0


def _cmd_pipeline_stages(args: argparse.Namespace) -> int:
    from cheetah.pipeline import stage_order

    print("\n".join(stage_order(".")))
    return 0


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("pipeline", help="run dvc.yaml under one parent MLflow run (what `make run` does)")
    psub = pl.add_subparsers(dest="pipeline_command", required=True, metavar="PIPELINE_COMMAND", help="what to do")
    r = psub.add_parser("run", help="dvc repro (all stages, or the given ones and what they need) with a parent "
                                    "MLflow run whose children are the stages; logs dvc.lock, reports, metrics")
    r.add_argument("stages", nargs="*", metavar="STAGE", help="stages of dvc.yaml (default: all)")
    r.add_argument("--force", action="store_true", help="rerun even the stages DVC finds up to date")
    r.set_defaults(func=_cmd_pipeline_run)
    src = psub.add_parser("source", help="what `pipeline run` does first: bring data/source in line with data.dvc "
                                         "and params.yaml (DVC cache or remote; regenerate the embedded world; "
                                         "`dvc add` a changed corpus). Run it before a plain `dvc repro`")
    src.set_defaults(func=_cmd_pipeline_source)
    u = psub.add_parser("use", help="make a parameters file (e.g. configs/vicuna-7b.yaml) the pipeline's params.yaml, "
                                    "every field written out (DVC tracks and templates them); checks that the "
                                    "stages' paths chain")
    u.add_argument("config", help="parameters file, e.g. configs/vicuna-7b.yaml")
    u.set_defaults(func=_cmd_pipeline_use)
    c = psub.add_parser("check", help="whether dvc.lock, data.dvc and metrics/ are those of the committed code and "
                                      "parameters (what .ci/run enforces); --reproduced: after `make run`, also "
                                      "nothing left to run and the metrics equal the committed ones")
    c.add_argument("--reproduced", action="store_true",
                   help="after a run: dvc status clean and every committed metrics file reproduced")
    c.add_argument("--tolerance", type=_tolerance, default=0.1,
                   help="relative tolerance for reproduced metrics (default %(default)s; every difference is printed; "
                        "speed and memory figures are not compared)")
    c.set_defaults(func=_cmd_pipeline_check)
    s = psub.add_parser("stages", help="print the stages of dvc.yaml in the order they run")
    s.set_defaults(func=_cmd_pipeline_stages)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------

_ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_model, _add_training, _add_score,
                                                             _add_world, _add_synthesize, _add_validate,
                                                             _add_evaluate, _add_benchmarks]
_ADDERS += [_add_register, _add_registry, _add_predict, _add_serve, _add_pipeline, _add_study]


def build_parser() -> argparse.ArgumentParser:
    from cheetah import __version__

    parser = argparse.ArgumentParser(prog="cheetah", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cheetah {__version__}")
    parser.add_argument("--params", default="params.yaml", metavar="FILE", help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a parameter, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--log-level", choices=LEVELS, type=str.upper,
                        help=f"log level of cheetah's messages (default: ${LOG_ENV}, else INFO)")
    # DeepSpeed's launcher appends --local_rank=N to every rank's arguments (the rank is in $LOCAL_RANK too).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to run")
    for add in _ADDERS:
        add(sub)
    _accept_common_options(sub)
    return parser


def _accept_common_options(sub: argparse._SubParsersAction) -> None:
    """`--params` and `--set` also work after the command (`cheetah train --set train.lr=1e-4`)."""
    for command in sub.choices.values():
        command.add_argument("--params", dest="params_after", default=argparse.SUPPRESS, metavar="FILE",
                             help="parameters file (default: params.yaml)")
        command.add_argument("--set", dest="set_after", action="append", default=argparse.SUPPRESS,
                             metavar="SECTION.KEY=VALUE", help="override a parameter (repeatable)")
        command.add_argument("--overwrite", dest="overwrite_after", action="store_true", default=argparse.SUPPRESS,
                             help=OVERWRITE_HELP)
        command.add_argument("--log-level", dest="log_level_after", choices=LEVELS, type=str.upper,
                             default=argparse.SUPPRESS, help="log level (default: $CHEETAH_LOG_LEVEL, else INFO)")
        command.add_argument("--local_rank", "--local-rank", dest="local_rank_after", type=int,
                             default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_common_options(action)


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (0; 2 for a `CheetahError`: bad configuration or data; 1 for a crash), also
    written to $CHEETAH_EXIT_STATUS_FILE when it is set: how `cheetah pipeline run` and the Prefect flow tell bad
    input from a crash in a stage that DVC ran."""
    status = 1  # a crash (an exception that escapes) exits 1, as Python does
    pin_cpu_kernels()  # before any command imports torch: the same numbers on any x86-64 machine
    try:
        status = _main(argv)
        return status
    except SystemExit as e:  # argparse: --help, --version (0) and usage errors (2)
        status = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        if os.environ.get(EXIT_STATUS_ENV):
            with contextlib.suppress(OSError):
                Path(os.environ[EXIT_STATUS_ENV]).write_text(f"{status}\n")


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `train.launcher` runs again on every rank
    args.set = [*(args.set or []), *vars(args).pop("set_after", [])]
    args.params = vars(args).pop("params_after", args.params)
    args.overwrite = vars(args).pop("overwrite_after", False) or args.overwrite
    args.log_level = vars(args).pop("log_level_after", args.log_level)
    local_rank = vars(args).pop("local_rank_after", args.local_rank)
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    try:
        configure_logging(args.log_level)
        with allow_overwrite(args.overwrite), lock_scope():  # the folders this command locked are released after it
            return int(args.func(args) or 0)
    except CheetahError as e:
        print(f"error: {e}", file=sys.stderr)
        record_rank_error(str(e))
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in _USER_FIXABLE_ERRNO:
            raise
        # A full or read-only disk, or a folder without permission: the atomic writers left nothing half-written.
        message = f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror}"
        print(f"error: {message}", file=sys.stderr)
        record_rank_error(message)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
