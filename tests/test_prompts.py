"""Chat renderings against the official Cheetah code, token for token, with a LLaMA-style tokenizer built in code.

The official inference path (`conversation/conversation.py`, `conversation_llama2.py`) builds the user message by
joining its non-blank text segments and `<Img><HereForImage></Img>` tags with single spaces, renders it as
`###Human: {msg}###Assistant:` (Vicuna) or `[INST] <<SYS>>\\n\\n<</SYS>>\\n\\n{msg} [/INST]` (LLaMA-2), tokenises each
segment between images on its own (BOS on the first only) and reads VPG-C's guide at the last prompt token. The
training configs' `prompt_template` renders differently (`vicuna-train`, `llama2-train`). The tokenizer here is
transformers' own LlamaTokenizer (SentencePiece-style BPE: a "▁" prefix on every call, byte fallback, so "\\n" is
<0x0A> = 13 as in LLaMA) on a small vocabulary written below, so the ids are fixed by this file alone.
"""

from __future__ import annotations

import pytest
from transformers import LlamaTokenizer

from cheetah.model.prompts import TEMPLATES, PromptBuilder

Q = 2  # image tokens per image (32 in the real model; the count does not change the text around them)
DEMON_LIKE = "Image 1: <image> Image 2: <image> What changed?"
PIECES = ["▁###", "Human", "Assistant", "▁Image", "▁What", "▁changed", "▁<", "Img", "▁</", "[", "INST", "]", "▁[/",
          "<<", "SYS", ">>", "▁<<", "\\n"]


def llama_style_tokenizer() -> LlamaTokenizer:
    """<unk> <s> </s> = 0 1 2, the 256 byte tokens at 3-258 (as LLaMA's), single characters, then merged pieces."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁#HumanAsitImgWhcged:?<>/[]INSTY12\\n":
        vocab.setdefault(c, len(vocab))
    merges = []
    for piece in PIECES:  # each piece merged left to right from its characters
        current = piece[0]
        for ch in piece[1:]:
            if current + ch not in vocab:
                merges.append((current, ch))
                vocab[current + ch] = len(vocab)
            current += ch
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.unk_token  # as the official LLaMA-2 model pads
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return llama_style_tokenizer()


def test_official_strings():
    # conversation.py get_prompt (L37-45) over CONV_VISION (L109-116); the message as Chat.ask / upload_img build it.
    assert TEMPLATES["vicuna"].render(DEMON_LIKE) == (
        "###Human: Image 1:  <Img><image></Img>  Image 2:  <Img><image></Img>  What changed?###Assistant:")
    # conversation_llama2.py LLAMA_2 style (L56-78) over CONV_VISION (L133-141): empty system prompt.
    assert TEMPLATES["llama2"].render(DEMON_LIKE) == (
        "[INST] <<SYS>>\n\n<</SYS>>\n\nImage 1:  <Img><image></Img>  Image 2:  <Img><image></Img>  What changed? [/INST]")
    # The training configs' prompt_template (single-quoted YAML: the LLaMA-2 one keeps backslash-n literally).
    assert TEMPLATES["vicuna-train"].render(DEMON_LIKE) == (
        "###Human: Image 1: <Img><image></Img> Image 2: <Img><image></Img> What changed? ###Assistant: ")
    assert TEMPLATES["llama2-train"].render(DEMON_LIKE) == (
        "[INST] <<SYS>>\\n\\n<</SYS>>\\n\\nImage 1: <Img><image></Img> Image 2: <Img><image></Img> What changed? [/INST]")
    # Message edge cases of the official join: an image first, images back to back, blank text, no image.
    official = TEMPLATES["vicuna"]
    assert official.render("<image><image> What?") == "###Human: <Img><image></Img> <Img><image></Img>  What?###Assistant:"
    assert official.render("<image> \n <image>") == "###Human: <Img><image></Img> <Img><image></Img>###Assistant:"
    assert official.render("What is it?") == "###Human: What is it?###Assistant:"


def test_a_demon_prompt_renders_as_the_official_demon_script(tmp_path):
    """The official DEMON run: i4_cheetah_llama2.py L57-67 (instruction + context + choice list, placeholders to
    <ImageHere>), then Chat.batch_answer (conversation_llama2.py L184-196)."""
    from test_demon import record, write_task

    from cheetah.evaluate.demon import load_demon_task

    write_task(tmp_path, "MultiModalQA", [record(0, "Table: {table#1} Context: {image#2} Question: What sport?",
                                                 "baseball", images=("0.png", "1.png"), choices=["soccer", "baseball"])])
    prompt = load_demon_task(tmp_path, "MultiModalQA").samples[0].prompt
    assert TEMPLATES["llama2"].render(prompt) == (
        "[INST] <<SYS>>\n\n<</SYS>>\n\nAnswer the question. Table:  <Img><image></Img>  Context:  <Img><image></Img>"
        "  Question: What sport?Choice list:['soccer', 'baseball']. Your answer is: [/INST]")


# Token ids of DEMON_LIKE, image blocks included (337 is <image>), and the guide: the last prompt token.
GOLDEN = {
    "vicuna": (
        ["<s>", "▁###", "Human", ":", "▁Image", "▁", "1", ":", "▁", "▁<", "Img", ">", "<image>", "<image>", "▁</",
         "Img", ">", "▁", "▁Image", "▁", "2", ":", "▁", "▁<", "Img", ">", "<image>", "<image>", "▁</", "Img", ">", "▁",
         "▁What", "▁changed", "?", "#", "#", "#", "Assistant", ":"],
        [1, 293, 297, 277, 310, 259, 288, 277, 259, 322, 324, 280, 337, 337, 325, 324, 280, 259, 310, 259, 289, 277,
         259, 322, 324, 280, 337, 337, 325, 324, 280, 259, 314, 321, 278, 260, 260, 260, 305, 277],
        ":"),
    "llama2": (
        ["<s>", "▁[", "INST", "]", "▁<<", "SYS", ">>", "<0x0A>", "<0x0A>", "<<", "/", "SYS", ">>", "<0x0A>", "<0x0A>",
         "Im", "a", "g", "e", "▁", "1", ":", "▁", "▁<", "Img", ">", "<image>", "<image>", "▁</", "Img", ">", "▁",
         "▁Image", "▁", "2", ":", "▁", "▁<", "Img", ">", "<image>", "<image>", "▁</", "Img", ">", "▁", "▁What",
         "▁changed", "?", "▁[/", "INST", "]"],
        [1, 329, 328, 283, 335, 333, 334, 13, 13, 331, 281, 333, 334, 13, 13, 323, 264, 271, 275, 259, 288, 277, 259,
         322, 324, 280, 337, 337, 325, 324, 280, 259, 310, 259, 289, 277, 259, 322, 324, 280, 337, 337, 325, 324, 280,
         259, 314, 321, 278, 330, 328, 283],
        "]"),
    # The training config's trailing space is a token of its own, and it is what the guide would read.
    "vicuna-train": (
        ["<s>", "▁###", "Human", ":", "▁Image", "▁", "1", ":", "▁<", "Img", ">", "<image>", "<image>", "▁</", "Img",
         ">", "▁Image", "▁", "2", ":", "▁<", "Img", ">", "<image>", "<image>", "▁</", "Img", ">", "▁What", "▁changed",
         "?", "▁###", "Assistant", ":", "▁"],
        [1, 293, 297, 277, 310, 259, 288, 277, 322, 324, 280, 337, 337, 325, 324, 280, 310, 259, 289, 277, 322, 324,
         280, 337, 337, 325, 324, 280, 314, 321, 278, 293, 305, 277, 259],
        "▁"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_token_ids_and_guide_token(tok, name):
    tokens, ids, guide = GOLDEN[name]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == 337
    enc = PromptBuilder(tok, TEMPLATES[name], Q, image_id).encode(DEMON_LIKE, 2)
    assert tok.convert_ids_to_tokens(enc.input_ids) == tokens
    assert enc.input_ids == ids
    assert enc.guide_position == len(ids) - 1 and tok.convert_ids_to_tokens(enc.input_ids[enc.guide_position]) == guide
    # Each text segment tokenised on its own, as get_context_emb (conversation.py L292-299): the official splice.
    segments = TEMPLATES[name].render(DEMON_LIKE).split("<image>")
    expected = [1]
    for i, segment in enumerate(segments):
        expected += ([image_id] * Q if i else []) + tok(segment, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == expected
    # Left-padded for generation, the guide is the last position: where the official code reads it at inference.
    builder = PromptBuilder(tok, TEMPLATES[name], Q, image_id)
    batch = builder.collate([enc, builder.encode("<image> What?", 1)], "left")
    assert batch["guide_positions"].tolist() == [batch["input_ids"].shape[1] - 1] * 2
