"""Demographic attribute sets audited by ``fastfair audit``, and their intersections.

Each set has ordered class labels, and for each class:

* ``words``: the word put in the prompt for in-prompt entanglement ("a photo of the face of a
  female doctor") -- its map is compared with the profession's;
* ``prompts``: CLIP zero-shot text prompts for the default classifier;

and one ``open_word`` for open-vocabulary entanglement, looked up in BiasMap's attribution prompt
("a photo of the face of a doctor and gender").

Built-in sets:

=============  ===================================================================================
``gender``     male, female
``race``       BiasMap's binary race: White, African-American (its prompts "a white person" /
               "an African-american person")
``fairface4``  FairFace's 4 race classes: White, Black, Asian, Indian
``fairface7``  FairFace's 7 race classes: White, Black, Latino_Hispanic, East Asian,
               Southeast Asian, Indian, Middle Eastern
``age``        young, old
=============  ===================================================================================

An intersection is written ``gender*race`` (or ``gender×race``); its classes are the label tuples,
shown as ``male|White``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttributeSet:
    name: str
    labels: tuple[str, ...]
    words: tuple[str, ...]                  # in-prompt word per class
    prompts: tuple[tuple[str, ...], ...]    # CLIP zero-shot prompts per class
    open_word: str                          # the word in the attribution prompt

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"attribute set {self.name!r} needs at least two distinct labels; got {self.labels}")
        if not (len(self.words) == len(self.prompts) == len(self.labels)):
            raise ValueError(f"attribute set {self.name!r}: one word and one prompt list per label")

    @property
    def slug(self) -> str:
        return slug(self.name)

    def as_dict(self) -> dict:
        return {"labels": list(self.labels), "words": list(self.words),
                "prompts": [list(p) for p in self.prompts], "open_word": self.open_word}


def _set(name, classes, open_word):
    labels = tuple(c[0] for c in classes)
    words = tuple(c[1] for c in classes)
    prompts = tuple(tuple(c[2]) for c in classes)
    return AttributeSet(name, labels, words, prompts, open_word)


ATTRIBUTE_SETS: dict[str, AttributeSet] = {
    "gender": _set("gender", [
        ("male", "male", ["a photo of a man", "a photo of a male person"]),
        ("female", "female", ["a photo of a woman", "a photo of a female person"]),
    ], "gender"),
    "race": _set("race", [
        ("White", "white", ["a photo of a white person"]),
        ("African-American", "African-American", ["a photo of an African-American person"]),
    ], "race"),
    "fairface4": _set("fairface4", [
        ("White", "White", ["a photo of a White person"]),
        ("Black", "Black", ["a photo of a Black person"]),
        ("Asian", "Asian", ["a photo of an Asian person"]),
        ("Indian", "Indian", ["a photo of an Indian person"]),
    ], "race"),
    "fairface7": _set("fairface7", [
        ("White", "White", ["a photo of a White person"]),
        ("Black", "Black", ["a photo of a Black person"]),
        ("Latino_Hispanic", "Latino", ["a photo of a Latino Hispanic person"]),
        ("East Asian", "East Asian", ["a photo of an East Asian person"]),
        ("Southeast Asian", "Southeast Asian", ["a photo of a Southeast Asian person"]),
        ("Indian", "Indian", ["a photo of an Indian person"]),
        ("Middle Eastern", "Middle Eastern", ["a photo of a Middle Eastern person"]),
    ], "race"),
    "age": _set("age", [
        ("young", "young", ["a photo of a young person"]),
        ("old", "old", ["a photo of an old person"]),
    ], "age"),
}


class AttributeSpecError(ValueError):
    """An unknown attribute set or a malformed intersection."""


def slug(text: str) -> str:
    """Column-safe lower-case name: "East Asian" -> "east_asian", "gender×race" -> "gender_x_race"."""
    s = text.replace("×", "_x_").replace("*", "_x_")
    s = re.sub(r"[^0-9A-Za-z]+", "_", s).strip("_").lower()
    return s or "_"


@dataclass(frozen=True)
class Intersection:
    parts: tuple[str, ...]
    labels: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return "×".join(self.parts)

    @property
    def slug(self) -> str:
        return "_x_".join(self.parts)


def intersection_labels(sets: list[AttributeSet]) -> tuple[str, ...]:
    out = [""]
    for s in sets:
        out = [f"{a}|{b}" if a else b for a in out for b in s.labels]
    return tuple(out)


def parse_attributes(spec, custom: dict | None = None) -> tuple[list[AttributeSet], list[Intersection]]:
    """"gender,race,gender*race" -> (base sets, intersections).

    Every pair of listed base sets of different attributes is reported as an intersection as well (not,
    e.g., race x fairface7: two label sets of race); ``a*b*c`` adds higher-order ones. Components of an intersection are audited as base sets even when not listed.
    ``custom`` adds user sets: {name: AttributeSet or dict(labels=..., words=..., prompts=..., open_word=...)}.
    """
    table = dict(ATTRIBUTE_SETS)
    for name, s in (custom or {}).items():
        if isinstance(s, dict):
            labels = tuple(s["labels"])
            s = AttributeSet(name, labels, tuple(s.get("words", labels)),
                             tuple(tuple(p) if isinstance(p, (list, tuple)) else (p,)
                                   for p in s.get("prompts", [f"a photo of a {w} person" for w in labels])),
                             s.get("open_word", name))
        table[name] = s
    items = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if str(p).strip()]
    if not items:
        raise AttributeSpecError("no attributes given; choose from " + ", ".join(table))
    base: list[str] = []
    inter: list[tuple[str, ...]] = []
    for it in items:
        parts = tuple(p.strip() for p in re.split(r"[*×]", it))
        for p in parts:
            if p not in table:
                raise AttributeSpecError(f"unknown attribute set {p!r}; built-in sets are {', '.join(ATTRIBUTE_SETS)}"
                                         + (f", custom: {', '.join(custom)}" if custom else "")
                                         + "; intersections are written gender*race")
        if len(parts) > 1:
            if len(set(parts)) != len(parts):
                raise AttributeSpecError(f"intersection {it!r} repeats a set")
            dims = [table[p].open_word for p in parts]
            if len(set(dims)) != len(dims):
                raise AttributeSpecError(f"intersection {it!r} crosses two sets of the same attribute "
                                         f"({', '.join(f'{p}: {d}' for p, d in zip(parts, dims))}); intersect "
                                         "different attributes, e.g. gender*race")
            inter.append(parts)
        for p in parts:
            if p not in base:
                base.append(p)
    listed = list(base)
    for i in range(len(listed)):
        for j in range(i + 1, len(listed)):
            pair = (listed[i], listed[j])
            if table[pair[0]].open_word == table[pair[1]].open_word:
                continue  # two label sets of one attribute (race, fairface7): no intersection
            if not any(set(pair) == set(x) for x in inter):
                inter.append(pair)
    # keep the order of the listed sets inside each intersection, and drop duplicates
    seen, out_inter = set(), []
    for parts in inter:
        key = frozenset(parts)
        if key in seen:
            continue
        seen.add(key)
        sets = [table[p] for p in parts]
        out_inter.append(Intersection(parts, intersection_labels(sets)))
    return [table[b] for b in base], out_inter
