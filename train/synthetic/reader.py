"""Reading a caption back into its claim: an independent reader of the scenes' caption language.

`read_caption(text)` parses any caption the templates in scenes.py write (either style) into a Claim,
without looking at how the caption was made; `scenes.claim_holds(claim, objects)` then says whether
it is true of a scene. The scene oracle (train/models/oracle.py) scores pairs with it, and the tests
read every template's output back with it.
"""
from __future__ import annotations

from train.synthetic.scenes import (CELL_PHRASES, COLOURS, COUNT_NOUNS, COUNT_WORDS, RELATION_WORDS,
                                    SHAPE_WORDS, SIZE_WORDS, WITH_PHRASES, Claim, Mention)

_ARTICLES = ("a", "an", "the")
_COUNT_OF_WORD = {word: n for n, word in COUNT_WORDS.items()}
_COLOUR_WORDS = set(COLOURS)
_SIZE_OF_WORD = {w: size for size, words in SIZE_WORDS.items() for w in words}
_SHAPE_OF_WORDS = {tuple(w.split()): shape for shape, words in SHAPE_WORDS.items() for w in words}
_CELL_OF_WORDS = {tuple(p.split()): cell for cell, phrases in CELL_PHRASES.items() for p in phrases}
_RELATION_OF_WORDS = {tuple(p.split()): rel for rel, phrases in RELATION_WORDS.items() for p in phrases}
_WITH_RELATION_OF_WORDS = {tuple(p.split()): rel for rel, p in WITH_PHRASES.items()}


def _longest_prefix(words: list, start: int, table: dict):
    """(value, length) of the longest entry of `table` (keys: word tuples) at words[start:], or (None, 0)."""
    for length in sorted({len(k) for k in table}, reverse=True):
        key = tuple(words[start:start + length])
        if len(key) == length and key in table:
            return table[key], length
    return None, 0


def read_caption(text: str) -> Claim:
    """The Claim a caption states, read from its words alone (the inverse of the templates).

    Written independently of `candidate_captions` so that a test can check every template says what
    its claim says (one template once stated the opposite relation). Also used by the ground-truth
    teacher (`train/models/oracle.py`), so it accepts captions as a tokenizer decodes them: lower
    case, punctuation spaced or not. Raises ValueError on words it cannot place.
    """
    words = text.lower().replace(",", " ").replace(":", " ").split()
    count = None
    if len(words) >= 2 and words[0] in _COUNT_OF_WORD and words[1] in COUNT_NOUNS:
        count, words = _COUNT_OF_WORD[words[0]], words[2:]
    mentions, spans, i = [], [], 0
    while i < len(words):
        if words[i] not in _COLOUR_WORDS:
            i += 1
            continue
        start = i - 1 if i > 0 and words[i - 1] in _SIZE_OF_WORD else i
        size = _SIZE_OF_WORD[words[i - 1]] if start < i else None
        shape, shape_length = _longest_prefix(words, i + 1, _SHAPE_OF_WORDS)
        if shape is None:
            raise ValueError(f"caption {text!r}: no shape after colour {words[i]!r}")
        end = i + 1 + shape_length
        cell, cell_length = _longest_prefix(words, end, _CELL_OF_WORDS)
        end += cell_length
        mentions.append(Mention(shape, words[i], size, cell))
        spans.append((start, end))
        i = end
    if not mentions:
        raise ValueError(f"caption {text!r}: names no coloured shape")
    relations = []
    for m in range(len(mentions) - 1):
        gap = words[spans[m][1]:spans[m + 1][0]]
        while gap and gap[-1] in _ARTICLES:  # the next mention's article
            gap = gap[:-1]
        if gap[:1] == ["is"]:
            gap = gap[1:]
        if gap in ([], ["and"]):
            continue
        if gap == ["with"]:  # "{B} with {A} to its left": A (mention m+1) is left of B (mention m)
            rel, length = _longest_prefix(words, spans[m + 1][1], _WITH_RELATION_OF_WORDS)
            if rel is None:
                raise ValueError(f"caption {text!r}: 'with' but no 'to its ...' / '... it' after")
            relations.append((m + 1, rel, m))
            continue
        rel, length = _longest_prefix(gap, 0, _RELATION_OF_WORDS)
        if rel is None or length != len(gap):
            raise ValueError(f"caption {text!r}: cannot read {' '.join(gap)!r} as a relation")
        relations.append((m, rel, m + 1))
    return Claim(tuple(mentions), tuple(relations), count)
