"""The embedded world: scenes, rendering, masks, language, tokenizer, and the source corpus on disk."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from cheetah.config import ConfigError, WorldConfig, load_params
from cheetah.io import DataError
from cheetah.world import (
    CELLS,
    EDIT_TYPES,
    PALETTE,
    PERCEPTION_KINDS,
    POSITION_PHRASES,
    SPECIAL_TOKENS,
    YES_NO_KINDS,
    Scene,
    caption,
    corpus_scene,
    describe,
    difference_sentence,
    existence_questions,
    generate_scene,
    heldout_scenes,
    language_corpus,
    png_bytes,
    questions,
    read_scenes,
    render,
    train_tokenizer,
    where,
    write_corpus,
    yes_no_pair,
)
from cheetah.world.language import NUMBER_WORDS, TEMPLATE_MARKERS
from cheetah.world.render import shade
from cheetah.world.scene import cell_bounds


def test_scenes_are_deterministic_and_independent_of_image_size():
    a, b = generate_scene(7, 3, 64), generate_scene(7, 3, 64)
    assert a == b
    assert generate_scene(7, 4, 64) != a
    assert generate_scene(8, 3, 64) != a
    # Content comes from its own stream: only the pixel boxes change with the image size.
    big = generate_scene(7, 3, 128)
    strip = lambda s: [dataclasses.replace(o, box=(0, 0, 0, 0)) for o in s.objects]  # noqa: E731
    assert strip(big) == strip(a) and big.background_color == a.background_color


def test_scene_structure_over_many_scenes():
    for i in range(150):
        s = generate_scene(1, i, 64)
        assert 1 <= len(s.primary) <= 2 and 3 <= len(s.details) <= 6
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells), "one object per cell"
        assert s.empty_cells(), "add needs an empty background cell"
        for o in s.objects:
            assert o.color != s.background_color
            x0, y0, x1, y1 = o.box
            cx0, cy0, cx1, cy1 = cell_bounds(o.cell, 64)
            assert cx0 <= x0 < x1 <= cx1 + 1e-9 and cy0 <= y0 < y1 <= cy1 + 1e-9
        large = [o.box[2] - o.box[0] for o in s.primary]
        small = [o.box[2] - o.box[0] for o in s.details]
        assert min(large) > max(small)


def test_render_masks_match_pixels():
    scene = generate_scene(2, 5, 64)
    out = render(scene)
    pixels = np.asarray(out.image)
    assert out.image.mode == "RGB" and out.image.size == (64, 64)
    union = np.zeros((64, 64), dtype=bool)
    for o in scene.objects:
        m = out.masks[o.name]
        assert m.shape == (64, 64) and m.dtype == bool and m.any()
        assert not (m & union).any(), "masks are disjoint"
        union |= m
        x0, y0, x1, y1 = o.box
        assert not m[:y0].any() and not m[y1:].any() and not m[:, :x0].any() and not m[:, x1:].any()
        allowed = {PALETTE[o.color], shade(PALETTE[o.color], 0.45)}
        assert {tuple(p) for p in pixels[m]} <= allowed
    bg = PALETTE[scene.background_color]
    assert {tuple(p) for p in pixels[~union]} <= {bg, shade(bg, 0.25)}


def test_png_bytes_are_deterministic_and_lossless():
    scene = generate_scene(3, 0, 64)
    data = png_bytes(render(scene).image)
    assert data == png_bytes(render(generate_scene(3, 0, 64)).image)
    assert b"tIME" not in data and b"tEXt" not in data  # no timestamps or text metadata
    import io
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decoded, np.asarray(render(scene).image))


def test_scene_graph_round_trip_and_errors():
    scene = generate_scene(4, 2, 64)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    bad = scene.to_dict()
    bad["objects"][1]["color"] = "mauve"
    with pytest.raises(DataError, match=r"scenes.jsonl:9.*objects\[1\]\.color.*'mauve'"):
        Scene.from_dict(bad, where="scenes.jsonl:9")
    bad = scene.to_dict()
    bad["objects"][0]["box"] = [0, 0, 100, 100]
    with pytest.raises(DataError, match=r"objects\[0\]\.box.*outside"):
        Scene.from_dict(bad)


def test_caption_describes_primary_objects_and_background_only():
    for i in range(40):
        scene = generate_scene(5, i, 64)
        text = caption(scene, template=i)
        for o in scene.primary:
            assert describe(o.attrs()) in text
        assert scene.background_color in text and "background" in text
        assert "small" not in text, "details are never captioned"
        primary_words = {w for o in scene.primary for w in describe(o.attrs()).split()}
        for o in scene.details:
            if o.shape not in primary_words:
                assert o.shape not in text


def test_questions_have_true_answers():
    rng = np.random.default_rng(0)
    for i in range(30):
        scene = generate_scene(6, i, 64)
        asked = {qa.question: qa.answer for qa in questions(scene)}
        for o in scene.objects:
            at = POSITION_PHRASES[o.cell]
            assert asked[f"What color is the {o.size} {o.shape} {at}?"] == o.color
            assert asked[f"What shape is the {o.size} {o.color} object {at}?"] == o.shape
            assert asked[f"What pattern does the {o.size} {o.color} {o.shape} {at} have?"] == o.texture
            if f"Where is the {o.size} {o.color} {o.shape}?" in asked:
                assert asked[f"Where is the {o.size} {o.color} {o.shape}?"] == o.cell
        n_small = sum(o.size == "small" for o in scene.objects)
        assert asked["How many small objects are there?"] == NUMBER_WORDS[n_small]
        assert asked["What color is the background?"] == scene.background_color
        for qa in existence_questions(scene, rng):
            _, size, shape = qa.question.rstrip("?").split()[-3:]
            present = any(o.size == size and o.shape == shape for o in scene.objects)
            assert qa.answer == ("yes" if present else "no")
        for kind in YES_NO_KINDS:
            yes, no = yes_no_pair(scene, kind, rng)
            assert yes.endswith("Please answer yes or no.") and no.endswith("Please answer yes or no.")
            assert yes != no
            if kind == "existence":
                def present(q):
                    _, size, color, shape = q.split(" in the image")[0].split()[-4:]
                    return any((o.size, o.color, o.shape) == (size, color, shape) for o in scene.objects)
                assert present(yes) and not present(no)


_AT = "|".join(POSITION_PHRASES.values())


def _yes_no_truth(scene: Scene, kind: str, question: str) -> bool:
    """Whether a yes/no question about `scene` is true, read back from its words (independently of how it was made)."""
    import re

    cell = {v: k for k, v in POSITION_PHRASES.items()}
    objs = scene.objects
    q = question.removesuffix(" Please answer yes or no.")
    if kind == "existence":
        size, color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) (\w+) in the image\?", q).groups()
        return any((o.size, o.color, o.shape) == (size, color, shape) for o in objs)
    if kind == "count":
        n, size = re.fullmatch(r"(?:Is|Are) there (\w+) (\w+) objects? in the image\?", q).groups()
        return sum(o.size == size for o in objs) == NUMBER_WORDS.index(n)
    if kind == "position":
        size, color, shape, at = re.fullmatch(rf"Is the (\w+) (\w+) (\w+) ({_AT}) of the image\?", q).groups()
        return any((o.size, o.color, o.shape, o.cell) == (size, color, shape, cell[at]) for o in objs)
    if kind == "color":
        size, shape, at, color = re.fullmatch(rf"Is the (\w+) (\w+) ({_AT}) (\w+)\?", q).groups()
        target = next(o for o in objs if (o.size, o.shape, o.cell) == (size, shape, cell[at]))
        return target.color == color
    if kind == "shape":
        size, color, at, shape = re.fullmatch(rf"Is the (\w+) (\w+) object ({_AT}) an? (\w+)\?", q).groups()
        target = next(o for o in objs if (o.size, o.color, o.cell) == (size, color, cell[at]))
        return target.shape == shape
    size, color, shape, at, texture = re.fullmatch(rf"Is the (\w+) (\w+) (\w+) ({_AT}) (\w+)\?", q).groups()
    target = next(o for o in objs if (o.size, o.color, o.shape, o.cell) == (size, color, shape, cell[at]))
    return target.texture == texture


@pytest.mark.parametrize("size", ["large", "small", None])
def test_yes_no_pairs_are_true_and_about_the_size_asked(size):
    rng = np.random.default_rng(3)
    for i in range(40):
        scene = generate_scene(8, i, 64)
        for kind in (*YES_NO_KINDS, *PERCEPTION_KINDS):
            yes, no = yes_no_pair(scene, kind, rng, size=size)
            assert _yes_no_truth(scene, kind, yes) and not _yes_no_truth(scene, kind, no), (kind, yes, no)
            if size is not None:
                assert f" {size} " in yes and f" {size} " in no
            if kind == "count" and size == "large":  # the wrong number is one a scene could hold: no prior helps
                assert {yes.split()[2], no.split()[2]} == {"one", "two"}
    with pytest.raises(ValueError, match="unknown yes/no kind"):
        yes_no_pair(scene, "smell", rng)
    with pytest.raises(ValueError, match="size must be"):
        yes_no_pair(scene, "color", rng, size="huge")


def test_difference_sentences_name_object_and_attributes():
    star = {"size": "small", "color": "red", "texture": "striped", "shape": "star", "position": "top left"}
    assert difference_sentence("modify", star, {**star, "color": "blue"}) == \
        "In the second image, the small red striped star at the top left is now blue."
    assert difference_sentence("modify", star, {**star, "shape": "circle"}).endswith("is now a circle.")
    assert difference_sentence("swap", star, {**star, "shape": "hexagon", "color": "orange", "texture": "plain"}) \
        == "In the second image, the small red striped star at the top left is replaced by a small orange hexagon."
    assert difference_sentence("delete", star, None) == \
        "In the second image, the small red striped star at the top left is gone."
    assert difference_sentence("add", None, {**star, "position": "center"}) == \
        "In the second image, there is a new small red striped star in the center."
    assert where({"label": "dog", "position": "right"}) == "dog on the right"
    with pytest.raises(ValueError, match="exactly one attribute"):
        difference_sentence("modify", star, {**star, "color": "blue", "shape": "circle"})
    with pytest.raises(ValueError, match="unknown edit type"):
        difference_sentence("recolor", star, star)
    assert set(EDIT_TYPES) == {"modify", "swap", "delete", "add"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(512)


def test_tokenizer_special_tokens_and_round_trip(tok, tmp_path):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert "<image>" in tok.all_special_tokens
    text = "Image 1: <image> Image 2: <image> Describe the difference between the images."
    ids = tok(text)["input_ids"]
    assert ids.count(4) == 2, "<image> is one token per image"
    assert tok.decode(ids) == text
    # The world's words are whole tokens: the tokenizer really learned the language.
    for word in ("red", "striped", "star", "background", "small", "large"):
        assert len(tok.tokenize(" " + word)) == 1, word
    # The chat templates' markers are one token each, wherever they stand; the text around them is unchanged.
    chat = "###Human: <Img><image></Img> Is it red? ###Assistant: Yes###"
    assert tok.tokenize(chat)[:5] == ["###Human:", "Ġ", "<Img>", "<image>", "</Img>"]
    assert tok.tokenize(chat)[-6:-3] == ["Ġ", "###Assistant:", "Ġ"] and tok.decode(tok(chat)["input_ids"]) == chat
    assert len(tok) == 512 + len(TEMPLATE_MARKERS)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(text)["input_ids"] == ids


def test_tokenizer_covers_the_corpus_and_is_deterministic(tok):
    corpus = language_corpus()
    joined = "\n".join(corpus)
    for marker in ("###Human:", "###Assistant:", "<Img>", "</Img>", "[INST]", "[/INST]", "Yes", "No",
                   "Please answer yes or no.", "image a", "Describe the difference between the images."):
        assert marker in joined
    for line in corpus[::50]:
        ids = tok(line)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == line
    assert train_tokenizer(512).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_corpus_format_and_determinism(tmp_path):
    cfg = WorldConfig(out=str(tmp_path / "a"), n=12, seed=3)
    out = write_corpus(cfg)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(12)]
    for i, r in enumerate(rows):
        assert set(r) == {"id", "image", "caption"} and r["image"] == f"images/{r['id']}.png"
        scene = corpus_scene(cfg, i)
        assert (out / r["image"]).read_bytes() == png_bytes(render(scene).image)
        assert r["caption"] in {caption(scene, t) for t in range(3)}
    assert read_scenes(out / "scenes.jsonl")["000005"] == corpus_scene(cfg, 5)
    again = write_corpus(WorldConfig(out=str(tmp_path / "b"), n=12, seed=3))
    assert _tree(out) == _tree(again)
    other = write_corpus(WorldConfig(out=str(tmp_path / "c"), n=12, seed=4))
    assert (other / "captions.jsonl").read_bytes() != (out / "captions.jsonl").read_bytes()


def test_failed_write_keeps_the_previous_corpus(tmp_path, monkeypatch):
    cfg = WorldConfig(out=str(tmp_path / "src"), n=5, seed=0)
    write_corpus(cfg)
    before = _tree(tmp_path / "src")
    import cheetah.world.corpus as corpus

    calls = {"n": 0}

    def broken(scene):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk full")
        return render(scene)

    monkeypatch.setattr(corpus, "render", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_corpus(WorldConfig(out=str(tmp_path / "src"), n=8, seed=1))
    assert _tree(tmp_path / "src") == before
    assert [p.name for p in tmp_path.iterdir()] == ["src"], "no temporary folder left behind"


def test_heldout_scenes_are_disjoint_from_training():
    cfg = WorldConfig(n=200, seed=0, heldout_seed=10_000)
    train = {json.dumps({**corpus_scene(cfg, i).to_dict(), "id": None}) for i in range(200)}
    held = list(heldout_scenes(cfg, 50))
    assert all(s.id.startswith("heldout-") for s in held)
    assert not train & {json.dumps({**s.to_dict(), "id": None}) for s in held}
    assert list(heldout_scenes(cfg, 2, start=10)) == list(heldout_scenes(cfg, 12))[10:]
    with pytest.raises(ConfigError, match="heldout_seed must differ"):
        load_params(None, ["world.seed=5", "world.heldout_seed=5"])


def test_cli_world(tmp_path, capsys):
    from cheetah.cli import main

    assert main(["--params", str(tmp_path / "none.yaml"), "world", "--out", str(tmp_path / "w"), "--n", "3"]) == 2
    assert "no such parameters file" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text("world:\n  n: 1000\n  seed: 1\n")  # flags win over the file
    assert main(["--params", str(params), "world", "--out", str(tmp_path / "w"), "--n", "3", "--seed", "9",
                 "--image-size", "32"]) == 0
    rows = (tmp_path / "w" / "captions.jsonl").read_text().splitlines()
    assert len(rows) == 3
    with Image.open(tmp_path / "w" / "images" / "000000.png") as im:
        assert im.size == (32, 32)
    assert CELLS[0] == "top left"
