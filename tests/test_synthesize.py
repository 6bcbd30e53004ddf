"""Synthesis on the embedded world: determinism, parallelism, edits, attention-guided selection, quarantine."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cheetah.config import ConfigError, SynthesizeConfig
from cheetah.io import DataError
from cheetah.synthesize import (
    AttentionSelector,
    Edit,
    PixelFilter,
    Synthesizer,
    build_backends,
    ShardFailed,
    load_source,
    synthesize,
)
from cheetah.world import (
    POSITION_PHRASES,
    describe,
    generate_scene,
    read_scenes,
    render,
    where,
)


def _cfg(source: Path, out: Path, **kw) -> SynthesizeConfig:
    return SynthesizeConfig(source=str(source), out=str(out), **{"n": 24, "captions": 8, **kw})


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Determinism and parallelism
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_workers_do_not_change_output(source, backbone, tmp_path):
    one = synthesize(_cfg(source, tmp_path / "one"), backbone)
    again = synthesize(_cfg(source, tmp_path / "again"), backbone)
    four = synthesize(_cfg(source, tmp_path / "four", shard_size=5), backbone)  # other shards, same bytes
    assert one == again == four
    reference = _tree(tmp_path / "one")
    assert reference == _tree(tmp_path / "again") == _tree(tmp_path / "four")
    assert {"synthetic.jsonl", "captions.jsonl", "quarantine.jsonl", "stats.json"} <= set(reference)
    assert one["pairs"] == 24 and one["captions"] == 8
    assert one["edit_types"] == {"modify": 6, "swap": 6, "delete": 6, "add": 6}
    other = synthesize(_cfg(source, tmp_path / "other", seed=1), backbone)
    assert other["pairs"] == 24
    assert _tree(tmp_path / "other")["synthetic.jsonl"] != reference["synthetic.jsonl"]


def test_record_format(source, tmp_path):
    synthesize(_cfg(source, tmp_path / "out", selector="random"))
    out = tmp_path / "out"
    pairs, captions = _rows(out / "synthetic.jsonl"), _rows(out / "captions.jsonl")
    for r in pairs:
        assert list(r) == ["id", "images", "instruction", "response", "edit", "source_id"]
        assert list(r["edit"]) == ["type", "object", "before", "after", "region"]
        assert r["instruction"].count("<image>") == 2 and len(r["images"]) == 2
        assert all((out / p).is_file() for p in r["images"])
    source_captions = {row["id"]: row["caption"] for row in _rows(source / "captions.jsonl")}
    for c in captions:
        assert list(c) == ["id", "images", "instruction", "response"]
        assert c["instruction"].count("<image>") == 1 and len(c["images"]) == 1
        original = c["images"][0]
        index = int(original.split("-")[1].split(".")[0])
        assert (out / original).read_bytes() == (source / f"images/{index:06d}.png").read_bytes()
        assert c["response"] == source_captions[f"{index:06d}"]


# ---------------------------------------------------------------------------------------------------------------
# Edits: the pixels change only in the region, and the sentence says what changed
# ---------------------------------------------------------------------------------------------------------------


def test_each_edit_type_is_confined_to_its_region_and_described(source, tmp_path):
    cfg = _cfg(source, tmp_path / "out", selector="random", n=40)
    synthesize(cfg)
    out = tmp_path / "out"
    scenes = read_scenes(source / "scenes.jsonl")
    seen = set()
    for r in _rows(out / "synthetic.jsonl"):
        edit, kind = r["edit"], r["edit"]["type"]
        seen.add(kind)
        a = np.asarray(Image.open(out / r["images"][0]).convert("RGB"))
        b = np.asarray(Image.open(out / r["images"][1]).convert("RGB"))
        changed = np.any(a != b, axis=-1)
        x0, y0, x1, y1 = edit["region"]
        inside = changed[y0:y1, x0:x1]
        assert changed.sum() == inside.sum(), f"{r['id']}: pixels changed outside the region"
        assert inside.mean() >= cfg.min_changed_fraction

        scene = scenes[r["source_id"]]
        sentence = r["response"]
        if kind == "add":
            after = edit["after"]
            assert edit["before"] is None
            assert after["position"] in scene.empty_cells(), "add only on background"
            assert sentence == f"In the second image, there is a new {where(after)}."
            new_pixels = {tuple(p) for p in b[y0:y1, x0:x1][inside]}
            assert render(scene).image.getpixel((x0, y0)) != () and new_pixels
            continue
        target = next(o for o in scene.objects if o.cell == edit["before"]["position"])
        assert edit["before"] == target.attrs() and edit["object"] == describe(target.attrs())
        assert sentence.startswith(f"In the second image, the {where(target.attrs())} ")
        # Re-create the edited scene from the structured description alone: it must be the edited image.
        if kind == "delete":
            assert edit["after"] is None and sentence.endswith(" is gone.")
            expected = dataclasses.replace(scene, objects=tuple(o for o in scene.objects if o is not target))
        else:
            after = edit["after"]
            changed_keys = {k for k in ("color", "texture", "shape") if after[k] != edit["before"][k]}
            if kind == "modify":
                assert len(changed_keys) == 1
                key = changed_keys.pop()
                value = after[key]
                assert sentence.endswith(f" is now {value}." if key != "shape" else f" is now a {value}.")
            else:
                assert {"color", "shape"} <= changed_keys
                assert sentence.endswith(f" is replaced by a {describe(after)}.")
            new = dataclasses.replace(target, color=after["color"], texture=after["texture"], shape=after["shape"])
            expected = dataclasses.replace(
                scene, objects=tuple(new if o is target else o for o in scene.objects))
        assert np.array_equal(np.asarray(render(expected).image), b), f"{r['id']}: edit description != pixels"
    assert seen == {"modify", "swap", "delete", "add"}


def test_pixel_filter_rejects_invisible_and_leaking_edits():
    scene = generate_scene(0, 1, 64)
    before = render(scene).image
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 10:20] = True
    edit = Edit("modify", "x", {}, {}, mask, "s", "p")
    f = PixelFilter(0.1)
    assert f.check(before, before, edit).code == "edit_not_visible"
    leaked = np.asarray(before).copy()
    leaked[10:20, 10:20] = 0
    leaked[40, 40] = 255 - leaked[40, 40]
    assert f.check(before, Image.fromarray(leaked), edit).code == "changed_outside_region"
    leaked[40, 40] = np.asarray(before)[40, 40]
    assert f.check(before, Image.fromarray(leaked), edit) is None


# ---------------------------------------------------------------------------------------------------------------
# Target selection follows the model
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def steer(model, patches: np.ndarray):
    """Make every Q-Former cross-attention head put (almost) all its weight on the given ViT patches.

    Queries become all-ones and keys `10 * ones` on the chosen patches, zero elsewhere (CLS included), so the
    softmax concentrates on those patches in every layer, head and query."""
    keep = np.concatenate([[False], patches.reshape(-1)])  # index 0 is the CLS token

    def query_hook(module, args, output):
        return torch.ones_like(output)

    def key_hook(module, args, output):
        steered = torch.zeros_like(output)
        steered[:, torch.from_numpy(keep)] = 10.0
        return steered

    import torch

    handles = []
    for name, module in model.qformer.named_modules():
        if name.endswith("crossattention.attention"):
            handles += [module.query.register_forward_hook(query_hook), module.key.register_forward_hook(key_hook)]
    assert handles, "no cross-attention layers found"
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _patches(mask: np.ndarray, grid: int) -> np.ndarray:
    """Which cells of a grid x grid patch layout `mask` touches."""
    side = mask.shape[0] // grid  # the patches cover grid * side pixels; the rest (if any) no patch sees
    return mask[:grid * side, :grid * side].reshape(grid, side, grid, side).any(axis=(1, 3))


def test_attention_selection_follows_the_model(backbone):
    selector = AttentionSelector(backbone.model, backbone.image_processor)
    grid = backbone.model.config.vision_config.image_size // backbone.model.config.vision_config.patch_size
    rng = np.random.default_rng(0)
    isolated_checked = 0
    for index in range(3):
        scene = generate_scene(11, index, 64)
        rendered = render(scene)
        names = [o.name for o in scene.objects]
        masks = [rendered.masks[n] for n in names]
        plain = selector.scores(rendered.image, masks, rng)
        assert np.isfinite(plain).all()
        for k, name in enumerate(names):
            # All attention on object k: k becomes the most attended, so it is never the target.
            with steer(backbone.model, _patches(masks[k], grid)):
                scores = selector.scores(rendered.image, masks, rng)
            assert int(np.argmin(scores)) != k and int(np.argmax(scores)) == k, name
            # All attention on every patch except object k's: k is the target, as long as no other object
            # shares one of k's patches (it would then lose attention too).
            if any((_patches(m, grid) & _patches(masks[k], grid)).any() for j, m in enumerate(masks) if j != k):
                continue
            with steer(backbone.model, ~_patches(masks[k], grid)):
                scores = selector.scores(rendered.image, masks, rng)
            assert int(np.argmin(scores)) == k, name
            isolated_checked += 1
    assert isolated_checked >= 3


def test_instructblip_backbones_work_too():
    import torch
    from transformers import BlipImageProcessorPil, InstructBlipConfig, InstructBlipForConditionalGeneration

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = InstructBlipConfig(
        vision_config={**small, "image_size": 64, "patch_size": 8},
        qformer_config={**small, "encoder_hidden_size": 32, "vocab_size": 100, "cross_attention_frequency": 1},
        text_config=dict(model_type="opt", vocab_size=120, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                         eos_token_id=2),
        num_query_tokens=4, image_token_index=110)
    model = InstructBlipForConditionalGeneration(config)
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    selector = AttentionSelector(model, BlipImageProcessorPil(size={"height": 64, "width": 64}))
    rendered = render(generate_scene(11, 0, 64))
    masks = list(rendered.masks.values())
    with steer(model, _patches(masks[0], 8)):
        scores = selector.scores(rendered.image, masks, np.random.default_rng(0))
    assert int(np.argmax(scores)) == 0 and int(np.argmin(scores)) != 0


def test_pipeline_edits_the_least_attended_object(source, backbone):
    cfg = _cfg(source, "unused", edit_types=["modify"], n=6)
    items, _, _ = load_source(cfg.source, need_scenes=True)
    synth = Synthesizer(cfg, build_backends(cfg, backbone), items)
    vision = backbone.model.config.vision_config
    grid = vision.image_size // vision.patch_size
    checked = 0
    for i in range(4):
        item = synth.draws.pair_item(i)
        rendered = render(item.scene)
        focus = item.scene.objects[0]
        with steer(backbone.model, _patches(rendered.masks[focus.name], grid)):
            chosen = synth.make_pair(i).record["edit"]["before"]["position"]
        assert chosen != focus.cell
        others = [o for o in item.scene.objects if o is not focus]
        ignored = others[-1]
        with steer(backbone.model, ~_patches(rendered.masks[ignored.name], grid)):
            chosen = synth.make_pair(i).record["edit"]["before"]["position"]
        sharing = [o for o in others if o is not ignored and (_patches(rendered.masks[o.name], grid)
                   & _patches(rendered.masks[ignored.name], grid)).any()]
        if not sharing:
            assert chosen == ignored.cell
            checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------------------------
# Rejects are quarantined and counted; failures never replace good output
# ---------------------------------------------------------------------------------------------------------------


def test_filter_rejects_are_quarantined_and_counted(source, tmp_path):
    cfg = _cfg(source, tmp_path / "out", selector="random", min_changed_fraction=0.9, max_attempts=2)
    stats = synthesize(cfg)
    quarantine = _rows(tmp_path / "out" / "quarantine.jsonl")
    assert stats["quarantined"] == len(quarantine) > 0
    assert stats["rejects"]["edit_not_visible"] == sum(q["reason"] == "edit_not_visible" for q in quarantine)
    assert stats["pairs"] + stats["unfilled_pairs"] == cfg.n
    assert stats["unfilled_pairs"] == sum(q["reason"] == "no_valid_edit" for q in quarantine)
    for q in quarantine:
        if q["reason"] == "edit_not_visible":
            assert q["stage"] == "filter" and q["id"].startswith("syn-") and q["edit"]["type"] == q["edit_type"]
            assert "below min_changed_fraction=0.9" in q["detail"]
    kept = {r["id"] for r in _rows(tmp_path / "out" / "synthetic.jsonl")}
    assert not kept & {q["id"] for q in quarantine if q["reason"] == "no_valid_edit"}


def test_bad_source_images_are_quarantined(source, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    lines = (src / "captions.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "id": json.loads(lines[3])["id"]})  # (the later one is refused)
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "../outside.png"})
    lines[2] = json.dumps({**json.loads(lines[2]), "image": "images/missing.png"})
    (src / "images" / "000004.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
    stats = synthesize(_cfg(src, tmp_path / "out", selector="random", n=8, captions=4))
    reasons = {(q["line"], q["reason"]) for q in _rows(tmp_path / "out" / "quarantine.jsonl")
               if q["stage"] == "source"}
    assert reasons == {(2, "path_escapes_root"), (3, "missing_image"), (4, "duplicate_id"),
                       (5, "undecodable_image")}
    assert stats["source_records"] == 30 and stats["source_usable"] == 26 and stats["pairs"] == 8


@pytest.mark.parametrize("line, problem", [
    (b"{broken", "captions.jsonl:3: malformed JSON"),
    (None, "captions.jsonl:3 (id '000002'): field caption must be a non-empty string, got ''"),
])
def test_records_not_in_the_format_stop_synthesis(source, tmp_path, line, problem):
    """The source format (cheetah.formats.source_problem) is checked as validation checks it: a record that is not
    in it stops the stage with the record named (exit 2 in the CLI), as it stops base."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    lines = (src / "captions.jsonl").read_bytes().split(b"\n")
    lines[2] = line if line is not None else json.dumps({**json.loads(lines[2]), "caption": ""}).encode()
    (src / "captions.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=re.escape(problem)):
        synthesize(_cfg(src, tmp_path / "out", selector="random", n=4, captions=2))
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_previous_output(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    synthesize(_cfg(source, out, selector="random", n=4, captions=2))
    before = _tree(out)
    import cheetah.synthesize.pipeline as pipeline

    def broken(image):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(pipeline, "png_bytes", broken)
    with pytest.raises(ShardFailed, match="failed at pair 0 on source record id .*RuntimeError: encoder crashed"):
        synthesize(_cfg(source, out, selector="random", n=6, captions=2))
    assert _tree(out) == before
    # The failed shard left nothing behind; the work area (kept for the rerun) holds no half-written shard.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.shards", "out"]
    assert sorted(p.name for p in (tmp_path / ".out.shards").iterdir()) == [".cheetah-output.json"]


def test_configuration_errors_are_clear(source, tmp_path):
    with pytest.raises(ConfigError, match="needs the backbone"):
        synthesize(_cfg(source, tmp_path / "x"))
    with pytest.raises(ConfigError, match="cannot load the backbone.*no-backbone"):
        synthesize(_cfg(source, tmp_path / "x"), str(tmp_path / "no-backbone"))
    with pytest.raises(ValueError, match="apply: world .* needs masks: world"):
        SynthesizeConfig(masks="sam", sam_dir="x", apply="world")
    with pytest.raises(ValueError, match="inpaint_dir must be set"):
        SynthesizeConfig(masks="sam", sam_dir="x", apply="inpaint")
    with pytest.raises(DataError, match="captions.jsonl: file not found"):
        load_source(tmp_path, need_scenes=False)
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(DataError, match="scenes.jsonl: file not found; masks: world needs"):
        load_source(tmp_path, need_scenes=True)
    (tmp_path / "scenes.jsonl").write_text("")
    with pytest.raises(DataError, match="none of 0 source records is usable"):
        synthesize(_cfg(tmp_path, tmp_path / "x", selector="random", masks="world"))


def test_cli_synthesize(source, tmp_path, capsys):
    from cheetah.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("")  # defaults, whatever the repository's params.yaml says
    code = main(["--params", str(params), "synthesize", "--source", str(source), "--out", str(tmp_path / "syn"),
                 "--n", "4",
                 "--captions", "2", "--selector", "random", "--shard-size", "3"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pairs"] == 4 and (tmp_path / "syn" / "synthetic.jsonl").is_file()
    assert main(["--params", str(params), "synthesize", "--source", str(source), "--out", str(tmp_path / "syn2"),
                 "--n", "2", "--selector", "attention", "--backbone", str(tmp_path / "missing")]) == 2
    assert "cannot load the backbone" in capsys.readouterr().err
    assert POSITION_PHRASES["center"] == "in the center"
