"""`cheetah <command>`: the one entry point used by people, `dvc.yaml` and the Prefect flow.

Each command reads its section of `params.yaml` (`--params`), applies `--set section.key=value` overrides and its
own flags, then calls the stage's public function. Nothing here holds logic of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from cheetah.config import ConfigError, Params, load_params
from cheetah.io import DataError


def _params(args: argparse.Namespace, flag_overrides: dict[str, object] | None = None) -> Params:
    """params.yaml + `--set` overrides + explicit flags (flags win; a flag left at None is not an override)."""
    overrides = list(args.set or [])
    for key, value in (flag_overrides or {}).items():
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return load_params(args.params, overrides)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------


def _cmd_model_summary(args: argparse.Namespace) -> int:
    from cheetah.model.backbones import load_backbone
    from cheetah.model.vpgc import VPGCModel

    p = _params(args, {"model.update_layer": args.update_layer})
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
    _print_json(report)
    return 0


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="backbones and VPG-C: summary, import of the official checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True)

    s = msub.add_parser("summary", help="print parameter counts and VPG-C settings as JSON")
    s.add_argument("--preset", help="preset name or local backbone directory (default: model.preset)")
    s.add_argument("--backbone-dir", help="load the preset's weights from this directory")
    s.add_argument("--meta", action="store_true", help="build on the meta device: counts without allocating weights")
    s.add_argument("--random", action="store_true", help="random weights instead of loading a directory")
    s.add_argument("--update-layer", type=int)
    s.set_defaults(func=_cmd_model_summary)

    i = msub.add_parser("import", help="convert the official Cheetah release into a backbone dir + VPG-C weights")
    i.add_argument("--cheetah-ckpt", required=True, help="released Cheetah .pth (dict with a 'model' entry)")
    i.add_argument("--eva-vit", required=True, help="LAVIS eva_vit_g.pth")
    i.add_argument("--qformer", required=True, help="LAVIS blip2_pretrained_flant5xxl.pth (Q-Former + ln_vision)")
    i.add_argument("--llm", required=True, help="LLaMA/Vicuna directory in Hugging Face format")
    i.add_argument("--out-backbone", required=True)
    i.add_argument("--out-vpgc", required=True)
    i.add_argument("--template", choices=["vicuna", "llama2"], default="vicuna")
    i.add_argument("--update-layer", type=int, default=None)
    i.add_argument("--image-size", type=int, default=224)
    i.set_defaults(func=_cmd_model_import)


# ---------------------------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------------------------


def _emit(obj: object, out: str | None) -> None:
    from cheetah.io import atomic_write_json

    if out:
        atomic_write_json(out, obj)
    _print_json(obj)


def _cmd_score_mme(args: argparse.Namespace) -> int:
    from cheetah.evaluate.scoring import score_mme

    _emit(score_mme(args.results_dir), args.out)
    return 0


def _cmd_score_demon(args: argparse.Namespace) -> int:
    from cheetah.evaluate.scoring import score_demon

    _emit(score_demon(args.data_dir, args.predictions, split=args.split, datasets=args.tasks), args.out)
    return 0


def _cmd_score_report(args: argparse.Namespace) -> int:
    from cheetah.evaluate.report import write_report
    from cheetah.io import read_json

    results: dict[str, dict[str, object]] = {}
    for spec in args.models:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise DataError(f"model spec {spec!r} must look like NAME=scores.json[,scores.json]")
        entry: dict[str, object] = {}
        for path in paths.split(","):
            scores = read_json(path)
            # `score demon` output has "tasks", `score mme` output has "subtasks".
            kind = "demon" if isinstance(scores, dict) and "tasks" in scores else \
                "mme" if isinstance(scores, dict) and "subtasks" in scores else None
            if kind is None:
                raise DataError(f"{path}: neither `cheetah score demon` nor `cheetah score mme` output")
            entry[kind] = scores
        results[name] = entry
    written = write_report(args.out, results, metrics_path=args.metrics, metrics_model=args.metrics_model)
    _print_json({k: str(v) for k, v in written.items()})
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="score DEMON/MME predictions in the official formats (any model's)")
    ssub = score.add_subparsers(dest="score_command", required=True)

    m = ssub.add_parser("mme", help="official MME calculation over <subtask>.txt results files; prints JSON")
    m.add_argument("--results-dir", required=True, help="folder of <subtask>.txt: image, question, gt, prediction")
    m.add_argument("--out", help="also write the JSON here")
    m.set_defaults(func=_cmd_score_mme)

    d = ssub.add_parser("demon", help="score <predictions>/<Dataset>/pred.json against the data; prints JSON")
    d.add_argument("--data-dir", required=True, help="DEMON root holding <Dataset>/core/core.json")
    d.add_argument("--predictions", required=True, help="folder holding <Dataset>/pred.json")
    d.add_argument("--split", choices=["core", "full"], default="core")
    d.add_argument("--tasks", nargs="+", metavar="DATASET", help="only these datasets (default: every pred.json)")
    d.add_argument("--out", help="also write the JSON here")
    d.set_defaults(func=_cmd_score_demon)

    r = ssub.add_parser("report", help="markdown tables + bar chart comparing models, and a metrics JSON")
    r.add_argument("models", nargs="+", metavar="NAME=SCORES[,SCORES]",
                   help="a model and the JSON files of its `score demon` / `score mme` output")
    r.add_argument("--out", required=True, help="folder for report.md and demon_categories.png")
    r.add_argument("--metrics", help="write this model's metrics JSON (for DVC and the registry) here")
    r.add_argument("--metrics-model", help="which model the metrics file is for (default: the last)")
    r.set_defaults(func=_cmd_score_report)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------

_ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_model, _add_score]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cheetah", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a parameter, e.g. --set train.lr=1e-4 (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
