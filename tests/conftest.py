"""Shared fixtures: a tokenizer trained in code and a tiny random backbone (no downloads, no files)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on this 2-core machine: one thread each (and in what they launch), or
# torch's thread pools oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never write into the checkout's MLflow store: one throwaway store per session (tests may override it).
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{__import__('tempfile').mkdtemp(prefix='cheetah-mlflow-')}/mlflow.db")

import contextlib
import subprocess

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TEST_CORPUS = [
    "###Human: <Img></Img> Describe the difference between the images. ###Assistant: ",
    "In the second image, the small red star at the top left is blue.",
    "a large red striped circle and a large blue square on a green background",
    "What colour is the large circle? red. Is there a small star? yes no",
    "Image 1: Image 2: Image 3: Which image has a small green triangle? image a image b image c",
    "[INST] <<SYS>>\n\n<</SYS>>\n\n [/INST] Please answer yes or no.",
]


def make_tokenizer(vocab_size: int = 300, with_image_token: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"] + (["<image>"] if with_image_token else [])
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEST_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>",
                                   additional_special_tokens=["<image>"] if with_image_token else None)


def sharpen_parameters(params, seed: int, scale: float = 0.3) -> None:
    """Overwrite parameters with N(0, scale) draws from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def sharpen(model, seed: int = 1):
    """Random tiny LMs give near-uniform logits (every argmax a near-tie); larger LM weights and a non-zero VPG-C
    make greedy decoding diverse, so equality tests can fail when they should."""
    sharpen_parameters([*(p for p in model.language_model.parameters() if p.dim() == 2), *model.vpgc.parameters()],
                       seed)
    return model


def build_tiny_instructblip(tokenizer, seed: int = 0, image_size: int = 32):
    """A tiny InstructBLIP backbone built in code: the tiny preset's shapes, an InstructBLIP Q-Former that reads
    text, and a Q-Former tokenizer of its own (trained here, as the LLM's)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from cheetah.model.backbones import PRESETS, Backbone, _image_processor, init_random_weights, preset_config
    from cheetah.model.prompts import TEMPLATES

    qformer_tokenizer = make_tokenizer(vocab_size=200, with_image_token=False)
    tiny = PRESETS["tiny"]
    vision = preset_config("tiny", tokenizer=tokenizer, image_size=image_size).vision_config  # the patch-size rule
    config = InstructBlipConfig(
        vision_config={**tiny.vision, "image_size": vision.image_size, "patch_size": vision.patch_size},
        qformer_config={**tiny.qformer, "vocab_size": len(qformer_tokenizer), "max_position_embeddings": 128,
                        "pad_token_id": qformer_tokenizer.pad_token_id},
        text_config={**tiny.text, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=tiny.num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    init_random_weights(model)
    return Backbone(model, tokenizer, _image_processor(image_size), TEMPLATES["plain"], "instructblip-tiny",
                    qformer_tokenizer=qformer_tokenizer)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_backbone(tokenizer):
    from cheetah.model.backbones import build_backbone

    return build_backbone("tiny", tokenizer=tokenizer, image_size=32, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the test machine's 2 shared cores run faster than with two threads fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def rng():
    return torch.Generator().manual_seed(0)


def write_instruction_set(folder, n_synthetic: int = 24, n_captions: int = 24, image_size: int = 32, seed: int = 0):
    """A small instruction set in the synthesis output format, rendered by the world (independent of the
    synthesis stage, so training tests do not depend on it): pairs of scenes with the second one's caption as the
    'difference', and single-image caption examples."""
    import json
    from pathlib import Path

    from cheetah.world import caption, generate_scene, png_bytes, render

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)

    def image(index: int) -> str:
        scene = generate_scene(seed, index, image_size=image_size)
        rel = f"images/{index:05d}.png"
        (folder / rel).write_bytes(png_bytes(render(scene).image))
        return rel, caption(scene)

    syn, cap = [], []
    for i in range(n_synthetic):
        (a, _), (b, text_b) = image(2 * i), image(2 * i + 1)
        syn.append({"id": f"syn-{i}", "images": [a, b], "source_id": f"src-{i}",
                    "instruction": "Image 1: <image> Image 2: <image> Describe the difference between the images.",
                    "response": text_b})
    for i in range(n_captions):
        a, text = image(10_000 + i)
        cap.append({"id": f"cap-{i}", "images": [a], "source_id": f"src-{i}",
                    "instruction": "<image> Describe the image briefly.", "response": text})
    (folder / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in syn))
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cap))
    return folder


# The synthesis tests' world corpus and backbone (one of each per test module).
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from cheetah.config import WorldConfig
    from cheetah.world import write_corpus

    return write_corpus(WorldConfig(out=str(tmp_path_factory.mktemp("world") / "source"), n=30, seed=0))


@pytest.fixture(scope="module")
def backbone():
    from cheetah.model.backbones import build_backbone
    from cheetah.world import train_tokenizer

    # One thread, as the pipeline runs: on a busy 2-core machine a second torch thread makes tiny models ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_backbone("tiny", tokenizer=train_tokenizer(512), image_size=64, seed=0)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def registry_workspace(root):
    """`root` as a registry test's world: MLflow tracking in root/mlflow.db, root the working directory, one torch
    thread (restored afterwards)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp.chdir(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        mp.undo()


COMMITTED = {"provenance": {"git_commit": "0" * 40, "git_dirty": "false"}}
"""What a card (`save_vpgc(..., extra=COMMITTED)`) or evaluation metrics record when trained or measured on committed
code: the champion gate's condition besides the registering checkout's state."""


def committed_lock_repo(repo, lock_text: str):
    """A git checkout at `repo` whose one commit holds `dvc.lock` (what `register` reads its provenance from)."""
    repo.mkdir()
    (repo / "dvc.lock").write_text(lock_text)
    for args in (["init", "-q"], ["add", "dvc.lock"],
                 ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "lock"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return repo


def copy_checkout(dest, paths):
    """Copy the files of this checkout under `paths` (tracked or untracked but not ignored) into `dest`: a throwaway
    repository for tests that run the pipeline."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *paths], cwd=repo, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        if (repo / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((repo / rel).read_bytes())
    return dest


LONGEST_FILES = ("test_flow_pipeline.py", "test_train.py", "test_scale_pipeline.py")
"""The longest files, longest first (322, 188 and 147 s of 1,091 in a fresh clone's `make test` at 86585fa): the
first to one of `make test`'s two workers, the next two to the other."""


def pytest_collection_modifyitems(items):
    """The longest files, then the other files with slow tests, then the rest (in-file order kept): `make test`
    hands whole files to its two workers in this order (`--no-loadscope-reorder`), and a slow file left for last
    would run alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        longest = LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES)
        return longest, item.path not in slow_files

    items.sort(key=rank)
