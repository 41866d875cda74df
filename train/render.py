"""An example laid out as the model is trained on it: the paper's grid, or one stream.

**Grid** (what the engine serves, ``backend.engine.layout``): C channels, 0 User, 1 Output,
2.. thinking. Row 0 is the seed row (User and Output silent, each thinking channel its role
word); the user's tokens follow one per row from row 1. All tokens of row r sit at RoPE
position r and see every token of earlier rows and themselves (block-causal). The token at
(r, c) predicts (r + 1, c); User's targets are masked out, as the paper trains.

Timing follows from that mask. Channel c at row r + 1 is predicted by the query (r, c), which
sees rows < r and itself: it sees User's row r - 1 at the earliest. So the state after the
user's word at row u is written at row u + 2 (from the word and the previous state, one step
of the machine), the user's stop (a silent User cell at row n + 1) is visible from row n + 3,
and Output, copying the final state (row n + 2), answers at row n + 4. Thinking repeats its
final state in row n + 3 (so that no row before the answer is all silent: that is the
engine's stop signal), then every channel is silent: the all-silent row n + 5 ends it.

**One stream** (the sequential baseline, served in the project's layout without a chat
template): the user's words as the prompt, then each item again with the state after it,
then " so", the answer and EOS. Channel-embedding rows 0 for the prompt and 1 for the
generated tokens, as the engine embeds a prompt and its output stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.engine.layout import find_silence, seed_row, user_tokens
from backend.serving.preprocessing import prompt_ids
from backend.tokenizer import Tokenizer
from train.tasks import Example

#: Default channels of the demo model: User, Output, one thinking channel.
NUM_CHANNELS = 3
THINK_CHANNEL = 2
OUTPUT_CHANNEL = 1
#: Rows from the user's last row to Output's (one-token) answer; see the module docstring.
ANSWER_DELAY = 4
#: Written between the states and the answer in the one-stream rendering.
SEQUENTIAL_SEPARATOR = " so"
IGNORE = -100


@dataclass(frozen=True)
class Rendered:
    """One training sequence, flattened: ``chans`` are channel-embedding rows, ``positions`` RoPE
    positions (grid rows), ``labels`` the next token of the same channel or ``IGNORE``."""

    ids: list[int]
    chans: list[int]
    positions: list[int]
    labels: list[int]
    #: Grid: C (block-causal over rows of C); one stream: 0 (plain causal).
    num_channels: int


class Renderer:
    """Turns examples into token layouts for one tokenizer (and checks every word is one token)."""

    def __init__(self, tokenizer: Tokenizer, num_channels: int = NUM_CHANNELS):
        if num_channels < 3:
            raise ValueError(
                f"num_channels must be >= 3 (User, Output, a thinking channel), got {num_channels}"
            )
        self.tokenizer = tokenizer
        self.num_channels = num_channels
        self.silence = find_silence(tokenizer)
        self.eos = tokenizer.eos_token_ids[0]
        self._cache: dict[str, int] = {}

    def word(self, word: str) -> int:
        """The one token of `` word``; a clear error for a word that splits."""
        tok = self._cache.get(word)
        if tok is None:
            ids = user_tokens(self.tokenizer, word)
            if len(ids) != 1:
                raise ValueError(
                    f"word {word!r} is {len(ids)} tokens {ids}: every task word must be one token"
                )
            tok = self._cache[word] = ids[0]
        return tok

    # ------------------------------------------------------------------ grid
    def grid_rows(self, example: Example) -> list[list[int]]:
        """The full grid of an example, row by row (C tokens each), seed row and stop row included."""
        c, sil = self.num_channels, self.silence
        n = len(example.words)
        rows = [seed_row(self.tokenizer, sil, c)]
        rows += [[sil] * c for _ in range(n + ANSWER_DELAY + 1)]
        for u, (word, state) in enumerate(zip(example.words, example.states, strict=True), start=1):
            rows[u][0] = self.word(word)
            if state is not None:
                rows[u + 2][THINK_CHANNEL] = self.word(state)
        # Thinking holds its final state one more row: row n + 3 (User and Output silent,
        # the answer not visible yet) must not be all silent, or the engine stops there.
        rows[n + 3][THINK_CHANNEL] = rows[n + 2][THINK_CHANNEL]
        rows[n + ANSWER_DELAY][OUTPUT_CHANNEL] = self.word(example.answer)
        return rows

    def grid(self, example: Example) -> Rendered:
        """The grid flattened row-major, with next-row labels (User's masked)."""
        rows = self.grid_rows(example)
        c = self.num_channels
        ids, chans, positions, labels = [], [], [], []
        for r, row in enumerate(rows):
            for ch, tok in enumerate(row):
                ids.append(tok)
                chans.append(ch)
                positions.append(r)
                last = r + 1 == len(rows)
                labels.append(IGNORE if ch == 0 or last else rows[r + 1][ch])
        return Rendered(ids, chans, positions, labels, c)

    # ------------------------------------------------------------------ one stream
    def sequential_prompt(self, example: Example) -> list[int]:
        """The prompt as the server builds it without a chat template."""
        return prompt_ids(self.tokenizer, example.text, chat_template=False)

    def sequential_target(self, example: Example) -> list[int]:
        """What the one-stream model writes: each item again and the state after it, then
        " so", the answer and EOS.

        Why it re-reads each item: with the states alone, the k-th state must find the k-th
        word by its absolute position in the prompt, which 150 steps did not teach (the model
        never stopped thinking); writing the item first makes it a copy of the next unread
        word. The cost, one more token per item, is reported (``bench.streams``).
        """
        out = []
        for word, state in zip(example.words, example.states, strict=True):
            if state is not None:
                out += [self.word(word), self.word(state)]
        out += self.tokenizer.encode(SEQUENTIAL_SEPARATOR) + [self.word(example.answer), self.eos]
        return out

    def sequential(self, example: Example) -> Rendered:
        prompt, target = self.sequential_prompt(example), self.sequential_target(example)
        ids = prompt + target
        labels = [IGNORE] * (len(prompt) - 1) + target + [IGNORE]
        chans = [0] * len(prompt) + [1] * len(target)
        return Rendered(ids, chans, list(range(len(ids))), labels, 0)


def collate(items: list[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch with its attention mask ``[B, 1, S, S]`` (True = may attend).

    Grid items get the block-causal mask (an earlier row, or the token itself); one-stream
    items the causal one. A padding query sees only itself, so its softmax stays finite.
    """
    b, s = len(items), max(len(x.ids) for x in items)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    chans = torch.zeros((b, s), dtype=torch.long)
    pos = torch.zeros((b, s), dtype=torch.long)
    labels = torch.full((b, s), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, 1, s, s), dtype=torch.bool)
    eye = torch.eye(s, dtype=torch.bool)
    for i, x in enumerate(items):
        n = len(x.ids)
        ids[i, :n] = torch.tensor(x.ids)
        chans[i, :n] = torch.tensor(x.chans)
        pos[i, :n] = torch.tensor(x.positions)
        labels[i, :n] = torch.tensor(x.labels)
        p = pos[i, :n]
        seen = p[None, :] < p[:, None] if x.num_channels else torch.ones(n, n, dtype=torch.bool).tril(-1)
        mask[i, 0, :n, :n] = seen
        mask[i, 0] |= eye
    return {
        "input_ids": ids,
        "channel_ids": chans,
        "position_ids": pos,
        "labels": labels,
        "attention_mask": mask,
    }
