"""``POST /v1/chat/completions``: OpenAI chat over the multi-stream ensemble.

What a client sees:

- the answer in ``delta.content`` / ``message.content``: a plain client that reads only
  ``content`` gets the user-facing answer (the ``revision`` too, with ``sync: "revise"``);
- reasoning in both ``reasoning_content`` (DeepSeek's and vLLM's name) and ``reasoning``
  (OpenRouter's and newer vLLM's), each delta with ``stream`` naming its stream
  (``output``, ``reasoning/0``, ...), so several parallel reasoning streams stay apart;
- ``usage`` with ``completion_tokens_details.reasoning_tokens``; ``session_id`` in every
  chunk and the ``X-Session-Id`` header, for ``/v1/sessions/{id}/input`` and ``/cancel``.

``messages`` go to the ensemble's ``messages`` input and through the model's own chat
template there (the front has no tokenizer); ``text_input`` carries the last user turn.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from client.events import Done, StreamDelta

from .errors import bad_request
from .options import Defaults, build_request, reasoning_effort, require
from .runner import Run, TokenLogprob, has_chunk, token_logprobs
from .streaming import chain
from .usage import answer_text, chat_usage, finish_reason, joined_reasoning, reasoning_texts, sequences_of

#: Keys of a chat body the endpoint reads itself.
CHAT_FIELDS = frozenset({"messages", "stream", "reasoning_effort", "stream_options"})


def text_of(content: Any, where: str) -> str:
    """A message's ``content``: a string, or a list of text parts (``text`` / ``input_text``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text", "output_text"):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise bad_request(f"{where}[{j}]: only text parts are supported, got {kind!r}", param=where)
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise bad_request(f"{where} must be a string or a list of text parts", param=where)


def conversation(messages: Any, param: str = "messages") -> list[dict[str, str]]:
    """OpenAI ``messages`` -> ``[{"role", "content"}]`` for the ensemble's ``messages`` input."""
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"{param} must be a non-empty list of messages", param=param)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise bad_request(f"{param}[{i}] must be an object with role and content", param=param)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(
                f"{param}[{i}].role must be system, developer, user or assistant "
                f"(tool calls are not supported), got {role!r}",
                param=param,
            )
        out.append({"role": role, "content": text_of(m.get("content"), f"{param}[{i}].content")})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise bad_request(f"{param} must contain a user message with non-blank content", param=param)
    return out


def logprobs_content(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice: per sampled token its log probability and, with
    ``top_logprobs``, its most likely alternatives (their text and exact bytes from the server)."""
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": list(t.encode("utf-8")),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in top
                ],
            }
            for t, lp, top in tokens
        ]
    }


def last_user_text(msgs: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(msgs) if m["role"] == "user" and m["content"].strip())


def request_for(body: Mapping[str, Any], defaults: Defaults) -> Any:
    msgs = conversation(require(body, "messages"))
    return build_request(
        body,
        last_user_text(msgs),
        endpoint_fields=CHAT_FIELDS,
        defaults=defaults,
        fixed={"messages": json.dumps(msgs, ensure_ascii=False)},
        effort=reasoning_effort(body.get("reasoning_effort")),
    )


class ChatShape:
    """The chat completion objects of one run (ids, model, timestamps shared by its chunks)."""

    def __init__(self, run: Run, model: str, server_timing: bool = False) -> None:
        self.run = run
        #: ``stream_options.include_server_timing`` (``streaming.StreamFlags``).
        self.server_timing = server_timing
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _chunk(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "session_id": self.run.session_id,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    def delta(self, ev: StreamDelta) -> dict[str, Any] | None:
        """The chunk of one stream delta, ``None`` where it has none (``runner.has_chunk``)."""
        if not has_chunk(ev):
            return None
        if ev.kind == "reasoning":
            delta = {"reasoning_content": ev.text, "reasoning": ev.text, "stream": ev.stream}
            chunk = self._chunk(delta, index=ev.sequence)
        else:
            lps = logprobs_content(token_logprobs(ev)) if ev.logprobs else None
            chunk = self._chunk({"content": ev.text, "stream": ev.stream}, logprobs=lps, index=ev.sequence)
        if self.server_timing:
            chunk["server_timing_ms"] = ev.timing_ms
        return chunk

    def first(self, index: int = 0) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, index=index)

    def last(self, done: Done, index: int = 0) -> dict[str, Any]:
        return self._chunk({}, finish_reason(done, self.run.cancelled), index=index)

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        chunk = self._chunk({})
        chunk["choices"] = []
        chunk["usage"] = chat_usage(done, done.prompt_tokens or 0)
        return chunk

    def choice(self, done: Done, index: int) -> dict[str, Any]:
        """Choice ``index`` of a whole answer (``n`` > 1: one per sequence, ``Done.sequences``)."""
        reasoning = joined_reasoning(done)
        message: dict[str, Any] = {"role": "assistant", "content": answer_text(done)}
        if reasoning:
            message["reasoning_content"] = reasoning
            message["reasoning"] = reasoning
            message["reasoning_streams"] = reasoning_texts(done)
        lps = self.run.logprobs_of(index)
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs_content(lps) if lps else None,
            "finish_reason": finish_reason(done, self.run.cancelled),
        }

    def completion(self, done: Done) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "session_id": self.run.session_id,
            "choices": [self.choice(d, i) for i, d in enumerate(sequences_of(done))],
            "usage": chat_usage(done, done.prompt_tokens or 0),
        }


async def chat_chunks(
    shape: ChatShape,
    first: StreamDelta | Done | None,
    rest: AsyncIterator[StreamDelta | Done],
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed chat completion, from its first event on (``n`` > 1: the
    choices' chunks interleave, each with its ``index``; every choice ends with its own
    ``finish_reason`` chunk)."""
    for i in range(shape.run.sequences):
        yield shape.first(i)

    async for ev in chain(first, rest):
        if isinstance(ev, Done):
            for i, seq in enumerate(sequences_of(ev)):
                yield shape.last(seq, i)
            if include_usage:
                yield shape.usage_chunk(ev)
            return
        chunk = shape.delta(ev)
        if chunk is not None:
            yield chunk
