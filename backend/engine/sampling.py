"""Per-stream sampling: every stream of a request carries its own parameters and RNG.

Streams of one request want different behaviour (a greedy answer next to a
high-temperature brainstorm), so nothing here is per request. Greedy streams of a
whole step are decided with one batched ``argmax``; the rest go one by one with their
own ``torch.Generator`` so that a seed reproduces a stream regardless of what else
shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class StreamSampler:
    """Holds a stream's RNG and the token history its repetition penalty looks at."""

    def __init__(self, params: SamplingParams, history: list[int] | None = None):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                self.generator.seed()
        self._seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.tensor(sorted(set(history or [])), dtype=torch.long)

    def observe(self, token: int) -> None:
        if self._seen is not None:
            self._seen = torch.unique(torch.cat([self._seen, torch.tensor([token])]))

    def needs_logits_processing(self) -> bool:
        return self._seen is not None or not self.params.greedy

    def sample(self, logits: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> int:
        """``logits``: ``[vocab]`` fp32; ``bias``: ``(token, delta)`` pairs added first.

        Order of operations: repetition penalty (as HF's processor), then ``bias`` (the
        paper's silence penalty is subtracted from the raw logit), then temperature, top-k,
        and top-p exactly as the paper's ``sample_top_p``: the probabilities are sorted,
        every token whose preceding mass already exceeds ``top_p`` is dropped, and the draw
        is made over the renormalised *sorted* probabilities. Drawing in sorted order (not
        vocabulary order) is what makes a seed give the same token as the paper's code.
        """
        p = self.params
        if self._seen is not None and self._seen.numel():
            picked = logits[self._seen]
            logits = logits.clone()
            logits[self._seen] = torch.where(
                picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty
            )
        if bias:
            logits = logits.clone()
            for token, delta in bias:
                logits[token] += delta
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs = sorted_probs.masked_fill(cum - sorted_probs > p.top_p, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum()
        return int(order[torch.multinomial(sorted_probs, 1, generator=self.generator)])
