"""The stream grid: channels, what each stream is, and which channels it may attend to.

A session is a grid of rows x channels (Su et al., 2026). Channel indices inside a
session are fixed: 0 is the shared prompt, 1 the User input channel, 2.. the streams in
the order the request declared them. Attention between channels is a small boolean
*visibility* matrix per session; the mask of a step is ``visible[q_chan, k_chan] and
k_row < q_row``, or the token itself. Two policies fill it:

- ``cross``: the paper's block-causal mask: every stream sees every channel's earlier
  rows. Right for stream-trained checkpoints.
- ``isolated``: a stream sees the shared prompt, the User channel and its own past only.
  Ordinary checkpoints have never seen interleaved channels, so this keeps each stream
  a clean continuation of the prompt while still advancing all streams in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backend.sampling import SamplingParams

PROMPT_CHANNEL = 0
USER_CHANNEL = 1
FIRST_STREAM_CHANNEL = 2
MAX_CHANNELS = 16
ATTENTION_MODES = ("isolated", "cross")
STREAM_KINDS = ("output", "reasoning")

#: Rows of a learned channel embedding, in the order the paper's checkpoints use:
#: User (the prompt is user text too), Output, then Thinking-1..k.
EMBED_USER = 0
EMBED_OUTPUT = 1
EMBED_FIRST_THINKING = 2


@dataclass
class StreamSpec:
    """One generated (or externally fed) stream of a session."""

    name: str
    kind: str = "output"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: Tokens forced into the stream, one per row, before sampling starts
    #: (e.g. a reasoning stream's "Let me think" header). They are not emitted.
    preamble_ids: list[int] = field(default_factory=list)
    #: True: the stream is not sampled here; its tokens arrive through ``Engine.inject``
    #: (reasoning produced by another Triton model, fed to the answer in ``cross`` mode).
    external: bool = False
    #: Per-stream override of the session's attention policy.
    attention: str | None = None

    def validate(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"stream {self.name!r}: kind must be one of {STREAM_KINDS}, got {self.kind!r}")
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"stream {self.name!r}: attention must be one of {ATTENTION_MODES}, got {self.attention!r}"
            )
        if not self.external:
            self.sampling.validate()


def visibility(attention: str, specs: list[StreamSpec]) -> torch.Tensor:
    """The ``[MAX_CHANNELS, MAX_CHANNELS]`` matrix: may a token of channel q see channel k."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention!r}")
    n = FIRST_STREAM_CHANNEL + len(specs)
    if n > MAX_CHANNELS:
        raise ValueError(
            f"a session has at most {MAX_CHANNELS - FIRST_STREAM_CHANNEL} streams, got {len(specs)}"
        )
    vis = torch.zeros((MAX_CHANNELS, MAX_CHANNELS), dtype=torch.bool)
    vis[PROMPT_CHANNEL, PROMPT_CHANNEL] = True
    vis[USER_CHANNEL, PROMPT_CHANNEL] = vis[USER_CHANNEL, USER_CHANNEL] = True
    if attention == "cross":
        vis[USER_CHANNEL, :n] = True
    for i, spec in enumerate(specs):
        c = FIRST_STREAM_CHANNEL + i
        mode = spec.attention or attention
        if mode == "cross":
            vis[c, :n] = True
        else:
            vis[c, PROMPT_CHANNEL] = vis[c, USER_CHANNEL] = vis[c, c] = True
    return vis


def embedding_row(spec: StreamSpec, reasoning_index: int) -> int:
    """The channel-embedding row of a stream (used only when the checkpoint has one)."""
    return EMBED_OUTPUT if spec.kind == "output" else EMBED_FIRST_THINKING + reasoning_index
