"""The embedded benchmarks: written in the official formats, read back by the same loaders, scored end to end."""

from __future__ import annotations

import hashlib
import re

import pytest

from cheetah.config import EvaluateConfig, WorldConfig
from cheetah.evaluate import embedded
from cheetah.evaluate.demon import CATEGORIES, TASKS, load_demon
from cheetah.evaluate.embedded import (DEMON_BUILDERS, MME_SLOTS, MME_SPLITS, read_mme_splits,
                                       write_embedded_benchmarks, write_embedded_demon, write_embedded_mme)
from cheetah.evaluate.mme import load_mme
from cheetah.evaluate.predictions import PredictionStore
from cheetah.evaluate.scoring import score_demon, score_mme, score_mme_splits
from cheetah.io import DataError
from cheetah.world import generate_scene

WORLD = WorldConfig(image_size=48)
PER_TASK, PER_SUBTASK = 6, 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    paths = write_embedded_benchmarks(WORLD, EvaluateConfig(demon_dir=str(root / "demon"), mme_dir=str(root / "mme"),
                                                            demon_per_task=PER_TASK, mme_per_subtask=PER_SUBTASK))
    return paths["demon"], paths["mme"]


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demon_tasks_load_back(bench):
    tasks = load_demon(bench[0])
    assert [t.dataset for t in tasks] == list(DEMON_BUILDERS)
    assert all(TASKS[t.dataset].embedded and t.dataset.startswith("World_") for t in tasks)
    assert {t.info.category for t in tasks} == set(CATEGORIES) - {"knowledge_grounded_qa", "text_rich_images_qa"}
    for t in tasks:
        assert len(t.samples) == PER_TASK
        assert t.question_type == ("open-ended" if t.info.metric == "rouge_l" else "multi-choice")
        for s in t.samples:
            assert s.prompt.count("<image>") == len(s.images) >= 2 and "{image#" not in s.prompt
            assert all(p.is_file() for p in s.images)
            if t.info.image_choice:
                assert s.response in ("Image A", "Image B", "Image C", "Image D") and len(s.images) == 7
            elif t.info.metric == "accuracy":
                assert s.response in s.choice_list and s.prompt.endswith(". Your answer is:")
            else:
                assert s.response and s.choice_list is None


def test_spot_the_change_pairs_differ_and_are_described(bench):
    task = load_demon(bench[0], ["World_SpotTheChange"])[0]
    for s in task.samples:
        assert s.images[0].read_bytes() != s.images[1].read_bytes()
        assert re.match(r"In the second image, (the .* is |there is a new )", s.response)


def test_which_image_question_has_exactly_one_answer(bench):
    import json

    doc = json.loads((bench[0] / "World_WhichImage" / "core" / "core.json").read_text())
    for rec, s in zip(doc["data"], load_demon(bench[0], ["World_WhichImage"])[0].samples):
        size, color, shape = re.search(r"Which image has an? (\w+) (\w+) (\w+)\?", s.prompt).groups()
        scenes = [generate_scene(WORLD.heldout_seed, int(i.split("-")[1]), WORLD.image_size)
                  for i in rec["world_scenes"]]
        having = [k for k, sc in enumerate(scenes)
                  if any((o.size, o.color, o.shape) == (size, color, shape) for o in sc.objects)]
        assert len(having) == 1
        assert s.response == s.choice_list[having[0]]


def test_demon_scores_end_to_end(bench, tmp_path):
    tasks = load_demon(bench[0])
    for t in tasks:
        oracle = PredictionStore(tmp_path / "oracle", "demon", t.dataset)
        yes = PredictionStore(tmp_path / "first", "demon", t.dataset)
        for s in t.samples:
            oracle.add_sample(s, s.response)
            yes.add_sample(s, s.choice_list[0] if s.choice_list else "")
        oracle.finalize([s.sample_id for s in t.samples])
        yes.finalize([s.sample_id for s in t.samples])
    out = score_demon(bench[0], tmp_path / "oracle")
    assert {t: v["score"] for t, v in out["tasks"].items()} == {t: 100.0 for t in DEMON_BUILDERS}
    assert out["average"] == 100.0
    # Always the first listed option: accuracy is the share of samples whose answer is listed first; empty
    # answers to open-ended tasks score 0.
    out = score_demon(bench[0], tmp_path / "first")
    for t in tasks:
        if t.info.metric == "rouge_l":
            expected = 0.0
        elif t.info.image_choice:
            expected = 100.0 * sum(s.response == "Image A" for s in t.samples) / PER_TASK
        else:
            expected = 100.0 * sum(s.response == s.choice_list[0] for s in t.samples) / PER_TASK
        assert out["tasks"][t.dataset]["score"] == pytest.approx(expected, abs=1e-4), t.dataset


def test_mme_subtasks_load_back_and_score(bench, tmp_path):
    data = load_mme(bench[1])
    assert list(data) == list(MME_SLOTS) == ["existence", "count", "position", "color"]
    for subtask, samples in data.items():
        assert len(samples) == 2 * PER_SUBTASK
        assert [s.answer for s in samples[:2]] == ["Yes", "No"]
        assert all(s.question.endswith("Please answer yes or no.") for s in samples)
        oracle = PredictionStore(tmp_path / "oracle", "mme", subtask)
        always_yes = PredictionStore(tmp_path / "yes", "mme", subtask)
        for s in samples:
            oracle.add_sample(s, s.answer)
            always_yes.add_sample(s, "Yes")
        oracle.finalize([s.key for s in samples])
        always_yes.finalize([s.key for s in samples])
    out = score_mme(tmp_path / "oracle")
    assert out["subtasks"] == {s: 200.0 for s in MME_SLOTS} and out["perception"] == 800.0
    out = score_mme(tmp_path / "yes")
    assert out["subtasks"] == {s: 50.0 for s in MME_SLOTS}  # acc 50, acc+ 0: every No-question wrong


def test_mme_questions_split_into_primary_and_detail(bench, tmp_path):
    splits = read_mme_splits(bench[1])
    assert list(splits) == list(MME_SLOTS)
    data = load_mme(bench[1])
    for subtask, samples in data.items():
        assert set(splits[subtask].values()) == {"primary", "detail"}
        for s in samples:
            assert f" {MME_SPLITS[splits[subtask][s.image]]} " in s.question  # large / small objects
        # A model that knows the large objects and says "Yes" to every question about small ones.
        store = PredictionStore(tmp_path / "primary-only", "mme", subtask)
        for s in samples:
            store.add_sample(s, s.answer if splits[subtask][s.image] == "primary" else "Yes")
        store.finalize([s.key for s in samples])
    out = score_mme_splits(tmp_path / "primary-only", splits)
    assert out["primary"]["subtasks"] == {s: 200.0 for s in MME_SLOTS} and out["primary"]["total"] == 800.0
    assert out["detail"]["subtasks"] == {s: 50.0 for s in MME_SLOTS} and out["detail"]["acc"] == 50.0
    assert out["primary"]["n_questions"] + out["detail"]["n_questions"] == 2 * PER_SUBTASK * len(MME_SLOTS)
    with pytest.raises(DataError, match="in no split"):
        score_mme_splits(tmp_path / "primary-only", {"existence": {"0000.png": "primary"}})
    assert read_mme_splits(tmp_path) is None  # not an embedded benchmark: no split


def test_deterministic_and_seeded(bench, tmp_path):
    again = write_embedded_demon(tmp_path / "demon", WORLD, PER_TASK)
    assert digest(again) == digest(bench[0])
    assert digest(write_embedded_mme(tmp_path / "mme", WORLD, PER_SUBTASK)) == digest(bench[1])
    other = write_embedded_mme(tmp_path / "mme2", WorldConfig(image_size=48, heldout_seed=777), PER_SUBTASK)
    assert digest(other) != digest(bench[1])
    # Tasks draw from their own slices: writing one task alone gives the same files for it.
    alone = write_embedded_demon(tmp_path / "alone", WORLD, PER_TASK, tasks=["World_Story"])
    story = {k: v for k, v in digest(bench[0]).items() if k.startswith("World_Story/")}
    assert {k: v for k, v in digest(alone).items() if k.startswith("World_Story/")} == story


def test_a_failed_write_leaves_the_old_benchmark(bench, tmp_path, monkeypatch):
    out = write_embedded_demon(tmp_path / "demon", WORLD, 2, tasks=["World_SpotTheChange"])
    before = digest(out)

    def broken(scenes, rng):
        raise RuntimeError("boom")

    monkeypatch.setitem(embedded.DEMON_BUILDERS, "World_Story", (6, broken, ["x"]))
    with pytest.raises(RuntimeError, match="boom"):
        write_embedded_demon(out, WORLD, 2)
    assert digest(out) == before
    with pytest.raises(ValueError, match="unknown embedded DEMON task"):
        write_embedded_demon(out, WORLD, 2, tasks=["World_Nope"])
