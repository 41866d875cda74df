"""``/v1/responses``: OpenAI's Responses API, one output item per stream.

Each reasoning stream of a session is its own ``reasoning`` item at its own ``output_index``
(its text in ``content[0]`` as ``reasoning_text``, streamed as
``response.reasoning_text.delta``), the answer a ``message`` item (``output_text``,
``response.output_text.delta``); a ``revision`` of the answer (``sync: "revise"``) is a
second message item. Items are numbered in the order their stream first speaks, so the
events of parallel streams interleave exactly as the server produced them. Every item also
carries ``stream``, the server's stream name.

Log probabilities (``include: ["message.output_text.logprobs"]``, with ``top_logprobs`` 0..20
alternatives per token): each answer token's ``{token, logprob, bytes, top_logprobs}`` in its
``output_text`` part's ``logprobs`` and in the ``logprobs`` of the
``response.output_text.delta`` that carries it (a delta whose tokens have no text yet, a
character split across tokens, still goes out, with ``delta: ""``, so the streamed entries
are exactly the stored ones); the same entries as chat's ``logprobs.content``
(``chat.logprobs_content``). Reasoning items have none: the server sends the answer's only.

Responses are kept in memory (``store``, the last ``STORE_SIZE``): ``GET
/v1/responses/{id}``, ``previous_response_id`` (the conversation goes on), ``background:
true`` (answer at once, poll with GET) and ``POST /v1/responses/{id}/cancel`` (cancels the
session on the server; the response ends ``cancelled``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

from client.errors import MultiStreamError
from client.events import Done, StreamDelta, kind_of
from client.request import GenerateRequest

from .chat import logprobs_content, text_of
from .errors import APIError, bad_request, from_server
from .options import Defaults, build_request, reasoning_effort
from .runner import Run, token_logprobs
from .usage import answer_stream, responses_usage

STORE_SIZE = 1000
RESPONSE_FIELDS = frozenset(
    {"input", "instructions", "stream", "background", "previous_response_id", "reasoning", "store", "include"}
)
#: The ``include`` value that asks for the answer's token log probabilities (OpenAI's name);
#: the only one this server has data for.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: The other values OpenAI documents for ``include``. None has anything to add here: this
#: server runs no tools (file search, web search, code interpreter, computer use), takes no
#: images, and returns reasoning as plain text, so ``reasoning.encrypted_content`` (what the
#: Agents SDK and Codex send with ``store: false``) has nothing to carry: reasoning items
#: sent back in ``input`` are skipped (``conversation``). Accepted, so those clients work;
#: a value outside this list is a typo or a newer feature, and is refused by name.
NO_OP_INCLUDES = frozenset(
    {
        "reasoning.encrypted_content",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "message.input_image.image_url",
    }
)


def wants_logprobs(body: Mapping[str, Any]) -> bool:
    """``include``: a list of OpenAI's documented values, of which only
    :data:`LOGPROBS_INCLUDE` changes the response here (:data:`NO_OP_INCLUDES`: nothing to add)."""
    include = body.get("include")
    if include is None:
        return False
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise bad_request(
            f'include must be a list of strings (e.g. ["{LOGPROBS_INCLUDE}"]), got {include!r}',
            param="include",
        )
    unknown = [x for x in include if x != LOGPROBS_INCLUDE and x not in NO_OP_INCLUDES]
    if unknown:
        known = ", ".join(sorted(NO_OP_INCLUDES | {LOGPROBS_INCLUDE}))
        raise bad_request(f"include: {unknown[0]!r} is not one of {known}", param="include")
    return LOGPROBS_INCLUDE in include


def conversation(body: Mapping[str, Any], store: ResponseStore) -> list[dict[str, str]]:
    """``instructions`` + the ``previous_response_id`` chain + ``input`` -> chat messages."""
    msgs: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("instructions must be a string", param="instructions")
        if instructions.strip():
            msgs.append({"role": "system", "content": instructions})
    prev_id = body.get("previous_response_id")
    if prev_id is not None:
        prev = store.get(prev_id)
        if prev is None:
            raise APIError(
                404,
                f"previous_response_id {prev_id!r} is not a stored response",
                param="previous_response_id",
            )
        msgs += [m for m in prev.messages if m["role"] != "system"] + [
            {"role": "assistant", "content": prev.answer()}
        ]
    raw = body.get("input")
    if raw is None:
        raise bad_request("input is required", param="input")
    if isinstance(raw, str):
        msgs.append({"role": "user", "content": raw})
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                raise bad_request(f"input[{i}] must be an object", param="input")
            kind = item.get("type", "message")
            if kind == "reasoning":
                continue  # a reasoning item sent back: the model's own notes, not conversation
            if kind != "message":
                raise bad_request(f"input[{i}]: items of type {kind!r} are not supported", param="input")
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise bad_request(
                    f"input[{i}].role must be system, developer, user or assistant, got {role!r}",
                    param="input",
                )
            msgs.append({"role": role, "content": text_of(item.get("content"), f"input[{i}].content")})
    else:
        raise bad_request("input must be a string or a list of input items", param="input")
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise bad_request("input must contain a user message with non-blank text", param="input")
    return msgs


def request_for(
    body: Mapping[str, Any], messages: list[dict[str, str]], defaults: Defaults
) -> GenerateRequest:
    import json

    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, Mapping):
        raise bad_request('reasoning must be an object ({"effort": ...})', param="reasoning")
    effort = reasoning_effort((reasoning or {}).get("effort"), "reasoning.effort")
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"].strip())
    fixed: dict[str, Any] = {"messages": json.dumps(messages, ensure_ascii=False)}
    if wants_logprobs(body):
        fixed["return_log_probs"] = True
    request = build_request(
        body,
        last_user,
        endpoint_fields=RESPONSE_FIELDS,
        defaults=defaults,
        fixed=fixed,
        effort=effort,
    )
    if request.top_logprobs and not request.return_log_probs:
        raise bad_request(
            f'top_logprobs ({request.top_logprobs}) needs include: ["{LOGPROBS_INCLUDE}"] '
            "(the alternatives are listed beside each token's own log probability)",
            param="top_logprobs",
        )
    if (request.num_return_sequences or 1) > 1:  # the Responses API has no n: one output per response
        key = next(k for k in ("n", "num_return_sequences") if k in body)
        raise bad_request(
            f"{key} must be 1 on /v1/responses (a response has one output); "
            "for several answers use /v1/chat/completions or /v1/completions with n",
            param=key,
        )
    return request


class ResponseRecord:
    """One response: its items as they fill, its status, what ``GET`` returns."""

    def __init__(self, body: Mapping[str, Any], messages: list[dict[str, str]], model: str, run: Run) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.messages = messages
        self.run = run
        self.status = "in_progress"
        self.background = bool(body.get("background"))
        self.store = body.get("store") is not False
        self.instructions = body.get("instructions")
        self.params = {k: body.get(k) for k in ("temperature", "top_p", "max_output_tokens", "top_logprobs")}
        self.metadata = body.get("metadata") or {}
        self.previous_response_id = body.get("previous_response_id")
        self.items: list[dict[str, Any]] = []
        self._by_stream: dict[str, int] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.finished = asyncio.Event()
        self._seq = 0

    # ------------------------------------------------------------------ the object
    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": self.background,
            "model": self.model,
            "output": [dict(item) for item in self.items],
            "instructions": self.instructions,
            "previous_response_id": self.previous_response_id,
            "metadata": self.metadata,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "temperature": self.params["temperature"],
            "top_p": self.params["top_p"],
            "max_output_tokens": self.params["max_output_tokens"],
            "top_logprobs": self.params["top_logprobs"],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "store": self.store,
            "session_id": self.run.session_id,
        }

    def answer(self) -> str:
        msgs = [i for i in self.items if i["type"] == "message"]
        return msgs[-1]["content"][0]["text"] if msgs else ""

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, **payload: Any) -> tuple[str, dict[str, Any]]:
        self._seq += 1
        return kind, {"type": kind, "sequence_number": self._seq, **payload}

    def opening(self) -> list[tuple[str, dict[str, Any]]]:
        snapshot = self.to_dict() | {"output": []}
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def _open_item(self, stream: str) -> list[tuple[str, dict[str, Any]]]:
        index = len(self.items)
        reasoning = kind_of(stream) == "reasoning"
        if reasoning:
            item = {
                "id": f"rs_{uuid.uuid4().hex}",
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {
                "id": f"msg_{uuid.uuid4().hex}",
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["stream"] = stream
        self.items.append(item)
        self._by_stream[stream] = index
        events = [self._event("response.output_item.added", output_index=index, item=dict(item, content=[]))]
        item["content"] = [part]
        events.append(
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=dict(part),
            )
        )
        return events

    def _close_item(self, index: int, status: str) -> list[tuple[str, dict[str, Any]]]:
        item = self.items[index]
        if item["status"] != "in_progress":
            return []
        item["status"] = status
        part = item["content"][0]
        kind = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        extra = {} if item["type"] == "reasoning" else {"logprobs": list(part["logprobs"])}
        return [
            self._event(
                kind, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=dict(part),
            ),
            self._event(
                "response.output_item.done", output_index=index, item=dict(item, content=[dict(part)])
            ),
        ]

    def feed(self, ev: StreamDelta) -> list[tuple[str, dict[str, Any]]]:
        """The stream events of one delta (the item opens on its stream's first delta)."""
        if ev.kind == "input":
            return []
        events = []
        if ev.stream not in self._by_stream:
            events += self._open_item(ev.stream)
        index = self._by_stream[ev.stream]
        item = self.items[index]
        part = item["content"][0]
        logprobs = (
            logprobs_content(token_logprobs(ev))["content"]
            if ev.logprobs and item["type"] == "message"
            else []
        )
        if ev.text or logprobs:
            part["text"] += ev.text
            if item["type"] == "reasoning":
                events.append(
                    self._event(
                        "response.reasoning_text.delta",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        delta=ev.text,
                    )
                )
            else:
                events.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        delta=ev.text,
                        logprobs=logprobs,
                    )
                )
                part["logprobs"] += logprobs
        if ev.finish_reason:
            events += self._close_item(
                index, "completed" if ev.finish_reason in ("stop", "length") else "incomplete"
            )
        return events

    def finish(self, done: Done | None, error: APIError | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Close every item and the response; the terminal event."""
        events = []
        for i in range(len(self.items)):
            events += self._close_item(i, "incomplete")
        if error is not None:
            self.status = "failed"
            self.error = {
                "code": "server_error" if error.status >= 500 else "invalid_request",
                "message": error.message,
            }
        elif done is not None:
            self.usage = responses_usage(done, done.prompt_tokens or 0)
            reason = done.finish_reasons.get(answer_stream(done)) or "stop"
            if reason == "cancelled":
                self.status = "cancelled"
                self.incomplete_details = {"reason": "cancelled"}
            elif reason == "length":
                self.status = "incomplete"
                self.incomplete_details = {"reason": "max_output_tokens"}
            else:
                self.status = "completed"
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(
            self.status, "response.incomplete"
        )
        events.append(self._event(kind, response=self.to_dict()))
        self.finished.set()
        return events

    async def consume(self, events: AsyncIterator[StreamDelta | Done]) -> None:
        """Run to the end without a reader (``stream: false``, ``background: true``)."""
        async for _ in self.stream(events):
            pass

    def stream(self, events: AsyncIterator[StreamDelta | Done]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The Responses API events of a run, from ``response.created`` to its terminal event."""
        return self._stream(events)

    async def _stream(
        self, events: AsyncIterator[StreamDelta | Done]
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        for item in self.opening():
            yield item
        try:
            async for ev in events:
                if isinstance(ev, Done):
                    for item in self.finish(ev):
                        yield item
                    return
                for item in self.feed(ev):
                    yield item
            for item in self.finish(None, APIError(500, "the generation ended without a result")):
                yield item
        except MultiStreamError as e:
            for item in self.finish(None, from_server(e)):
                yield item
        finally:
            if not self.finished.is_set():  # the reader went away (disconnect)
                self.finish(None, APIError(500, "the client went away"))


class ResponseStore:
    """The last ``STORE_SIZE`` responses, running ones included (cancel, GET while running)."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, ResponseRecord] = OrderedDict()
        self.background_tasks: set[asyncio.Task] = set()

    def put(self, record: ResponseRecord) -> None:
        self._items[record.id] = record
        while len(self._items) > self.size:
            oldest = next(iter(self._items))
            if not self._items[oldest].finished.is_set():
                break  # never drop a running one: it must stay cancellable
            self._items.popitem(last=False)

    def get(self, response_id: str) -> ResponseRecord | None:
        return self._items.get(response_id)

    def drop_if_unstored(self, record: ResponseRecord) -> None:
        if not record.store:
            self._items.pop(record.id, None)
