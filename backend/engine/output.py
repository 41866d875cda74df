"""What happens to a sampled token before the client sees it: stop rules, text, hold-back.

One :class:`StreamOutput` per stream (vLLM v1 keeps the same concerns in its output
processor): it decides whether a token ends the stream (end of sequence, a stop token,
a stop string, ``max_tokens``), turns tokens into text without ever splitting a
character (``IncrementalDetokenizer``), and holds back the tail of the text that could
still grow into a stop string, so a stop string never reaches the client. It knows
nothing about tensors, batches or KV: the scheduler feeds it one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.engine.sampling_params import SamplingParams
from backend.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class Accepted:
    """The outcome of one token: the text the client may have now, and whether it ended."""

    text: str
    finished: bool = False
    reason: str | None = None
    #: False for a silence token: it moves the grid on but is never sent as text.
    visible: bool = True


class StreamOutput:
    """Stop rules, incremental text and hold-back of one stream."""

    def __init__(
        self, tokenizer: Tokenizer, params: SamplingParams, eos_ids: set[int], silence_id: int | None
    ):
        self.params = params
        self.eos_ids = eos_ids
        self.silence_id = silence_id
        self.detok = IncrementalDetokenizer(tokenizer)
        self.count = 0  # tokens accepted, silence included: max_tokens bounds the stream's rows
        self.text = ""
        self.sent = 0  # how much of ``text`` the client has
        #: With stop strings, hold back a tail that could still grow into one (as vLLM does).
        self.hold = max((len(x) for x in params.stop), default=1) - 1

    def _take(self, hold: int) -> str:
        """The text not yet sent, less the last ``hold`` characters; marks it sent."""
        end = max(self.sent, len(self.text) - hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def accept(self, token: int) -> Accepted:
        p = self.params
        self.count += 1
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return Accepted(self.close("stop"), True, "stop")
        if token == self.silence_id:
            if self.count >= p.max_tokens:
                return Accepted(self.close("length"), True, "length", visible=False)
            return Accepted("", visible=False)
        self.text += self.detok.push([token])
        if p.stop:
            longest = max(len(x) for x in p.stop)
            hits = [i for i in (self.text.find(x, max(0, self.sent - longest)) for x in p.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return Accepted(self._take(0), True, "stop")
        if self.count >= p.max_tokens:
            return Accepted(self.close("length"), True, "length")
        return Accepted(self._take(self.hold))

    def close(self, reason: str) -> str:
        """The text not yet sent, for the stream's final event (none after an error)."""
        if reason == "error":
            return ""
        self.text += self.detok.flush()
        return self._take(0)
