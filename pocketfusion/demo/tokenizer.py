"""A CLIP BPE tokenizer learned from the demo grammar's words.

CLIP's tokenizer is byte-level BPE with an end-of-word marker ``</w>``. We learn the merges on the
demo vocabulary (a real BPE training loop: merge the most frequent adjacent pair until every word
is one symbol), then write ``vocab.json`` / ``merges.txt`` that ``transformers.CLIPTokenizer``
loads unchanged. ``model_max_length`` is set explicitly: the class default (77) would not match
the small text encoder's position table and breaks the Stable Diffusion pipeline.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pocketfusion.demo.scenes import COLORS, POSITIONS, SHAPES, SIZES

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table GPT-2 / CLIP use, so every byte has a base symbol.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def corpus_words() -> list[str]:
    words = {"a", "on", "background", ","}
    words.update(SHAPES, COLORS, SIZES)
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE over ``words`` until each is a single symbol (ties broken lexicographically)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(out)
        seqs = new


def write_tokenizer(out_dir: str | Path) -> None:
    """Write a CLIPTokenizer for the demo grammar into ``out_dir``."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges = learn_merges(corpus_words())
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(str(out))
