"""MLflow registration: the champion/challenger gate, lineage tags, and serving the champion (`cheetah predict` and
`mlflow.pyfunc.load_model(...).predict(df)`), on a tiny VPG-C and a tracking store in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import COMMITTED, committed_lock_repo, make_tokenizer, registry_workspace, sharpen_parameters

from cheetah.config import Params, RegisterConfig
from cheetah.io import DataError

NAME = "cheetah-vpgc"
REPO = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A git repo with a dvc.lock, a tiny backbone, three VPG-C weight sets and two images; tracking in the tmp dir."""
    from cheetah.model.backbones import build_backbone, load_backbone, save_backbone
    from cheetah.model.vpgc import VPGCModel
    from cheetah.model.weights import save_vpgc
    from cheetah.world import generate_scene, png_bytes, render

    root = tmp_path_factory.mktemp("registry")
    with registry_workspace(root):
        backbone = build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0)
        sharpen_parameters([p for p in backbone.model.language_model.parameters() if p.dim() == 2], seed=1)
        save_backbone(backbone, "backbone")  # relative: the card records "backbone" and its absolute path
        vpgc = {}
        for seed in (1, 2, 3):
            model = VPGCModel(load_backbone("backbone"))
            sharpen_parameters(model.vpgc.parameters(), seed=10 + seed)
            vpgc[seed] = save_vpgc(model, f"vpgc{seed}", extra=COMMITTED)
        images = []
        for k in range(2):
            path = root / f"image{k}.png"
            path.write_bytes(png_bytes(render(generate_scene(0, k, image_size=32)).image))
            images.append(str(path))

        lock = {"schema": "2.0", "stages": {
            "world": {"cmd": "cheetah world", "outs": [{"path": "data/source", "md5": "aaaa1111.dir", "hash": "md5"}]},
            "base": {"cmd": "cheetah base", "outs": [{"path": "data/backbone", "md5": "bbbb2222.dir", "hash": "md5"}]},
            "register": {"cmd": "cheetah register", "outs": [{"path": "metrics/register.json", "md5": "cccc"}]},
        }}
        repo = committed_lock_repo(root / "repo", yaml.safe_dump(lock))
        yield {"root": root, "repo": repo, "vpgc": vpgc, "images": images, "lock": lock}


def _metrics_file(world, name: str, seed: int, value: float, **extra) -> Path:
    """An evaluation metrics file as `cheetah evaluate` writes it, naming the weights it measured."""
    from cheetah.model.weights import read_card

    path = world["root"] / name
    path.write_text(json.dumps({"demon": {"average": value, "tasks": {"t": 1.0}},
                                "mme": {"perception": extra.get("perception", 100.0)},
                                "vpgc_sha256": extra.get("sha", read_card(world["vpgc"][seed])["sha256"]),
                                "baselines": {"base": {"demon": {"average": 0.1}}},
                                **extra.get("recorded", COMMITTED)}))
    return path


@pytest.fixture(scope="module")
def registered(world):
    """Four registrations with margin 0.05: a first model, a worse one, one better only within the margin, and one
    better by more than the margin."""
    from cheetah.registry import register

    params = Params(register=RegisterConfig(margin=0.05))
    receipts = []
    for n, (seed, value) in enumerate([(1, 0.50), (2, 0.40), (2, 0.53), (3, 0.60)]):
        metrics = _metrics_file(world, f"eval{n}.json", seed, value, perception=100.0 + n)
        receipts.append(register(params, metrics, world["vpgc"][seed], out=world["root"] / f"register{n}.json",
                                 root=world["repo"]))
    return receipts


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def test_gate_worse_and_within_margin_never_take_champion_better_does(registered, world):
    first, worse, within, better = registered
    assert [r["version"] for r in registered] == [1, 2, 3, 4]
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert not worse["promoted"] and worse["aliases"] == {"challenger": 2, "champion": 1}
    assert not within["promoted"] and within["aliases"] == {"challenger": 3, "champion": 1}
    assert "does not beat" in within["reason"] and within["previous_champion"] == {"version": 1, "value": 0.5}
    assert better["promoted"] and better["aliases"] == {"challenger": 4, "champion": 4}
    client = _client()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "4"
    assert client.get_model_version(NAME, "2").tags["gate"].startswith("kept: ")
    assert client.get_model_version(NAME, "4").tags["gate"].startswith("promoted: ")
    # The receipt is what DVC keeps (metrics/register.json in the pipeline).
    assert json.loads((world["root"] / "register3.json").read_text()) == better


def test_versions_carry_lineage_and_metric_tags(registered, world):
    from cheetah.model.weights import read_card

    tags = _client().get_model_version(NAME, "4").tags
    assert tags["git_commit"] == _git(world["repo"], "rev-parse", "HEAD") and tags["git_dirty"] == "false"
    upstream = {k: v for k, v in world["lock"]["stages"].items() if k != "register"}
    assert tags["dvc_lock_hash"] == hashlib.sha256(json.dumps(upstream, sort_keys=True).encode()).hexdigest()
    assert tags["data_hash"] == "aaaa1111.dir" and tags["backbone_hash"] == "bbbb2222.dir"
    assert tags["vpgc_sha256"] == read_card(world["vpgc"][3])["sha256"]
    assert float(tags["metric.demon.average"]) == 0.60 and float(tags["metric.mme.perception"]) == 103.0
    assert "metric.demon.tasks.t" not in tags and "metric.baselines.base.demon.average" not in tags  # headline only
    # The model holds the VPG-C weights and card, never the backbone.
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/4", dst_path=str(world["root"] / "dl")))
    files = sorted(p.name for p in local.rglob("*") if p.is_file())
    assert "vpgc.safetensors" in files and "vpgc.json" in files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)  # no backbone weights
    # The lineage artifact: the dvc.lock the tags were computed from, logged with the registering run.
    run_id = _client().get_model_version(NAME, "4").run_id
    assert [a.path for a in _client().list_artifacts(run_id, "lineage")] == ["lineage/dvc.lock"]
    # The data it was trained and measured on are inputs of that run; the metrics belong to the logged model.
    inputs = _client().get_run(run_id).inputs.dataset_inputs
    assert sorted(d.dataset.name for d in inputs) == ["corpus", "demon", "mme", "synthetic"]
    model_id = _client().get_model_version(NAME, "4").source.removeprefix("models:/")
    logged = {m.key: m.value for m in _client().get_logged_model(model_id).metrics}
    assert logged["demon.average"] == 0.60 and logged["mme.perception"] == 103.0


def test_predict_cli_and_pyfunc_answer_with_the_champion(registered, world, capsys, monkeypatch):
    import mlflow
    import pandas as pd

    from cheetah.cli import main
    from cheetah.evaluate.generation import answer_one, load_model
    from cheetah.registry import with_image_placeholders

    images, instruction = world["images"], "What is different between the images?"
    assert main(["predict", "--model", f"models:/{NAME}@champion", "--image", images[0], "--image", images[1],
                 "--instruction", instruction]) == 0
    cli_answer = capsys.readouterr().out.strip()
    assert main(["predict", "--image", images[0], "--image", images[1], "--instruction", instruction]) == 0
    assert capsys.readouterr().out.strip() == cli_answer  # the default model is models:/<name>@champion

    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    monkeypatch.setenv("CHEETAH_IMAGE_ROOT", str(Path(images[0]).parent))  # the served model may read this folder
    frame = pd.DataFrame({"instruction": [instruction, "<image> Describe the image."],
                          "images": [images, [images[0]]]})
    answers = pyfunc.predict(frame)
    assert answers[0] == cli_answer and len(answers) == 2 and all(isinstance(a, str) for a in answers)

    # It is the champion's (version 4 = vpgc3) model: its VPG-C weights are exactly vpgc3's, not version 1's, and
    # it answers as vpgc3 answers when loaded directly.
    served = pyfunc.unwrap_python_model().model.vpgc.state_dict()
    for seed, same in ((3, True), (1, False)):
        direct = load_model(world["vpgc"][seed]).vpgc.state_dict()
        assert all(torch.equal(served[k], direct[k]) for k in direct) is same
    prompt = with_image_placeholders(instruction, 2)
    assert prompt.startswith("Image 1: <image> Image 2: <image> ")
    assert cli_answer == answer_one(load_model(world["vpgc"][3]), prompt, images, max_new_tokens=32) and cli_answer


def test_served_model_finds_its_backbone_elsewhere(registered, world, tmp_path, monkeypatch):
    import shutil

    from cheetah.registry import predict, resolve_backbone_dir

    uri, images = f"models:/{NAME}/4", world["images"]
    expected = predict(uri, "What is it?", images[:1])
    # From another working directory: the card's absolute path (where the backbone was trained) still holds.
    monkeypatch.chdir(tmp_path)
    assert predict(uri, "What is it?", images[:1]) == expected
    # A copy elsewhere, named explicitly (e.g. the model served on another machine).
    shutil.copytree(world["root"] / "backbone", tmp_path / "copy")
    assert predict(uri, "What is it?", images[:1], backbone_dir=tmp_path / "copy") == expected
    with pytest.raises(DataError, match="CHEETAH_BACKBONE_DIR"):
        resolve_backbone_dir({"backbone": "gone/backbone", "backbone_abspath": "/nonexistent/backbone"})
    with pytest.raises(DataError, match="image not found"):
        predict(uri, "What is it?", [str(tmp_path / "missing.png")])


def test_champion_serves_in_a_fresh_process_without_the_project_or_its_backbone(registered, world, tmp_path):
    """Another machine, simulated: a process started elsewhere, where `cheetah` is not importable (no site-packages
    .pth processing, so not even the editable install) and the backbone is not where it was trained. The model's
    own code (code_paths) and the backbone logged to the tracking server make it answer as here."""
    import base64
    import os
    import sysconfig

    from cheetah.registry import predict

    instruction = "What is different between the images?"
    expected = predict(f"models:/{NAME}@champion", instruction, world["images"])
    inline = ["data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode() for p in world["images"]]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "try:\n    import cheetah\n    sys.exit('cheetah was importable before loading the model')\n"
        "except ImportError:\n    pass\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "import cheetah\n"
        f"rows = pd.DataFrame({{'instruction': [{instruction!r}] * 2, 'images': [{world['images']!r}, {inline!r}]}})\n"
        "answers = m.predict(rows)\n"
        # Files outside the image folder the server was given are refused: one line, no stack trace.
        "from cheetah.registry.pyfunc import RequestError\n"
        "try:\n    m.predict(pd.DataFrame({'instruction': ['?'], 'images': [['/etc/passwd']]}))\n"
        "    sys.exit('read a file outside CHEETAH_IMAGE_ROOT')\n"
        "except RequestError as e:\n    refused = e.serialize_as_json()\n"
        "print(json.dumps({'answers': answers, 'code': cheetah.__file__, 'refused': refused}))\n")
    backbone, moved = world["root"] / "backbone", world["root"] / "backbone.elsewhere"
    backbone.rename(moved)
    try:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
               "PYTHONPATH": sysconfig.get_paths()["purelib"], "CHEETAH_CACHE": str(tmp_path / "cache"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "CHEETAH_IMAGE_ROOT": str(Path(world["images"][0]).parent)}
        done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        moved.rename(backbone)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["answers"] == [expected, expected]
    refused = json.loads(result["refused"])
    assert refused["error_code"] == "BAD_REQUEST" and "outside the image folder CHEETAH_IMAGE_ROOT" in refused["message"]
    assert "stack_trace" not in refused
    assert str(REPO) not in result["code"] and "/code/cheetah/" in result["code"]  # the model's copy of the code
    assert any((tmp_path / "cache" / "backbones").iterdir())  # downloaded from the tracking server


def test_receipt_is_current_only_for_a_version_the_store_holds(registered, world, tmp_path):
    from cheetah.registry import receipt_is_current

    receipt = world["root"] / "register3.json"
    assert receipt_is_current(receipt, root=world["root"])
    forged = json.loads(receipt.read_text()) | {"run_id": "0" * 32}
    (tmp_path / "r.json").write_text(json.dumps(forged))
    assert not receipt_is_current(tmp_path / "r.json", root=world["root"])
    (tmp_path / "r.json").write_text(json.dumps(forged | {"version": 99}))
    assert not receipt_is_current(tmp_path / "r.json", root=world["root"])
    assert not receipt_is_current(tmp_path / "missing.json", root=world["root"])


def test_decide_and_metric_lookup():
    from cheetah.registry import decide, metric_value

    assert decide(0.1, None, 0.5) == (True, "no champion yet")
    assert decide(0.6, 0.5, 0.05)[0] and not decide(0.55, 0.5, 0.05)[0] and not decide(0.5, 0.5, 0.0)[0]
    for bad in (float("nan"), float("inf")):  # refused before the "no champion" branch, too
        for champion in (0.5, None):
            with pytest.raises(DataError, match="not a finite number"):
                decide(bad, champion, 0.0)
    metrics = {"demon": {"average": 0.3}, "mme": {"perception": 120.5}}
    assert metric_value(metrics, "mme.perception") == 120.5 and metric_value(metrics, "demon.average") == 0.3
    with pytest.raises(DataError, match="no metric 'mme.cognition'"):
        metric_value(metrics, "mme.cognition", "metrics/eval.json")
    with pytest.raises(DataError, match="not a number"):
        metric_value({"demon": {"average": "high"}}, "demon.average")


def test_register_refuses_missing_inputs(world, tmp_path):
    from cheetah.registry import register

    with pytest.raises(DataError, match="vpgc.safetensors: not found"):
        register(Params(), tmp_path / "eval.json", tmp_path / "nothing", out=tmp_path / "r.json")
    (tmp_path / "eval.json").write_text(json.dumps({"mme": {"perception": 1.0}}))
    with pytest.raises(DataError, match="does not name the weights it measured"):
        register(Params(), tmp_path / "eval.json", world["vpgc"][1], out=tmp_path / "r.json")
    with pytest.raises(DataError, match="no metric 'demon.average'"):
        register(Params(), _no_demon(world, tmp_path), world["vpgc"][1], out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def _no_demon(world, tmp_path) -> Path:
    from cheetah.model.weights import read_card

    path = tmp_path / "nodemon.json"
    path.write_text(json.dumps({"mme": {"perception": 1.0}, "vpgc_sha256": read_card(world["vpgc"][1])["sha256"]}))
    return path


def _gate_params(name: str) -> Params:
    return Params(register=RegisterConfig(model_name=name))


def test_broken_inputs_never_reach_champion(world, tmp_path):
    """NaN/inf metrics, truncated or non-finite weights, and metrics of other weights are refused before anything is
    registered: the registry stays empty, so nothing can become champion."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cheetah.model.weights import read_card
    from cheetah.registry import register

    params, vpgc = _gate_params("broken-inputs"), world["vpgc"][1]
    for value, match in ((float("nan"), "non-finite metric"), (float("inf"), "non-finite metric")):
        path = tmp_path / "nan.json"
        path.write_text(json.dumps({"demon": {"average": value}, "vpgc_sha256": read_card(vpgc)["sha256"]}))
        with pytest.raises(DataError, match=match):
            register(params, path, vpgc, out=tmp_path / "r.json")
    good = _metrics_file(world, "good-for-1.json", 1, 0.5)
    with pytest.raises(DataError, match="not the ones being registered"):
        register(params, good, world["vpgc"][2], out=tmp_path / "r.json")
    truncated = tmp_path / "truncated"
    shutil.copytree(vpgc, truncated)
    data = (truncated / "vpgc.safetensors").read_bytes()
    (truncated / "vpgc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="SHA-256 differs"):
        register(params, good, truncated, out=tmp_path / "r.json")
    # A card rewritten to match truncated weights: the file itself is then unreadable.
    card = json.loads((truncated / "vpgc.json").read_text())
    card["sha256"] = hashlib.sha256((truncated / "vpgc.safetensors").read_bytes()).hexdigest()
    (truncated / "vpgc.json").write_text(json.dumps(card))
    with pytest.raises(DataError, match="not a readable safetensors file"):
        register(params, _metrics_file(world, "m-trunc.json", 1, 0.5, sha=card["sha256"]), truncated,
                 out=tmp_path / "r.json")
    # Diverged (NaN) weights with a matching card.
    nan = tmp_path / "nan-weights"
    shutil.copytree(vpgc, nan)
    tensors = load_file(str(nan / "vpgc.safetensors"))
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    save_file(tensors, str(nan / "vpgc.safetensors"), metadata={"format": "pt"})
    card = json.loads((nan / "vpgc.json").read_text())
    card["sha256"] = hashlib.sha256((nan / "vpgc.safetensors").read_bytes()).hexdigest()
    (nan / "vpgc.json").write_text(json.dumps(card))
    with pytest.raises(DataError, match="NaN or infinite"):
        register(params, _metrics_file(world, "m-nan.json", 1, 0.5, sha=card["sha256"]), nan, out=tmp_path / "r.json")
    # Weights of a random-weights planning run.
    random_run = tmp_path / "random"
    shutil.copytree(vpgc, random_run)
    card = json.loads((random_run / "vpgc.json").read_text()) | {"random_backbone": True}
    (random_run / "vpgc.json").write_text(json.dumps(card))
    with pytest.raises(DataError, match="random weights"):
        register(params, good, random_run, out=tmp_path / "r.json")
    assert not _client().search_model_versions("name='broken-inputs'")
    assert not (tmp_path / "r.json").exists()


def test_dirty_tree_and_experiments_take_challenger_only_until_promoted_by_hand(world, tmp_path, monkeypatch):
    from cheetah.registry import demote, history, promote, register

    params, repo = _gate_params("eligibility"), world["repo"]
    (repo / "params.yaml").write_text("train: {lr: 1}\n")  # an uncommitted parameter change
    try:
        dirty = register(params, _metrics_file(world, "e1.json", 1, 0.5), world["vpgc"][1], out=tmp_path / "r1.json",
                         root=repo)
    finally:
        (repo / "params.yaml").unlink()
    assert not dirty["promoted"] and "not committed (params.yaml)" in dirty["reason"]
    assert dirty["aliases"] == {"challenger": 1, "champion": None}
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-seed")
    experiment = register(params, _metrics_file(world, "e2.json", 2, 0.9), world["vpgc"][2],
                          out=tmp_path / "r2.json", root=repo)
    assert not experiment["promoted"] and "DVC experiment 'lucky-seed'" in experiment["reason"]
    monkeypatch.delenv("DVC_EXP_NAME")
    clean = register(params, _metrics_file(world, "e3.json", 3, 0.3), world["vpgc"][3], out=tmp_path / "r3.json",
                     root=repo)
    assert clean["promoted"] and clean["reason"] == "no champion yet"  # eligible, although its metric is lower
    tags = _client().get_model_version("eligibility", "1").tags
    assert tags["git_dirty"] == "true" and tags["champion_eligible"] == "false"
    assert _client().get_model_version("eligibility", "2").tags["dvc_experiment"] == "lucky-seed"

    # A forced promotion is recorded; a demotion hands champion to the best remaining *eligible* version.
    forced = promote("eligibility", 2, "reviewed the experiment by hand")
    assert forced == {"model_name": "eligibility", "champion": 2, "previous_champion": 3,
                      "reason": "reviewed the experiment by hand"}
    assert demote("eligibility", 2, "answers are garbage on real images")["champion"] == 3
    with pytest.raises(DataError, match="was demoted"):
        promote("eligibility", 2, "again")
    assert demote("eligibility", 3, "broken too")["champion"] is None  # 1 is not eligible (dirty tree)
    rows = {r["version"]: r for r in history("eligibility")}
    assert rows[2]["promoted_by_hand"].startswith("reviewed the experiment by hand (champion was version 3)")
    assert rows[2]["demoted"] == "answers are garbage on real images" and rows[3]["demoted"] == "broken too"
    assert rows[1]["gate"].startswith("kept: not eligible")
    # The current aliases (challenger stays on the last registered version; no champion is left) ...
    assert {v: r["aliases"] for v, r in rows.items()} == {1: [], 2: [], 3: ["challenger"]}
    # ... and every decision, in order: version 3's second gate decision did not replace its first.
    assert [(e["event"], e["reason"].split(":")[0]) for e in rows[3]["events"]] == [
        ("gate", "promoted"), ("gate", "promoted"), ("demoted", "broken too")]
    assert rows[3]["events"][1]["reason"].startswith("promoted: best remaining eligible")
    assert [e["event"] for e in rows[2]["events"]] == ["gate", "promoted_by_hand", "demoted"]
    assert all(e["at"].endswith("Z") and e["by"] for r in rows.values() for e in r["events"])


def test_eligibility_comes_from_what_training_and_evaluation_recorded_not_the_registering_checkout(world, tmp_path):
    """Weights trained (or metrics measured) on uncommitted code never become champion by being registered from a
    clean checkout afterwards (`git stash`, then `cheetah register`), nor do weights that recorded no provenance."""
    import shutil

    from cheetah.registry import register

    params, repo = _gate_params("recorded-provenance"), world["repo"]
    dirty = {"git_commit": "1" * 40, "git_dirty": "true", "git_uncommitted": "cheetah/train/vpgc.py"}
    trained_dirty = tmp_path / "trained-dirty"
    shutil.copytree(world["vpgc"][1], trained_dirty)
    card = json.loads((trained_dirty / "vpgc.json").read_text())
    (trained_dirty / "vpgc.json").write_text(json.dumps(card | {"provenance": dirty}))
    first = register(params, _metrics_file(world, "p1.json", 1, 0.9), trained_dirty, out=tmp_path / "r1.json",
                     root=repo)
    assert not first["promoted"] and first["aliases"]["champion"] is None
    assert first["reason"] == ("not eligible for champion: the code, parameters or data of its training were not "
                               "committed (cheetah/train/vpgc.py)")
    tags = _client().get_model_version("recorded-provenance", "1").tags
    assert tags["git_dirty"] == "false"  # the registering checkout was clean: only the card tells
    assert tags["training.git_dirty"] == "true" and tags["training.git_commit"] == "1" * 40
    assert tags["evaluation.git_dirty"] == "false" and tags["champion_eligible"] == "false"

    measured_dirty = register(params, _metrics_file(world, "p2.json", 2, 0.9, recorded={"provenance": dirty}),
                              world["vpgc"][2], out=tmp_path / "r2.json", root=repo)
    assert not measured_dirty["promoted"] and "of its evaluation were not committed" in measured_dirty["reason"]

    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(world["vpgc"][3], unrecorded)
    recorded = json.loads((unrecorded / "vpgc.json").read_text())
    (unrecorded / "vpgc.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "provenance"}))
    none = register(params, _metrics_file(world, "p3.json", 3, 0.9), unrecorded, out=tmp_path / "r3.json", root=repo)
    assert not none["promoted"] and "its training recorded no provenance" in none["reason"]
    # The same weights with a clean record are eligible: the record, not the weights, decided.
    clean = register(params, _metrics_file(world, "p4.json", 3, 0.9), world["vpgc"][3], out=tmp_path / "r4.json",
                     root=repo)
    assert clean["promoted"] and clean["reason"] == "no champion yet"


def test_gate_compares_the_champions_logged_metric_not_its_tags(world, tmp_path):
    """Tags are only a record: editing the champion's metric tag does not change what the gate compares."""
    from cheetah.registry import register

    params = _gate_params("logged-metrics")
    first = register(params, _metrics_file(world, "l1.json", 1, 0.5), world["vpgc"][1], out=tmp_path / "r1.json",
                     root=world["repo"])
    assert first["promoted"]
    _client().set_model_version_tag("logged-metrics", "1", "metric.demon.average", "0.0")
    second = register(params, _metrics_file(world, "l2.json", 2, 0.4), world["vpgc"][2], out=tmp_path / "r2.json",
                      root=world["repo"])
    assert not second["promoted"] and second["previous_champion"] == {"version": 1, "value": 0.5}
