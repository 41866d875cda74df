"""``generate``'s parameters, defined once, and their encoding as Triton inputs.

Every request parameter is one field of :class:`GenerateRequest`, and the field's metadata
(a :class:`Param`) says everything else about it: the Triton input it travels as and its
datatype, a help text, the rule a value must keep, whether the web playground offers it.
``generate(prompt, **options)`` on both clients, the CLI flags (``client.cli``), the
playground's settings (``client.web.app``) and :data:`INPUT_TYPES` are all derived from it,
so a new parameter is one new field here, not ten edits that can drift apart.

The ``multistream`` ensemble follows the TensorRT-LLM ``ensemble`` contract: every input is
shaped ``[batch, 1]`` and optional inputs are simply absent when unset, so the server applies
its own defaults. We therefore send only what the caller set (plus the always-present
``text_input``, ``max_tokens``, ``stream``); sending defaults would hide server-side default
changes.
"""

from __future__ import annotations

import dataclasses
import numbers
import uuid
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

#: Triton datatype -> (numpy dtype of the tensor, Python type a caller passes).
DATATYPES: dict[str, tuple[Any, type]] = {
    "BYTES": (np.object_, str),
    "BOOL": (np.bool_, bool),
    "INT32": (np.int32, int),
    "UINT64": (np.uint64, int),
    "FP32": (np.float32, float),
}

#: The server's ``ATTENTION_MODES`` / ``SYNC_MODES`` (CONTRACTS §3), repeated because the
#: client never imports the server; ``tests/test_contract.py`` keeps them equal.
ATTENTION_MODES = ("isolated", "cross")
SYNC_MODES = ("none", "revise")
#: The server's ``START_MODES`` of the paper's stream layout (``backend.engine.layout``).
START_MODES = ("seed", "header", "grid")
_META = "multistream"


@dataclass(frozen=True)
class Param:
    """One field of :class:`GenerateRequest`: how it travels, what it must be, who offers it.

    ``ge`` / ``gt`` / ``le`` and ``choices`` are checked locally before anything is sent, so
    a caller's mistake is a ``ValueError`` naming the parameter rather than a server round
    trip (the server re-checks everything). ``ui_default`` is the default of the CLI flag and
    of a blank playground field where it differs from the library's (people reading an answer
    want a longer one than a script does).
    """

    name: str
    default: Any
    input: str
    datatype: str
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    repeated: bool = False  # several values in one [1, n] tensor (stop words)
    nonblank: bool = False
    web: bool = True  # offered by the playground (it sends the prompt, stream and session id itself)
    ui_default: Any = None

    @property
    def pytype(self) -> type:
        """The Python type of one value, from the Triton datatype."""
        return DATATYPES[self.datatype][1]

    @property
    def rule(self) -> str:
        """The value rule in words (``""`` when any value of the type goes)."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.gt is not None and self.le is not None:
            return f"in ({_num(self.gt)}, {_num(self.le)}]"
        parts = []
        if self.ge is not None:
            parts.append(f">= {_num(self.ge)}")
        if self.gt is not None:
            parts.append(f"> {_num(self.gt)}")
        if self.le is not None:
            parts.append(f"<= {_num(self.le)}")
        return " and ".join(parts)

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` unless ``value`` (not ``None``) has the type and keeps the rule."""
        for v in self.values(value):
            if not _has_type(v, self.pytype):
                raise ValueError(f"{self.name} must be {_type_words(self.pytype)}, got {v!r}")
            if self.nonblank and not v.strip():
                raise ValueError(f"{self.name} must be a non-blank string")
            if self.choices is not None and v not in self.choices:
                raise ValueError(f"{self.name} must be {self.rule}, got {v!r}")
            if self.pytype in (int, float) and not (
                (self.ge is None or v >= self.ge)
                and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le)
            ):
                raise ValueError(f"{self.name} must be {self.rule}, got {v!r}")

    def values(self, value: Any) -> list[Any]:
        """The single values in ``value``: a repeated field takes one value or a sequence."""
        if self.repeated and isinstance(value, Sequence) and not isinstance(value, str):
            return list(value)
        return [value]

    def parse(self, text: str | float) -> Any:
        """A value typed by a person (CLI flag, form field, JSON number) -> checked value.

        An integer may be written ``40`` or ``40.0`` (number inputs and JSON send either).
        """
        raw = text.strip() if isinstance(text, str) else text
        try:
            if self.pytype is int:
                number = float(raw)
                if not number.is_integer():
                    raise ValueError
                value: Any = int(number)
            elif self.pytype is float:
                value = float(raw)
            elif self.pytype is bool:
                value = _parse_bool(raw)
            else:
                value = str(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{self.name} must be {_type_words(self.pytype)}, got {text!r}") from None
        self.check(value)
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _type_words(typ: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[typ]


def _has_type(value: Any, typ: type) -> bool:
    # bool is an Integral in Python; as a number it is always a caller's slip.
    if typ is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if typ is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if typ is bool:
        return isinstance(value, bool | np.bool_)
    return isinstance(value, typ)


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    low = str(raw).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError


def param(default: Any = MISSING, *, datatype: str, help: str, input: str | None = None, **rule: Any) -> Any:
    """A ``GenerateRequest`` field carrying its :class:`Param` (``input`` defaults to the name)."""
    return field(
        default=default, metadata={_META: {"datatype": datatype, "help": help, "input": input, **rule}}
    )


@dataclass(frozen=True)
class GenerateRequest:
    """What ``generate`` was asked for; ``None`` means "not sent, server default".

    The fields after ``prompt`` are exactly ``generate``'s keyword options, in this order.
    """

    prompt: str = param(input="text_input", datatype="BYTES", help="the prompt", nonblank=True)
    max_tokens: int = param(
        64, datatype="INT32", help="tokens to generate for the answer", ge=1, ui_default=128
    )
    stream: bool = param(
        True, datatype="BOOL", help="a delta per token (false: one final response)", web=False
    )
    temperature: float | None = param(None, datatype="FP32", help="0 is greedy, the server's default", ge=0)
    top_p: float | None = param(None, datatype="FP32", help="nucleus sampling mass", gt=0, le=1)
    top_k: int | None = param(None, datatype="INT32", help="sample among the k likeliest (0: all)", ge=0)
    seed: int | None = param(None, datatype="UINT64", help="sampling seed", ge=0)
    repetition_penalty: float | None = param(
        None, datatype="FP32", help="above 1 discourages repeating tokens", gt=0
    )
    stop: str | Sequence[str] | None = param(
        None,
        input="stop_words",
        datatype="BYTES",
        help="stop string (repeatable)",
        repeated=True,
        web=False,
    )
    reasoning_streams: int | None = param(
        None, datatype="INT32", help="background thinking streams next to the answer", ge=0
    )
    reasoning_budget: int | None = param(None, datatype="INT32", help="tokens per reasoning stream", ge=1)
    attention_mode: str | None = param(
        None,
        datatype="BYTES",
        help="isolated: streams see the prompt, the user and themselves; cross: every stream",
        choices=ATTENTION_MODES,
    )
    sync: str | None = param(
        None,
        datatype="BYTES",
        help="revise: the answer is revised once reasoning is done (a 'revision' stream)",
        choices=SYNC_MODES,
    )
    session_id: str | None = param(
        None,
        datatype="BYTES",
        help="id to push input into / cancel the session (chosen by the client when unset)",
        web=False,
    )
    messages: str | None = param(
        None,
        datatype="BYTES",
        help='a conversation, JSON [{"role", "content"}], rendered with the chat template instead of the prompt',
        web=False,
    )
    raw_prompt: bool | None = param(
        None, datatype="BOOL", help="send the prompt as is, without the chat template", web=False
    )
    presence_penalty: float | None = param(
        None, datatype="FP32", help="lowers a token's logit once it occurred in the answer", ge=-2, le=2
    )
    frequency_penalty: float | None = param(
        None, datatype="FP32", help="lowers a token's logit per occurrence in the answer", ge=-2, le=2
    )
    min_tokens: int | None = param(
        None, datatype="INT32", help="the answer cannot end before this many tokens", ge=0, web=False
    )
    ignore_eos: bool | None = param(
        None, datatype="BOOL", help="generate max_tokens whatever the model says (benchmarks)", web=False
    )
    bad_words: str | Sequence[str] | None = param(
        None, datatype="BYTES", help="a word the answer never contains (repeatable)", repeated=True, web=False
    )
    return_log_probs: bool | None = param(
        None,
        datatype="BOOL",
        help="output_log_probs / cum_log_probs: each answer token's log probability",
        web=False,
    )
    num_return_sequences: int | None = param(
        None,
        datatype="INT32",
        help="answers to sample for the prompt, as answer streams of one session (> 1: Done.sequences)",
        ge=1,
        web=False,
    )
    top_logprobs: int | None = param(
        None,
        datatype="INT32",
        help="top_logprobs_*: each answer token's k most likely tokens (needs return_log_probs)",
        ge=0,
        le=20,
        web=False,
    )
    # The paper's stream layout (a deployment serving a stream-trained checkpoint); a
    # project-layout deployment refuses these.
    layout_start: str | None = param(
        None,
        datatype="BYTES",
        help="paper layout: the grid starts from the seed row, the warm-start header, or grid_rows",
        choices=START_MODES,
        web=False,
    )
    grid_rows: str | None = param(
        None,
        datatype="BYTES",
        help="paper layout: JSON rows of num_channels cells (token ids or words, '-' = silence)",
        web=False,
    )
    skip_silence: bool | None = param(
        None, datatype="BOOL", help="paper layout: silence keys are masked", web=False
    )
    ablate_channels: int | Sequence[int] | None = param(
        None,
        datatype="INT32",
        help="paper layout: channels forced to silence (repeatable)",
        repeated=True,
        ge=1,
        web=False,
    )
    silence_penalty: float | None = param(
        None,
        datatype="FP32",
        help="paper layout: lowers Output's silence logit once the user stopped (default 10)",
        ge=0,
        web=False,
    )
    think_silence_penalty: float | None = param(
        None,
        datatype="FP32",
        help="paper layout: the same for the thinking channels (default 0)",
        ge=0,
        web=False,
    )
    penalty_during_user_talk: bool | None = param(
        None, datatype="BOOL", help="paper layout: apply the penalty while the user talks too", web=False
    )
    stop_silent_rows: int | None = param(
        None,
        datatype="INT32",
        help="paper layout: stop after this many all-silent rows (0: never; default 1)",
        ge=0,
        web=False,
    )
    return_channel_stats: bool | None = param(
        None,
        datatype="BOOL",
        help="paper layout: channel_stats output, entropy and top-1 probability per token",
        web=False,
    )

    def validate(self) -> None:
        """Catch caller mistakes locally, by each field's :class:`Param`; the server re-checks."""
        for p in PARAMS.values():
            value = getattr(self, p.name)
            if value is not None:
                p.check(value)

    def tensors(self) -> dict[str, np.ndarray]:
        """The inputs to send, each shaped ``[1, n]`` (n = 1 except for several stop words)."""
        self.validate()
        out: dict[str, np.ndarray] = {}
        for p in PARAMS.values():
            v = getattr(self, p.name)
            if v is None:
                continue
            np_dtype = DATATYPES[p.datatype][0]
            items = p.values(v)
            if not items:
                continue
            if np_dtype is np.object_:
                out[p.input] = np.array([[str(s).encode("utf-8") for s in items]], dtype=np.object_)
            else:
                out[p.input] = np.array([items], dtype=np_dtype)
        return out

    def json_body(self) -> dict[str, Any]:
        """Body for HTTP ``generate``/``generate_stream``: inputs as JSON scalars."""
        body: dict[str, Any] = {}
        for name, arr in self.tensors().items():
            flat = arr.reshape(-1).tolist()
            flat = [x.decode("utf-8") if isinstance(x, bytes) else x for x in flat]
            body[name] = flat[0] if len(flat) == 1 else flat
        return body


def _params() -> dict[str, Param]:
    out = {}
    for f in fields(GenerateRequest):
        meta = dict(f.metadata[_META])
        meta["input"] = meta["input"] or f.name
        out[f.name] = Param(name=f.name, default=f.default, **meta)
    return out


#: Every field of ``GenerateRequest``, by field name.
PARAMS: dict[str, Param] = _params()
#: ``generate``'s keyword options: the fields with a default (``prompt`` is positional).
OPTIONS: dict[str, Param] = {n: p for n, p in PARAMS.items() if p.default is not MISSING}
#: Triton input name -> (datatype, numpy dtype), as docs/CONTRACTS.md §3 names them.
INPUT_TYPES: dict[str, tuple[str, Any]] = {
    p.input: (p.datatype, DATATYPES[p.datatype][0]) for p in PARAMS.values()
}


def infer_inputs(tensors: dict[str, np.ndarray], module: Any) -> list:
    """``InferInput`` objects for ``tritonclient.grpc`` or ``tritonclient.http`` (``module``).

    A name that is no ``GenerateRequest`` input (``session_control``'s ``action``) is BYTES.
    """
    inputs = []
    for name, arr in tensors.items():
        dtype = INPUT_TYPES.get(name, ("BYTES", np.object_))[0]
        inp = module.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def ensure_session_id(request: GenerateRequest) -> GenerateRequest:
    """The request, with a client-chosen session id when it has none.

    With the id known before the first response, a cancel can reach the session through
    ``session_control`` at any time (Triton 2.51 drops a stream cancel at the ensemble).
    """
    if request.session_id:
        return request
    return dataclasses.replace(request, session_id=f"client-{uuid.uuid4().hex}")


def options_doc() -> str:
    """``generate``'s options as text, one per line (appended to both clients' docstrings)."""
    lines = []
    for p in OPTIONS.values():
        default = "unset: server default" if p.default is None else f"default {p.default!r}"
        rule = f"; {p.rule}" if p.rule else ""
        lines.append(f"- ``{p.name}`` ({p.pytype.__name__}, {default}{rule}): {p.help}")
    return "\n".join(lines)
