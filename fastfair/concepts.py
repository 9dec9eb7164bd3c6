"""Words -> token positions in a prompt's tokenization (the key positions of cross-attention).

Positions count the BOS token: in "a photo of a doctor", "doctor" is key position 5.
A word made of several sub-word tokens ("janitor" = jan + itor, "African-American" = african - american)
resolves to all of its positions; its map is the mean over them. A word that occurs more than once
resolves to every occurrence (as DAAM does). Matching is on whole BPE tokens, so "a" never matches
the inside of "and". Pipelines with two tokenizers (SDXL) must agree on the positions.
"""
from __future__ import annotations

from dataclasses import dataclass


class ConceptError(ValueError):
    """A word that cannot be mapped (not in the prompt), or a prompt that cannot be used."""


@dataclass(frozen=True)
class Concept:
    word: str
    prompt: str
    positions: tuple[int, ...]


def pipeline_tokenizers(pipe) -> list:
    toks = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if not toks:
        raise ConceptError(f"{type(pipe).__name__} has no tokenizer: fastfair maps words through the pipeline's "
                           "CLIP tokenizer(s)")
    return toks


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's BPE tokens (without BOS/EOS); raises if the prompt exceeds the tokenizer's limit."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConceptError(f"prompt must be a non-empty string, got {prompt!r}")
    toks = tokenizer.tokenize(prompt)
    limit = tokenizer.model_max_length
    if len(toks) + 2 > limit:
        raise ConceptError(f"prompt has {len(toks)} tokens plus BOS/EOS, more than the tokenizer's limit of {limit}; "
                           f"the text encoder would silently truncate it. Shorten the prompt to at most "
                           f"{limit - 2} tokens: {prompt!r}")
    return toks


def _pretty(toks: list[str]) -> str:
    return " ".join(f"{i + 1}:{t.replace('</w>', '')}" for i, t in enumerate(toks))


def resolve_word(tokenizer, prompt: str, word: str) -> tuple[int, ...]:
    toks = prompt_tokens(tokenizer, prompt)
    wt = tokenizer.tokenize(word)
    if not word.strip() or not wt:
        raise ConceptError(f"empty word {word!r}")
    hits: list[int] = []
    n = len(wt)
    for i in range(len(toks) - n + 1):
        if toks[i:i + n] == wt:
            hits.extend(range(i + 1, i + n + 1))  # +1: BOS is key position 0
    if not hits:
        raise ConceptError(f"word {word!r} (tokens {' '.join(t.replace('</w>', '') for t in wt)}) is not in the prompt "
                           f"{prompt!r}, whose tokens are [{_pretty(toks)}]. Use a word from the prompt, or pass "
                           f"attribution_prompt=... that contains it (open-vocabulary maps).")
    return tuple(hits)


def resolve(pipe_or_tokenizers, prompt: str, word: str) -> Concept:
    """Resolve ``word`` in ``prompt`` through every tokenizer of the pipeline (they must agree)."""
    toks = pipe_or_tokenizers if isinstance(pipe_or_tokenizers, (list, tuple)) else pipeline_tokenizers(pipe_or_tokenizers)
    positions = [resolve_word(t, prompt, word) for t in toks]
    if any(p != positions[0] for p in positions[1:]):
        raise ConceptError(f"the pipeline's tokenizers disagree on {word!r} in {prompt!r}: {positions}")
    return Concept(word, prompt, positions[0])


def eos_position(tokenizer, prompt: str) -> int:
    """Key position of the end-of-sentence token (right after the last word token)."""
    return len(prompt_tokens(tokenizer, prompt)) + 1
