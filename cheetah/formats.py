"""Constants of the on-disk formats that several modules read and write. No heavy imports: the validation suites,
the world generator and the loaders all take them from here.
"""

IMAGE_TOKEN = "<image>"
"""The image placeholder: where an instruction's images go, one per image (in `synthetic.jsonl`, in the world's
DEMON-format instructions, in prompts). No other field may hold it, and it is a special token of every tokenizer."""
