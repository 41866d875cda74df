"""The ``top_logprobs_*`` outputs: each answer token's most likely alternatives, with their text.

Why the server detokenizes them: a client (the OpenAI front above all) has no tokenizer, yet
OpenAI's ``top_logprobs`` entries carry each alternative's text and bytes. So decode turns the
engine's ``(ids, log probabilities)`` (``StreamSampler.top_logprobs``) into three tensors
shaped as TensorRT-LLM shapes ``output_log_probs``, one more axis for the k alternatives:
``[batch 1, beam 1, tokens, k]`` (CONTRACTS §3).

Each alternative is detokenized on its own (``Tokenizer.token_bytes``), not in context: a token
that ends inside a multi-byte character has no text of its own. ``top_logprobs_text`` must be
valid UTF-8 (Triton's HTTP JSON writes strings as they are, and a client reading the stream
would fail on the first broken one), so such a token travels as OpenAI's legacy spelling
``bytes:\\xf0\\x9f`` (what OpenAI's completions endpoint shows for it), and the client turns that
back into the bytes (``client.events.token_bytes_of``, tested to agree with :func:`wire_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from backend.tokenizer import Tokenizer

#: The spelling of a token whose bytes are not text on their own (OpenAI's legacy form).
BYTES_PREFIX = "bytes:"
#: The output names, in the order :func:`top_arrays` returns them.
OUTPUTS = ("top_logprobs_ids", "top_logprobs_values", "top_logprobs_text")

Top = Sequence[tuple[Sequence[int], Sequence[float]]]


def wire_text(raw: bytes) -> str:
    """A token's bytes as ``top_logprobs_text`` carries them: the text when the bytes are
    valid UTF-8, else ``bytes:`` and each byte as ``\\xNN``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in raw)


def top_arrays(top: Top, k: int, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``top`` (per token: ids and log probabilities, most likely first) -> the three outputs,
    each ``[1, 1, len(top), k]``."""
    n = len(top)
    ids = np.array([list(t[0]) for t in top], dtype=np.int32).reshape(1, 1, n, k)
    values = np.array([list(t[1]) for t in top], dtype=np.float32).reshape(1, 1, n, k)
    text = np.array(
        [wire_text(tokenizer.token_bytes(int(i))).encode("utf-8") for t in top for i in t[0]],
        dtype=np.object_,
    ).reshape(1, 1, n, k)
    return ids, values, text


def from_flat(name: str, flat: Sequence[object], tokens: int) -> np.ndarray:
    """One ``top_logprobs_*`` output of a ``bls_wire`` packet (a flat list) -> its
    ``[1, 1, tokens, k]`` array again; ``tokens`` is the length of the same packet's
    ``output_log_probs`` (always sent with it)."""
    k = len(flat) // tokens if tokens else 0
    if name == "top_logprobs_text":
        return np.array([str(v).encode("utf-8") for v in flat], dtype=np.object_).reshape(1, 1, tokens, k)
    dtype = np.int32 if name == "top_logprobs_ids" else np.float32
    return np.array(flat, dtype=dtype).reshape(1, 1, tokens, k)
