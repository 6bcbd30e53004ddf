"""The promotion gate: what is registered is verified first, and `champion` moves only by the rules.

Nothing is registered unless it checks out: the weights must match the SHA-256 on their card, hold only finite
values, come from a real backbone (not random planning weights) and load on the backbone the card records; the
metrics must be finite and name the weights they measured (`vpgc_sha256`, written by `cheetah evaluate`).

Promotion is MLflow 3 aliases: the new version always takes `challenger`; it takes `champion` when it is eligible
(`cheetah.registry.provenance.champion_eligibility`: committed code, parameters and data when it was trained,
evaluated and registered, as the card, the metrics and the registering checkout record; not a `dvc exp run`
experiment) and there is no champion, or its `register.metric` beats the champion's, as logged with the champion's
MLflow model, by more than `register.margin` (higher is better). Every decision is recorded on the version (`gate`,
`gate_at`); `demote`, `promote` and `history` are `cheetah registry demote|promote|history`.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

from cheetah.config import Params
from cheetah.io import DataError, atomic_write_json, check_finite_weights, nonfinite_paths, read_json
from cheetah.pipeline.dag import RECEIPT
import cheetah.registry.integrity as integrity
from cheetah.provenance import PROVENANCE_FIELD, lineage, load_yaml, out_md5
from cheetah.registry.provenance import champion_eligibility, config_tags, recorded_tags
from cheetah.registry.pyfunc import log_backbone, log_model, resolve_backbone_dir
from cheetah.tracking import flat_metrics

CHAMPION = "champion"
CHALLENGER = "challenger"
MEASURED_WEIGHTS_FIELD = "vpgc_sha256"  # in the evaluation metrics: the hash of the VPG-C weights they measured
RANDOM_BACKBONE_FIELD = "random_backbone"  # in a weights card: trained on random backbone weights (planning only)


def metric_value(metrics: Mapping[str, Any], name: str, source: str = "metrics") -> float:
    """`name` from the evaluation metrics; dotted names reach into nested sections (`mme.perception`)."""
    node: Any = metrics
    if name in metrics:
        node = metrics[name]
    else:
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise DataError(f"{source}: no metric {name!r} (register.metric); "
                                f"it has {sorted(flat_metrics(metrics))}")
            node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise DataError(f"{source}: metric {name!r} is {node!r}, not a number")
    if not math.isfinite(node):
        raise DataError(f"{source}: metric {name!r} is {node}, not a finite number")
    return float(node)


def verify_weights(vpgc_dir: str | Path) -> dict[str, Any]:
    """The card of `vpgc_dir` after checking that the weights are what the card says (hash), finite, trained on a
    real backbone (not random planning weights), and loadable on the backbone the card records (built on the
    meta device: shapes and architecture), whose weights must be finite too. Raises DataError."""
    from cheetah.model.backbones import load_backbone
    from cheetah.model.vpgc import VPGCModel
    from cheetah.model.weights import CARD_FILE, WEIGHTS_FILE, checked_state, read_card

    vpgc_dir = Path(vpgc_dir)
    for f in (WEIGHTS_FILE, CARD_FILE):
        if not (vpgc_dir / f).is_file():
            raise DataError(f"{vpgc_dir / f}: not found (register needs the trained VPG-C weights and card)")
    card = read_card(vpgc_dir)
    if card.get(RANDOM_BACKBONE_FIELD):
        raise DataError(f"{vpgc_dir / CARD_FILE}: trained on a backbone with random weights (a planning or "
                        "benchmark run); such weights are never registered")
    location = resolve_backbone_dir(card)
    if location is not None:  # built on the meta device below: its weights are read here, one tensor at a time
        check_finite_weights(location, "backbone weights")
    backbone = load_backbone(str(location or card["backbone"]), device="meta")
    checked_state(vpgc_dir, VPGCModel(backbone, update_layer=card["update_layer"]))
    return card


def read_measured_metrics(metrics_path: str | Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation metrics, refused unless every number is finite and they name (by hash) the weights in hand."""
    metrics = read_json(metrics_path)
    if not isinstance(metrics, Mapping):
        raise DataError(f"{metrics_path}: expected a JSON object of metrics")
    bad = nonfinite_paths(dict(metrics))
    if bad:
        raise DataError(f"{metrics_path}: non-finite metric(s) {', '.join(bad[:5])}; nothing was registered")
    measured = metrics.get(MEASURED_WEIGHTS_FIELD)
    if measured is None:
        raise DataError(f"{metrics_path}: does not name the weights it measured ({MEASURED_WEIGHTS_FIELD}); "
                        "evaluate the weights with `cheetah evaluate` before registering them")
    if measured != card.get("sha256"):
        raise DataError(f"{metrics_path}: measured the VPG-C weights {str(measured)[:12]}…, not the ones being "
                        f"registered ({str(card.get('sha256'))[:12]}…); evaluate these weights first")
    return dict(metrics)


def decide(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, why). Promote when there is no champion, or the challenger beats it by more than `margin`. A
    non-finite challenger is an error, whatever the champion: it can never become champion."""
    if not math.isfinite(challenger):
        raise DataError(f"the challenger's metric is {challenger}, not a finite number; it cannot be promoted")
    if champion is None:
        return True, "no champion yet"
    if challenger > champion + margin:
        return True, f"{challenger:.4f} beats the champion's {champion:.4f} by more than the margin {margin}"
    return False, f"{challenger:.4f} does not beat the champion's {champion:.4f} by more than the margin {margin}"


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def logged_metric(client: Any, version: Any, metric: str) -> float | None:
    """`metric` as logged with the version's MLflow model (the LoggedModel's metrics), None when it has none.
    This, not a tag, is what the gate compares."""
    from mlflow.exceptions import MlflowException

    model_id = getattr(version, "model_id", None)
    source = str(getattr(version, "source", "") or "")
    if not model_id and source.startswith("models:/m-"):  # the sqlite store leaves model_id unset; source has it
        model_id = source[len("models:/"):].split("/")[0]
    if not model_id:
        return None
    try:
        logged = client.get_logged_model(model_id)
    except MlflowException:
        return None
    values = [m.value for m in logged.metrics or [] if m.key == metric]
    return float(values[-1]) if values and math.isfinite(values[-1]) else None


def register(params: Params, metrics_path: str | Path | None = None, vpgc_dir: str | Path | None = None,
             out: str | Path = RECEIPT, root: str | Path = ".") -> dict[str, Any]:
    """Verify, log and register the VPG-C model of `vpgc_dir` (default `train.out`), gate it, write the receipt.

    Nothing is registered unless the weights match their card and load on its backbone, and the metrics are
    finite and name those weights. The version always takes `challenger`; it takes `champion` only when it is
    eligible (`champion_eligibility`) and beats the champion's logged metric by more than `register.margin`."""
    from mlflow.tracking import MlflowClient

    from cheetah.config import to_dict
    from cheetah.tracking import stage_run

    cfg = params.register
    root = Path(root)
    vpgc_dir = Path(vpgc_dir or params.train.out)
    metrics_path = Path(metrics_path or params.evaluate.metrics)
    card = verify_weights(vpgc_dir)
    metrics = read_measured_metrics(metrics_path, card)
    value = metric_value(metrics, cfg.metric, str(metrics_path))
    numbers = flat_metrics(metrics)
    # Headline numbers only (e.g. demon.average, mme.perception): not per task, not the baselines.
    headline = {k: v for k, v in numbers.items() if k.count(".") <= 1 and not k.startswith("baselines.")}
    tags = {**lineage(root), "vpgc_sha256": str(card["sha256"]), "backbone": str(card.get("backbone")),
            "metric": cfg.metric, **{f"metric.{k}": repr(v) for k, v in headline.items()}}
    tags[f"metric.{cfg.metric}"] = repr(value)
    tags.update(config_tags(card))
    recorded = {"training": card.get(PROVENANCE_FIELD), "evaluation": metrics.get(PROVENANCE_FIELD)}
    tags.update(recorded_tags(recorded))
    eligible, eligibility = champion_eligibility(tags, recorded)
    tags["champion_eligible"] = str(eligible).lower()

    with stage_run("register", {"register": to_dict(cfg)}, experiment=cfg.experiment) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.")})
        if (root / "dvc.lock").is_file():
            mlflow.log_artifact(str(root / "dvc.lock"), artifact_path="lineage")
        with warnings.catch_warnings():
            # The predict method takes a DataFrame (no list[...] type hints) and the signature is given explicitly.
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            location = resolve_backbone_dir(card)
            backbone = log_backbone(location) if location is not None else None
            info = log_model(vpgc_dir, card, params, backbone)
        # What is registered is pinned: every file of the logged model, as the store now holds it (integrity.py).
        with tempfile.TemporaryDirectory(prefix="cheetah-logged-") as logged:
            local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=logged)
            tags.update(integrity.record(local, str(card["sha256"]), info.model_uri))
        # Linked to the logged model: the gate reads a champion's numbers from its model, not from tags.
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in numbers.items()}, model_id=info.model_id)
        _log_datasets(params, root, info.model_id)
        client = MlflowClient()
        version = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
        v = str(version.version)
        champion = _alias_version(client, cfg.model_name, CHAMPION)
        champion_value = logged_metric(client, champion, cfg.metric) if champion is not None else None
        if not eligible:
            promote, reason = False, f"not eligible for champion: {eligibility}"
        elif champion is not None and champion_value is None:
            promote, reason = False, (f"the champion (version {champion.version}) has no logged {cfg.metric!r}; "
                                      "it stays champion (`cheetah registry promote` moves it by hand)")
        else:
            promote, reason = decide(value, champion_value, cfg.margin)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, v)
        if promote:
            client.set_registered_model_alias(cfg.model_name, CHAMPION, v)
        _record(client, cfg.model_name, v, "gate", ("promoted: " if promote else "kept: ") + reason)
        client.update_model_version(cfg.model_name, v, description=(
            f"VPG-C on {card.get('backbone')} (layer {card.get('update_layer')}); {cfg.metric} = {value:.4f}; "
            f"git {tags['git_commit'][:12]}; {'champion' if promote else 'challenger'}: {reason}"))
        mlflow.set_tags({"registered_model": cfg.model_name, "registered_version": v, "promoted": str(promote).lower()})
        receipt = {
            "model_name": cfg.model_name,
            "version": int(v),
            "model_uri": f"models:/{cfg.model_name}/{v}",
            "run_id": run.info.run_id if run is not None else None,
            "metric": cfg.metric,
            "value": value,
            "margin": cfg.margin,
            "promoted": promote,
            "reason": reason,
            "previous_champion": None if champion is None else {"version": int(champion.version),
                                                                  "value": champion_value},
            "aliases": {CHALLENGER: int(v), CHAMPION: int(v) if promote else
                        (int(champion.version) if champion is not None else None)},
            "tracking_uri": mlflow.get_tracking_uri(),  # the lineage tags are on the version itself
        }
    atomic_write_json(out, receipt)
    return receipt


def _log_datasets(params: Params, root: Path, model_id: str) -> None:
    """The data the model was trained and measured on, as MLflow dataset inputs of the registering run linked to
    its model: each folder with DVC's hash of it (from dvc.lock / data.dvc; "unknown" outside the pipeline)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import LoggedModelInput

    lock = load_yaml(root / "dvc.lock") or {}
    hashes = {str(o.get("path", "")).rstrip("/"): o.get("md5") for st in (lock.get("stages") or {}).values()
              for o in (st or {}).get("outs") or [] if isinstance(o, Mapping)}
    data_dvc = load_yaml(root / "data.dvc")
    if data_dvc:
        hashes["data/source"] = out_md5(data_dvc, "data/source")
    for context, name, path in (("source", "corpus", params.synthesize.source),
                                ("training", "synthetic", params.train.data),
                                ("evaluation", "demon", params.evaluate.demon_dir),
                                ("evaluation", "mme", params.evaluate.mme_dir)):
        digest = str(hashes.get(str(path).rstrip("/")) or "unknown").removesuffix(".dir")
        with warnings.catch_warnings():  # MLflow registers two equivalent local-file source classes
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways", category=UserWarning)
            source = resolve_dataset_source((root / path).resolve().as_uri())
        mlflow.log_input(MetaDataset(source, name=name, digest=digest[:36]), context=context,
                         model=LoggedModelInput(model_id=model_id))


EVENT_TAG = "event."
"""Prefix of the version tags that keep its history, one per decision (`event.001`, ...): JSON of its kind, reason,
time and who made it. The tags `gate`, `demoted` and `promoted_by_hand` hold the latest of each kind."""


def _record(client: Any, name: str, version: str, event: str, text: str) -> None:
    """One gate event on a version's tags (`gate`, `demoted`, `promoted_by_hand`): the latest of its kind, with the
    time it happened, and appended to the version's history (`EVENT_TAG`)."""
    import datetime
    import getpass

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.set_model_version_tag(name, version, event, text)
    client.set_model_version_tag(name, version, f"{event}_at", stamp)
    tags = client.get_model_version(name, version).tags or {}
    number = 1 + sum(1 for key in tags if key.startswith(EVENT_TAG))
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # (no user name in a container without a passwd entry)
        who = "unknown"
    client.set_model_version_tag(name, version, f"{EVENT_TAG}{number:03d}",
                                 json.dumps({"event": event, "reason": text, "at": stamp, "by": who}))


def _versions(client: Any, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


def demote(name: str, version: int | str, reason: str, metric: str = "demon.average") -> dict[str, Any]:
    """Mark a version broken (`demoted` tag with the reason) and, if it was champion, give `champion` to the best
    remaining eligible version that the gate decided on, by its logged `metric`, whose files are still those
    registered (or to none; the
    versions passed over for their files are listed under `skipped`). Returns what happened."""
    from mlflow.tracking import MlflowClient

    if not reason.strip():
        raise DataError("demote: give the reason (--reason), it is recorded on the version")
    client = MlflowClient()
    target = _get_version(client, name, version)
    _record(client, name, str(target.version), "demoted", reason)
    champion = _alias_version(client, name, CHAMPION)
    result: dict[str, Any] = {"model_name": name, "demoted": int(target.version), "reason": reason,
                              "champion": None if champion is None else int(champion.version)}
    if champion is None or str(champion.version) != str(target.version):
        return result
    client.delete_registered_model_alias(name, CHAMPION)
    candidates = []
    for mv in _versions(client, name):
        tags = mv.tags or {}
        # Never gated: its `register` did not finish (killed between registering and deciding).
        if "demoted" in tags or tags.get("champion_eligible") != "true" or "gate" not in tags:
            continue
        value = logged_metric(client, mv, metric)
        if value is not None:
            candidates.append((value, int(mv.version), mv))
    best, best_value = None, None
    for value, _, mv in sorted(candidates, key=lambda c: c[:2], reverse=True):
        try:  # the best whose files are still those registered
            with integrity.checked(name, mv.version):
                best, best_value = mv, value
            break
        except DataError as e:
            result.setdefault("skipped", {})[int(mv.version)] = str(e)
    if best is not None:
        client.set_registered_model_alias(name, CHAMPION, str(best.version))
        _record(client, name, str(best.version), "gate", f"promoted: best remaining eligible {metric} "
                f"({best_value:.4f}) after version {target.version} was demoted ({reason})")
    result["champion"] = None if best is None else int(best.version)
    return result


def promote(name: str, version: int | str, reason: str) -> dict[str, Any]:
    """Move `champion` to `version` by hand, whatever the gate said (a recorded, deliberate override). A demoted
    version is refused, and so is one whose stored files are not those registered (`integrity.checked`): a broken
    or tampered model is never served."""
    from mlflow.tracking import MlflowClient

    if not reason.strip():
        raise DataError("promote: give the reason (--reason), it is recorded on the version")
    client = MlflowClient()
    target = _get_version(client, name, version)
    if "demoted" in (target.tags or {}):
        raise DataError(f"{name} version {target.version} was demoted ({target.tags['demoted']}); "
                        "it cannot become champion")
    integrity.verify_version(name, target.version)  # its files are still those registered, or it is refused
    previous = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(target.version))
    was = f"version {previous.version}" if previous is not None else "none"
    _record(client, name, str(target.version), "promoted_by_hand", f"{reason} (champion was {was})")
    return {"model_name": name, "champion": int(target.version),
            "previous_champion": None if previous is None else int(previous.version), "reason": reason}


def _get_version(client: Any, name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise DataError(f"{name}: no version {version} in the registry at {mlflow.get_tracking_uri()}") from None


def history(name: str) -> list[dict[str, Any]]:
    """Every version of `name` with its current aliases, lineage, the latest gate event of each kind and every event
    in order (`events`: what `cheetah registry history` prints)."""
    from mlflow.tracking import MlflowClient

    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise DataError(f"{name}: no such registered model in the registry at {mlflow.get_tracking_uri()}") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in _versions(client, name):
        tags = mv.tags or {}
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "events": [json.loads(tags[k]) for k in sorted(tags) if k.startswith(EVENT_TAG)],
            "metric": tags.get("metric"),
            "value": tags.get(f"metric.{tags.get('metric')}"),
            "git_commit": tags.get("git_commit", "")[:12],
            "champion_eligible": tags.get("champion_eligible"),
            **{k: tags[k] for k in (integrity.DIGEST_TAG, "dvc_experiment", "git_uncommitted", "gate", "gate_at", "demoted", "demoted_at",
                                    "promoted_by_hand", "promoted_by_hand_at") if k in tags},
        })
    return rows


def receipt_is_current(path: str | Path = RECEIPT, experiment: str = "cheetah",
                       root: str | Path = ".") -> bool:
    """Whether the tracking store (of the repository at `root`) still holds the version a registration receipt
    names, from the same run. False for a missing or unreadable receipt, or a store that lost it (a fresh clone, a
    deleted mlflow.db, another MLFLOW_TRACKING_URI)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from cheetah.tracking import configure

    path = Path(path)
    if not path.is_file():
        return False
    try:
        receipt = json.loads(path.read_text())
        name, version, run_id = receipt["model_name"], str(receipt["version"]), receipt.get("run_id")
    except (ValueError, KeyError, TypeError):
        return False
    configure(experiment, root=root)
    try:
        mv = MlflowClient().get_model_version(name, version)
    except MlflowException:
        return False
    return run_id is None or mv.run_id == run_id
