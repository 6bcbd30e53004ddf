"""`cheetah evaluate`: generation, scoring and the comparison report for one or more models.

For every model (by default `base` = the backbone, `vpgc` = the trained VPG-C weights) and every benchmark:

    <evaluate.out>/<model>/predictions/demon/<Dataset>/pred.json     official DEMON prediction files
    <evaluate.out>/<model>/predictions/mme/<subtask>.txt             official MME calculation input
    <evaluate.out>/<model>/demon_scores.json, mme_scores.json        `cheetah score demon|mme` output
    <evaluate.out>/report.md, demon_categories.png, mme_subtasks.png tables and charts comparing the models
    <evaluate.out>/examples/<benchmark>-<task>.png                    qualitative examples: each model's answers
    <evaluate.out>/plots/<benchmark>_<model>.csv                      what dvc.yaml's evaluation plots draw
    <evaluate.out>/evaluation.json                                   what was evaluated, how, and where
    <evaluate.metrics>                                               metrics JSON (DVC, the registry's gate)

Predictions are journaled per sample as they are generated (`PredictionStore`), tagged with the model's identity
(weights hashes) and the decoding settings: a killed evaluation rerun with the same model and settings generates
only the missing answers, and one with another model or settings is refused (pass `restart=True` to start over).
The batch size is not part of the tag: answers do not depend on it (see `cheetah.evaluate.generation`).

Across devices (docs/scale.md): launched by `torchrun --nproc_per_node N` (or `deepspeed --no_local_rank`), every
rank loads the model on its own device (`cuda:<LOCAL_RANK>`, or the CPU), reads every rank's journal, takes every
N-th of the samples still missing (in sample order: a deterministic shard) and journals its answers to a file of
its own; when all ranks are done, rank 0 merges the journals into the official files in sample order, scores and
reports. The merged files equal a one-process run's (in fp32; see the generation module on bf16), and a killed
multi-rank run resumes, with any number of ranks, where its ranks stopped.

The metrics file holds the `vpgc` model's metrics at the top level (`demon.average` is what the registry promotes
on; without a `vpgc` model, the last one's) and the other models' under `baselines.<name>`, each number once so
that `dvc exp show` stays readable: `{"demon": {"average": …, …}, "mme": {…}, "model": "vpgc", "vpgc_sha256": …,
"baselines": {"base": {"demon": {…}, "mme": {…}}}}`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.config import Params, to_dict
from cheetah.io import DataError, atomic_write_json, claim_dir, lock_scope, write_metrics
from cheetah.model.weights import weights_digest
from cheetah.progress import StageBar
from cheetah.provenance import PROVENANCE_FIELD, code_state, lineage

log = logging.getLogger(__name__)

BENCHMARKS = ("demon", "mme")
REPORT_KIND = "evaluation report"  # the kind of folder `evaluate.out` is (cheetah.io.claim_dir)


def default_model_specs(params: Params) -> dict[str, str]:
    """`base`: the backbone directory (or the preset name when there is none); `vpgc`: the trained weights."""
    return {"base": params.model.backbone_dir or params.model.preset, "vpgc": params.train.out}


def parse_model_specs(items: Sequence[str]) -> dict[str, str]:
    """`["base=data/backbone", "vpgc=checkpoints/vpgc"]` -> dict, refusing malformed or repeated names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise DataError(f"--model {item!r} must look like NAME=SPEC (a VPG-C dir, backbone dir or preset)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
            raise DataError(f"--model {item!r}: the name may hold letters, digits, '_', '.', '-' (it names a folder)")
        if name in out:
            raise DataError(f"--model: {name!r} given twice")
        out[name] = spec
    return out


# ---------------------------------------------------------------------------------------------------------------
# Identity of a model (what the prediction journal is tagged with)
# ---------------------------------------------------------------------------------------------------------------


def model_identity(spec: str, model: Any) -> dict[str, Any]:
    """What makes this model's answers what they are: weights hashes and the backbone's architecture."""
    from cheetah.evaluate.generation import is_vpgc_dir
    from cheetah.model.weights import read_card

    info = model.backbone_info
    backbone: dict[str, Any] = {"source": Path(info.source).name if Path(info.source).is_dir() else info.source,
                                "fingerprint": info.fingerprint()}
    if Path(info.source).is_dir():
        backbone["weights_sha256"] = weights_digest(info.source)
    out: dict[str, Any] = {"spec": str(spec), "backbone": backbone, "update_layer": model.update_layer}
    if is_vpgc_dir(spec):
        card = read_card(spec)
        out["vpgc_sha256"] = card.get("sha256")
    else:
        out["vpgc_sha256"] = None  # a fresh, zero VPG-C: the backbone alone
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation into prediction stores
# ---------------------------------------------------------------------------------------------------------------


class Ranks:
    """This process's place in a data-parallel evaluation: rank and world size from the launcher's variables
    (torchrun, deepspeed), with a gloo process group for the barriers (1 process: no group, barriers do nothing)."""

    # The ranks wait for the slowest one at a barrier: an evaluation shard can take hours, so the wait may too.
    TIMEOUT = datetime.timedelta(hours=12)

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=self.TIMEOUT)  # barriers only: no tensors are exchanged
                self._owned = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.barrier()  # without it, 2-rank gloo jobs abort at exit now and then (shared/research)
            dist.destroy_process_group()
            self._owned = False

    def device(self, setting: str) -> Any:
        """`evaluate.device` for this rank: `auto`/`cuda` mean this rank's GPU (`cuda:<LOCAL_RANK>`) under a launcher."""
        import torch

        from cheetah.evaluate.generation import resolve_device

        device = resolve_device(setting)
        if device.type == "cuda" and device.index is None and self.world > 1:
            device = torch.device("cuda", self.local_rank)
        return device


@contextlib.contextmanager
def _count_other_ranks(bar: StageBar, journals: Sequence[Path], every: float = 1.0) -> Iterator[None]:
    """Rank 0's bar counts every rank's answers: a thread counts the lines the other ranks append to their journals."""
    if not journals:
        yield
        return
    stop = threading.Event()
    offsets = {p: p.stat().st_size if p.exists() else 0 for p in journals}

    def poll() -> None:
        while not stop.wait(every):
            for path, offset in offsets.items():
                if path.exists() and path.stat().st_size > offset:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                    offsets[path] = offset + len(chunk)
                    bar.update(chunk.count(b"\n"))

    thread = threading.Thread(target=poll, name="evaluate-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def generate_predictions(generator: Any, out_dir: str | Path, meta: Mapping[str, Any],
                         demon_dir: str | Path | None = None, mme_dir: str | Path | None = None,
                         ranks: Ranks | None = None, label: str = "evaluate") -> dict[str, int]:
    """Predictions of one model for every DEMON task under `demon_dir` and MME subtask under `mme_dir`, written to
    `<out_dir>/demon/...` and `<out_dir>/mme/...`; returns the number of answers generated per task (by all ranks).

    With several `ranks`, each generates its shard of the missing samples; rank 0 writes the official files."""
    from cheetah.evaluate.demon import load_demon
    from cheetah.evaluate.generation import Request
    from cheetah.evaluate.mme import load_mme
    from cheetah.evaluate.predictions import PredictionStore

    ranks = ranks or Ranks()
    out_dir = Path(out_dir)
    tasks: list[tuple[str, Any, Sequence[Any]]] = []
    if demon_dir is not None:
        for task in load_demon(demon_dir):
            tasks.append((f"demon/{task.dataset}", PredictionStore(out_dir / "demon", "demon", task.dataset,
                                                                   dict(meta), ranks.rank, ranks.world),
                          task.samples))
    if mme_dir is not None:
        for subtask, samples in load_mme(mme_dir).items():
            tasks.append((f"mme/{subtask}", PredictionStore(out_dir / "mme", "mme", subtask, dict(meta), ranks.rank,
                                                            ranks.world), samples))
    todo = {name: [s for s in samples if s.key not in store.done_ids()] for name, store, samples in tasks}
    ranks.barrier()  # every rank has read every journal before any rank adds to one: all agree on what is missing
    total = sum(len(t) for t in todo.values())
    others = [store.journal.with_name(store.journal.name.replace(f"-rank{ranks.rank}.", f"-rank{r}."))
              for _, store, _ in tasks for r in range(1, ranks.world)] if ranks.rank == 0 else []
    with StageBar(label, total, "answers", disable=ranks.rank != 0) as bar, _count_other_ranks(bar, others):
        for name, store, samples in tasks:
            mine = todo[name][ranks.rank::ranks.world]
            if not mine:
                continue
            log.info("%s: %d of %d samples to generate%s (%d already done)", name, len(todo[name]), len(samples),
                     f", {len(mine)} on rank {ranks.rank}" if ranks.world > 1 else "",
                     len(samples) - len(todo[name]))
            requests = [Request(s.prompt, list(s.images), key=f"{name}/{s.key}") for s in mine]
            for index, answer in generator.iter_answers(requests):
                store.add_sample(mine[index], answer)
                bar.update(1)
        ranks.barrier()  # every rank's answers are in its journal
        bar.set(total)
    if ranks.rank == 0:
        for _, store, samples in tasks:
            store.reload()
            store.finalize([s.key for s in samples])
    return {name: len(t) for name, t in todo.items()}


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


def evaluate(params: Params, model_specs: Mapping[str, str] | None = None, benchmark: str = "all",
             restart: bool = False) -> dict[str, Any]:
    """Generate, score and report every model on the DEMON-format tasks under `evaluate.demon_dir` and the
    MME-format subtasks under `evaluate.mme_dir` (`benchmark`: "demon", "mme" or "all").

    `model_specs` maps a name to a VPG-C weights directory, a backbone directory or a preset (default:
    `default_model_specs`). Returns `{"models": {name: {"demon": scores, "mme": scores}}, "metrics": …, "paths": …}`.
    Under `torchrun` / `deepspeed` every rank calls this (see the module's docstring); only rank 0 scores and
    reports, and the other ranks return `{"models": {}, "metrics": {}, "paths": {}, "rank": r}`.
    """
    if benchmark not in ("all", *BENCHMARKS):
        raise ValueError(f"benchmark must be 'demon', 'mme' or 'all', got {benchmark!r}")
    from cheetah.devices import torch_threads

    with lock_scope(), torch_threads(params.evaluate.threads):  # (the report folder's lock ends with it)
        return _evaluate_locked(params, model_specs, benchmark, restart)


def _evaluate_locked(params: Params, model_specs: Mapping[str, str] | None, benchmark: str, restart: bool
                     ) -> dict[str, Any]:
    cfg = params.evaluate
    # The code it runs on, before its outputs exist (a first run's reports are not yet DVC's, and would count as
    # uncommitted): recorded in the metrics, whose champion gate requires it committed, and in the report.
    code = code_state()
    specs = dict(model_specs) if model_specs else default_model_specs(params)
    if not specs:
        raise DataError("no model to evaluate")
    demon_dir = cfg.demon_dir if benchmark in ("all", "demon") else None
    mme_dir = cfg.mme_dir if benchmark in ("all", "mme") else None
    for kind, folder in (("DEMON", demon_dir), ("MME", mme_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{folder}: {kind} data folder not found (`cheetah benchmarks` writes the embedded one)")
    ranks = Ranks()
    # The report folder is filled in place (predictions resume): never one that holds someone else's files. Every
    # rank checks before anyone writes (so all refuse together); rank 0 then claims it.
    inputs = [p for p in (demon_dir, mme_dir, *specs.values()) if p]
    out = claim_dir(cfg.out, REPORT_KIND, protect=inputs, create=False)
    ranks.barrier()
    if ranks.rank == 0:
        claim_dir(out, REPORT_KIND, protect=inputs)
    ranks.barrier()
    # (On an error the process ends with it, and the launcher stops the other ranks: no barrier to wait at.)
    result = _evaluate(params, specs, benchmark, demon_dir, mme_dir, out, ranks, restart, code)
    ranks.close()
    return result


def _evaluate(params: Params, specs: Mapping[str, str], benchmark: str, demon_dir: str | None, mme_dir: str | None,
              out: Path, ranks: Ranks, restart: bool, code: Mapping[str, str]) -> dict[str, Any]:
    import torch

    from cheetah.evaluate.content import demon_content
    from cheetah.evaluate.examples import write_examples
    from cheetah.evaluate.generation import Generator, load_model
    from cheetah.evaluate.diagnostics import MME_CONSTANT_SCORE, constant_reference
    from cheetah.evaluate.embedded import read_mme_splits
    from cheetah.evaluate.report import write_report
    from cheetah.evaluate.scoring import score_demon, score_mme, score_mme_splits

    from cheetah.devices import check_gpu

    cfg = params.evaluate
    device = ranks.device(cfg.device)
    check_gpu(params, "evaluate", device=device)  # (evaluate.device `cpu` on a GPU node)
    check_gpu(params, "evaluate", device=device)
    if ranks.world > 1:
        log.info("evaluate: rank %d of %d on %s", ranks.rank, ranks.world, device)
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    # The embedded MME-format benchmark's primary / detail questions (None for the official release): read once.
    splits = read_mme_splits(mme_dir) if mme_dir is not None else None
    for name, spec in specs.items():
        model_dir = out / name
        pred_dir = model_dir / "predictions"
        if restart and pred_dir.exists() and ranks.rank == 0:
            shutil.rmtree(pred_dir)
        ranks.barrier()  # (the other ranks read what rank 0 kept)
        started = time.perf_counter()
        model = load_model(spec, backbone_dir=params.model.backbone_dir, device=device, dtype=params.model.dtype,
                           template=params.model.template)
        generator = Generator(model, batch_size=cfg.batch_size, **cfg.generation())
        meta = {"spec": str(spec), "identity": model_identity(spec, model), "decoding": generator.settings()}
        generated = generate_predictions(generator, pred_dir, meta, demon_dir, mme_dir, ranks, f"evaluate {name}")
        recovery = _recovery(params, generator, model) if ranks.rank == 0 else {}
        del generator, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if ranks.rank != 0:
            continue  # rank 0 scores and reports
        entry: dict[str, Any] = {"demon": None, "mme": None}
        if demon_dir is not None:
            entry["demon"] = score_demon(demon_dir, pred_dir / "demon",
                                         datasets=_tasks(generated, "demon"),
                                         option_rule=cfg.demon_option_rule)
            atomic_write_json(model_dir / "demon_scores.json", entry["demon"])
        if mme_dir is not None:
            entry["mme"] = score_mme(pred_dir / "mme")
            if splits:
                entry["mme"]["splits"] = score_mme_splits(pred_dir / "mme", splits)
            atomic_write_json(model_dir / "mme_scores.json", entry["mme"])
        content = demon_content(demon_dir, pred_dir / "demon", _tasks(generated, "demon")) if demon_dir else {}
        if "heldout_differences" in recovery:
            content = {"heldout_differences": recovery["heldout_differences"], **content}
            atomic_write_json(model_dir / "heldout_differences.json", recovery["answers"])
        if content:
            entry["content"] = content
            atomic_write_json(model_dir / "content_scores.json", content)
        if "probe" in recovery:
            entry["probe"] = recovery["probe"]
            atomic_write_json(model_dir / "probe.json", recovery["probe"])
        entry["answers"] = _answers(demon_dir, mme_dir, pred_dir, generated)
        atomic_write_json(model_dir / "answers.json", entry["answers"])
        results[name] = entry
        runs[name] = {**meta, "generated": generated, "seconds": round(time.perf_counter() - started, 3)}

    if ranks.rank != 0:
        return {"models": {}, "metrics": {}, "paths": {}, "rank": ranks.rank}
    examples, shown = write_examples(out, {name: out / name / "predictions" for name in specs}, demon_dir, mme_dir)
    datasets = _tasks(next(iter(runs.values()))["generated"], "demon")
    reference = {"demon": constant_reference(demon_dir, datasets, cfg.demon_option_rule) if demon_dir else {},
                 "mme": MME_CONSTANT_SCORE}
    written = {**write_report(out, results, title="Evaluation: " + ", ".join(specs), sections=[shown],
                              reference=reference, provenance=provenance(params, runs, code)), **examples}
    champion = "vpgc" if "vpgc" in results else list(results)[-1]
    # The hash of the weights these numbers measured: registration refuses weights they were not measured on; the
    # code they were measured with: the champion gate requires it committed.
    metrics = {**_model_metrics(results[champion]), "model": champion,
               "vpgc_sha256": runs[champion]["identity"]["vpgc_sha256"],
               PROVENANCE_FIELD: code,
               "baselines": {n: _model_metrics(r) for n, r in results.items() if n != champion}}
    written["metrics"] = write_metrics(cfg.metrics, metrics)
    summary = {"benchmark": benchmark, "data": {"demon": demon_dir, "mme": mme_dir}, "batch_size": cfg.batch_size,
               "device": device.type, "ranks": ranks.world, "models": runs,
               "outputs": {k: str(v) for k, v in written.items()}}
    written["summary"] = atomic_write_json(out / "evaluation.json", summary)
    return {"models": results, "metrics": metrics, "paths": {k: str(v) for k, v in written.items()}}


def _model_metrics(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One model's metrics: the official scores, and on the embedded world the content scores (%) and the probe on
    what its VPG-C adds (mean over attributes, %)."""
    from cheetah.evaluate.report import metrics_dict

    out = metrics_dict(entry["demon"], entry["mme"])
    if entry.get("content"):
        out["content"] = {task: v["content"] for task, v in entry["content"].items()}
    if entry.get("probe"):
        out["probe"] = {name: v["mean"] for name, v in entry["probe"].items()}
    return out


def _recovery(params: Params, generator: Any, model: Any) -> dict[str, Any]:
    """On the embedded world (cheetah/evaluate/recovery.py): the content of the model's difference descriptions of the
    held-out synthetic pairs (`evaluate.heldout_differences`), and the probe on what its VPG-C adds
    (`evaluate.probe_scenes`)."""
    from cheetah.evaluate.probes import PROBE_STREAM
    from cheetah.evaluate.recovery import correction_probe, heldout_differences, heldout_pairs
    from cheetah.world import generate_scene, heldout_scenes

    cfg, out = params.evaluate, {}
    if cfg.heldout_differences:
        pairs = heldout_pairs(params.train.data, params.train.heldout_fraction)
        if not pairs:
            raise DataError(f"{params.train.data}: no held-out pairs at train.heldout_fraction="
                            f"{params.train.heldout_fraction}")
        out["heldout_differences"], out["answers"] = heldout_differences(generator, pairs)
    if cfg.probe_scenes:
        world = params.world
        fit = [generate_scene(PROBE_STREAM, i, world.image_size) for i in range(cfg.probe_scenes)]
        test = list(heldout_scenes(world, max(1, cfg.probe_scenes // 8)))
        out["probe"] = correction_probe(model, generator.builder, fit, test)
    return out


def _answers(demon_dir: str | None, mme_dir: str | None, pred_dir: Path, generated: Mapping[str, int]
             ) -> dict[str, Any]:
    """How the model answered each task (`cheetah.evaluate.diagnostics`): distinct answers, options chosen, examples."""
    from cheetah.evaluate.diagnostics import demon_answers, mme_answers

    return {"demon": demon_answers(demon_dir, pred_dir / "demon", _tasks(generated, "demon")) if demon_dir else {},
            "mme": mme_answers(pred_dir / "mme", _tasks(generated, "mme")) if mme_dir else {}}


def _tasks(generated: Mapping[str, int], benchmark: str) -> list[str]:
    """The tasks of `benchmark` among `generate_predictions`' keys ("<benchmark>/<task>")."""
    return [t.split("/", 1)[1] for t in generated if t.startswith(benchmark + "/")]


def provenance(params: Params, runs: Mapping[str, Mapping[str, Any]], code: Mapping[str, str] | None = None,
               root: str | Path = ".") -> dict[str, Any]:
    """What produced a report: the code (git commit, uncommitted changes), the pipeline state (`dvc.lock` hash, data
    and backbone hashes), the evaluation and model parameters, and per model its weights (hashes, the VPG-C card's
    training record) and decoding settings."""
    from cheetah.evaluate.generation import is_vpgc_dir
    from cheetah.model.weights import read_card

    models: dict[str, Any] = {}
    for name, run in runs.items():
        info = {"spec": run["spec"], "identity": run["identity"], "decoding": run["decoding"]}
        if is_vpgc_dir(run["spec"]):
            card = read_card(run["spec"])
            info["training"] = card.get("training")
        models[name] = info
    # The code state recorded when the stage started (`code`), with what DVC recorded upstream of it.
    return {"lineage": lineage(root, stage="evaluate", code=code),
            "params": {"evaluate": to_dict(params.evaluate), "model": to_dict(params.model)},
            "models": models}
