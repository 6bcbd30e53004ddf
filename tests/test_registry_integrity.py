"""What is served is what was registered (issue 26): tampering with a registered model's stored files — its code, a
planted pickle, its weights with the card's hash rewritten to match — makes `cheetah predict`, `cheetah serve`,
`cheetah.registry.load` and `cheetah registry promote|demote` refuse it by name, exit 2, and nothing planted runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import COMMITTED, committed_lock_repo, make_tokenizer, registry_workspace, sharpen_parameters

from cheetah.cli import main
from cheetah.config import Params, RegisterConfig
from cheetah.io import DataError

NAME = "cheetah-vpgc"


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """Two registered versions of a tiny VPG-C from a clean git checkout: 1 (champion) and 2 (challenger)."""
    from cheetah.model.backbones import build_backbone, load_backbone, save_backbone
    from cheetah.model.vpgc import VPGCModel
    from cheetah.model.weights import read_card, save_vpgc
    from cheetah.registry import register
    from cheetah.world import generate_scene, png_bytes, render

    root = tmp_path_factory.mktemp("integrity")
    with registry_workspace(root):
        backbone = build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0)
        save_backbone(backbone, "backbone")
        image = root / "image.png"
        image.write_bytes(png_bytes(render(generate_scene(0, 0, image_size=32)).image))
        repo = committed_lock_repo(root / "repo", "schema: '2.0'\nstages: {}\n")
        for version, value in ((1, 0.6), (2, 0.5)):
            model = VPGCModel(load_backbone("backbone"))
            sharpen_parameters(model.vpgc.parameters(), seed=10 + version)
            save_vpgc(model, f"vpgc{version}", extra=COMMITTED)
            metrics = root / f"eval{version}.json"
            metrics.write_text(json.dumps({"demon": {"average": value}, "mme": {"perception": 1.0},
                                           "vpgc_sha256": read_card(f"vpgc{version}")["sha256"], **COMMITTED}))
            register(Params(register=RegisterConfig()), metrics, f"vpgc{version}",
                     out=root / f"register{version}.json", root=repo)
        yield {"root": root, "image": str(image)}


@pytest.fixture(autouse=True)
def _registry_as_registered(request):
    """Every test starts from the registry `reg` built (1 champion, 2 challenger, nothing demoted), whatever ran
    before it: the tests promote and demote, and they run in any order."""
    if "reg" in request.fixturenames:
        request.getfixturevalue("reg")
        client = _client()
        for version in ("1", "2"):
            for tag in ("demoted", "demoted_at"):
                if tag in client.get_model_version(NAME, version).tags:
                    client.delete_model_version_tag(NAME, version, tag)
        client.set_registered_model_alias(NAME, "champion", "1")
        client.set_registered_model_alias(NAME, "challenger", "2")


@pytest.fixture(autouse=True)
def _no_server(monkeypatch):
    """`cheetah serve` never starts a real server here (a test that expects a refusal would otherwise block)."""
    import cheetah.registry.serve  # noqa: F401 (the module, for the line below)

    serve = sys.modules["cheetah.registry.serve"]
    run = serve.subprocess.run  # (the subprocess module itself: every other command, e.g. git, still runs)

    def started(cmd, *args, **kwargs):
        if "serve" in map(str, cmd):
            raise AssertionError(f"the server was started: {cmd}")
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(serve.subprocess, "run", started)


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _stored(version: int) -> Path:
    """The folder the tracking store keeps version `version`'s files in (what an attacker with access rewrites)."""
    from urllib.parse import urlparse

    model_id = _client().get_model_version(NAME, str(version)).source.removeprefix("models:/")
    return Path(urlparse(_client().get_logged_model(model_id).artifact_location).path)


@contextlib.contextmanager
def _tampering(reg, version: int = 2):
    """The stored folder of `version` to tamper with; restored afterwards."""
    stored = _stored(version)
    backup = reg["root"] / f"backup-{version}"
    shutil.copytree(stored, backup)
    try:
        yield stored
    finally:
        shutil.rmtree(stored)
        shutil.copytree(backup, stored)
        shutil.rmtree(backup)


def _champion() -> int:
    return int(_client().get_model_version_by_alias(NAME, "champion").version)


def _one_error_line(err: str, *named: str) -> None:
    """One `error:` line naming `named`, no traceback (MLflow's download progress bar may share stderr)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and all(n in errors[0] for n in named), err


def _refused_everywhere(reg, capsys, named: str, marker: Path | None = None) -> None:
    """predict, serve, promote and load all refuse version 2 with one line naming `named`; nothing ran."""
    from cheetah.registry import load

    predict = ["predict", "--model", f"models:/{NAME}/2", "--image", reg["image"], "--instruction", "What is it?"]
    for argv in (predict, ["serve", "--model", f"models:/{NAME}/2"], ["registry", "promote", "2", "--reason", "x"]):
        assert main(argv) == 2, argv
        _one_error_line(capsys.readouterr().err, named, f"{NAME} version 2")
    with pytest.raises(DataError, match=named):
        load(f"models:/{NAME}/2")
    assert _champion() == 1
    assert marker is None or not marker.exists()


def test_registration_records_every_file_and_an_untouched_version_serves(reg, capsys):
    from cheetah.io import sha256_file
    from cheetah.registry import integrity, predict
    from cheetah.model.weights import read_card

    tags = _client().get_model_version(NAME, "2").tags
    files = json.loads(tags[integrity.FILES_TAG])
    assert tags[integrity.DIGEST_TAG] == integrity.files_digest(tags[integrity.FILES_TAG])
    assert files["artifacts/vpgc2/vpgc.safetensors"] == read_card(reg["root"] / "vpgc2")["sha256"]
    assert {"MLmodel", "served_model.py", "code/cheetah/registry/pyfunc.py"} <= set(files)
    stored = _stored(2)
    assert files == {p.relative_to(stored).as_posix(): sha256_file(p) for p in stored.rglob("*") if p.is_file()}
    assert isinstance(predict(f"models:/{NAME}/2", "What is it?", [reg["image"]]), str)
    # Only registered versions are loaded: a run's or a path's model has no record to be checked against.
    with pytest.raises(DataError, match="only registered versions"):
        predict(str(stored), "What is it?", [reg["image"]])


@pytest.mark.parametrize("rel", ["served_model.py", "code/cheetah/registry/pyfunc.py"])
def test_planted_code_in_the_stored_model_never_runs(reg, capsys, rel):
    marker = reg["root"] / "planted-code-ran"
    with _tampering(reg) as stored:
        with open(stored / rel, "a") as f:
            f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
        _refused_everywhere(reg, capsys, f"{rel} changed", marker)


def test_bytecode_caches_in_the_store_neither_block_nor_run(reg, capsys):
    """Loading a model in place (plain `mlflow.pyfunc.load_model` on a local store) writes Python's bytecode caches
    into the store: the version still serves. A planted cache, valid for the stored source (so that an in-place load
    would run it), never runs: the verified copy is loaded without caches."""
    import importlib._bootstrap_external as bootstrap
    import sys

    from cheetah.registry import predict

    marker = reg["root"] / "planted-bytecode-ran"
    with _tampering(reg) as stored:
        source = stored / "served_model.py"
        planted = compile(source.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n", str(source), "exec")
        st = source.stat()
        cache = stored / "__pycache__" / f"served_model.{sys.implementation.cache_tag}.pyc"
        cache.parent.mkdir()
        cache.write_bytes(bytes(bootstrap._code_to_timestamp_pyc(planted, int(st.st_mtime), st.st_size)))
        (stored / "code" / "cheetah" / "__pycache__").mkdir(exist_ok=True)
        (stored / "code" / "cheetah" / "__pycache__" / "x.pyc").write_bytes(b"\0")
        assert isinstance(predict(f"models:/{NAME}/2", "What is it?", [reg["image"]]), str)
        assert main(["predict", "--model", f"models:/{NAME}/2", "--image", reg["image"], "--instruction", "?"]) == 0
    assert not marker.exists()


class _Planted:
    """Unpickling this object creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_with_an_edited_mlmodel_never_runs(reg, capsys):
    import cloudpickle

    marker = reg["root"] / "planted-pickle-ran"
    with _tampering(reg) as stored:
        (stored / "python_model.pkl").write_bytes(cloudpickle.dumps(_Planted(marker)))
        spec = yaml.safe_load((stored / "MLmodel").read_text())
        flavor = spec["flavors"]["python_function"]
        flavor["loader_module"] = "mlflow.pyfunc.model"
        flavor["python_model"] = "python_model.pkl"
        (stored / "MLmodel").write_text(yaml.safe_dump(spec))
        _refused_everywhere(reg, capsys, "MLmodel changed; python_model.pkl was added", marker)
    # Even a pickle recorded at registration would be refused: a served model is loaded from code only.
    from cheetah.registry.integrity import check_models_from_code

    folder = reg["root"] / "pickled-model"
    shutil.copytree(_stored(2), folder)
    (folder / "python_model.pkl").write_bytes(b"")
    with pytest.raises(DataError, match=r"python_model\.pkl: a pickled file"):
        check_models_from_code(folder, "m")


def test_rewritten_weights_with_a_matching_card_are_neither_promoted_nor_served(reg, capsys):
    from safetensors.torch import load_file, save_file

    from cheetah.io import sha256_file

    with _tampering(reg) as stored:
        weights = stored / "artifacts" / "vpgc2" / "vpgc.safetensors"
        tensors = {k: v + 1.0 for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
        card = json.loads((weights.parent / "vpgc.json").read_text())
        card["sha256"] = sha256_file(weights)  # the card agrees with the new weights: only the registration does not
        (weights.parent / "vpgc.json").write_text(json.dumps(card))
        _refused_everywhere(reg, capsys, "vpgc2/vpgc.json changed; artifacts/vpgc2/vpgc.safetensors changed")
    assert main(["registry", "promote", "2", "--reason", "checked"]) == 0  # restored: it may be promoted again
    assert _champion() == 2
    assert main(["registry", "promote", "1", "--reason", "back"]) == 0 and _champion() == 1


def test_a_version_without_or_with_an_edited_record_is_refused(reg, capsys):
    from cheetah.registry import integrity

    client = _client()
    files = client.get_model_version(NAME, "2").tags[integrity.FILES_TAG]
    try:
        client.delete_model_version_tag(NAME, "2", integrity.FILES_TAG)
        _refused_everywhere(reg, capsys, "no record of its files")
        # A record edited to match tampered files no longer matches its digest.
        edited = json.loads(files) | {"python_model.pkl": "0" * 64}
        client.set_model_version_tag(NAME, "2", integrity.FILES_TAG, json.dumps(edited))
        _refused_everywhere(reg, capsys, "does not match its digest")
    finally:
        client.set_model_version_tag(NAME, "2", integrity.FILES_TAG, files)


def test_the_served_model_refuses_a_backbone_other_than_the_registered_one(reg, capsys, tmp_path):
    from cheetah.model.backbones import build_backbone, save_backbone

    save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=5), tmp_path / "other")
    assert main(["predict", "--model", f"models:/{NAME}/2", "--image", reg["image"], "--instruction", "What?",
                 "--backbone-dir", str(tmp_path / "other")]) == 2
    _one_error_line(capsys.readouterr().err, f"{tmp_path / 'other'}: the backbone's weights")


def test_serve_starts_the_server_on_the_checked_copy_only(reg, monkeypatch):
    serving = sys.modules["cheetah.registry.serve"]
    started = []
    monkeypatch.setattr(serving.subprocess, "run", lambda cmd, check: started.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    assert main(["serve", "--model", f"models:/{NAME}/2", "--port", "5055"]) == 0
    model = Path(started[0][started[0].index("-m", 3) + 1])
    assert (model / "MLmodel").is_file() and str(_stored(2)) not in str(model)
    assert started[0][-2:] == ["--port", "5055"]


def _poison(folder: Path) -> None:
    """One tensor of the backbone's weights set to NaN (what a diverged `base` writes)."""
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})


def test_a_nan_backbone_is_refused_by_evaluate_register_and_predict(reg, capsys, tmp_path):
    """The backbone every registered version records, poisoned in place: nothing evaluates, registers or serves it."""
    backbone = reg["root"] / "backbone"
    shutil.copytree(backbone, tmp_path / "good")
    _poison(backbone)
    named = f"{backbone / 'model.safetensors'}: 1 of "
    try:
        (tmp_path / "demon").mkdir()
        assert main(["evaluate", "--no-track", "--benchmark", "demon", "--data-dir", str(tmp_path / "demon"),
                     "--model", f"base={backbone}", "--set", f"evaluate.out={json.dumps(str(tmp_path / 'eval'))}",
                     "--set", f"evaluate.metrics={json.dumps(str(tmp_path / 'eval.json'))}"]) == 2
        _one_error_line(capsys.readouterr().err, named, "NaN or infinite")
        versions = len(_client().search_model_versions(f"name='{NAME}'"))
        assert main(["register", "--vpgc-dir", str(reg["root"] / "vpgc2"), "--metrics", str(reg["root"] / "eval2.json"),
                     "--out", str(tmp_path / "receipt.json")]) == 2
        _one_error_line(capsys.readouterr().err, named, "NaN or infinite")
        assert len(_client().search_model_versions(f"name='{NAME}'")) == versions
        assert main(["predict", "--model", f"models:/{NAME}/1", "--image", reg["image"], "--instruction", "What?"]) == 2
        _one_error_line(capsys.readouterr().err, named, "NaN or infinite")
        assert not (tmp_path / "eval.json").exists() and not (tmp_path / "receipt.json").exists()
    finally:
        shutil.rmtree(backbone)
        shutil.copytree(tmp_path / "good", backbone)


def test_demote_never_promotes_a_version_the_gate_did_not_decide_on(reg, capsys):
    """A `register` killed between registering version 2 and its gate decision leaves it with no `gate` tag."""
    client = _client()
    decision = client.get_model_version(NAME, "2").tags["gate"]
    client.delete_model_version_tag(NAME, "2", "gate")
    try:
        assert main(["registry", "demote", "1", "--reason", "broken"]) == 0
        assert json.loads(capsys.readouterr().out)["champion"] is None
    finally:
        client.set_model_version_tag(NAME, "2", "gate", decision)
    client.set_registered_model_alias(NAME, "champion", "1")
    assert main(["registry", "demote", "1", "--reason", "broken"]) == 0  # decided on: it takes over
    assert json.loads(capsys.readouterr().out)["champion"] == 2


def test_demote_passes_over_a_tampered_version(reg, capsys):
    with _tampering(reg) as stored:
        (stored / "served_model.py").write_text("raise SystemExit('planted')\n")
        assert main(["registry", "demote", "1", "--reason", "broken"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["champion"] is None and "served_model.py changed" in result["skipped"]["2"]


def test_history_of_a_model_that_is_not_registered_is_one_line(reg, capsys):
    assert main(["registry", "history", "--model-name", "cheetah-nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cheetah-nope: no such registered model" in err
    assert main(["registry", "history"]) == 0 and len(json.loads(capsys.readouterr().out)) == 2
