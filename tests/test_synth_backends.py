"""The model-based backends for real images (SAM, CLIP, diffusion inpainting), with tiny random models.

Each model is built from a config in code, saved to a local directory, and loaded back the way a user's real
checkpoint is: from that directory only. The tests check the plumbing and the guarantees our code adds (masks of
the right shape, blending that keeps every pixel outside the mask, filters that decide by their threshold), and
that the whole real-image pipeline runs end to end and passes validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cheetah.config import ConfigError, SynthesizeConfig, ValidateConfig
from cheetah.synthesize import (
    Clip,
    ClipFilter,
    Edit,
    InpaintApplier,
    LabelEditor,
    Region,
    SamMasks,
    SourceItem,
    synthesize,
)
from cheetah.world import generate_scene, render, train_tokenizer

LABELS = ["dog", "cat", "ball", "cup"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer(300, extra_texts=[f"a photo of a {x}" for x in LABELS])
    t.model_max_length = 16
    return t


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8, output_channels=16, window_size=0, global_attn_indexes=[1], mlp_dim=64,
                  num_pos_feats=8)
    config = SamConfig(vision_config=vision,
                       prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
                       mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                                iou_head_hidden_dim=16))
    path = tmp_path_factory.mktemp("sam")
    SamModel(config).save_pretrained(path)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                   pad_size={"height": 64, "width": 64})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tok) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory, tok) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                          scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("inpaint")
    pipe.save_pretrained(path)
    return path


def _image(index: int = 0) -> Image.Image:
    return render(generate_scene(0, index, 32)).image


def test_model_backends_load_only_from_local_directories(tmp_path):
    for build in (lambda: SamMasks(str(tmp_path / "nope")), lambda: Clip(str(tmp_path / "nope")),
                  lambda: InpaintApplier(str(tmp_path / "nope"))):
        with pytest.raises(ConfigError, match="not a local directory"):
            build()
    with pytest.raises(ConfigError, match="sam_dir is not set"):
        SamMasks(None)


def test_sam_masks_from_a_point_grid(sam_dir):
    sam = SamMasks(str(sam_dir), points=4, min_score=0.0)
    image = _image()
    found = sam.masks(image)
    assert found, "a 4x4 grid of prompts finds at least one mask"
    for mask, score in found:
        assert mask.shape == (32, 32) and mask.dtype == bool and 0.002 <= mask.mean() <= 0.5
    for (a, _), (b, _) in zip(found, found[1:]):
        assert (a & b).sum() / (a | b).sum() <= 0.7, "near-duplicate masks are merged"
    assert SamMasks(str(sam_dir), points=4, min_score=1.01).masks(image) == []  # the IoU threshold applies

    # Background areas are the grid cells SAM left (almost) empty.
    fixed = np.zeros((32, 32), dtype=bool)
    fixed[:11, :11] = True  # covers the top left cell
    sam.masks = lambda image: [(fixed, 0.9)]
    objects, background = sam.regions(SourceItem(0, "a", "a.png", Path("a.png"), "c"), image)
    assert [(o.name, o.attrs) for o in objects] == [("m0", {"label": "object", "position": "top left"})]
    assert [b.attrs["position"] for b in background] == ["top", "top right", "left", "center", "right",
                                                         "bottom left", "bottom", "bottom right"]
    assert all(not (b.mask & fixed).any() for b in background)


def test_clip_labels_and_filter(clip_dir):
    clip = Clip(str(clip_dir))
    image = _image()
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:14, 4:14] = True
    sims = clip.similarity([image, image.crop((0, 0, 16, 16))], ["a dog", "a red cup", "x"])
    assert sims.shape == (2, 3) and np.all(np.abs(sims) <= 1 + 1e-5)
    assert clip.label(image, mask, LABELS) in LABELS
    edit = Edit("modify", "dog", {"label": "dog"}, {"label": "dog", "color": "red"}, mask, "s", "a red dog")
    assert ClipFilter(clip, -1.0).check(image, image, edit) is None
    rejected = ClipFilter(clip, 0.999).check(image, image, edit)
    assert rejected.code == "clip_low_similarity" and "'a red dog'" in rejected.detail


def test_inpainting_changes_only_the_mask(inpaint_dir):
    applier = InpaintApplier(str(inpaint_dir), steps=1)
    image = _image()
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 6:18] = True
    edit = Edit("modify", "dog", None, None, mask, "s", "a blue dog")
    out = applier.apply(image, None, edit, np.random.default_rng(0))
    a, b = np.asarray(image), np.asarray(out)
    assert out.size == image.size
    assert np.array_equal(a[~mask], b[~mask]), "every pixel outside the mask is the original"
    assert np.any(a[mask] != b[mask])
    again = applier.apply(image, None, edit, np.random.default_rng(0))
    assert np.array_equal(np.asarray(again), b), "seeded from the sample's generator"


def test_label_editor_sentences():
    mask = np.zeros((32, 32), dtype=bool)
    mask[2:8, 2:8] = True
    target = Region("m0", mask, {"label": "dog", "position": "top left"})
    editor = LabelEditor(LABELS, colors=["blue"])
    rng = np.random.default_rng(0)
    modify = editor.propose(None, None, target, "modify", rng)
    assert modify.sentence == "In the second image, the dog at the top left is now blue."
    assert modify.prompt == "a blue dog" and modify.mask.sum() > mask.sum(), "grown to repaint the outline"
    swap = editor.propose(None, None, target, "swap", rng)
    assert swap.after["label"] in set(LABELS) - {"dog"} and "is replaced by" in swap.sentence
    assert editor.propose(None, None, target, "delete", rng).sentence.endswith("the dog at the top left is gone.")
    cell = Region("cell:center", mask, {"position": "center"})
    add = editor.propose(None, None, cell, "add", rng)
    assert add.before is None and add.sentence.startswith("In the second image, there is a new blue ")
    assert add.describe()["region"] == [2, 2, 8, 8]


def test_real_image_pipeline_end_to_end(tmp_path, sam_dir, clip_dir, inpaint_dir, tok):
    from cheetah.model.backbones import build_backbone
    from cheetah.validate import run_suite

    # A "real" corpus: just images and captions, no scene graphs.
    src = tmp_path / "real"
    (src / "photos").mkdir(parents=True)
    rows = []
    for i in range(3):
        _image(i).save(src / "photos" / f"p{i}.png")
        rows.append({"id": f"p{i}", "image": f"photos/p{i}.png", "caption": f"photo number {i}"})
    (src / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SynthesizeConfig(
        source=str(src), out=str(tmp_path / "out"), n=3, captions=2, edit_types=["modify", "swap", "delete"],
        masks="sam", sam_dir=str(sam_dir), sam_points=4, sam_min_score=0.0, apply="inpaint",
        inpaint_dir=str(inpaint_dir), inpaint_steps=1, filters=["pixel", "clip"], clip_dir=str(clip_dir),
        clip_min_similarity=-1.0, labels=LABELS)
    backbone = build_backbone("tiny", tokenizer=tok, image_size=32, seed=0)
    stats = synthesize(cfg, backbone)
    assert stats["pairs"] == 3, stats
    out = tmp_path / "out"
    for r in (json.loads(line) for line in (out / "synthetic.jsonl").read_text().splitlines()):
        a = np.asarray(Image.open(out / r["images"][0]).convert("RGB"))
        b = np.asarray(Image.open(out / r["images"][1]).convert("RGB"))
        x0, y0, x1, y1 = r["edit"]["region"]
        outside = np.ones(a.shape[:2], dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(a[outside], b[outside])
        assert r["edit"]["before"]["label"] in LABELS and r["edit"]["object"] in LABELS
    result = run_suite("synthetic", out, ValidateConfig(docs_dir=str(tmp_path / "docs")), docs=False)
    assert result.success, result.summary()
