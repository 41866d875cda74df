"""OpenAI request bodies -> one :class:`client.request.GenerateRequest`, generically.

Why generic: ``GenerateRequest`` is the one definition of every request option (its field
metadata says the type and the rule). Any body key that is a ``GenerateRequest`` option is
taken as that option, so ``reasoning_streams``, ``attention_mode``, the stream layout's
options, and whatever field is added there later reach the ensemble without an edit here.
The OpenAI SDK sends ``extra_body`` keys as top-level JSON keys, which is how clients set
them.

What this module adds: OpenAI's own names for our options (``max_completion_tokens`` ->
``max_tokens``, ``n`` -> ``num_return_sequences``), OpenAI fields that are accepted while
they hold their neutral value (``logit_bias: {}``) and refused otherwise,
``reasoning_effort`` presets, and an error for anything unknown (a typo in ``extra_body``
would otherwise silently do nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.request import OPTIONS, GenerateRequest, Param

from .errors import APIError, bad_request

#: Options the endpoint decides, never the body: the front always streams from the ensemble
#: (per-stream token counts and finish reasons, disconnect = cancel), and the prompt fields
#: are built from ``messages`` / ``prompt`` / ``input``.
ENDPOINT_OPTIONS = frozenset({"stream", "messages", "raw_prompt"})

#: OpenAI field -> the ``GenerateRequest`` option it means, where the names differ.
ALIASES: dict[str, str] = {
    "max_completion_tokens": "max_tokens",
    "max_output_tokens": "max_tokens",
    "n": "num_return_sequences",
    "logprobs": "return_log_probs",
}

#: OpenAI fields without an option (yet): accepted while neutral, refused otherwise.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "text": ({"format": {"type": "text"}},),
    "modalities": (["text"],),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "truncation": ("disabled",),
    "include": ([],),
}

#: OpenAI fields that do not change the generation; accepted and ignored.
IGNORED = frozenset(
    {
        "model",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "parallel_tool_calls",
        "stream_options",
        "verbosity",
    }
)

#: ``reasoning_effort`` (chat) / ``reasoning.effort`` (responses) -> reasoning streams and
#: tokens per stream. More effort = more parallel directions and longer ones; values set
#: explicitly (``extra_body``) win.
EFFORT_PRESETS: dict[str, tuple[int, int]] = {
    "none": (0, 0),
    "minimal": (0, 0),
    "low": (1, 64),
    "medium": (2, 128),
    "high": (3, 256),
}


@dataclass(frozen=True)
class Defaults:
    """What the front sends where the client said nothing."""

    max_tokens: int = 256


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    for a in allowed:
        if isinstance(a, bool) or isinstance(value, bool):
            if value is a:
                return True
        elif value == a:
            return True
    return False


def _convert(p: Param, key: str, value: Any) -> Any:
    """A JSON value -> the option's Python value, checked by the option's own rule.

    JSON has one number type: an integer option takes ``40`` or ``40.0``; a float option any
    number. Errors name the field the client sent (``max_completion_tokens``) and the rule.
    """
    label = key if key == p.name else f"{key} ({p.name})"
    try:
        if p.repeated and isinstance(value, list):
            items = [_scalar(p, v) for v in value]
            p.check(items)
            return items
        v = _scalar(p, value)
        p.check(v)
        return v
    except ValueError as e:
        text = str(e)
        if text.startswith(p.name):
            text = text[len(p.name) :].lstrip()
        raise bad_request(f"{label} {text}", param=key) from None


def _scalar(p: Param, value: Any) -> Any:
    typ = p.pytype
    if typ is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def reasoning_effort(effort: Any, param: str = "reasoning_effort") -> dict[str, int]:
    """The ``reasoning_streams`` / ``reasoning_budget`` a ``reasoning_effort`` stands for."""
    if effort is None:
        return {}
    if effort not in EFFORT_PRESETS:
        raise bad_request(f"{param} must be one of {', '.join(EFFORT_PRESETS)}, got {effort!r}", param=param)
    streams, budget = EFFORT_PRESETS[effort]
    return (
        {"reasoning_streams": streams}
        if streams == 0
        else {"reasoning_streams": streams, "reasoning_budget": budget}
    )


def build_request(
    body: Mapping[str, Any],
    prompt: str,
    *,
    endpoint_fields: frozenset[str],
    defaults: Defaults,
    fixed: Mapping[str, Any] | None = None,
    effort: Mapping[str, int] | None = None,
) -> GenerateRequest:
    """The ensemble request for an OpenAI body.

    ``endpoint_fields`` are the keys the endpoint reads itself (``messages``, ``stream``,
    ``reasoning_effort`` ...); ``fixed`` the options it sets (``messages``, ``raw_prompt``);
    ``effort`` preset values that explicit options override. Raises :class:`APIError` (400).
    """
    options: dict[str, Any] = {}
    given: dict[str, str] = {}  # option -> the body key that set it
    for key, value in body.items():
        if key in endpoint_fields or key in IGNORED:
            continue
        name = ALIASES.get(key, key)
        if name in OPTIONS and name not in ENDPOINT_OPTIONS:
            if value is None:
                continue
            if name in given and given[name] != key:
                raise bad_request(f"{key} and {given[name]} both set {name}; send one", param=key)
            options[name] = _convert(OPTIONS[name], key, value)
            given[name] = key
            continue
        allowed = NEUTRAL.get(key)
        if allowed is not None:
            if value is None or _neutral(value, allowed):
                continue
            raise bad_request(f"{key} is not supported by this server (only {allowed[0]!r} is)", param=key)
        known = sorted(set(OPTIONS) - ENDPOINT_OPTIONS)
        raise bad_request(
            f"unknown field {key!r}; the multi-stream options are: {', '.join(known)}", param=key
        )
    for name, value in (effort or {}).items():
        options.setdefault(name, value)
    options.setdefault("max_tokens", defaults.max_tokens)
    options.update(fixed or {})
    options["stream"] = True
    try:
        request = GenerateRequest(prompt, **options)
        request.validate()
    except ValueError as e:  # a rule between options (never reached by single-field checks)
        raise bad_request(str(e)) from None
    return request


def body_names(body: Mapping[str, Any]) -> dict[str, str]:
    """Option -> the body key that set it (``max_tokens`` -> ``max_output_tokens``), so a
    server error about an option names the field the client actually sent."""
    return {ALIASES.get(k, k): k for k in body if ALIASES.get(k, k) in OPTIONS}


def require(body: Mapping[str, Any], key: str) -> Any:
    if key not in body or body[key] is None:
        raise bad_request(f"{key} is required", param=key)
    return body[key]


__all__ = ["APIError", "Defaults", "build_request", "reasoning_effort", "require"]
