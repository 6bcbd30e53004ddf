"""How fast the `tiny` preset's language model learns Yes/No from an *ideal* visual prompt: one token per object.

The companion of benchmarks/yes_no_reading.py (the caption as text). Here the context is what a perfect Q-Former
and projection could give the language model: one input vector per large object and one for the background, each
a learned linear map of the sum of its attribute words' embeddings ("large red striped square"). The question and
answer are the base stage's (MME-style, about the large objects of world scenes, `yes_no_pair(..., size="large")`),
loss on the answer only; accuracy is Yes-vs-No logit on held-out scenes, per kind of question. AdamW with 50 warm-up
steps and cosine decay, one thread.

It bounds what the base stage can reach with a given number of alignment steps (docs/base.md):

    python benchmarks/yes_no_objects.py --steps 1500 --heads 8
    python benchmarks/yes_no_objects.py --steps 1500 --heads 4
Prints the figures as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cheetah.model.backbones import PRESETS
from cheetah.world import PERCEPTION_KINDS, generate_scene, train_tokenizer, yes_no_pair
from yes_no_reading import yes_no_accuracy  # this folder: the scripts run as `python benchmarks/<name>.py`


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init-range", type=float, default=0.1, help="the LLM's initializer_range")
    ap.add_argument("--heads", type=int, default=8, help="attention heads of the 128-wide LLM")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=30000, help="training scenes (two questions each)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--kinds", default=",".join(PERCEPTION_KINDS), help="comma-separated question kinds asked")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    tok = train_tokenizer(512)
    text = {k: v for k, v in PRESETS["tiny"].text.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**{**text, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                            "initializer_range": args.init_range, "num_attention_heads": args.heads,
                                            "num_key_value_heads": args.heads}))
    width = model.config.hidden_size
    project = torch.nn.Linear(width, width)  # the projection's part: object content -> the LLM's input space
    embed = model.get_input_embeddings()

    def word(w: str) -> int:
        return tok(" " + w, add_special_tokens=False)["input_ids"][0]

    def examples(seed: int, scenes: int, kinds: tuple[str, ...]) -> list[tuple[list[list[int]], list[int], list[int]]]:
        """(attribute words per object token, input ids, labels) per question."""
        rng, out = np.random.default_rng(seed), []
        for i in range(scenes):
            scene = generate_scene(seed, i, 64)
            objects = [[word("large"), word(o.color), word(o.shape), word(o.texture)]
                       for o in scene.objects if o.size == "large"]
            objects.append([word(scene.background_color), word(scene.background_texture), word("background")])
            yes, no = yes_no_pair(scene, kinds[int(rng.integers(len(kinds)))], rng, size="large")
            for question, answer in ((yes, "Yes"), (no, "No")):
                prompt = tok(f"###Human: {question}###Assistant: ", add_special_tokens=False)["input_ids"]
                response = tok(f"{answer}###", add_special_tokens=False)["input_ids"]
                out.append((objects, prompt + response, [-100] * len(prompt) + response))
        return out

    def batch(rows):
        n = max(len(o) + len(ids) for o, ids, _ in rows)
        x = torch.zeros(len(rows), n, width)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        labels = torch.full((len(rows), n), -100)
        for b, (objects, ids, lab) in enumerate(rows):
            k = len(objects)
            x[b, :k] = project(torch.stack([embed(torch.tensor(w)).sum(0) for w in objects]))
            x[b, k:k + len(ids)] = embed(torch.tensor(ids))
            mask[b, :k + len(ids)] = 1
            labels[b, k:k + len(ids)] = torch.tensor(lab)
        return x, mask, labels

    kinds = tuple(args.kinds.split(","))
    train = examples(0, args.scenes, kinds)
    held = {k: examples(99, 100, (k,)) for k in kinds}
    yes_id, no_id = (tok(a, add_special_tokens=False)["input_ids"][0] for a in ("Yes", "No"))
    params = [*model.parameters(), *project.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    rng, curve, started = np.random.default_rng(1), {}, time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        x, mask, labels = batch([train[i] for i in rng.integers(len(train), size=args.batch)])
        loss = model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            by_kind = {}
            with torch.no_grad():
                for kind, rows in held.items():
                    x, mask, labels = batch(rows)
                    logits = model(inputs_embeds=x, attention_mask=mask).logits
                    by_kind[kind] = yes_no_accuracy(logits, labels, yes_id, no_id)
            curve[step] = {"accuracy": round(float(np.mean(list(by_kind.values()))), 1), "kinds": by_kind}
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {curve[step]['accuracy']} % {by_kind}",
                  flush=True)
    print(json.dumps({"init_range": args.init_range, "heads": args.heads, "lr": args.lr, "steps": args.steps,
                      "batch": args.batch, "accuracy_by_step": curve, "final_accuracy": curve[args.steps]["accuracy"],
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
