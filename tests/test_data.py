"""The training data path: the sampler (the same batches as one shuffle per sample slot, at the cost of one per
epoch), the example index (validation with file, line and field; records read back on demand), the feature store
(computed once, shared by ranks through disk shards, half precision, killed shards redone) and the step batches
built by DataLoader workers (identical to in-process, and from any resume step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, write_instruction_set

from cheetah.io import DataError
from cheetah.model.backbones import build_backbone
from cheetah.model.prompts import PromptBuilder
from cheetah.train import data as data_module
from cheetah.train.data import (Collator, ExampleBatches, ExampleFile, JointSampler, StepBatches, batches,
                                build_feature_store, feature_key, shard_path)


@pytest.fixture(scope="module")
def instruction_set(tmp_path_factory):
    return write_instruction_set(tmp_path_factory.mktemp("data") / "syn", n_synthetic=20, n_captions=20)


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0)


def _files(folder: Path) -> list[ExampleFile]:
    return [ExampleFile(folder / "synthetic.jsonl"), ExampleFile(folder / "captions.jsonl")]


def _per_slot_reference(n: int, b: int, seed: int, source: int, step: int) -> list[int]:
    """The sampler as it was first written: a whole-data-set shuffle for every sample slot."""
    out = []
    for pos in range(step * b, (step + 1) * b):
        epoch, offset = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, source, epoch]).permutation(n)[offset]))
    return out


def test_sampler_gives_the_per_slot_batches_with_one_permutation_per_epoch(monkeypatch):
    sampler = JointSampler(13, 7, 5, 3, seed=4)
    for step in range(40):  # several epochs of both sources, steps straddling epoch boundaries
        syn, cap = sampler.step(step)
        assert syn == _per_slot_reference(13, 5, 4, 0, step) and cap == _per_slot_reference(7, 3, 4, 1, step)
    made = []
    real = np.random.default_rng
    monkeypatch.setattr(data_module.np.random, "default_rng", lambda seed: made.append(tuple(seed)) or real(seed))
    fresh = JointSampler(1000, 1000, 24, 64, seed=0)
    for step in range(15):  # 15 x 64 = 960 < 1000: one epoch of each source
        fresh.step(step)
    assert sorted(made) == [(0, 0, 0), (0, 1, 0)]
    assert JointSampler(1000, 1000, 24, 64, seed=0).step(11) == fresh.step(11)  # resuming needs no state


def test_example_file_validates_once_and_reads_records_back(instruction_set, tmp_path):
    syn = ExampleFile(instruction_set / "synthetic.jsonl")
    lines = (instruction_set / "synthetic.jsonl").read_text().splitlines()
    assert len(syn) == len(lines) and len(syn.image_keys) == 2 * len(lines)
    third = json.loads(lines[3])
    example = syn.example(3)
    assert (example.id, example.instruction, example.response) == (third["id"], third["instruction"],
                                                                    third["response"])
    assert [p.name for p in example.images] == [Path(p).name for p in third["images"]]
    train, held = syn.split(0.3)
    assert sorted([*train, *held]) == list(range(len(syn))) and len(held) > 0
    assert not {syn.example(i).source_id for i in held} & {syn.example(i).source_id for i in train}

    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(instruction_set / "images", bad / "images")
    good = lines[0]
    for text, message in [
        (good + "\n" + good, "duplicate id 'syn-0'"),
        (good + "\n{oops", r"synthetic.jsonl:2: malformed JSON"),
        (good.replace('"images/00000.png", ', ""), r":1 \(id 'syn-0'\): instruction has 2 <image> placeholder\(s\) for 1"),
        (good.replace("images/00000.png", "images/missing.png"), r":1 \(id 'syn-0'\): images: .*missing.png not found"),
        (good.replace('"response": "', '"response": "<image> '), r":1 \(id 'syn-0'\): response contains the image placeholder"),
        (good.replace("images/00000.png", "../../x.png"), "escapes its root folder"),
    ]:
        (bad / "synthetic.jsonl").write_text(text + "\n")
        with pytest.raises(DataError, match=message):
            ExampleFile(bad / "synthetic.jsonl")


def _encoder(backbone, calls: list[int]):
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(len(pixels))
        return backbone.model.vision_model(pixel_values=pixels).last_hidden_state
    return encode


def test_feature_store_is_computed_once_shared_through_disk_and_split_over_ranks(instruction_set, backbone,
                                                                                 tmp_path):
    files = _files(instruction_set)
    unique = len(np.unique(np.concatenate([f.image_keys for f in files])))
    kw = dict(image_processor=backbone.image_processor,
              weights_key=feature_key(backbone.model.vision_model, backbone.image_processor), batch_size=8,
              shard_size=16)
    calls: list[int] = []
    memory = build_feature_store("memory", files, encode=_encoder(backbone, calls), dtype=torch.float32, **kw)
    assert sum(calls) == unique and len(memory) == unique
    # Two "ranks" share the disk: each computes its shards, and together they hold exactly the memory store.
    calls.clear()
    disk = tmp_path / "features"
    for rank in (1, 0):
        store = build_feature_store(str(disk), files, encode=_encoder(backbone, calls), dtype=torch.float32,
                                    rank=rank, world=2, **kw)
    assert sum(calls) == unique  # every image once, over both ranks
    keys = files[0].keys_of(2)
    assert torch.equal(store.get(keys), memory.get(keys))
    assert torch.equal(store.get(store.keys), memory.tensor)
    # A later run reuses the shards; a shard lost (a killed run leaves only temporary files) is computed again.
    calls.clear()
    shards = sorted(next(disk.iterdir()).glob("shard-*.npy"))
    assert len(shards) == -(-unique // 16)
    shards[1].rename(shards[1].with_name(".shard-000001.npy.host-1.tmp"))
    again = build_feature_store(str(disk), files, encode=_encoder(backbone, calls), dtype=torch.float32, **kw)
    assert sum(calls) == 16 and torch.equal(again.get(again.keys), memory.tensor)
    # Half precision: half the bytes, the same features to within its rounding; another dtype, another folder.
    half = build_feature_store(str(disk), files, encode=_encoder(backbone, calls), dtype=torch.bfloat16, **kw)
    got = half.get(half.keys)
    assert got.dtype == torch.bfloat16 and len(list(disk.iterdir())) == 2
    torch.testing.assert_close(got.float(), memory.tensor, rtol=1e-2, atol=1e-2)
    assert shard_path(half.directory, 0).stat().st_size < shard_path(again.directory, 0).stat().st_size * 0.6


def test_step_batches_from_workers_equal_in_process_and_resume_anywhere(instruction_set, backbone, tmp_path):
    files = _files(instruction_set)
    store = build_feature_store(str(tmp_path / "f"), files, encode=_encoder(backbone, []), dtype=torch.float32,
                                image_processor=backbone.image_processor, weights_key="w")
    builder = PromptBuilder.for_backbone(backbone, max_length=256)
    (syn, syn_rows), (cap, cap_rows) = [(f, f.split(0.1)[0]) for f in files]
    sampler = JointSampler(len(syn_rows), len(cap_rows), 4, 4, seed=0)

    def dataset(rank: int = 0, world: int = 1, collate: Collator | None = None) -> StepBatches:
        return StepBatches(sampler, [(syn, syn_rows), (cap, cap_rows)],
                           collate or Collator(builder, store, backbone.image_processor), 8, rank, world, 2)

    full = list(batches(dataset(), range(8), workers=0))
    resumed = list(batches(dataset(), range(5, 8), workers=2))
    for a, b in zip(full[5:], resumed):
        for ga, gb in zip(a, b):
            for x, y in zip(ga, gb):
                assert x.keys() == y.keys() and x["example_ids"] == y["example_ids"]
                assert all(torch.equal(x[k], y[k]) for k in x if k != "example_ids")
    step = full[0]
    assert len(step) == 2 and [len(g["input_ids"]) for g in step[0]] == [2, 2]  # 2 micro-batches x 2 sources
    assert [n.split()[0] for g in step[0] for n in g["example_ids"]] == ["synthetic"] * 2 + ["captions"] * 2
    assert step[0][0]["vision_features"].shape[0] == 2 * 2  # two images per synthetic example
    # Two ranks take alternate examples of the same global batch.
    halves = [dataset(rank, 2)[0] for rank in (0, 1)]
    assert sum(len(g["input_ids"]) for half in halves for m in half for g in m) == 8
    # Without a feature store, the workers decode the images.
    pixels = dataset(collate=Collator(builder, None, backbone.image_processor))[0]
    assert pixels[0][0]["pixel_values"].shape == (4, 3, 32, 32) and "vision_features" not in pixels[0][0]
    # A prompt longer than max_length names the file and line.
    short = Collator(PromptBuilder.for_backbone(backbone, max_length=20), store, backbone.image_processor)
    with pytest.raises(DataError, match=r"synthetic.jsonl:\d+ \(id='syn-\d+'\): the prompt is"):
        ExampleBatches(syn, syn_rows, short)[0]


def test_feature_key_is_the_vision_weights_content_not_the_architecture(backbone):
    """Two backbones of one architecture (one fingerprint) with other vision weights: other cache keys; the same
    weights loaded again: the same key."""
    other = build_backbone("tiny", tokenizer=backbone.tokenizer, image_size=32, seed=1)
    again = build_backbone("tiny", tokenizer=backbone.tokenizer, image_size=32, seed=0)
    assert other.fingerprint() == backbone.fingerprint()
    key = feature_key(backbone.model.vision_model, backbone.image_processor)
    assert feature_key(other.model.vision_model, other.image_processor) != key
    assert feature_key(again.model.vision_model, again.image_processor) == key
