"""Token accounting and stream texts of a finished generation, in OpenAI's terms.

OpenAI counts reasoning inside ``completion_tokens`` and says how much of it was reasoning
(``completion_tokens_details.reasoning_tokens``); every reasoning stream of a session counts.
The User-channel echo (pushed input as the model read it) is input, not generated.
"""

from __future__ import annotations

from typing import Any

from client.events import Done, kind_of


def sequences_of(done: Done) -> list[Done]:
    """The answers of a generation, one per choice: ``n`` > 1 asked for several sequences."""
    return done.sequences or [done]


def generated(done: Done) -> tuple[int, int]:
    """(all generated tokens, of which reasoning) of a finished generation, every sequence's."""
    total = reasoning = 0
    for seq in sequences_of(done):
        for name, n in seq.tokens.items():
            kind = kind_of(name)
            if kind == "input":
                continue
            total += n
            if kind == "reasoning":
                reasoning += n
    return total, reasoning


def answer_stream(done: Done) -> str:
    """The stream carrying the final answer: a ``revision`` once reasoning revised it."""
    return "revision" if "revision" in done.texts else "output"


def answer_text(done: Done) -> str:
    return done.texts.get(answer_stream(done), "")


def finish_reason(done: Done, cancelled: bool = False) -> str:
    """The answer's finish reason (``cancelled`` when a client or a cancel endpoint stopped it)."""
    if cancelled:
        return "cancelled"
    return done.finish_reasons.get(answer_stream(done)) or "stop"


def reasoning_texts(done: Done) -> dict[str, str]:
    return {n: t for n, t in sorted(done.texts.items()) if kind_of(n) == "reasoning"}


def joined_reasoning(done: Done) -> str:
    return "\n\n".join(t for t in reasoning_texts(done).values() if t)


def chat_usage(done: Done, prompt_tokens: int) -> dict[str, Any]:
    total, reasoning = generated(done)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": total,
        "total_tokens": prompt_tokens + total,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def responses_usage(done: Done, prompt_tokens: int) -> dict[str, Any]:
    total, reasoning = generated(done)
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": total,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt_tokens + total,
    }
