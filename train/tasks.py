"""The task families the demo stream model is trained on, made by a program (no LLM here).

Each family is a small state machine that the user feeds one word per row. A thinking
channel that keeps the state while the user talks has the answer ready the moment the user
stops; a model that only starts thinking afterwards must replay every step first. That is
the paper's "solving while reading" claim in its simplest testable form:

- ``compass``: ``facing north left left back right`` -> the heading after the turns;
- ``count``: ``count plum fig plum apple plum`` -> how often the first fruit comes again;
- ``max``: ``max three seven two five`` -> the largest number;
- ``color``: ``color cat red dog blue tree`` -> the last color named.

An :class:`Example` is rendering-neutral: the user's words, the thinking state after each
word (``None``: nothing to think yet), and the answer. ``train.render`` lays it out as the
engine serves it (a grid) or as one stream (read, then think, then answer).

Every word is one token with a leading space in SmolLM2's vocabulary, so one user word is
one grid row; ``train.render`` refuses a word that is not.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FAMILIES = ("compass", "count", "max", "color")

HEADINGS = ("north", "east", "south", "west")
TURNS = {"left": -1, "right": 1, "back": 2}
FRUITS = ("apple", "pear", "plum", "fig", "lime")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = ("red", "blue", "green", "yellow", "black", "white")
THINGS = ("cat", "dog", "tree", "car", "box", "cup", "hat", "sun")
#: The thinking state of ``color`` before any color was named.
NO_COLOR = "none"

#: How many items (turns, fruits, numbers, words) an example streams after its header.
MIN_ITEMS, MAX_ITEMS = 5, 9


@dataclass(frozen=True)
class Example:
    """One task instance: what the user says, what a thinking channel tracks, the answer."""

    family: str
    #: The user's words in order (one grid row each).
    words: tuple[str, ...]
    #: The state after each word (same length as ``words``); None while there is none yet.
    states: tuple[str | None, ...]
    answer: str

    def __post_init__(self) -> None:
        if len(self.words) != len(self.states):
            raise ValueError(f"{self.family}: {len(self.words)} words but {len(self.states)} states")

    @property
    def text(self) -> str:
        """The user's text as a client sends it."""
        return " ".join(self.words)

    @property
    def thoughts(self) -> list[str]:
        """The states in order, without the gaps: what a one-stream model writes out."""
        return [s for s in self.states if s is not None]


def _compass(rng: random.Random, n: int) -> Example:
    heading = rng.randrange(4)
    words, states = ["facing", HEADINGS[heading]], [None, HEADINGS[heading]]
    for _ in range(n):
        turn = rng.choice(tuple(TURNS))
        heading = (heading + TURNS[turn]) % 4
        words.append(turn)
        states.append(HEADINGS[heading])
    return Example("compass", tuple(words), tuple(states), HEADINGS[heading])


def _count(rng: random.Random, n: int) -> Example:
    target = rng.choice(FRUITS)
    hits = rng.randint(0, n)  # uniform count, so guessing a constant scores ~1/n
    where = set(rng.sample(range(n), hits))
    others = [f for f in FRUITS if f != target]
    items = [target if i in where else rng.choice(others) for i in range(n)]
    words, states, count = ["count", target], [None, NUMBERS[0]], 0
    for item in items:
        count += item == target
        words.append(item)
        states.append(NUMBERS[count])
    return Example("count", tuple(words), tuple(states), NUMBERS[count])


def _max(rng: random.Random, n: int) -> Example:
    top = rng.randint(2, 9)  # uniform maximum
    values = [rng.randint(1, top) for _ in range(n)]
    values[rng.randrange(n)] = top
    words, states, best = ["max"], [None], 0
    for v in values:
        best = max(best, v)
        words.append(NUMBERS[v])
        states.append(NUMBERS[best])
    return Example("max", tuple(words), tuple(states), NUMBERS[best])


def _color(rng: random.Random, n: int) -> Example:
    last_pos = rng.randrange(n)
    items = [rng.choice(THINGS + COLORS) if i < last_pos else rng.choice(THINGS) for i in range(n)]
    items[last_pos] = rng.choice(COLORS)  # uniform last color, at a uniform position
    words, states, last = ["color"], [None], NO_COLOR
    for item in items:
        if item in COLORS:
            last = item
        words.append(item)
        states.append(last)
    return Example("color", tuple(words), tuple(states), last)


_MAKERS: dict[str, Callable[[random.Random, int], Example]] = {
    "compass": _compass,
    "count": _count,
    "max": _max,
    "color": _color,
}


def make_example(family: str, rng: random.Random) -> Example:
    """One random example of ``family`` (5 to 9 items after its header)."""
    if family not in _MAKERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _MAKERS[family](rng, rng.randint(MIN_ITEMS, MAX_ITEMS))


def held_out(size: int = 200, seed: int = 1234) -> list[Example]:
    """The evaluation split: ``size`` examples, the families in turn, fixed by ``seed``."""
    rng = random.Random(f"held-out-{seed}")
    out, seen = [], set()
    while len(out) < size:
        ex = make_example(FAMILIES[len(out) % len(FAMILIES)], rng)
        if ex.text not in seen:
            seen.add(ex.text)
            out.append(ex)
    return out


def training_example(
    seed: int, index: int, exclude: set[str], families: tuple[str, ...] = FAMILIES
) -> Example:
    """Training example ``index``: a pure function of ``(seed, index)``, never a held-out text.

    Why per-index seeding rather than one generator: a resumed run sees exactly the batches
    the interrupted one would have, without saving any random state.
    """
    rng = random.Random(f"train-{seed}-{index}")
    while True:
        ex = make_example(families[index % len(families)], rng)
        if ex.text not in exclude:
            return ex


def score(example: Example, output_text: str) -> bool:
    """A correct answer is exactly the answer word (spaces aside), nothing before or after."""
    return output_text.strip().lower() == example.answer


__all__ = [
    "FAMILIES",
    "Example",
    "held_out",
    "make_example",
    "score",
    "training_example",
]
