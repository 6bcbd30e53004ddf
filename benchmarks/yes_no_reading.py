"""How fast the `tiny` preset's language model, alone and from scratch, learns to answer Yes/No from a caption.

The base stage must teach the tiny LLM to answer MME-style Yes/No questions about what captions cover (issue 11:
>= 85 % on large objects). Image aside, that needs the language model to compare a question with its context, which a
real LLM knows from pretraining. This measures that ability in isolation: text only, the caption given in the prompt
("Caption: a large red square ... Is there a large red square in the image? Please answer yes or no."), balanced
Yes/No pairs about the large objects of world scenes (`yes_no_pair(..., size="large")`), the `tiny` preset's
LLaMA shapes, loss on the answer only; accuracy is Yes-vs-No logit on held-out scenes.

It is the measurement behind docs/base.md: at Hugging Face's default `initializer_range` (0.02) the model stays at
chance for thousands of steps; at 0.1 it learns within a few hundred.

    python benchmarks/yes_no_reading.py --init-range 0.02 --steps 600
    python benchmarks/yes_no_reading.py --init-range 0.1 --steps 600
    python benchmarks/yes_no_reading.py --init-range 0.1 --steps 300 --kinds existence
    python benchmarks/yes_no_reading.py --init-range 0.1 --steps 600 --heads 8
Prints the figures as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cheetah.model.backbones import PRESETS
from cheetah.world import PERCEPTION_KINDS, caption, generate_scene, train_tokenizer, yes_no_pair


def examples(tok, seed: int, scenes: int, image_size: int,
             kinds: tuple[str, ...] = PERCEPTION_KINDS) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per question: the Vicuna-style turn, labels on the answer only."""
    rng, out = np.random.default_rng(seed), []
    for i in range(scenes):
        scene = generate_scene(seed, i, image_size)
        kind = kinds[int(rng.integers(len(kinds)))]
        yes, no = yes_no_pair(scene, kind, rng, size="large")
        for question, answer in ((yes, "Yes"), (no, "No")):
            prompt = tok(f"###Human: Caption: {caption(scene)}. {question}###Assistant: ",
                         add_special_tokens=False)["input_ids"]
            response = tok(f"{answer}###", add_special_tokens=False)["input_ids"]
            out.append((prompt + response, [-100] * len(prompt) + response))
    return out


def collate(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id)
    labels = torch.full((len(rows), n), -100)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for k, (i, lab) in enumerate(rows):
        ids[k, :len(i)], labels[k, :len(lab)], mask[k, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, mask, labels


def yes_no_accuracy(logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int) -> float:
    """Held-out accuracy (%): at each row's first answer token, is "Yes" above "No" exactly when the answer is Yes?"""
    rows = torch.arange(len(labels))
    first = (labels != -100).float().argmax(1)  # the answer's first token; its logits sit one before
    said_yes = logits[rows, first - 1, yes_id] > logits[rows, first - 1, no_id]
    return round(100.0 * float((said_yes == (labels[rows, first] == yes_id)).float().mean()), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init-range", type=float, default=0.02, help="the LLM's initializer_range (HF default 0.02)")
    ap.add_argument("--heads", type=int, default=PRESETS["tiny"].text["num_attention_heads"],
                    help="attention heads of the 128-wide LLM (default: the preset's)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=4000, help="training scenes (two questions each)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", default=",".join(PERCEPTION_KINDS), help="comma-separated question kinds asked")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok = train_tokenizer(512)
    text = {k: v for k, v in PRESETS["tiny"].text.items() if k != "model_type"}
    config = LlamaConfig(**{**text, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                            "initializer_range": args.init_range,
                            "num_attention_heads": args.heads, "num_key_value_heads": args.heads})
    model = LlamaForCausalLM(config)
    kinds = tuple(args.kinds.split(","))
    train, held = examples(tok, 0, args.scenes, 64, kinds), examples(tok, 99, 150, 64, kinds)
    yes_id, no_id = (tok(a, add_special_tokens=False)["input_ids"][0] for a in ("Yes", "No"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng, curve, started = np.random.default_rng(1), {}, time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        ids, mask, labels = collate([train[i] for i in rng.integers(len(train), size=args.batch)], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            ids, mask, labels = collate(held, tok.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            curve[step] = yes_no_accuracy(logits, labels, yes_id, no_id)
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {curve[step]} %", flush=True)
    print(json.dumps({"init_range": args.init_range, "heads": args.heads, "kinds": list(kinds), "lr": args.lr,
                      "steps": args.steps, "batch": args.batch, "accuracy_by_step": curve,
                      "final_accuracy": curve[args.steps],
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
