"""Fact-retrieval prompts: facts hidden in BBC News filler text, a question at the end, exact-match answers.

Three kinds of value, chosen because a tokenizer splits each into several tokens that all must survive: ``number``
(7 digits: SmolLM2 gives each digit its own token), ``code`` (two letters, a dash, four digits: ``KQ-4821``) and
``name`` (a first and a last name). A prompt holds ``facts`` facts of one kind, each ``"The <kind> of <key> is
<value>."`` with a distinct key (a city), spread over depths 0.1..0.9 (a single fact: its depth moves with the trial
index). It then asks about one fact (``ask="one"``: one prompt per fact, same haystack) or lists every key and asks
for all values in order (``ask="all"``). Text, keys, values and depths all come from ``seed``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from benchmarks.corpus import load_corpus_text

KINDS = ("number", "code", "name")
KEYS = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dakar", "Perth", "Tbilisi", "Bergen", "Cusco", "Turin")
FIRST = ("Maria", "Tomas", "Ingrid", "Kwame", "Aiko", "Rafael", "Leila", "Dmitri", "Oluwa", "Sven", "Priya", "Mateo")
LAST = ("Okafor", "Lindqvist", "Moreau", "Takahashi", "Castillo", "Novak", "Haddad", "Brennan", "Kowalski", "Ferreira")
NOUN = {"number": "secret number", "code": "access code", "name": "contact person"}


@dataclass(frozen=True)
class FactPrompt:
    prompt: str
    answers: tuple[str, ...]  # the asked facts' values (all of them for ask="all")
    kind: str
    depths: tuple[float, ...]  # of the asked facts

    def found(self, text: str) -> int:
        """How many answers appear whole in ``text`` (exact match, not part of a longer number, code or word)."""
        return sum(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", text) is not None for a in self.answers)


def kind_prompts(tokenizer, kind: str, n_trials: int, prompt_tokens: int, seed: int) -> list[FactPrompt]:
    """The prompts of one benchmark kind: ``number``, ``code``, ``name`` (one fact, ``n_trials`` depths),
    ``multiN`` (N numbers per haystack, asked one at a time: ``n_trials`` prompts, ``n_trials // N`` haystacks),
    ``multiN-all`` (N numbers asked at once, ``n_trials`` haystacks)."""
    if kind in KINDS:
        return fact_prompts(tokenizer, n_trials, prompt_tokens, seed, kind)
    found = re.fullmatch(r"multi(\d+)(-all)?", kind)
    if found is None:
        raise ValueError(f"kind must be one of {KINDS}, multiN or multiN-all, got {kind!r}")
    facts = int(found.group(1))
    if found.group(2):
        return fact_prompts(tokenizer, n_trials, prompt_tokens, seed, "number", facts, "all")
    return fact_prompts(tokenizer, max(1, n_trials // facts), prompt_tokens, seed, "number", facts, "one")


def fact_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "code":
        return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + f"-{rng.randint(1000, 9999)}"
    if kind == "name":
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def fact_prompts(tokenizer, n_trials: int, prompt_tokens: int, seed: int, kind: str = "number", facts: int = 1,
                 ask: str = "one") -> list[FactPrompt]:
    """``n_trials`` haystacks of about ``prompt_tokens`` tokens; ``ask="one"`` yields one prompt per fact of each."""
    if ask not in ("one", "all"):
        raise ValueError(f"ask must be 'one' or 'all', got {ask!r}")
    if not 1 <= facts <= len(KEYS):
        raise ValueError(f"facts must be in [1, {len(KEYS)}], got {facts}")
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in load_corpus_text().split(".") if 40 < len(s.strip()) < 300]
    noun = NOUN[kind]
    out = []
    for t in range(n_trials):
        keys = rng.sample(KEYS, facts)
        values = [fact_value(rng, kind) for _ in keys]
        if facts == 1:
            depths = [0.1 + 0.8 * t / max(n_trials - 1, 1)]
        else:
            depths = [0.1 + 0.8 * (i + rng.random()) / facts for i in range(facts)]
        filler, n = [], 0
        while n < prompt_tokens - 40 - 25 * facts:
            filler.append(rng.choice(sentences))
            n += len(tokenizer(filler[-1]).input_ids)
        cuts = [int(len(filler) * d) for d in depths]
        parts, last = [], 0
        for cut, key, value in zip(cuts, keys, values):
            parts += filler[last:cut] + [f"The {noun} of {key} is {value}."]
            last = cut
        body = " ".join(parts + filler[last:])
        if ask == "all":
            question = (f"\nQuestion: what is the {noun} of each city, in this order: {', '.join(keys)}? "
                        f"Answer: {keys[0]}:")
            out.append(FactPrompt(f"{body}{question}", tuple(values), kind, tuple(depths)))
            continue
        for key, value, depth in zip(keys, values, depths):
            question = f"\nQuestion: what is the {noun} of {key}? Answer: The {noun} of {key} is"
            out.append(FactPrompt(f"{body}{question}", (value,), kind, (depth,)))
    return out
