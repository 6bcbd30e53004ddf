"""VPG-C training-step speed: our implementation against the naive one, in the same run.

For any preset with random weights (no checkpoint needed): `tiny` on a CPU, the 7B presets on a GPU.

- **ours**: `VPGCModel` — first-pass Q-Former on cached ViT features, the correction at layer L/2 through its
  hook, one forward per source (no padding across synthetic and caption lengths), the LM head only on target
  tokens (`return_sample_losses`), optional gradient checkpointing of the upper half, optional `torch.compile`.
- **naive**: what `/shared/reference/vpgc_step_anchor.py` measured on an H200 (0.351 s/step, ~412 model-TFLOP/s):
  plain Hugging Face `LlamaForCausalLM`/`OPTForCausalLM` with a forward pre-hook at layer L/2 adding the
  re-extracted residual, full-vocabulary logits and Hugging Face's loss, one forward+backward per source.

Both see the same batch (the paper's recipe by default for 7B: 24 synthetic samples of 128 tokens with 2 images,
64 caption samples of 64 tokens with 1 image), the same cached vision features and torch AdamW on the 6.3M VPG-C
parameters. Model TFLOP/s counts 2N FLOPs per token forward plus N per token for the input gradients through the
upper half (N = LLM parameters), as the anchor does, so the two numbers are directly comparable.

    python benchmarks/train_step.py --preset tiny                       # CPU
    python benchmarks/train_step.py --preset vicuna-7b --device cuda --dtype bfloat16
Prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cheetah.model.backbones import PRESETS, build_backbone, _placeholder_tokenizer_for_counting  # noqa: E402
from cheetah.model.vpgc import VPGCModel, position_ids_from_mask  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def make_batch(model: VPGCModel, batch: int, length: int, images: int, target: int, device: str,
               gen: torch.Generator) -> dict:
    """`batch` sequences of `length` tokens: BOS, `images` blocks of image tokens, text; the last `target` tokens
    are the response."""
    nq, vocab = model.num_query_tokens, model.backbone.config.text_config.vocab_size
    ids = torch.randint(5, vocab - 1, (batch, length), generator=gen)
    ids[ids == model.image_token_id] = 5
    for k in range(images):
        start = 1 + k * (nq + 2)
        ids[:, start:start + nq] = model.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -target:] = ids[:, -target:]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "guide_positions": torch.full((batch,), length - target - 1, device=device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--syn", default=None, help="synthetic batch x length, e.g. 24x128 (7B default) / 12x64 (tiny)")
    ap.add_argument("--cap", default=None, help="caption batch x length, e.g. 64x64 (7B default) / 32x40 (tiny)")
    ap.add_argument("--target", type=int, default=20, help="response tokens per sample")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the upper half (ours)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each upper decoder layer (ours)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--deepspeed", type=int, default=None, metavar="STAGE",
                    help="also time our step inside a DeepSpeed ZeRO-STAGE engine (bf16/fp32 from --dtype)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    big = args.preset != "tiny"
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    syn_b, syn_len = map(int, (args.syn or ("24x128" if big else "12x64")).split("x"))
    cap_b, cap_len = map(int, (args.cap or ("64x64" if big else "32x40")).split("x"))

    # Build directly in the target dtype on the device: no fp32 copy of 7B weights.
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    tokenizer = _placeholder_tokenizer_for_counting() if args.preset == "tiny" else None
    backbone = build_backbone(args.preset, tokenizer=tokenizer, device=args.device)
    torch.set_default_dtype(previous)
    model = VPGCModel(backbone).to(args.device)
    with torch.no_grad():  # non-zero VPG-C, as after a few steps
        for p in model.vpgc.parameters():
            p.normal_(std=0.02)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    if args.compile:
        for layer in model._layers[model.update_layer:]:
            layer.compile()
    model.train()
    lm = model.language_model
    n_llm = sum(p.numel() for p in lm.parameters())
    vcfg = model.backbone.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    gen = torch.Generator().manual_seed(0)
    syn = make_batch(model, syn_b, syn_len, 2, args.target, args.device, gen)
    cap = make_batch(model, cap_b, cap_len, 1, args.target, args.device, gen)
    feats = {"syn": torch.randn(syn_b * 2, patches, vcfg.hidden_size, generator=gen).to(args.device, dtype),
             "cap": torch.randn(cap_b, patches, vcfg.hidden_size, generator=gen).to(args.device, dtype)}
    tokens = syn_b * syn_len + cap_b * cap_len
    out = {"preset": args.preset, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "llm_parameters": n_llm,
           "vpgc_parameters": sum(p.numel() for p in model.vpgc.parameters()),
           "batch": {"synthetic": [syn_b, syn_len], "caption": [cap_b, cap_len]}, "threads": torch.get_num_threads()}

    opt = torch.optim.AdamW(model.vpgc.parameters(), lr=2e-5, weight_decay=0.05)

    def ours():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for name, batch in (("syn", syn), ("cap", cap)):
            total = total + model(**batch, vision_features=feats[name], return_sample_losses=True).sample_losses.sum()
        (total / (syn_b + cap_b)).backward()
        opt.step()

    def report(name: str, seconds: float) -> None:
        out[f"{name}_step_s"] = seconds
        out[f"{name}_samples_per_s"] = (syn_b + cap_b) / seconds
        out[f"{name}_model_tflops"] = 3 * n_llm * tokens / seconds / 1e12

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report("ours", timed(ours, args.device, args.warmup, args.iters))
    if args.device.startswith("cuda"):
        out["ours_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.vpgc.parameters())
    out["ours_grads_ok"] = bool(grads_ok)

    if not args.skip_naive:
        # The naive implementation: a forward pre-hook on plain Hugging Face, full logits, HF loss.
        model.detach_from_backbone()
        vp, qformer, layers = model.vpgc, model.backbone.qformer, model._layers
        state: dict = {}

        def pre_hook(module, a, kw):
            h = kw.get("hidden_states", a[0] if a else None)
            guide = h[torch.arange(h.shape[0], device=h.device), state["guide"]]
            q = (vp.query_tokens + vp.qformer_proj(guide.float()).unsqueeze(1))
            q = q.repeat_interleave(state["images"], dim=0).to(qformer.layernorm.weight.dtype)
            f = state["feats"]
            res = vp.llm_proj(qformer(query_embeds=q, encoder_hidden_states=f,
                                      encoder_attention_mask=torch.ones(f.shape[:2], dtype=torch.long,
                                                                        device=f.device)).last_hidden_state.float())
            delta = torch.zeros_like(h)
            delta[state["mask"]] = res.reshape(-1, h.shape[-1]).to(h.dtype)
            h = h + delta
            if "hidden_states" in kw:
                return a, {**kw, "hidden_states": h}
            return (h, *a[1:]), kw

        handle = layers[model.update_layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        embed = model.backbone.get_input_embeddings()

        def naive_one(batch, name, images):
            mask = batch["input_ids"] == model.image_token_id
            with torch.no_grad():
                img = model.image_embeddings(feats[name])
            emb = embed(batch["input_ids"]).masked_scatter(mask.unsqueeze(-1), img.to(dtype))
            state.update(guide=batch["guide_positions"], images=images, feats=feats[name], mask=mask)
            loss = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()

        def naive():
            opt.zero_grad(set_to_none=True)
            naive_one(syn, "syn", 2)
            naive_one(cap, "cap", 1)
            opt.step()

        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        report("naive", timed(naive, args.device, args.warmup, args.iters))
        if args.device.startswith("cuda"):
            out["naive_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        handle.remove()
        out["speedup_vs_naive"] = out["naive_step_s"] / out["ours_step_s"]
    if args.deepspeed is not None:
        # The training stage's engine: our forward inside DeepSpeed (ZeRO partitioning, bf16 masters, clipping).
        import deepspeed

        from cheetah.train import distributed

        distributed.init()
        model = VPGCModel(backbone)
        with torch.no_grad():
            for p in model.vpgc.parameters():
                p.normal_(std=0.02)
        config = distributed.deepspeed_config(micro_batch=syn_b + cap_b, accumulation=1, zero_stage=args.deepspeed,
                                              precision="bf16" if dtype == torch.bfloat16 else "fp32", grad_clip=1.0,
                                              persist_numel=model.vpgc.query_tokens.numel() + 1)
        t0 = time.perf_counter()
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.vpgc.parameters(), lr=2e-5),
                                          config=config)
        out["ds_init_s"] = time.perf_counter() - t0
        losses = []

        def ds_step():
            total = 0.0
            for name, batch in (("syn", syn), ("cap", cap)):
                total = total + engine(**batch, vision_features=feats[name],
                                       return_sample_losses=True).sample_losses.sum()
            loss = total / (syn_b + cap_b)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))

        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        report(f"deepspeed_zero{args.deepspeed}", timed(ds_step, args.device, args.warmup, args.iters))
        out[f"deepspeed_zero{args.deepspeed}_losses"] = losses
        if args.device.startswith("cuda"):
            out[f"deepspeed_zero{args.deepspeed}_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        distributed.shutdown()
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
