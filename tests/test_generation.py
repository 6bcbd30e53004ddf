"""Generation for evaluation: batch-size independence on the embedded benchmarks, bucketing, seeded sampling,
stopping at the template's end string, image errors, model loading."""

from __future__ import annotations

import pytest
import torch
from conftest import sharpen
from PIL import Image

from cheetah.config import EvaluateConfig, WorldConfig
from cheetah.evaluate.demon import load_demon
from cheetah.evaluate.embedded import write_embedded_benchmarks
from cheetah.evaluate.generation import Generator, Request, answer_one, load_image, load_model
from cheetah.evaluate.mme import load_mme
from cheetah.io import DataError
from cheetah.model.backbones import build_backbone, save_backbone
from cheetah.model.vpgc import VPGCModel
from cheetah.model.weights import save_vpgc

NEW = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The test machine's 2 cores are shared: one intra-op thread is several times faster than two fighting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world_tokenizer():
    from cheetah.world.language import train_tokenizer

    return train_tokenizer(512)


@pytest.fixture(scope="module")
def model(world_tokenizer):
    return sharpen(VPGCModel(build_backbone("tiny", tokenizer=world_tokenizer, image_size=32, seed=0)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = EvaluateConfig(demon_dir=str(root / "demon"), mme_dir=str(root / "mme"), demon_per_task=3,
                         mme_per_subtask=2)
    return write_embedded_benchmarks(WorldConfig(image_size=32), cfg)


@pytest.fixture(scope="module")
def requests(bench):
    reqs = [Request(s.prompt, list(s.images)) for t in load_demon(bench["demon"]) for s in t.samples]
    reqs += [Request(s.prompt, list(s.images)) for ss in load_mme(bench["mme"]).values() for s in ss]
    return reqs


def test_batch_size_1_and_n_give_identical_answers_on_embedded_benchmarks(model, requests):
    assert len(requests) == 7 * 3 + 4 * 2 * 2
    gen1 = Generator(model, batch_size=1, max_new_tokens=NEW)
    gen8 = Generator(model, batch_size=8, max_new_tokens=NEW)
    ids1, ids8 = gen1.generate_ids(requests), gen8.generate_ids(requests)
    # Token for token; a row the end *string* stopped keeps its batch's padding after it (the random model here may
    # emit a template marker that holds "###", e.g. "###Human:"), which batch size 1 never has.
    pad = gen8.tokenizer.pad_token_id

    def unpadded(row):
        while row and row[-1] == pad:
            row = row[:-1]
        return row

    assert ids1 == [unpadded(row) for row in ids8]
    one, eight = gen1.answer(requests), gen8.answer(requests)
    assert one == eight == [gen1.decode(row) for row in ids1]
    # Not a degenerate model: the answers differ from each other, and most are not empty (a random model may end
    # one at once).
    assert len(set(one)) > len(one) // 2 and sum(map(bool, one)) > len(one) // 2
    # Padding really happened: some batch mixes prompt lengths (and image counts).
    lengths = [len(e.input_ids) for e in gen8._encode(requests)]
    assert any(len({lengths[i] for i in batch}) > 1 for batch in gen8.plan(lengths))
    # Answers come back in request order, whatever the order of the requests.
    assert gen8.answer(requests[::-1]) == one[::-1]


def test_plan_buckets_neighbouring_lengths_longest_first(model):
    gen = Generator(model, batch_size=3)
    lengths = [5, 50, 7, 49, 6, 51, 8]
    batches = gen.plan(lengths)
    assert batches == [[5, 1, 3], [6, 2, 4], [0]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_sampling_needs_a_seed_and_is_reproducible_per_request(model, requests):
    with pytest.raises(ValueError, match="seed"):
        Generator(model, do_sample=True)
    with pytest.raises(ValueError, match="seed"):
        EvaluateConfig(do_sample=True)
    subset = requests[::4]
    a = Generator(model, batch_size=4, max_new_tokens=NEW, do_sample=True, seed=3).answer(subset)
    b = Generator(model, batch_size=1, max_new_tokens=NEW, do_sample=True, seed=3).answer(subset)
    c = Generator(model, batch_size=4, max_new_tokens=NEW, do_sample=True, seed=4).answer(subset)
    greedy = Generator(model, batch_size=4, max_new_tokens=NEW).answer(subset)
    assert a == b  # same seed: same answers, whatever the batch
    assert sum(x != y for x, y in zip(a, c)) >= len(subset) // 2  # another seed: other draws
    assert sum(x != y for x, y in zip(a, greedy)) >= len(subset) // 2  # really sampling


def test_top_k_and_the_official_demon_setting(model, requests):
    subset = requests[::4]
    greedy = Generator(model, batch_size=4, max_new_tokens=NEW).answer(subset)
    # top-k 1 leaves one token to draw: sampling is then greedy decoding, whatever the seed
    assert Generator(model, batch_size=4, max_new_tokens=NEW, do_sample=True, seed=3, top_k=1).answer(subset) == greedy
    official = EvaluateConfig(decoding="official-demon").generation()
    assert official == {"max_new_tokens": 300, "do_sample": True, "seed": 0, "temperature": 1.0, "top_p": 0.9,
                        "top_k": 50, "stop_strings": None}
    gen = Generator(model, batch_size=4, **{**official, "max_new_tokens": NEW})
    assert gen.settings() == {"decoding": "sample", "max_new_tokens": NEW, "template": "vicuna-train", "end": "###",
                              "dtype": "float32", "seed": 0, "temperature": 1.0, "top_p": 0.9, "top_k": 50}
    assert gen.answer(subset) == Generator(model, batch_size=1, **{**official, "max_new_tokens": NEW}).answer(subset)


def test_stop_strings_override_the_template_end(model):
    gen = Generator(model, stop_strings=["red", "blue"])
    tk = gen.tokenizer
    assert gen.settings()["stop"] == ["red", "blue"]
    assert gen.decode(tk(" a large blue star ###Human: red", add_special_tokens=False)["input_ids"]) == "a large"
    assert Generator(model).decode(tk(" a large blue star ###", add_special_tokens=False)["input_ids"]) == \
        "a large blue star"


def _boost(model: VPGCModel, token_id: int, from_call: int):
    """Make the LM emit `token_id` from its `from_call`-th forward on (1 = prefill, i.e. the first new token)."""
    calls = [0]

    def hook(module, args, out):
        calls[0] += 1
        if calls[0] >= from_call:
            out = out.clone()
            out[..., token_id] += 1e4
        return out

    return model.language_model.lm_head.register_forward_hook(hook), calls


@pytest.mark.parametrize("stop", ["end", "end_in_pieces", "eos"])
def test_generation_stops_at_the_template_end_and_eos(model, requests, stop):
    gen = Generator(model, batch_size=1, max_new_tokens=20)
    tk = gen.tokenizer
    assert gen.template.end == "###"
    # "###" as one token (an extra EOS id), as three "#" tokens (caught by the stop-string criterion), or EOS.
    token = {"end": tk.convert_tokens_to_ids("###"), "end_in_pieces": tk.convert_tokens_to_ids("#"),
             "eos": tk.eos_token_id}[stop]
    request = [requests[0]]
    k = 4
    first_k = Generator(model, batch_size=1, max_new_tokens=k).answer(request)[0]
    handle, calls = _boost(model, token, from_call=k + 1)
    try:
        stopped = gen.answer(request)[0]
    finally:
        handle.remove()
    assert stopped == first_k and stopped
    # stopped right after the end token (the third "#") instead of running to 20 tokens
    assert calls[0] == k + (3 if stop == "end_in_pieces" else 1)


def test_decode_cuts_at_first_end_string_and_strips(model):
    gen = Generator(model)
    tk = gen.tokenizer
    ids = tk(" the red star ###Human: more", add_special_tokens=False)["input_ids"]
    assert gen.decode(ids) == "the red star"
    assert gen.decode(ids[:3] + [tk.eos_token_id] + ids[3:]) == tk.decode(ids[:3]).strip()


def test_missing_and_corrupt_images_are_named(model, tmp_path, requests):
    gen = Generator(model, batch_size=2, max_new_tokens=2)
    missing = tmp_path / "nowhere.png"
    with pytest.raises(DataError, match="nowhere.png"):
        gen.answer([Request("<image> Is there a star?", [missing])])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="corrupt.png"):
        gen.answer([requests[0], Request("<image> Is there a star?", [corrupt])])
    good = requests[0].images[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(DataError, match="placeholder"):
        gen.answer([Request("<image> <image> two slots", [good])])


def test_answer_one_and_pil_images_match_batched_answers(model, requests):
    r = requests[5]
    expected = Generator(model, batch_size=4, max_new_tokens=NEW).answer(requests[:8])[5]
    assert answer_one(model, r.instruction, r.images, max_new_tokens=NEW) == expected
    pil = [Image.open(p).convert("RGB") for p in r.images]
    assert answer_one(model, r.instruction, pil, max_new_tokens=NEW) == expected


def test_load_model_base_and_vpgc_share_one_path(model, world_tokenizer, tmp_path, requests):
    backbone = build_backbone("tiny", tokenizer=world_tokenizer, image_size=32, seed=0)
    trained = VPGCModel(backbone)
    trained.load_state_dict(model.state_dict())  # the sharpened LM and VPG-C
    save_backbone(backbone, tmp_path / "backbone")
    trained.backbone_info.source = str(tmp_path / "backbone")
    save_vpgc(trained, tmp_path / "vpgc")

    base = load_model(tmp_path / "backbone")
    vpgc = load_model(tmp_path / "vpgc")
    assert all(int(torch.count_nonzero(p)) == 0 for n, p in base.vpgc.named_parameters() if "proj" in n)
    assert torch.equal(vpgc.vpgc.llm_proj.weight, model.vpgc.llm_proj.weight)
    subset = requests[:6]
    kw = dict(batch_size=3, max_new_tokens=NEW)
    assert Generator(vpgc, **kw).answer(subset) == Generator(model, **kw).answer(subset)
    # The base model is the backbone alone: turning the in-memory model's VPG-C off gives its answers.
    plain = VPGCModel(build_backbone("tiny", tokenizer=world_tokenizer, image_size=32, seed=0))
    plain.backbone.load_state_dict(model.backbone.state_dict())
    base_answers = Generator(base, **kw).answer(subset)
    assert base_answers == Generator(plain.eval(), **kw).answer(subset)
    assert base_answers != Generator(vpgc, **kw).answer(subset)
