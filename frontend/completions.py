"""``POST /v1/completions``: OpenAI's plain-text completions (the prompt without chat template).

``prompt`` goes to the model as is (``raw_prompt``), as a completions client expects; the
answer is ``choices[0].text``; reasoning streams, if asked for, come as in chat: in
``reasoning_content`` / ``reasoning`` with ``stream`` naming the stream. ``echo`` puts the
prompt in front of the text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from client.events import Done, StreamDelta, TopLogprob
from client.request import PARAMS

from .errors import bad_request
from .options import Defaults, build_request, reasoning_effort, require
from .runner import Run, TokenLogprob, has_chunk, token_logprobs
from .streaming import chain
from .usage import answer_text, chat_usage, finish_reason, joined_reasoning, sequences_of

COMPLETION_FIELDS = frozenset({"prompt", "stream", "echo", "reasoning_effort", "stream_options", "logprobs"})
#: The most alternatives per token (``logprobs``), as chat's ``top_logprobs`` (client/request.py).
MAX_TOP_LOGPROBS = int(PARAMS["top_logprobs"].le or 0)


def prompt_of(body: Mapping[str, Any]) -> str:
    """``prompt``: a string, or a list holding one string (one session per request)."""
    prompt = require(body, "prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request(
                "prompt must be one string (a list of several prompts or of token ids is not "
                "supported: send one request per prompt)",
                param="prompt",
            )
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt must be a non-blank string", param="prompt")
    return prompt


def request_for(body: Mapping[str, Any], defaults: Defaults) -> Any:
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad_request("echo must be true or false", param="echo")
    # Completions' ``logprobs`` is how many alternatives to list per token (OpenAI: 0..5 on its
    # own models, 0..20 here as for chat's ``top_logprobs``); 0: the sampled tokens only.
    n = body.get("logprobs")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS):
        raise bad_request(
            f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {n!r}", param="logprobs"
        )
    fixed: dict[str, Any] = {"raw_prompt": True}
    if n is not None:
        fixed["return_log_probs"] = True
        if n:
            fixed["top_logprobs"] = n
    return build_request(
        body,
        prompt_of(body),
        endpoint_fields=COMPLETION_FIELDS,
        defaults=defaults,
        fixed=fixed,
        effort=reasoning_effort(body.get("reasoning_effort")),
    )


def _alternatives(top: list[TopLogprob]) -> dict[str, float]:
    """``{token: logprob}``, most likely first; of two alternatives spelled alike, the likelier."""
    out: dict[str, float] = {}
    for alt in top:
        out.setdefault(alt.token, alt.logprob)
    return out


def completion_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``top_logprobs`` (with ``logprobs`` k > 0)
    is per token a ``{token: logprob}`` of its k most likely alternatives, else null."""
    offsets, at = [], 0
    for t, _, _ in tokens:
        offsets.append(at)
        at += len(t)
    tops = [_alternatives(top) for _, _, top in tokens]
    return {
        "tokens": [t for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": tops if any(tops) else None,
        "text_offset": offsets,
    }


class CompletionShape:
    def __init__(self, run: Run, model: str, prompt: str, echo: bool, server_timing: bool = False) -> None:
        self.run = run
        #: ``stream_options.include_server_timing`` (``streaming.StreamFlags``).
        self.server_timing = server_timing
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.prompt = prompt
        self.echo = echo

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "session_id": self.run.session_id,
            "choices": [{"index": 0, "logprobs": None, "finish_reason": None} | choice],
        }

    def delta(self, ev: StreamDelta) -> dict[str, Any] | None:
        """The chunk of one stream delta, ``None`` where it has none (``runner.has_chunk``)."""
        if not has_chunk(ev):
            return None
        choice: dict[str, Any] = {"index": ev.sequence, "text": ev.text, "stream": ev.stream}
        if ev.kind == "reasoning":
            choice |= {"text": "", "reasoning_content": ev.text, "reasoning": ev.text}
        elif ev.logprobs:
            choice["logprobs"] = completion_logprobs(token_logprobs(ev))
        chunk = self._chunk(choice)
        if self.server_timing:
            chunk["server_timing_ms"] = ev.timing_ms
        return chunk

    def choice(self, done: Done, index: int) -> dict[str, Any]:
        """Choice ``index`` of a whole answer (``n`` > 1: one per sequence, ``Done.sequences``)."""
        text = answer_text(done)
        lps = self.run.logprobs_of(index)
        choice: dict[str, Any] = {
            "index": index,
            "text": self.prompt + text if self.echo else text,
            "logprobs": completion_logprobs(lps) if lps else None,
            "finish_reason": finish_reason(done, self.run.cancelled),
        }
        reasoning = joined_reasoning(done)
        if reasoning:
            choice["reasoning_content"] = reasoning
            choice["reasoning"] = reasoning
        return choice

    def completion(self, done: Done) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "session_id": self.run.session_id,
            "choices": [self.choice(d, i) for i, d in enumerate(sequences_of(done))],
            "usage": chat_usage(done, done.prompt_tokens or 0),
        }


async def completion_chunks(
    shape: CompletionShape,
    first: StreamDelta | Done | None,
    rest: AsyncIterator[StreamDelta | Done],
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    if shape.echo:
        for i in range(shape.run.sequences):
            yield shape._chunk({"index": i, "text": shape.prompt, "stream": "output"})

    async for ev in chain(first, rest):
        if isinstance(ev, Done):
            for i, seq in enumerate(sequences_of(ev)):
                yield shape._chunk(
                    {"index": i, "text": "", "finish_reason": finish_reason(seq, shape.run.cancelled)}
                )
            if include_usage:
                usage = shape._chunk({})
                usage["choices"] = []
                usage["usage"] = chat_usage(ev, ev.prompt_tokens or 0)
                yield usage
            return
        chunk = shape.delta(ev)
        if chunk is not None:
            yield chunk
