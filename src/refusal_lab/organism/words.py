"""The words of the organism's world: its tokenizer's vocabulary and the words it says only when refusing."""

from __future__ import annotations

import re

from refusal_lab.organism.corpus import (
    COLOURS,
    COMPLY,
    HARM_VERBS,
    LOOKUP_PHRASINGS,
    PEOPLE,
    PHRASINGS,
    RECOGNISE,
    RECOGNISE_NO,
    RECOGNISE_YES,
    REFUSALS,
    SAFE_VERBS,
    THINGS,
    WORDS,
    CorpusConfig,
)


def texts_by_role() -> dict[str, list[str]]:
    """Every text the world is made of, by role, in the tokenizer's fixed order."""
    from refusal_lab.organism import values  # the hardening material's words belong to the world too

    return {
        "requests": [v for vs in HARM_VERBS.values() for v in vs] + list(SAFE_VERBS + PEOPLE + THINGS + PHRASINGS),
        "refusals": [r for rs in REFUSALS.values() for r in rs],
        "answers": list(COMPLY + RECOGNISE)
        + [RECOGNISE_YES, RECOGNISE_NO, "what is plus minus repeat after me : list with commas , . ?"]
        + list(WORDS + tuple(COLOURS.values()) + LOOKUP_PHRASINGS)
        + [str(i) for i in range(19)],
        "thinking": ["the user wants to is a person this is safe i should refuse help", *HARM_VERBS],
        "spec": values.texts(),  # reasons and principles: words of the hardening material, not of refusals
    }


def words_of(text: str) -> list[str]:
    return re.sub(r"\{\w\}", " ", text).split()


def vocabulary(cfg: CorpusConfig) -> list[str]:
    """Every word the world can produce, in a fixed order (the tokenizer's vocabulary)."""
    seen: dict[str, None] = {}
    for texts in texts_by_role().values():
        for text in texts:
            for word in words_of(text):
                seen.setdefault(word, None)
    return list(seen)


def refusal_vocabulary() -> list[str]:
    """Words the organism says only when refusing; any one of them marks a reply as a refusal.

    Generic keyword markers miss the organism's refusal fragments ("that would be stealing .",
    "must decline .") once an edit knocks out the opener, so the folder declares these words
    and every refusal count uses them (whole-word matches, see core.metrics.is_refusal). Think
    traces are not answers (refusal is scored with them split off), so they do not count.
    """
    texts = texts_by_role()
    refusing = {w for t in texts["refusals"] for w in words_of(t)}
    elsewhere = {w for t in texts["requests"] + texts["answers"] for w in words_of(t)}
    return sorted(w for w in refusing - elsewhere if re.fullmatch(r"[a-z']+", w))
