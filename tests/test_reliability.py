"""What a hostile-but-realistic user can throw at the stages: output folders that hold other files, planted pickles
in a training state folder, a diverging run, a corrupted checkpoint, duplicate parameter keys."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, write_instruction_set
from safetensors.torch import load_file

from cheetah.cli import main
from cheetah.config import ConfigError, load_params
from cheetah.errors import DivergenceError
from cheetah.io import MANIFEST, DataError
from cheetah.model.backbones import build_backbone, save_backbone
from cheetah.train.state import UnsafeState
from cheetah.train.vpgc import train_vpgc

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------------------------


def test_world_out_never_deletes_a_folder_it_did_not_write(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHEETAH_TRACKING", "0")
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.txt").write_text("text")
    assert main(["world", "--out", "precious", "--n", "2"]) == 2
    assert "thesis.txt" in capsys.readouterr().err and (precious / "thesis.txt").read_text() == "text"
    assert (precious / "sub").is_dir()
    # The working directory and its parents are refused, and no temporary folder is left behind.
    assert main(["world", "--out", ".", "--n", "2"]) == 2
    assert main(["world", "--out", str(tmp_path.parent), "--n", "2"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
    # Its own output it replaces; once something is added, only --overwrite does, and the new manifest says so.
    assert main(["world", "--out", "w", "--n", "2"]) == 0
    assert main(["world", "--out", "w", "--n", "3"]) == 0
    (tmp_path / "w" / "notes.txt").write_text("mine")
    assert main(["world", "--out", "w", "--n", "2"]) == 2
    assert (tmp_path / "w" / "notes.txt").exists()
    assert main(["world", "--out", "w", "--n", "2", "--overwrite"]) == 0
    manifest = json.loads((tmp_path / "w" / MANIFEST).read_text())
    assert manifest["kind"] == "world corpus" and manifest["overwrote"] == ["notes.txt"]
    assert "captions.jsonl" in manifest["files"] and not (tmp_path / "w" / "notes.txt").exists()
    # A changed file of its own output counts as someone else's: a longer one, and one edited in place to the same
    # size (the manifest records each file's SHA-256, not only its size).
    assert all(set(v) == {"bytes", "sha256"} for v in manifest["files"].values())
    captions = tmp_path / "w" / "captions.jsonl"
    text = captions.read_bytes()
    capsys.readouterr()
    captions.write_bytes(text.replace(b"a", b"e", 1))
    assert len(captions.read_bytes()) == len(text) and captions.read_bytes() != text
    assert main(["world", "--out", "w", "--n", "2"]) == 2
    assert "captions.jsonl" in capsys.readouterr().err
    captions.write_bytes(text)  # restored: its own again
    assert main(["world", "--out", "w", "--n", "2"]) == 0
    with open(captions, "a") as f:
        f.write("\n")
    assert main(["world", "--out", "w", "--n", "2"]) == 2
    # Another stage's output is not this stage's to replace.
    assert main(["world", "--out", "w2", "--n", "2"]) == 0
    assert main(["benchmarks", "--demon-dir", "w2", "--mme-dir", "mme", "--demon-per-task", "1",
                 "--mme-per-subtask", "2"]) == 2


def test_a_manifest_from_before_content_hashes_is_compared_on_sizes(tmp_path):
    from cheetah.io import check_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("abc")
    (out / MANIFEST).write_text(json.dumps({"written_by": "cheetah", "kind": "k", "files": {"a.txt": 3}}))
    assert check_output(out, "k") == []
    (out / "a.txt").write_text("abcd")
    with pytest.raises(DataError, match="a.txt"):
        check_output(out, "k")


def test_folders_filled_in_place_are_claimed_only_when_empty_or_already_theirs(tmp_path):
    """Evaluation reports and training state are written into, not replaced: a folder of someone else's files is
    refused, an empty or missing one is claimed (a manifest), a claimed one is reused."""
    from cheetah.evaluate.run import REPORT_KIND
    from cheetah.io import claim_dir

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    with pytest.raises(DataError, match=r"report\.md"):
        claim_dir(tmp_path / "mine", REPORT_KIND)
    claim_dir(tmp_path / "new", REPORT_KIND)
    (tmp_path / "new" / "report.md").write_text("written by evaluate")
    assert claim_dir(tmp_path / "new", REPORT_KIND) == tmp_path / "new"
    with pytest.raises(DataError, match="holds files"):
        claim_dir(tmp_path / "new", "training state")


def test_an_unreachable_tracking_server_is_one_line_and_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    """MLflow's own defaults retry a server that is down for about four minutes, then a traceback."""
    from cheetah import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHEETAH_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a user's setting wins over the project's patience
    for key in ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["world", "--out", "w", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MLFLOW_TRACKING_URI=http://127.0.0.1:9" in err and "CHEETAH_TRACKING=0" in err
    assert not (tmp_path / "w").exists()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == tracking.SERVER_PATIENCE["MLFLOW_HTTP_REQUEST_TIMEOUT"]


def test_a_dask_address_that_is_not_a_scheduler_is_refused_in_bounded_time():
    """A service that accepts the connection and never speaks Dask made the client wait for ever; a malformed
    address was a traceback."""
    import socket
    import time

    from cheetah.engine import _check_scheduler

    with socket.socket() as server:  # accepts connections (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"synthesize\.address: nothing at tcp://127\.0\.0\.1:\d+ answered as a "
                                              r"Dask scheduler within 2 s"):
            _check_scheduler(f"tcp://127.0.0.1:{server.getsockname()[1]}", timeout=2)
        assert time.monotonic() - start < 10
    for address in ("tcp://::1:x", "nonsense://host"):
        with pytest.raises(ConfigError, match="synthesize.address: cannot reach a Dask scheduler at"):
            _check_scheduler(address, timeout=2)


def test_duplicate_keys_in_a_parameters_file_are_refused(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:4: .*duplicate key 'lr' \(also on line 2\)"):
        load_params(params)
    assert main(["--params", str(params), "model", "summary", "--meta"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback


def test_a_yaml_alias_bomb_is_refused_at_once_without_printing_its_value(tmp_path, capsys):
    """Nine lines of anchors stand for 10**9 values: refused while loading, in well under a second."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    params = tmp_path / "bomb.yaml"
    params.write_text("\n".join([*lines, "train: {steps: *a8}"]) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml:\d+: .*expands to more than 100000 values"):
        load_params(params)
    assert main(["--params", str(params), "model", "summary", "--meta"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lol" not in err
    # A --set value is read by the same loader; invalid YAML there is one line too.
    levels = ["&b0 [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"&b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 6)]
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_params(None, ["train.steps=[" + ", ".join(levels) + "]"])
    assert main(["--set", "train.steps=[1", "model", "summary", "--meta"]) == 2
    assert capsys.readouterr().err.startswith("error: override 'train.steps': the value is not valid YAML")


def test_diverged_weights_never_replace_a_good_output_and_a_broken_backbone_is_refused_by_file(tmp_path):
    """A backbone whose weights went NaN (a `base` run with a huge learning rate) is refused before the swap: the
    good backbone stays byte-identical. Reading a NaN or truncated backbone is a one-line error naming the file."""
    from cheetah.model.backbones import load_backbone

    good = build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0)
    save_backbone(good, tmp_path / "backbone")
    before = {p.name: p.read_bytes() for p in (tmp_path / "backbone").iterdir()}
    with torch.no_grad():
        next(good.model.parameters()).fill_(float("nan"))
    with pytest.raises(DataError, match=r"model\.safetensors: 1 of \d+ tensors hold NaN or infinite values.*left as "
                                        "it was"):
        save_backbone(good, tmp_path / "backbone")
    assert {p.name: p.read_bytes() for p in (tmp_path / "backbone").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]  # no temporary folder left behind
    weights = tmp_path / "backbone" / "model.safetensors"
    weights.write_bytes(before["model.safetensors"][:1000])
    with pytest.raises(DataError, match=rf"{weights}: not a readable safetensors file"):
        load_backbone(tmp_path / "backbone")


def test_a_pickled_backbone_is_refused_by_file_and_never_unpickled(tmp_path):
    """A backbone folder whose weights are a pickle (`pytorch_model.bin`) is one DataError naming the file, and its
    code never runs; beside safetensors weights (as many Hugging Face snapshots ship) the pickle is never read."""
    from cheetah.model.backbones import load_backbone

    folder = tmp_path / "backbone"
    save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0), folder)
    torch.save({"x": _Planted(tmp_path / "ran")}, folder / "pytorch_model.bin")
    load_backbone(folder)  # the safetensors are read, the pickle is not
    assert not (tmp_path / "ran").exists()
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError, match=rf"{folder / 'pytorch_model.bin'}: pickled backbone weights are never loaded"):
        load_backbone(folder)
    assert not (tmp_path / "ran").exists()


def test_single_file_outputs_never_replace_a_file_the_project_did_not_write(tmp_path, monkeypatch, capsys):
    """`score --out` (and every metrics file) replaces only a file it wrote itself and nobody changed since, or one
    git holds as it is; anything else only with --overwrite."""
    from cheetah.evaluate.mme import results_line
    from cheetah.io import write_metrics

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "existence.txt").write_text(results_line("a", "q1", "Yes", "yes") +
                                                       results_line("a", "q2", "No", "no"))
    score = ["score", "mme", "--results-dir", "results", "--out"]
    (tmp_path / "userfile.json").write_text('{"mine": 1}\n')
    assert main([*score, "userfile.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "userfile.json: refusing to replace this file" in err and "--overwrite" in err
    assert (tmp_path / "userfile.json").read_text() == '{"mine": 1}\n'
    assert main([*score, "userfile.json", "--overwrite"]) == 0 and "perception" in (tmp_path / "userfile.json").read_text()
    # Its own output it replaces; once edited by hand, no longer.
    assert main([*score, "scores.json"]) == 0 and main([*score, "scores.json"]) == 0
    with open(tmp_path / "scores.json", "a") as f:
        f.write(" ")
    assert main([*score, "scores.json"]) == 2
    # A folder, or a corpus's captions.jsonl given as a metrics file: refused, untouched.
    assert main([*score, "results"]) == 2
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "captions.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(DataError, match=r"captions\.jsonl: refusing to replace this file"):
        write_metrics(tmp_path / "corpus" / "captions.jsonl", {"loss": 1.0})
    assert (tmp_path / "corpus" / "captions.jsonl").read_text() == '{"id": "x"}\n'
    # A metrics file as git holds it (a fresh clone's metrics/*.json) is replaced; a changed one is not.
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "train.json").write_text('{"loss": 2.0}\n')
    subprocess.run(["git", "add", "train.json"], cwd=tmp_path, check=True)
    write_metrics(tmp_path / "train.json", {"loss": 1.0})
    (tmp_path / "eval.json").write_text('{"loss": 2.0}\n')
    subprocess.run(["git", "add", "eval.json"], cwd=tmp_path, check=True)
    (tmp_path / "eval.json").write_text('{"loss": 3.0}\n')
    with pytest.raises(DataError, match=r"eval\.json: refusing to replace this file"):
        write_metrics(tmp_path / "eval.json", {"loss": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# Training: state folders, divergence, resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0), d / "backbone")
    write_instruction_set(d / "syn", n_synthetic=16, n_captions=16)
    return d


@pytest.fixture(autouse=True)
def _tracking(monkeypatch):
    monkeypatch.setenv("CHEETAH_TRACKING", "0")


def _train(d: Path, name: str, state: str | None = None, restart: bool = False, **train):
    values = {"data": str(d / "syn"), "out": str(d / name / "vpgc"), "state_dir": str(d / (state or name) / "state"),
              "metrics": str(d / name / "train.json"), "curve": str(d / name / "curve.csv"), "steps": 4,
              "synthetic_batch": 4, "caption_batch": 4, "checkpoint_every": 1, "keep_checkpoints": 2,
              "eval_every": 100, "heldout_fraction": 0.2, "warmup_steps": 1, "lr": 0.01, "zero_stage": 2, **train}
    overrides = [f"train.{k}={json.dumps(v)}" for k, v in values.items()]
    overrides += ["model.preset=tiny", f"model.backbone_dir={json.dumps(str(d / 'backbone'))}"]
    return train_vpgc(load_params(None, overrides), restart=restart)


def _weights(d: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(d / name / "vpgc" / "vpgc.safetensors"))


@pytest.fixture(scope="module")
def finished(ws):
    """A complete 4-step run whose state folder holds step-000003 and step-000004 (the reference weights)."""
    _train(ws, "reference")
    state = ws / "reference" / "state"
    assert sorted(p.name for p in state.glob("step-*")) == ["step-000003", "step-000004"]
    return state


def _copy_state(ws: Path, finished: Path, name: str) -> Path:
    shutil.copytree(finished, ws / name / "state")
    return ws / name / "state"


def _same_weights(ws: Path, a: str, b: str) -> None:
    wa, wb = _weights(ws, a), _weights(ws, b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class _Planted:
    """Unpickling this object creates `marker` (what a planted pickle in a shared state folder would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rehash(step: Path) -> None:
    """Rewrite the checkpoint's record so that its hashes match the tampered files (an attacker who can write the
    folder can write the record too): only the tensors-only reader stands in the way."""
    from cheetah.io import sha256_file
    from cheetah.train.state import RECORD

    record = json.loads((step / RECORD).read_text())
    record["files"] = {rel: sha256_file(step / rel) for rel in record["files"]}
    (step / RECORD).write_text(json.dumps(record))


def test_the_planted_payload_runs_under_plain_unpickling(tmp_path):
    """The payload of the next test is real: plain `torch.load` runs it."""
    torch.save({"x": _Planted(tmp_path / "ran")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_a_planted_pickle_in_any_state_file_never_runs(ws, finished, capsys):
    files = sorted(p.relative_to(finished / "step-000004").as_posix()
                   for p in (finished / "step-000004").rglob("*.pt"))
    assert len(files) >= 2  # the module states and the ZeRO optimiser states
    for k, rel in enumerate(files):
        marker = ws / f"ran-{k}"
        # Tampered only: the hash no longer matches, so the newest intact checkpoint (step 3) is resumed.
        state = _copy_state(ws, finished, f"tampered{k}")
        torch.save({"x": _Planted(marker)}, state / "step-000004" / rel)
        _train(ws, f"tampered{k}")
        assert not marker.exists()
        assert f"not resuming from {state}/step-000004: {rel} differs from the hash" in capsys.readouterr().out
        _same_weights(ws, "reference", f"tampered{k}")
        # Tampered with a matching record: refused by the tensors-only reader, naming the file.
        state = _copy_state(ws, finished, f"planted{k}")
        torch.save({"x": _Planted(marker)}, state / "step-000004" / rel)
        _rehash(state / "step-000004")
        with pytest.raises(UnsafeState, match=rf"{rel}: refusing to read this training state file"):
            _train(ws, f"planted{k}")
        assert not marker.exists() and not (ws / f"planted{k}" / "vpgc").exists()


@pytest.mark.parametrize("damage", ["empty record", "truncated optimiser", "missing model file"])
def test_a_corrupted_latest_checkpoint_resumes_from_the_previous_one(ws, finished, capsys, damage):
    name = "corrupt-" + damage.replace(" ", "-")
    state = _copy_state(ws, finished, name)
    step = state / "step-000004"
    if damage == "empty record":
        (step / "cheetah_state.json").write_text("")
    else:
        target = next(p for p in step.rglob("*.pt") if ("optim" in p.name) == (damage == "truncated optimiser"))
        if damage == "truncated optimiser":
            target.write_bytes(target.read_bytes()[:100])
        else:
            target.unlink()
    _train(ws, name)
    out = capsys.readouterr().out
    assert f"not resuming from {state}/step-000004" in out and f"resuming VPG-C training from {state}/step-000003" in out
    _same_weights(ws, "reference", name)


def test_restart_starts_over_deliberately(ws, finished, capsys):
    state = _copy_state(ws, finished, "restarted")
    _train(ws, "restarted", restart=True)
    out = capsys.readouterr().out
    assert f"--restart: removed {state}/step-000004" in out and "resuming" not in out
    _same_weights(ws, "reference", "restarted")


def test_train_out_that_holds_the_state_or_the_data_is_refused_before_any_work(ws, finished):
    state = _copy_state(ws, finished, "inside")
    before = sorted(p.name for p in state.rglob("*"))
    with pytest.raises(DataError, match="contains .*state"):
        _train(ws, "inside", state="inside", out=str(ws / "inside"))
    with pytest.raises(DataError, match="contains .*syn, which this stage reads"):
        _train(ws, "inside", out=str(ws / "syn"))
    assert sorted(p.name for p in state.rglob("*")) == before


def test_a_non_finite_loss_stops_training_or_is_skipped_within_the_allowance(ws, monkeypatch):
    from cheetah.model.vpgc import VPGCModel

    forward = VPGCModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # step 2's synthetic group
                out = dataclasses.replace(out, token_sums=out.token_sums * float("nan"))
        return out

    monkeypatch.setattr(VPGCModel, "forward", poisoned)
    with pytest.raises(DivergenceError, match=r"non-finite loss at step 2 on example\(s\) synthetic syn-"):
        _train(ws, "nan-stop")
    assert not (ws / "nan-stop" / "vpgc").exists() and not (ws / "nan-stop" / "train.json").exists()
    calls["n"] = 0
    metrics = _train(ws, "nan-skip", max_skipped_steps=1)
    assert metrics["skipped_steps"] == 1 and len(json.loads((ws / "nan-skip" / "train.json").read_text())) > 0
    assert [h["step"] for h in _curve_rows(ws, "nan-skip")] == [1, 3, 4]


def test_a_feature_cache_of_other_backbone_weights_is_never_reused(ws, tmp_path):
    """`train.feature_cache` is keyed on the vision weights' content: a backbone of the same architecture with other
    weights (a `base` stage that reran) computes its own features instead of reading the first one's."""
    other = tmp_path / "other-backbone"
    save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=7), other)
    cache = tmp_path / "features"

    def train(name: str, backbone: Path, feature_cache: str) -> None:
        overrides = [f"train.{k}={json.dumps(v)}" for k, v in {
            "data": str(ws / "syn"), "out": str(tmp_path / name / "vpgc"), "state_dir": str(tmp_path / name / "state"),
            "metrics": str(tmp_path / name / "train.json"), "curve": str(tmp_path / name / "curve.csv"), "steps": 1,
            "synthetic_batch": 4, "caption_batch": 4, "eval_every": 100, "heldout_fraction": 0.2,
            "warmup_steps": 1, "lr": 0.01, "feature_cache": feature_cache}.items()]
        train_vpgc(load_params(None, [*overrides, "model.preset=tiny", f"model.backbone_dir={json.dumps(str(backbone))}"]))

    train("a", ws / "backbone", str(cache))
    train("b", other, str(cache))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # one store per backbone's weights


_HOLD = ("import sys, time\nfrom cheetah.io import lock_output\nlock_output(sys.argv[1])\nprint('locked', flush=True)\n"
         "time.sleep(120)\n")


@contextlib.contextmanager
def _locked_elsewhere(folder: Path):
    """Another run holding `folder`'s lock (a process that took it and waits); killed (-9) afterwards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_two_runs_on_one_folder_one_is_refused_by_name(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # An output folder replaced by a rename (`cheetah world`): refused while another run writes it.
    with _locked_elsewhere(tmp_path / "w") as other:
        assert main(["world", "--out", "w", "--n", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"w: another cheetah run (pid {other.pid} on " in err
        assert not (tmp_path / "w").exists()
    # The other run was killed: its lock went with it (the file it left is no lock); the lock of a finished run is
    # released, its file removed.
    assert (tmp_path / ".w.cheetah-lock").exists()
    assert main(["world", "--out", "w", "--n", "2"]) == 0
    assert not list(tmp_path.glob(".*.cheetah-lock"))
    # A training's state folder and its weights folder: the second training is refused before any work.
    for folder in (ws / "locked" / "state", ws / "locked" / "vpgc"):
        with _locked_elsewhere(folder):
            with pytest.raises(DataError, match=rf"{folder}: another cheetah run \(pid \d+ on "):
                _train(ws, "locked")
        assert not (ws / "locked" / "vpgc").exists() and not (ws / "locked" / "state").exists()


def test_train_metrics_pointed_at_a_corpus_file_is_refused_before_any_work(ws):
    captions = ws / "syn" / "captions.jsonl"
    before = captions.read_bytes()
    with pytest.raises(DataError, match=rf"{captions}: refusing to replace this file: no earlier metrics output"):
        _train(ws, "into-corpus", metrics=str(captions))
    assert captions.read_bytes() == before and not (ws / "into-corpus").exists()


def _curve_rows(d: Path, name: str) -> list[dict]:
    import csv

    with open(d / name / "curve.csv") as f:
        return [{"step": int(r["step"])} for r in csv.DictReader(f)]


def test_an_infinite_learning_rate_exits_non_zero_with_a_named_error(ws):
    params = ws / "inf.yaml"
    params.write_text(json.dumps({
        "model": {"preset": "tiny", "backbone_dir": str(ws / "backbone")},
        "train": {"data": str(ws / "syn"), "out": str(ws / "inf" / "vpgc"), "state_dir": str(ws / "inf" / "state"),
                  "metrics": str(ws / "inf" / "train.json"), "curve": str(ws / "inf" / "curve.csv"), "steps": 3,
                  "synthetic_batch": 4, "caption_batch": 4, "heldout_fraction": 0.2, "warmup_steps": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHEETAH_TRACKING": "0"}
    done = subprocess.run([sys.executable, "-m", "cheetah.cli", "--params", str(params), "train",
                           "--set", "train.lr=.inf"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: train: the update of step 1 made VPG-C weights non-finite" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (ws / "inf" / "vpgc").exists() and not (ws / "inf" / "train.json").exists()


def test_the_served_model_reads_images_sent_inline_or_under_its_image_root_only(tmp_path):
    """A REST client could name any file of the serving machine as an image."""
    from PIL import Image

    from cheetah.registry.pyfunc import _as_images, image_data_uri

    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (4, 4), "red").save(root / "a.png")
    Image.new("RGB", (4, 4), "blue").save(outside / "b.png")
    (root / "link.png").symlink_to(outside / "b.png")
    inline = image_data_uri(outside / "b.png")
    assert _as_images([inline], 0, None)[0].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DataError, match="row 0, image 0: this model reads images sent in the request"):
        _as_images([str(root / "a.png")], 0, None)
    assert _as_images(["a.png", str(root / "a.png")], 0, str(root)) == [str((root / "a.png").resolve())] * 2
    for escape in ("../private/b.png", str(outside / "b.png"), "link.png"):
        with pytest.raises(DataError, match=f"image 1: {re.escape(escape)}: outside the image folder"):
            _as_images([inline, escape], 3, str(root))



# ---------------------------------------------------------------------------------------------------------------
# Minor items of issue 26
# ---------------------------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_checkpoint_is_one_named_error_and_loses_nothing(ws, finished, monkeypatch, capsys):
    """The disk fills while step 3's checkpoint is written (a file-size limit: the kernel refuses the writes, as on a
    full disk, and PyTorch's zip writer raises a RuntimeError naming no file). The earlier checkpoints are kept, the
    partial one removed, and the next run resumes."""
    import resource
    import signal

    from cheetah.errors import CheetahError
    from cheetah.train.state import TrainingState

    save = TrainingState.save

    def filling(self, engine, step, client_state):
        if step != 3:
            return save(self, engine, step, client_state)
        limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, limits[1]))
        try:
            return save(self, engine, step, client_state)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(TrainingState, "save", filling)
    state = ws / "disk-full" / "state"
    with pytest.raises(CheetahError, match=rf"^{state}: writing the checkpoint of step 3 failed \(.*inline_container"
                                           r".*MiB free there\): is the disk full\? .*earlier ones are kept") as e:
        _train(ws, "disk-full")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in state.iterdir() if p.name.startswith(("step-", ".tmp"))) == \
        ["step-000001", "step-000002"]
    assert not (ws / "disk-full" / "vpgc").exists()
    monkeypatch.setattr(TrainingState, "save", save)  # space freed: the run resumes and ends as one never stopped
    capsys.readouterr()
    _train(ws, "disk-full")
    assert f"resuming VPG-C training from {state}/step-000002" in capsys.readouterr().out
    _same_weights(ws, "reference", "disk-full")


def test_a_registered_model_name_with_a_quote_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """The registry looks a name up with an MLflow filter string (name='...'), which has no escape for a quote."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"register: model_name \"it's\": .* must be non-empty and hold none of "
                                          r"' \" / : \(found '\)"):
        load_params(None, ["register.model_name=it's"])
    for bad in ('a"b', "team/model", "models:x"):
        with pytest.raises(ConfigError, match="register: model_name"):
            load_params(None, [f"register.model_name={bad}"])
    assert load_params(None, ["register.model_name=Cheetah VPG-C v1.2"]).register.model_name == "Cheetah VPG-C v1.2"
    assert main(["--params", os.devnull, "--set", "register.model_name=it's", "registry", "history"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_name \"it's\"" in err
    assert list(tmp_path.iterdir()) == []  # no tracking store, no output


def test_an_output_below_a_regular_file_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """mkdir's FileExistsError / NotADirectoryError was a traceback naming neither the output nor the file."""
    from cheetah.evaluate.mme import results_line
    from cheetah.io import write_metrics

    monkeypatch.chdir(tmp_path)
    (tmp_path / "somefile.txt").write_text("mine")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "existence.txt").write_text(results_line("a", "q1", "Yes", "yes") +
                                                       results_line("a", "q2", "No", "no"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["world", "--out", "somefile.txt/sub", "--n", "2"],
                 ["world", "--out", "somefile.txt/sub/deeper", "--n", "2"],
                 ["score", "mme", "--results-dir", "results", "--out", "somefile.txt/scores.json"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        out = argv[argv.index("--out") + 1]
        assert err.count("\n") == 1 and f"{out}: cannot be written: somefile.txt is a file, not a folder" in err
    metrics = tmp_path / "somefile.txt" / "train.json"
    with pytest.raises(DataError, match=rf"{metrics}: cannot be written: {tmp_path}/somefile\.txt is a file"):
        write_metrics(metrics, {"loss": 1.0})
    assert (tmp_path / "somefile.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("feature_cache", [None, "memory"])
def test_an_error_in_a_dataloader_worker_is_the_one_line_it_was_raised_with(ws, tmp_path, feature_cache):
    """PyTorch re-raises a worker's exception with the worker's traceback in its message (17 lines on exit 2). Both
    loaders: the steps' batches (images decoded per step) and the vision-feature precompute."""
    data = shutil.copytree(ws / "syn", tmp_path / "syn")
    for image in (data / "images").iterdir():
        image.write_bytes(image.read_bytes()[:100])  # the header survives: the corpus check passes
    with pytest.raises(DataError) as e:
        _train(ws, f"worker-{feature_cache}", data=str(data), workers=1, feature_cache=feature_cache, steps=1)
    assert re.fullmatch(rf"{data}/images/\d+\.png: cannot decode image \(image file is truncated\)", str(e.value))
    assert not (ws / f"worker-{feature_cache}" / "vpgc").exists()


def test_mme_files_reached_through_a_link_out_of_its_folder_are_refused(tmp_path):
    """DEMON's images are held to their root; an MME copy could make the evaluation read (and a served report show)
    any file of the machine."""
    from cheetah.evaluate.mme import load_mme, write_mme_subtask

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    qas = [("Is there a cube? Please answer yes or no.", "Yes"), ("Is there a ball? Please answer yes or no.", "No")]
    root, outside = tmp_path / "mme", tmp_path / "private"
    folder = write_mme_subtask(root, "existence", [("0001.png", png, qas)])
    write_mme_subtask(outside, "count", [("0001.png", png, qas)])
    (folder / "0002.png").symlink_to(folder / "0001.png")  # a link inside the folder is fine
    (folder / "0002.txt").write_text((folder / "0001.txt").read_text())
    assert len(load_mme(root)["existence"]) == 4
    for link, target in (("0003.png", outside / "count" / "0001.png"), ("0003.txt", outside / "count" / "0001.txt")):
        other = {"0003.png": "0003.txt", "0003.txt": "0003.png"}[link]
        (folder / other).write_bytes((folder / ("0001" + Path(other).suffix)).read_bytes())
        (folder / link).symlink_to(target)
        with pytest.raises(DataError, match=rf"{folder}/{link} \(-> {target}\): 'existence/{link}' escapes its root "
                                            rf"folder {root}"):
            load_mme(root)
        (folder / link).unlink()
        (folder / other).unlink()
    (root / "count").symlink_to(outside / "count")  # a whole subtask folder
    with pytest.raises(DataError, match="'count/0001.png' escapes its root folder"):
        load_mme(root)
