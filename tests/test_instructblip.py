"""InstructBLIP backbones evaluate and predict like BLIP-2 ones: a tiny InstructBLIP built in code, saved with its
Q-Former tokenizer, through `cheetah evaluate` and `cheetah predict` (the Q-Former's first pass reads the
instruction, as InstructBLIP's does)."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_instructblip, make_tokenizer, sharpen_parameters

from cheetah.cli import main
from cheetah.config import Params
from cheetah.evaluate.generation import Generator, Request, answer_one, load_model
from cheetah.model.backbones import load_backbone, save_backbone
from cheetah.model.vpgc import VPGCModel
from cheetah.model.weights import save_vpgc


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny InstructBLIP backbone (LM weights made non-degenerate) and a non-zero VPG-C on it, plus the
    embedded benchmarks at its image size."""
    from cheetah.world import generate_scene, png_bytes, render

    root = tmp_path_factory.mktemp("instructblip")
    backbone = build_tiny_instructblip(make_tokenizer(), seed=0)
    sharpen_parameters([p for p in backbone.model.language_model.parameters() if p.dim() == 2], seed=1)
    save_backbone(backbone, root / "backbone")
    model = VPGCModel(load_backbone(root / "backbone"))
    sharpen_parameters(model.vpgc.parameters(), seed=2)
    save_vpgc(model, root / "vpgc")
    images = []
    for k in range(2):
        images.append(root / f"image{k}.png")
        images[-1].write_bytes(png_bytes(render(generate_scene(0, k, image_size=32)).image))
    (root / "params.yaml").write_text("world:\n  image_size: 32\n")
    assert main(["--params", str(root / "params.yaml"), "benchmarks", "--demon-dir", str(root / "demon"),
                 "--mme-dir", str(root / "mme"), "--demon-per-task", "1", "--mme-per-subtask", "2"]) == 0
    return root, images


def test_saved_backbone_keeps_its_qformer_tokenizer_and_the_first_pass_reads_the_instruction(saved):
    root, images = saved
    backbone = load_backbone(root / "backbone")
    assert backbone.is_instructblip and backbone.qformer_tokenizer is not None and backbone.template.name == "plain"
    model = load_model(root / "vpgc")
    seen = []
    hook = model.backbone.qformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("input_ids")), with_kwargs=True)
    try:
        a = Generator(model, max_new_tokens=6).answer([Request("<image> What is in the image?", [images[0]])])
    finally:
        hook.remove()
    first_pass, reextraction = seen[0], seen[1]  # at prefill: the first pass, then VPG-C's query-only re-run
    text = " ".join("<image> What is in the image?".replace("<image>", " ").split())
    assert first_pass[0].tolist() == backbone.qformer_tokenizer(text)["input_ids"] and reextraction is None
    assert isinstance(a[0], str)


def test_cli_evaluate_on_an_instructblip_backbone(saved, tmp_path, monkeypatch, capsys):
    root, _ = saved
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    sets = {"evaluate.demon_dir": str(root / "demon"), "evaluate.mme_dir": str(root / "mme"),
            "evaluate.out": str(tmp_path / "eval"), "evaluate.metrics": str(tmp_path / "eval.json"),
            "evaluate.max_new_tokens": 4, "evaluate.device": "cpu", "model.backbone_dir": str(root / "backbone")}
    argv = ["--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for k, v in sets.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert main(argv + ["evaluate", "--no-track", "--model", f"base={root / 'backbone'}",
                        "--model", f"vpgc={root / 'vpgc'}"]) == 0
    capsys.readouterr()
    for name in ("base", "vpgc"):
        demon = json.loads((tmp_path / "eval" / name / "demon_scores.json").read_text())
        assert len(demon["tasks"]) == 7 and "average" in demon
        assert json.loads((tmp_path / "eval" / name / "mme_scores.json").read_text())["perception"] is not None
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["model"] == "vpgc" and set(metrics["baselines"]) == {"base"}


def test_cli_predict_with_an_instructblip_model(saved, tmp_path, monkeypatch, capsys):
    from cheetah.registry import register, with_image_placeholders

    root, images = saved
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    from cheetah.model.weights import read_card

    sha = read_card(root / "vpgc")["sha256"]  # the metrics name the weights they measured
    (tmp_path / "eval.json").write_text(json.dumps({"demon": {"average": 1.0}, "vpgc_sha256": sha}))
    receipt = register(Params(), tmp_path / "eval.json", root / "vpgc", out=tmp_path / "register.json", root=tmp_path)
    instruction = "What is different between the images?"
    assert main(["predict", "--model", receipt["model_uri"], "--image", str(images[0]), "--image", str(images[1]),
                 "--instruction", instruction, "--max-new-tokens", "6"]) == 0
    answer = capsys.readouterr().out.strip()
    expected = answer_one(load_model(root / "vpgc"), with_image_placeholders(instruction, 2), images,
                          max_new_tokens=6)
    assert answer == expected and answer
