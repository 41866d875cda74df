"""What a stream is sampled with: :class:`SamplingParams`, the request-side half of
sampling (``sampling.py`` holds the torch-side :class:`~backend.engine.sampling.StreamSampler`).

A file of its own without torch, because the processes that only validate and route
requests (preprocessing, the BLS model) import it: torch costs each of them ~135 MiB (PSS, bench.memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: OpenAI's bound of ``top_logprobs`` (chat) and ``logprobs`` (completions).
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """What a stream is sampled with. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    #: OpenAI's / TensorRT-LLM's penalties over the tokens this stream generated: a token's
    #: logit is lowered by ``presence_penalty`` once it occurred and by ``frequency_penalty``
    #: per occurrence (negative values encourage it).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: End-of-sequence and ``stop_token_ids`` cannot be sampled before this many tokens.
    min_tokens: int = 0
    #: Token sequences never generated: the last token of each is banned whenever the stream's
    #: latest tokens equal the rest of it (a one-token word is banned always).
    bad_words_ids: list[list[int]] = field(default_factory=list)
    #: Record each sampled token's log probability (``StreamSampler.logprobs``).
    logprobs: bool = False
    #: Also record, per sampled token, the ``top_logprobs`` most likely tokens and their log
    #: probabilities (``StreamSampler.top_logprobs``; OpenAI's ``top_logprobs``, at most 20).
    top_logprobs: int = 0

    def validate(self) -> None:
        """Raises ``ValueError`` naming the field and the rule it breaks."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
