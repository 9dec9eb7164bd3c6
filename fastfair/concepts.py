"""Words -> token positions in a prompt's tokenization (the key positions of cross-attention).

Positions count the BOS token: in "a photo of a doctor", "doctor" is key position 5.
A multi-vector textual-inversion token (DFT's soft tokens on SD 1.x/2.x and SDXL) counts as its k tokens, as the
pipelines expand it (:func:`expand_multi_vector`), so the words after it sit k - 1 positions further on.
A word made of several sub-word tokens ("janitor" = jan + itor, "African-American" = african - american)
resolves to all of its positions; its map is the mean over them. A word that occurs more than once
resolves to every occurrence (as DAAM does). Matching is on whole words of the tokenization, so "a" never
matches the inside of "and", nor "woman" the end of "policewoman". Pipelines with two tokenizers (SDXL) must
agree on the positions.
"""
from __future__ import annotations

import re
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


def expand_multi_vector(tokenizer, text: str) -> str:
    """``text`` as the pipelines encode it when a multi-vector textual-inversion token is loaded: a token "<t>" with
    k vectors becomes "<t> <t>_1 ... <t>_(k-1)" (diffusers' ``maybe_convert_prompt``, applied by SD 1.x/2.x's and
    SDXL's ``encode_prompt``), so every later word sits k - 1 positions further on. DFT's soft tokens are such a
    token (k = 4 by default)."""
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    if not any(t.endswith("_1") for t in added):
        return text
    for tok in set(tokenizer.tokenize(text)):
        if tok in added:
            rep, i = tok, 1
            while f"{tok}_{i}" in added:
                rep += f" {tok}_{i}"
                i += 1
            text = text.replace(tok, rep)
    return text


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's BPE tokens (without BOS/EOS) as the pipeline encodes them (multi-vector textual-inversion tokens
    expanded); raises if the prompt exceeds the tokenizer's limit."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConceptError(f"prompt must be a non-empty string, got {prompt!r}")
    toks = tokenizer.tokenize(expand_multi_vector(tokenizer, prompt))
    limit = tokenizer.model_max_length
    if len(toks) + 2 > limit:
        raise ConceptError(f"prompt has {len(toks)} tokens plus BOS/EOS, more than the tokenizer's limit of {limit}; "
                           f"the text encoder would silently truncate it. Shorten the prompt to at most "
                           f"{limit - 2} tokens: {prompt!r}")
    return toks


def _pretty(toks: list[str], tokenizer=None) -> str:
    """Numbered tokens as text (CLIP's byte-level symbols decoded where the tokenizer can)."""
    def text(t):
        if tokenizer is not None and hasattr(tokenizer, "convert_tokens_to_string"):
            t = tokenizer.convert_tokens_to_string([t]).strip() or t  # a partial UTF-8 character shows as U+FFFD
        return t.replace("</w>", "")
    return " ".join(f"{i + 1}:{text(t)}" for i, t in enumerate(toks))


def _inside_hint(toks: list[str], wt: list[str], word: str) -> str:
    """Where ``word``'s tokens occur only as the end of longer words ("woman" in "policewoman")."""
    if any(toks[i:i + len(wt)] == wt for i in range(len(toks) - len(wt) + 1)):
        return (f" {word!r} occurs only as the end of a longer word (e.g. 'woman' in 'policewoman'); map the whole "
                "word instead.")
    return ""


def _spacing_hint(prompt: str, word: str) -> str:
    """CLIP splits words at spaces: a word inside a run of characters without spaces (CJK, Thai...) is
    tokenised differently from the word alone."""
    if word in prompt and any(ord(c) > 0x2E80 for c in word):
        return (f" CLIP's tokenizer splits text at spaces, so {word!r} inside a run of characters without spaces "
                "tokenises differently; put spaces around it in the prompt.")
    return ""


def resolve_word(tokenizer, prompt: str, word: str) -> tuple[int, ...]:
    toks = prompt_tokens(tokenizer, prompt)
    wt = tokenizer.tokenize(expand_multi_vector(tokenizer, word))
    if not word.strip() or not wt:
        raise ConceptError(f"empty word {word!r}")
    hits: list[int] = []
    n = len(wt)
    added = set(getattr(tokenizer, "added_tokens_encoder", None) or ())
    for i in range(len(toks) - n + 1):
        if toks[i:i + n] == wt and _word_starts(toks, i, added):
            hits.extend(range(i + 1, i + n + 1))  # +1: BOS is key position 0
    if not hits:
        raise ConceptError(f"word {word!r} (tokens {_pretty(wt, tokenizer)}) is not in the prompt "
                           f"{prompt!r}, whose tokens are [{_pretty(toks, tokenizer)}]. Use a word from the prompt, or "
                           f"pass attribution_prompt=... that contains it (open-vocabulary maps)."
                           + _inside_hint(toks, wt, word) + _spacing_hint(prompt, word))
    return tuple(hits)


def _word_starts(toks: list[str], i: int, added: set) -> bool:
    """Whether a match at BPE token ``i`` starts a word: CLIP ends every word's last token with "</w>", so a
    token that follows one (or an added token, or the prompt's start) begins a word -- "woman" is not the end of
    "policewoman" (police + woman</w>), nor "man" of "doorman"."""
    return i == 0 or toks[i - 1].endswith("</w>") or toks[i - 1] in added


SD3_T5_TOKENS = 256  # SD3's T5 sequence (max_sequence_length), after the 77 CLIP positions


def t5_positions(tokenizer, prompt: str, word: str | None, offset: int, limit: int = SD3_T5_TOKENS
                 ) -> tuple[int, ...]:
    """Positions of ``word``'s SentencePiece tokens in the text sequence: ``offset`` (SD3: the CLIP part's 77;
    Flux: 0) plus the index in the T5 tokens (no BOS; EOS after the last token). ``word=None``: only the
    length check."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConceptError(f"prompt must be a non-empty string, got {prompt!r}")
    toks = tokenizer.tokenize(prompt)
    if len(toks) + 1 > limit:
        raise ConceptError(f"prompt has {len(toks)} T5 tokens plus EOS, more than the {limit} the pipeline encodes; "
                           f"the T5 encoder would silently truncate it. Shorten the prompt: {prompt!r}")
    if word is None:
        return ()
    wt = tokenizer.tokenize(word)
    if not word.strip() or not wt:
        raise ConceptError(f"empty word {word!r}")
    hits: list[int] = []
    if getattr(tokenizer, "is_fast", False):  # by characters: as CLIP, any case, punctuation around it
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        if len(spans) != len(toks):
            raise ConceptError(f"the T5 tokenizer's offsets ({len(spans)}) do not match its tokens ({len(toks)}) "
                               f"for {prompt!r}")
        for m in re.finditer(whole_word(word), prompt, flags=re.IGNORECASE):
            hits.extend(offset + i for i, (a, b) in enumerate(spans) if a < m.end() and b > m.start())
    else:
        for i in range(len(toks) - len(wt) + 1):
            if toks[i:i + len(wt)] == wt and _word_ends(toks, i + len(wt)):
                hits.extend(range(offset + i, offset + i + len(wt)))
    if not hits:
        raise ConceptError(f"word {word!r} (T5 tokens {' '.join(wt)}) is not in the prompt {prompt!r}, whose T5 tokens "
                           f"are [{' '.join(toks)}]. Use a word from the prompt, written as a separate word (not "
                           "the start or end of a longer one)")
    return tuple(sorted(set(hits)))


def whole_word(word: str) -> str:
    """A regular expression of ``word`` as a whole word (its parts separated by any whitespace), to search
    case-insensitively: not inside a longer word ("man" in "mango", "woman" in "policewoman"). Word boundaries are
    letters' boundaries, as CLIP's pre-tokenizer draws them (digits and '_' split words there: "doctor2" holds the
    word "doctor"), so that a prompt resolves the same way on its CLIP and T5 sides."""
    letter = r"[^\W\d_]"
    return rf"(?<!{letter})" + r"\s+".join(re.escape(part) for part in word.split()) + rf"(?!{letter})"


def _word_ends(toks: list[str], j: int) -> bool:
    """Whether a word matched up to token ``j`` ends there: the prompt ends, the next SentencePiece token starts
    a new word ("\u2581"), or is punctuation -- not a continuation ("man" is not the start of "mango", nor
    "doctor" of "doctors")."""
    if j >= len(toks):
        return True
    nxt = toks[j]
    return nxt.startswith("\u2581") or not nxt[:1].isalnum()


FLUX_T5_TOKENS = 512  # FluxPipeline's default max_sequence_length


def _is_flux(pipe) -> bool:
    return hasattr(getattr(pipe, "transformer", None), "single_transformer_blocks")


def check_prompt(pipe, prompt: str) -> None:
    """Raise if the text encoder that carries the prompt's tokens would truncate it: CLIP (77) for SD / SDXL /
    SD3, T5 (512) for Flux, whose CLIP encoder only gives the pooled embedding."""
    if _is_flux(pipe):
        t5_positions(pipe.tokenizer_2, prompt, None, 0, FLUX_T5_TOKENS)
    else:  # every CLIP tokenizer: SDXL's second counts runs of "!" (its pad token) differently from the first
        for tok in pipeline_tokenizers(pipe):
            prompt_tokens(tok, prompt)


def resolve(pipe_or_tokenizers, prompt: str, word: str) -> Concept:
    """Resolve ``word`` in ``prompt`` through every tokenizer of the pipeline (the CLIP ones must agree).
    SD3 with its T5 encoder: the word's T5 tokens count too (text positions 77 + i), so its map is the mean
    over its CLIP and T5 tokens."""
    if _is_flux(pipe_or_tokenizers):  # Flux's text sequence is T5's tokens only (no BOS)
        return Concept(word, prompt, t5_positions(pipe_or_tokenizers.tokenizer_2, prompt, word, 0, FLUX_T5_TOKENS))
    toks = pipe_or_tokenizers if isinstance(pipe_or_tokenizers, (list, tuple)) else pipeline_tokenizers(pipe_or_tokenizers)
    positions = [resolve_word(t, prompt, word) for t in toks]
    if any(p != positions[0] for p in positions[1:]):
        raise ConceptError(f"the pipeline's tokenizers disagree on {word!r} in {prompt!r}: {positions}, so its two "
                           "text encoders see it at different positions and no one map is right"
                           + (" (SDXL's second tokenizer treats '!', its padding token, as a token of its own: "
                              "remove or space out the '!' before the word)" if "!" in prompt else ""))
    pos = positions[0]
    t5 = getattr(pipe_or_tokenizers, "tokenizer_3", None)
    if t5 is not None and getattr(pipe_or_tokenizers, "text_encoder_3", None) is not None \
            and getattr(pipe_or_tokenizers, "transformer", None) is not None:
        pos = pos + t5_positions(t5, prompt, word, toks[0].model_max_length)
    return Concept(word, prompt, pos)


def eos_position(tokenizer, prompt: str) -> int:
    """Key position of the end-of-sentence token (right after the last word token)."""
    return len(prompt_tokens(tokenizer, prompt)) + 1
