"""Interleaved image-text prompts: chat templates, tokenisation with image-token blocks, and batch collation.

The user writes `<image>` wherever an image goes. Each placeholder becomes one block of `num_query_tokens` image
tokens (ids equal to `config.image_token_index`), in order; the model later scatters each image's Q-Former output
into its block. A mismatch between placeholders and images is an error here, because the Hugging Face model
silently ignores images whose tokens are missing.

Training batches are right-padded with labels masked to the response; generation batches are left-padded so every
prompt ends at the last position. Both record `guide_positions`: the index of the last instruction token of each
sample, whose hidden state VPG-C reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a user turn is rendered. `{}` in `prompt` receives the user text; `image` wraps every placeholder."""

    name: str
    prompt: str
    image: str
    end: str
    """Appended to training targets; generation stops at it (Vicuna v0 ends turns with '###', LLaMA-2 with </s>)."""

    def render(self, user_text: str) -> str:
        return self.prompt.format(user_text.replace(IMAGE_TOKEN, self.image))


TEMPLATES: dict[str, ChatTemplate] = {
    # eval_configs/cheetah_eval_vicuna.yaml: '###Human: {} ###Assistant: ', end_sym '###', images as <Img>…</Img>.
    "vicuna": ChatTemplate("vicuna", "###Human: {} ###Assistant: ", f"<Img>{IMAGE_TOKEN}</Img>", "###"),
    # eval_configs/cheetah_eval_llama2.yaml: empty system prompt, end_sym '</s>'.
    "llama2": ChatTemplate("llama2", "[INST] <<SYS>>\n\n<</SYS>>\n\n{} [/INST] ", f"<Img>{IMAGE_TOKEN}</Img>", "</s>"),
    # BLIP-2 OPT is not chat-tuned: plain text with images in place.
    "plain": ChatTemplate("plain", "{}", IMAGE_TOKEN, "\n"),
}


class PromptError(ValueError):
    """A prompt and its images do not fit together."""


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_TOKEN)


def encode_interleaved(tokenizer: Any, text: str, num_images: int, num_query_tokens: int, image_token_id: int,
                       add_bos: bool = True) -> list[int]:
    """Token ids of `text` with each `<image>` replaced by `num_query_tokens` image-token ids.

    Text segments are tokenised separately (BOS on the first only), as the official Cheetah code does, so an image
    never merges with neighbouring text into one token.
    """
    segments = text.split(IMAGE_TOKEN)
    if len(segments) - 1 != num_images:
        raise PromptError(f"the prompt has {len(segments) - 1} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) "
                          f"were given: {text[:120]!r}")
    ids: list[int] = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    for i, segment in enumerate(segments):
        if i > 0:
            ids.extend([image_token_id] * num_query_tokens)
        if segment:
            ids.extend(tokenizer(segment, add_special_tokens=False)["input_ids"])
    if ids.count(image_token_id) != num_images * num_query_tokens:
        raise PromptError(f"the text itself contains the image token id {image_token_id}: {text[:120]!r}")
    return ids


@dataclasses.dataclass
class Encoded:
    """One tokenised sample."""

    input_ids: list[int]
    labels: list[int]
    guide_position: int
    """Index of the last instruction (prompt) token."""
    num_images: int


class PromptBuilder:
    """Tokenises samples for one backbone (tokenizer, template, number of query tokens, image-token id)."""

    def __init__(self, tokenizer: Any, template: Any, num_query_tokens: int, image_token_id: int,
                 max_length: int = 512):
        if tokenizer.pad_token_id is None:
            raise PromptError("the tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.template = template
        self.num_query_tokens = num_query_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length

    @classmethod
    def for_backbone(cls, backbone: Any, max_length: int = 512) -> "PromptBuilder":
        return cls(backbone.tokenizer, backbone.template, backbone.num_query_tokens, backbone.image_token_id,
                   max_length)

    def encode_prompt(self, instruction: str, num_images: int) -> list[int]:
        ids = encode_interleaved(self.tokenizer, self.template.render(instruction), num_images,
                                 self.num_query_tokens, self.image_token_id)
        if len(ids) > self.max_length:
            raise PromptError(f"the prompt is {len(ids)} tokens, longer than max_length={self.max_length}: "
                              f"{instruction[:120]!r}")
        return ids

    def encode(self, instruction: str, num_images: int, response: str | None = None) -> Encoded:
        """Prompt (and, for training, response + end marker). The response is truncated to fit max_length."""
        prompt = self.encode_prompt(instruction, num_images)
        labels = [IGNORE_INDEX] * len(prompt)
        ids = list(prompt)
        if response is not None:
            target = self.tokenizer(response + self.template.end, add_special_tokens=False)["input_ids"]
            target = target[: self.max_length - len(prompt)]
            ids += target
            labels += target
        return Encoded(ids, labels, guide_position=len(prompt) - 1, num_images=num_images)

    def collate(self, samples: Sequence[Encoded], padding_side: str) -> dict[str, torch.Tensor]:
        """Pad to one tensor batch. `right` for training (labels kept), `left` for generation."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(s.input_ids) for s in samples)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        guide = torch.zeros(len(samples), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            start = width - n if padding_side == "left" else 0
            input_ids[row, start:start + n] = torch.tensor(s.input_ids)
            labels[row, start:start + n] = torch.tensor(s.labels)
            attention_mask[row, start:start + n] = 1
            guide[row] = start + s.guide_position
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "guide_positions": guide,
            "image_counts": torch.tensor([s.num_images for s in samples], dtype=torch.long),
        }


def qformer_text_inputs(qformer_tokenizer: Any, instructions: Sequence[str], image_counts: Sequence[int],
                        max_length: int = 128) -> dict[str, torch.Tensor]:
    """InstructBLIP only: the instruction (placeholders removed) fed to the Q-Former, repeated for every image."""
    texts = [" ".join(t.replace(IMAGE_TOKEN, " ").split()) for t, n in zip(instructions, image_counts) for _ in range(n)]
    enc = qformer_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"qformer_input_ids": enc["input_ids"], "qformer_attention_mask": enc["attention_mask"]}
