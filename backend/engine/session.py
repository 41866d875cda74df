"""Sessions and their streams: the state the scheduler advances one row at a time.

A *session* is one grid: a prefix (a prompt, or the rows of a header grid) and the
streams that continue it, one channel each, row by row. A *stream* is one channel that is
sampled here, forced through a preamble, or fed from outside (``external``). Nothing here
touches a tensor except the per-session visibility matrix (built once) and each stream's
sampler: the scheduler moves ints around, the engine does the torch work.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backend.engine.attention import (
    ATTENTION_MODES,
    EMBED_USER,
    FIRST_STREAM_CHANNEL,
    PROMPT_CHANNEL,
    USER_CHANNEL,
    embedding_row,
    grid_visibility,
    visibility,
)
from backend.engine.output import StreamOutput
from backend.engine.sampling_params import SamplingParams
from backend.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch-free at import: preprocessing and the BLS model read GridRules, Prefix
    import torch

STREAM_KINDS = ("output", "reasoning")


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
    #: The channel (and channel-embedding row) of the stream in the paper's layout; None in
    #: the project's layout, where streams take channels 2.. in order.
    channel: int | None = None

    def validate(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"stream {self.name!r}: kind must be one of {STREAM_KINDS}, got {self.kind!r}")
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"stream {self.name!r}: attention must be one of {ATTENTION_MODES}, got {self.attention!r}"
            )
        if not self.external:
            self.sampling.validate()


def answer_stream(index: int) -> str:
    """The stream of answer ``index`` of a session with several (``num_return_sequences``,
    OpenAI ``n``): ``output``, ``output/1``, ``output/2``, ... (answer 0 keeps the one-answer
    name, so a k = 1 session is exactly what it always was)."""
    return "output" if index == 0 else f"output/{index}"


def answer_index(name: str) -> int | None:
    """Inverse of :func:`answer_stream`; None for a stream that is not an answer."""
    if name == "output":
        return 0
    head, _, tail = name.partition("/")
    return int(tail) if head == "output" and tail.isdigit() and int(tail) > 0 else None


def answer_specs(sampling: SamplingParams, k: int) -> list[StreamSpec]:
    """k answers of one session: answer i seeded ``seed + i`` when ``sampling`` is seeded, so
    sampled answers differ yet replay (answer 0 is the one-answer session's). They share the
    session's slot and prompt KV and never see each other (``attention.visibility``)."""
    specs = []
    for i in range(k):
        seed = None if sampling.seed is None else (sampling.seed + i) & 0xFFFF_FFFF_FFFF_FFFF
        params = dataclasses.replace(sampling, seed=seed)
        specs.append(StreamSpec(name=answer_stream(i), kind="output", sampling=params))
    return specs


@dataclass
class StreamEvent:
    """A delta of one stream; every stream ends with exactly one ``finished`` event."""

    session_id: str
    stream: str
    kind: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    row: int = -1
    t: float = field(default_factory=time.monotonic)
    #: Per token of the delta, ``(entropy, top-1 probability)`` of the distribution it was
    #: sampled from (after the silence penalty, before temperature); only for sessions that
    #: asked for them (``Engine.submit(channel_stats=True)``), else empty.
    stats: list[tuple[float, float]] = field(default_factory=list)
    #: Per token of the delta, its log probability (``SamplingParams.logprobs``), else empty.
    logprobs: list[float] = field(default_factory=list)
    #: Per token of the delta, its ``top_logprobs`` alternatives ``(ids, log probabilities)``,
    #: most likely first (``SamplingParams.top_logprobs``), else empty.
    top_logprobs: list[tuple[list[int], list[float]]] = field(default_factory=list)


EventCallback = Callable[[StreamEvent], None]


@dataclass(frozen=True)
class Prefix:
    """The rows a session starts from, each token with its grid coordinates.

    A prompt is one token per row on the prompt channel (causal = block-causal then); the
    paper's seed row or header grid is C tokens per row, channel c at embedding row c.
    """

    tokens: tuple[int, ...]
    rows: tuple[int, ...]
    chans: tuple[int, ...]
    embeds: tuple[int, ...]

    @classmethod
    def prompt(cls, ids: Sequence[int]) -> Prefix:
        n = len(ids)
        return cls(tuple(ids), tuple(range(n)), (PROMPT_CHANNEL,) * n, (EMBED_USER,) * n)

    @classmethod
    def grid(cls, rows: Sequence[Sequence[int]]) -> Prefix:
        """Rows of C tokens (channel c of every row is column c)."""
        if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
            raise ValueError("a grid prefix needs at least one row, every row with the same number of tokens")
        c = len(rows[0])
        return cls(
            tuple(t for r in rows for t in r),
            tuple(i for i in range(len(rows)) for _ in range(c)),
            tuple(range(c)) * len(rows),
            tuple(range(c)) * len(rows),
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def next_row(self) -> int:
        """The first row after the prefix."""
        return self.rows[-1] + 1

    @property
    def last_row(self) -> list[int]:
        """Indices of the entries of the prefix's last row (their logits start the streams)."""
        last = self.rows[-1]
        return [i for i, r in enumerate(self.rows) if r == last]

    def first_logits(self, channel: int) -> int:
        """Which entry of the last row a stream on ``channel`` samples its first token from:
        its own channel's, or (a prompt) the last token's. Returned as a position in
        :attr:`last_row`."""
        last = self.last_row
        for k, i in enumerate(last):
            if self.chans[i] == channel:
                return k
        return len(last) - 1


@dataclass(frozen=True)
class GridRules:
    """Session-level rules of the paper's stream layout (``stream_inference.generate``).

    Every row holds one token per channel, silence for a channel with nothing to say;
    channel 0 is User (never sampled: the queued user tokens, else silence). Where the
    paper's code is the reference, the defaults are its defaults.
    """

    silence_id: int
    num_channels: int
    output_channel: int = 1
    #: Subtracted from Output's silence logit once the user has stopped, ramped in over
    #: ``penalty_ramp_rows`` rows (min(1, k / ramp), k = rows since the user's last token).
    silence_penalty: float = 10.0
    #: The same for the thinking channels (2..C-1); off by default as in the paper.
    think_silence_penalty: float = 0.0
    penalty_ramp_rows: int = 5
    #: The paper's variant that also applies the penalty while the user talks
    #: (ramp counted from the user's first row).
    penalty_during_user_talk: bool = False
    #: End the session after this many consecutive all-silent rows (1 when the user text
    #: is given up front, as the paper); None: never on silence.
    stop_silent_rows: int | None = 1
    #: Rows the session may generate (the paper's ``max_rows``).
    max_rows: int = 200
    #: Silence keys are masked (a token still sees itself).
    skip_silence: bool = False
    #: Channels forced to silence (ablation): their samples are replaced by silence.
    ablate: frozenset[int] = frozenset()

    def penalty(self, channel: int, k: int) -> float:
        """The silence penalty of ``channel`` ``k`` rows into the ramp (k >= 1)."""
        base = self.silence_penalty if channel == self.output_channel else self.think_silence_penalty
        return base * min(1.0, k / self.penalty_ramp_rows) if base > 0 and k > 0 else 0.0


class Stream:
    """One channel of a session: what it feeds into the next row, and what it has said."""

    def __init__(
        self,
        spec: StreamSpec,
        channel: int,
        embed_row: int,
        output: StreamOutput,
        history: list[int],
    ):
        self.spec = spec
        self.channel = channel
        self.embed_row = embed_row
        self.forced: collections.deque[int] = collections.deque(spec.preamble_ids)
        from backend.engine.sampling import StreamSampler  # torch: engine processes only

        self.sampler = None if spec.external else StreamSampler(spec.sampling, history, output.eos_ids)
        self.output = output
        self.next_input: int | None = None  # the token this stream feeds into the next row
        self.finished = False
        self.external_pending: collections.deque[int] = collections.deque()

    @property
    def name(self) -> str:
        return self.spec.name


class Session:
    """One grid being generated: its prefix, its streams and where it stands."""

    def __init__(
        self,
        sid: str,
        prefix: Prefix,
        streams: list[Stream],
        vis: torch.Tensor,
        attention: str,
        on_event: EventCallback | None,
        *,
        user_channel: int,
        user_embed: int,
        rules: GridRules | None = None,
        silence_id: int | None = None,
        user_ids: Sequence[int] = (),
        imported: bool = False,
        export: concurrent.futures.Future | None = None,
    ):
        self.id = sid
        self.prefix = prefix
        self.streams = streams
        self.by_name = {s.name: s for s in streams}
        self.vis = vis
        self.attention = attention
        self.on_event = on_event
        self.user_channel = user_channel
        self.user_embed = user_embed
        self.rules = rules
        #: Token for an idle channel (the paper's layout, or ``cross`` mode with a configured
        #: silence token); None: idle channels are left out of the row.
        self.silence_id = rules.silence_id if rules is not None else silence_id
        #: The prefix's KV comes from another process (``prefix_kv``): nothing to prefill.
        self.imported = imported
        self.export = export
        self.slot = -1
        self.prefilled = 0
        self.row = prefix.next_row  # the row the next decode step feeds
        self.user_pending: collections.deque[int] = collections.deque(user_ids)
        self.first_user_row: int | None = None
        self.last_user_row: int | None = None
        self.silent_rows = 0  # consecutive all-silent rows (the paper's layout)
        self.rows_generated = 0
        self.t_submit = time.monotonic()
        #: Report ``StreamEvent.stats`` for every sampled token.
        self.channel_stats = False

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.prefix)

    def sampled_streams(self) -> list[Stream]:
        return [s for s in self.streams if not s.spec.external]

    def done(self) -> bool:
        if self.export is not None:
            return not self.in_prefill
        return all(s.finished or s.spec.external for s in self.streams)


def new_session(
    sid: str,
    prefix: Prefix,
    specs: Sequence[StreamSpec],
    *,
    attention: str,
    on_event: EventCallback | None,
    rules: GridRules | None,
    user_ids: Sequence[int],
    tokenizer: Tokenizer,
    eos_ids: set[int],
    silence_token_id: int | None,
) -> Session:
    """A session with its streams placed on the grid: which channel and embedding row each
    stream takes, and which channels see which (the project's layout, or ``rules``)."""
    streams = []
    reasoning_index = 0
    for i, spec in enumerate(specs):
        if rules is not None:
            if spec.channel is None or not 1 <= spec.channel < rules.num_channels:
                raise ValueError(f"stream {spec.name!r}: channel must be in 1..{rules.num_channels - 1}")
            channel = embed = spec.channel
        else:
            channel, embed = FIRST_STREAM_CHANNEL + i, embedding_row(spec.kind, reasoning_index)
        reasoning_index += spec.kind == "reasoning"
        silence = rules.silence_id if rules is not None else silence_token_id
        output = StreamOutput(tokenizer, spec.sampling, eos_ids, silence)
        streams.append(Stream(spec, channel, embed, output, list(prefix.tokens)))
    if rules is not None:
        vis = grid_visibility(rules.num_channels)
        user_channel = user_embed = 0
    else:
        vis = visibility(attention, [s.attention for s in specs], [s.kind for s in specs])
        user_channel, user_embed = USER_CHANNEL, EMBED_USER
    return Session(
        sid,
        prefix,
        streams,
        vis,
        attention,
        on_event,
        user_channel=user_channel,
        user_embed=user_embed,
        rules=rules,
        silence_id=silence_token_id,
        user_ids=user_ids,
    )
