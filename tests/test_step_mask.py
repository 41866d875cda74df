"""The attention mask of a step as a pure function of grid coordinates (no model).

Reference: the definitions, written out per pair in Python. ``cross`` is the paper's
block-causal mask (a token sees every allowed channel's strictly earlier rows, and
itself); ``isolated`` lets a stream see the prompt, the User channel and itself; the
paper's ``skip_silence`` hides silence keys.
"""

from __future__ import annotations

import itertools

import torch

from backend.engine.attention import (
    FIRST_STREAM_CHANNEL,
    MAX_CHANNELS,
    PROMPT_CHANNEL,
    USER_CHANNEL,
    grid_visibility,
    visibility,
)
from backend.engine.batch import step_mask

SILENCE = 7


def _grid(prompt: int, rows: int, chans: list[int], silent_every: int = 0):
    """Keys of a session: a prompt (one token per row), then ``rows`` rows of ``chans``."""
    key_row, key_chan, key_tok = [], [], []
    for r in range(prompt):
        key_row.append(r), key_chan.append(PROMPT_CHANNEL), key_tok.append(100 + r)
    for r in range(prompt, prompt + rows):
        for c in chans:
            key_row.append(r), key_chan.append(c)
            key_tok.append(SILENCE if silent_every and (r + c) % silent_every == 0 else 200 + r)
    return key_row, key_chan, key_tok


def _mask(key_row, key_chan, key_tok, queries: list[int], vis: torch.Tensor, skip: int = -1) -> torch.Tensor:
    """The mask for queries that are keys of the step (their own cache index given)."""
    t = lambda xs: torch.tensor([xs])  # noqa: E731 - a one-session batch
    return step_mask(
        t([key_row[i] for i in queries]),
        t([key_chan[i] for i in queries]),
        t(queries),
        t(key_row),
        t(key_chan),
        t(key_tok),
        torch.tensor([len(key_row)]),
        vis[None],
        torch.tensor([skip]),
    )[0]


def _expected(key_row, key_chan, key_tok, q: int, allowed, skip: int = -1) -> list[bool]:
    return [
        k == q or (key_row[k] < key_row[q] and allowed(key_chan[q], key_chan[k]) and key_tok[k] != skip)
        for k in range(len(key_row))
    ]


def test_cross_is_block_causal() -> None:
    chans = [USER_CHANNEL, FIRST_STREAM_CHANNEL, FIRST_STREAM_CHANNEL + 1]
    kr, kc, kt = _grid(4, 3, chans)
    queries = list(range(len(kr)))
    mask = _mask(kr, kc, kt, queries, visibility("cross", [None, None]))
    for q in queries:
        assert mask[q].tolist() == _expected(kr, kc, kt, q, lambda a, b: True)
    # The same row's other channels are never visible: a row is decoded in one forward.
    same_row = [k for k in queries if kr[k] == kr[-1] and k != queries[-1]]
    assert not mask[-1, same_row].any()


def test_isolated_sees_prompt_user_and_itself() -> None:
    chans = [USER_CHANNEL, FIRST_STREAM_CHANNEL, FIRST_STREAM_CHANNEL + 1]
    kr, kc, kt = _grid(3, 3, chans)
    mask = _mask(kr, kc, kt, list(range(len(kr))), visibility("isolated", [None, None]))

    def allowed(qc: int, kc_: int) -> bool:
        if qc == PROMPT_CHANNEL:
            return kc_ == PROMPT_CHANNEL
        return kc_ in (PROMPT_CHANNEL, USER_CHANNEL) or kc_ == qc

    for q in range(len(kr)):
        assert mask[q].tolist() == _expected(kr, kc, kt, q, allowed)


def test_per_stream_override() -> None:
    """One stream may read the others (``cross``) in an otherwise isolated session."""
    a, b = FIRST_STREAM_CHANNEL, FIRST_STREAM_CHANNEL + 1
    vis = visibility("isolated", ["cross", None])
    assert vis[a, b] and not vis[b, a]


def test_paper_grid_with_skip_silence_hides_silence_keys() -> None:
    kr, kc, kt = _grid(0, 4, list(range(4)), silent_every=3)
    queries = list(range(len(kr)))
    vis = grid_visibility(4)
    plain = _mask(kr, kc, kt, queries, vis)
    skipped = _mask(kr, kc, kt, queries, vis, skip=SILENCE)
    for q in queries:
        assert plain[q].tolist() == _expected(kr, kc, kt, q, lambda a, b: True)
        assert skipped[q].tolist() == _expected(kr, kc, kt, q, lambda a, b: True, skip=SILENCE)
    assert plain.sum() > skipped.sum()  # something was hidden
    # A silence query still sees itself.
    own = [q for q in queries if kt[q] == SILENCE]
    assert all(skipped[q, q] for q in own)


def test_lengths_and_padding() -> None:
    """Two sessions of different lengths in one batch; a padding query sees key 0 only."""
    kr = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]])
    kc = torch.zeros((2, 4), dtype=torch.long)
    kt = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    q_row = torch.tensor([[3], [1]])
    q_chan = torch.zeros((2, 1), dtype=torch.long)
    q_idx = torch.tensor([[3], [-1]])  # session 1's query is padding
    vis = torch.stack([grid_visibility(1), grid_visibility(1)])
    mask = step_mask(q_row, q_chan, q_idx, kr, kc, kt, torch.tensor([4, 2]), vis, torch.tensor([-1, -1]))
    assert mask[0, 0].tolist() == [True, True, True, True]
    assert mask[1, 0].tolist() == [True, False, False, False]


def test_visibility_limits() -> None:
    assert grid_visibility(10)[:10, :10].all() and not grid_visibility(10)[10:].any()
    for mode, n in itertools.product(("cross", "isolated"), (1, MAX_CHANNELS - FIRST_STREAM_CHANNEL)):
        assert visibility(mode, [None] * n).shape == (MAX_CHANNELS, MAX_CHANNELS)
