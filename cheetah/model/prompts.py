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
from typing import Any, Literal

import torch

from cheetah.formats import IMAGE_TOKEN

IGNORE_INDEX = -100
QFORMER_MAX_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a user turn is rendered. `{}` in `prompt` receives the user message; `image` wraps every placeholder.

    `message` says how the message is put together from the user text and its images:
    - "inline": the text as written, each `<image>` replaced by `image` in place (the training configs'
      `prompt_template.format(text)`, `cheetah_vicuna.py` L284);
    - "official": as the official chat code builds it (`conversation.py` `Chat.ask` L129-134, `upload_img`
      L275-285, `batch_answer` L161-168): the non-blank text segments, unstripped, and the image tags, joined by one
      space each (`' '.join([message, part])`). So "Image 1: <image> What?" becomes
      "Image 1:  <Img><image></Img>  What?" (two spaces on each side of an image), a prompt that starts with an image
      starts with its tag, and blank text between images leaves one space.
    """

    name: str
    prompt: str
    image: str
    end: str
    """Appended to training targets; generation stops at it (Vicuna v0 ends turns with '###', LLaMA-2 with </s>)."""
    message: Literal["inline", "official"] = "inline"

    def render(self, user_text: str) -> str:
        if self.message == "inline":
            return self.prompt.format(user_text.replace(IMAGE_TOKEN, self.image))
        parts: list[str] = []
        for i, segment in enumerate(user_text.split(IMAGE_TOKEN)):
            if i > 0:
                parts.append(self.image)
            if segment.strip():
                parts.append(segment)
        return self.prompt.format(" ".join(parts))


TEMPLATES: dict[str, ChatTemplate] = {
    # The official inference rendering, which the released checkpoints were evaluated with (DEMON, the demos):
    # conversation/conversation.py CONV_VISION (L109-116: system "", sep "###", roles Human/Assistant) rendered by
    # get_prompt (L37-45): "###" + "Human: " + message + "###" + "Assistant:". No space before "###", none after
    # "Assistant:", so the last prompt token (VPG-C's guide, input_part_targets_len = len - 1, L316-319) is ':'.
    "vicuna": ChatTemplate("vicuna", "###Human: {}###Assistant:", f"<Img>{IMAGE_TOKEN}</Img>", "###", "official"),
    # conversation/conversation_llama2.py CONV_VISION (L133-141: system "", sep "<s>", sep2 "</s>") rendered by the
    # LLAMA_2 style (L56-78): "[INST] " + "<<SYS>>\n" + "" + "\n<</SYS>>\n\n" + message + " [/INST]", the leading
    # "<s>" stripped; BOS comes from the tokenizer (get_context_emb L318-323). The guide is the end of "[/INST]".
    "llama2": ChatTemplate("llama2", "[INST] <<SYS>>\n\n<</SYS>>\n\n{} [/INST]", f"<Img>{IMAGE_TOKEN}</Img>",
                           "</s>", "official"),
    # The training configs' rendering (eval_configs/cheetah_eval_vicuna.yaml `prompt_template`, applied by
    # cheetah_vicuna.py forward L284): a space before "###Assistant:" and a trailing space, which the LLaMA tokenizer
    # makes a token of its own (the guide). The training code is unreleased; this is what its config says. It is
    # also the embedded `tiny` default's rendering (its recorded results were made with it).
    "vicuna-train": ChatTemplate("vicuna-train", "###Human: {} ###Assistant: ", f"<Img>{IMAGE_TOKEN}</Img>", "###"),
    # eval_configs/cheetah_eval_llama2.yaml `prompt_template: '[INST] <<SYS>>\n\n<</SYS>>\n\n{} [/INST]'` is a
    # single-quoted YAML string: OmegaConf (as PyYAML) keeps each "\n" as a backslash and an "n", so the training
    # config's LLaMA-2 prompt holds those four characters twice, not newlines (cheetah_llama2.py L285 formats it).
    "llama2-train": ChatTemplate("llama2-train", "[INST] <<SYS>>\\n\\n<</SYS>>\\n\\n{} [/INST]",
                                 f"<Img>{IMAGE_TOKEN}</Img>", "</s>"),
    # BLIP-2 OPT and InstructBLIP are not chat-tuned: plain text with images in place.
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
    qformer_ids: list[int] | None = None
    """InstructBLIP only: the instruction in the Q-Former's tokenizer, which its first pass reads with every image."""

    @property
    def num_targets(self) -> int:
        """Tokens the LM loss is taken on (next-token targets: every label after the first that is not ignored)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


class PromptBuilder:
    """Tokenises samples for one backbone (tokenizer, template, number of query tokens, image-token id)."""

    def __init__(self, tokenizer: Any, template: Any, num_query_tokens: int, image_token_id: int,
                 max_length: int = 512, qformer_tokenizer: Any | None = None):
        if tokenizer.pad_token_id is None:
            raise PromptError("the tokenizer has no pad token")
        if qformer_tokenizer is not None and qformer_tokenizer.pad_token_id is None:
            raise PromptError("the Q-Former tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.template = template
        self.num_query_tokens = num_query_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.qformer_tokenizer = qformer_tokenizer
        """Set for InstructBLIP backbones: batches then carry the instruction for the Q-Former's first pass."""

    @classmethod
    def for_backbone(cls, backbone: Any, max_length: int = 512) -> "PromptBuilder":
        if backbone.is_instructblip and backbone.qformer_tokenizer is None:
            raise PromptError(f"InstructBLIP backbone {backbone.source!r} has no Q-Former tokenizer")
        return cls(backbone.tokenizer, backbone.template, backbone.num_query_tokens, backbone.image_token_id,
                   max_length, backbone.qformer_tokenizer if backbone.is_instructblip else None)

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
        return Encoded(ids, labels, guide_position=len(prompt) - 1, num_images=num_images,
                       qformer_ids=self.encode_qformer(instruction))

    def encode_qformer(self, instruction: str) -> list[int] | None:
        """InstructBLIP: the instruction without placeholders, as LAVIS's InstructBLIP gives it to the Q-Former
        (`text_Qformer`, truncated to its max_txt_len of 128 tokens)."""
        if self.qformer_tokenizer is None:
            return None
        text = " ".join(instruction.replace(IMAGE_TOKEN, " ").split())
        return self.qformer_tokenizer(text, truncation=True, max_length=QFORMER_MAX_LENGTH)["input_ids"]

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
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "guide_positions": guide,
            "image_counts": torch.tensor([s.num_images for s in samples], dtype=torch.long),
        }
        if self.qformer_tokenizer is not None:
            batch.update(self._collate_qformer(samples))
        return batch

    def _collate_qformer(self, samples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """One row per image (its sample's instruction), in the order the images appear: what the Q-Former's
        first pass reads beside each image's features."""
        rows = [s.qformer_ids for s in samples for _ in range(s.num_images)]
        if any(r is None for r in rows):
            raise PromptError("an InstructBLIP batch needs every sample encoded with its Q-Former text")
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.qformer_tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them (what `generate` does too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
