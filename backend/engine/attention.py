"""The stream grid's channels and the attention policy between them.

A session is a grid of rows x channels (Su et al., 2026). In the project's own layout the
channel indices of a session are fixed: 0 is the shared prompt, 1 the User input channel,
2.. the streams in the order the request declared them. Attention between channels is a
small boolean *visibility* matrix per session; the mask of a step is
``visible[q_chan, k_chan] and k_row < q_row``, or the token itself
(:func:`backend.engine.batch.step_mask`). Two policies fill it:

- ``cross``: the paper's block-causal mask: every stream sees every channel's earlier
  rows. Right for stream-trained checkpoints.
- ``isolated``: a stream sees the shared prompt, the User channel and its own past only.
  Ordinary checkpoints have never seen interleaved channels, so this keeps each stream
  a clean continuation of the prompt while still advancing all streams in one forward.

Several answers (``num_return_sequences`` / OpenAI ``n``): a session may carry k output
streams. Under either policy no answer sees another, and answers after the first are seen
by no other channel, so each answer is the computation a one-answer session runs from the
same prompt and seed, sharing the one slot's prompt KV (the same tokens in fp32; in bf16 the
attention sums over this slot's other key layout round differently). In ``cross`` mode the other channels
(User, reasoning) see the first answer only: that one equals the one-answer session exactly,
and the others read the same reasoning rows.

The paper's own layout (``GridRules``) numbers channels as its checkpoints were trained:
0 User, 1 Output, 2.. thinking, all under the block-causal mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a matrix is built: the constants serve torch-free processes
    import torch

PROMPT_CHANNEL = 0
USER_CHANNEL = 1
FIRST_STREAM_CHANNEL = 2
MAX_CHANNELS = 16
#: The attention policies a request may ask for (the one definition; requests validate
#: against it).
ATTENTION_MODES = ("isolated", "cross")

#: Rows of a learned channel embedding, in the order the paper's checkpoints use:
#: User (the prompt is user text too), Output, then Thinking-1..k.
EMBED_USER = 0
EMBED_OUTPUT = 1
EMBED_FIRST_THINKING = 2


def visibility(
    attention: str, stream_modes: Sequence[str | None], kinds: Sequence[str] | None = None
) -> torch.Tensor:
    """The ``[MAX_CHANNELS, MAX_CHANNELS]`` matrix of the project's layout: may a token of
    channel q see channel k. ``stream_modes[i]`` overrides the policy of stream ``i``;
    ``kinds[i]`` (``output`` / ``reasoning``; None: no answers marked) marks the
    answers, which never see each other (the module's "several answers")."""
    import torch

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention!r}")
    n = FIRST_STREAM_CHANNEL + len(stream_modes)
    if n > MAX_CHANNELS:
        raise ValueError(
            f"a session has at most {MAX_CHANNELS - FIRST_STREAM_CHANNEL} streams, got {len(stream_modes)}"
        )
    vis = torch.zeros((MAX_CHANNELS, MAX_CHANNELS), dtype=torch.bool)
    vis[PROMPT_CHANNEL, PROMPT_CHANNEL] = True
    vis[USER_CHANNEL, PROMPT_CHANNEL] = vis[USER_CHANNEL, USER_CHANNEL] = True
    if attention == "cross":
        vis[USER_CHANNEL, :n] = True
    for i, override in enumerate(stream_modes):
        c = FIRST_STREAM_CHANNEL + i
        if (override or attention) == "cross":
            vis[c, :n] = True
        else:
            vis[c, PROMPT_CHANNEL] = vis[c, USER_CHANNEL] = vis[c, c] = True
    answers = [FIRST_STREAM_CHANNEL + i for i, kind in enumerate(kinds or ()) if kind == "output"]
    for c in answers[1:]:  # a further answer: seen by no other channel
        vis[:, c] = False
        vis[c, c] = True
    for c in answers:  # an answer sees no other answer
        for other in answers:
            if other != c:
                vis[c, other] = False
    return vis


def grid_visibility(num_channels: int) -> torch.Tensor:
    """The paper's layout: every channel sees every channel's earlier rows (block-causal)."""
    if not 1 <= num_channels <= MAX_CHANNELS:
        raise ValueError(f"num_channels must be in 1..{MAX_CHANNELS}, got {num_channels}")
    import torch

    vis = torch.zeros((MAX_CHANNELS, MAX_CHANNELS), dtype=torch.bool)
    vis[:num_channels, :num_channels] = True
    return vis


def embedding_row(kind: str, reasoning_index: int) -> int:
    """The channel-embedding row of a stream of the project's layout (used only when the
    checkpoint has a channel embedding)."""
    return EMBED_OUTPUT if kind == "output" else EMBED_FIRST_THINKING + reasoning_index
