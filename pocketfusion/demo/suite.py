"""The demo model's prompt suite: training prompts, 240 held-out prompts, the pixel metric."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

from pocketfusion.suite import PromptSuite

MODEL_DIR = Path(__file__).resolve().parent / "model"


def _evaluate(images: Sequence, prompts: Sequence[str]) -> dict:
    from pocketfusion.demo.metrics import prompt_accuracy
    from pocketfusion.demo.scenes import parse_prompt

    return prompt_accuracy(images, [parse_prompt(p) for p in prompts])


def _distribution(images: Sequence, prompts: Sequence[str], seeds_images: Mapping[str, Sequence] | None = None) -> dict:
    from pocketfusion.demo.distribution import measure

    return measure(images, prompts, seeds_images)


@functools.lru_cache(maxsize=1)
def demo_suite() -> PromptSuite:
    from pocketfusion.demo.scenes import split_scenes

    train, held = split_scenes()
    return PromptSuite(name="demo", train_prompts=tuple(s.prompt for s in train),
                       heldout_prompts=tuple(s.prompt for s in held), evaluator=_evaluate,
                       distribution=_distribution)


def is_demo_compatible(model) -> bool:
    """True for the demo model, or a pipeline that uses the demo grammar's tokenizer."""
    from transformers import CLIPTokenizer

    from pocketfusion.demo.tokenizer import corpus_words

    if model.kind != "pipeline":
        return False
    if Path(model.path).resolve() == MODEL_DIR:
        return True
    text = " ".join(corpus_words())
    demo_tok = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"), local_files_only=True)
    tok = model.components["tokenizer"]
    return tok.model_max_length == demo_tok.model_max_length and list(tok(text).input_ids) == list(demo_tok(text).input_ids)
