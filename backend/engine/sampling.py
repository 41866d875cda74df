"""Per-stream sampling: every stream of a request carries its own parameters and RNG.

Streams of one request want different behaviour (a greedy answer next to a
high-temperature brainstorm), so nothing here is per request. Greedy streams of a
whole step are decided with one batched ``argmax``; the rest go one by one with their
own ``torch.Generator`` so that a seed reproduces a stream regardless of what else
shares the batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from backend.engine.sampling_params import SamplingParams


class StreamSampler:
    """Holds a stream's RNG and the token history its repetition penalty looks at."""

    def __init__(self, params: SamplingParams, history: list[int] | None = None, eos_ids: Iterable[int] = ()):
        self.params = params
        #: What ``min_tokens`` holds back: end of sequence and the stop tokens.
        self._enders = torch.tensor(sorted({*eos_ids, *params.stop_token_ids}), dtype=torch.long)
        self._counts: dict[int, int] = {}  # generated tokens (the penalties look only at these)
        self._generated: list[int] = []
        #: Log probability of each sampled token under the model's distribution (``logprobs``).
        self.logprobs: list[float] = []
        #: Per sampled token, the ``top_logprobs`` most likely ``(ids, log probabilities)`` of
        #: the same distribution as ``logprobs``, most likely first (``top_logprobs > 0``).
        self.top_logprobs: list[tuple[list[int], list[float]]] = []
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
        self._counts[token] = self._counts.get(token, 0) + 1
        self._generated.append(token)
        if self._seen is not None:
            self._seen = torch.unique(torch.cat([self._seen, torch.tensor([token])]))

    def needs_logits_processing(self) -> bool:
        p = self.params
        return (
            self._seen is not None
            or not p.greedy
            or bool(
                p.presence_penalty
                or p.frequency_penalty
                or p.min_tokens
                or p.bad_words_ids
                or p.logprobs
                or p.top_logprobs
            )
        )

    def _banned(self) -> list[int]:
        """Tokens that may not come next: bad words whose prefix was just generated, and the
        end of sequence while fewer than ``min_tokens`` were generated."""
        out = []
        for word in self.params.bad_words_ids:
            head = word[:-1]
            if not head or self._generated[-len(head) :] == head:
                out.append(word[-1])
        return out

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Presence / frequency penalties, bad words and ``min_tokens`` (a new tensor if any)."""
        p = self.params
        if (p.presence_penalty or p.frequency_penalty) and self._counts:
            ids = torch.tensor(list(self._counts), dtype=torch.long)
            counts = torch.tensor(list(self._counts.values()), dtype=logits.dtype)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        banned = self._banned()
        early = len(self._generated) < p.min_tokens and self._enders.numel() > 0
        if banned or early:
            logits = logits.clone()
            if banned:
                logits[torch.tensor(banned, dtype=torch.long)] = float("-inf")
            if early:
                logits[self._enders] = float("-inf")
        return logits

    def sample(self, logits: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> int:
        """``logits``: ``[vocab]`` fp32; ``bias``: ``(token, delta)`` pairs added first.

        Order of operations: repetition penalty (as HF's processor), then ``bias`` (the
        paper's silence penalty is subtracted from the raw logit), then presence / frequency
        penalties, bad words and ``min_tokens`` (``logprobs`` and ``top_logprobs`` are taken
        before these and before temperature / top-k / top-p, from the model's distribution
        (after the repetition penalty and ``bias`` only, none by default) as OpenAI reports
        it and vLLM does by default), then temperature, top-k,
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
        raw = logits
        logits = self._penalise(logits)
        token = self._draw(logits)
        if p.logprobs or p.top_logprobs:
            self._record(raw, token)
        return token

    def _record(self, raw: torch.Tensor, token: int) -> None:
        """The sampled token's log probability and, if asked, the ``top_logprobs`` best ones:
        one ``log_softmax`` and one ``topk`` over this row only (the rows that ask)."""
        p = self.params
        lps = torch.log_softmax(raw.float(), dim=-1)
        if p.logprobs:
            self.logprobs.append(float(lps[token]))
        if p.top_logprobs:
            top = torch.topk(lps, min(p.top_logprobs, lps.shape[-1]))
            self.top_logprobs.append((top.indices.tolist(), top.values.tolist()))

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
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
