"""Triton model ``preprocessing``: validate the request, apply the chat template, tokenize.

Why first and alone: validation happens once, here, so a bad request fails before any KV
is allocated, with a message naming the input (CONTRACTS §4: later models trust
``request_json``). Tokenizing here keeps the engine instances busy with forwards only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend.engine.layout import LayoutError, StreamLayout, parse_grid, resolve_layout, user_tokens
from backend.serving.parameters import instance_parameters
from backend.serving.request import Limits, RequestConfig, RequestError
from backend.serving.tensors import input_array
from backend.tokenizer import Tokenizer

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


def limits_from_params(params: dict[str, str], layout: StreamLayout | None = None) -> Limits:
    max_context = int(params.get("max_context", "2048"))
    return Limits(
        max_tokens_limit=int(params.get("max_tokens_limit", str(max_context))),
        max_reasoning_streams=int(params.get("max_reasoning_streams", "4")),
        max_reasoning_budget=int(params.get("max_reasoning_budget", str(max_context))),
        max_context=max_context,
        num_channels=layout.num_channels if layout is not None else 0,
    )


def prompt_ids(
    tokenizer: Tokenizer, text: str, chat_template: bool = True, messages: list[dict[str, str]] | None = None
) -> list[int]:
    """The prompt rows of a request: the conversation (``messages``, else the user's text as one
    user message) inside the model's chat template; ``text`` as is without the template."""
    if messages:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception (e.g. role order)
            raise RequestError(f"messages: the model's chat template refused them: {e}") from None
    elif chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(text)


def grid_ids(tokenizer: Tokenizer, layout: StreamLayout, cfg: RequestConfig, max_context: int) -> list[int]:
    """The start rows of a paper-layout request, flattened; fills ``cfg.user_ids``."""
    try:
        grid = (
            parse_grid(cfg.grid_rows, tokenizer, layout.silence_id, layout.num_channels)
            if cfg.layout_start == "grid"
            else None
        )
        rows = layout.start_rows(tokenizer, cfg.layout_start, grid, cfg.ablate_channels)
    except LayoutError as e:
        raise RequestError(str(e)) from None
    cfg.user_ids = user_tokens(tokenizer, cfg.text)
    cfg.silence_id = layout.silence_id
    flat = [t for row in rows for t in row]
    cfg.check_grid_context(len(flat), max_context)
    return flat


def bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word as token sequences: as written and with a leading space (a word inside a
    sentence tokenizes differently from one at the start; vLLM bans both forms too)."""
    out: list[list[int]] = []
    for word in words:
        for form in {word, " " + word.lstrip()}:
            ids = tokenizer.encode(form)
            if ids and ids not in out:
                out.append(ids)
    return out


class PreprocessingModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from backend.model_store import resolve_model_dir

        params = instance_parameters(args)
        model_dir = Path(resolve_model_dir(params.get("model_dir") or "default"))
        self.tokenizer = Tokenizer.from_dir(model_dir)
        #: The paper's stream layout when the deployment serves it (None: the project's).
        self.layout = resolve_layout(model_dir, self.tokenizer, params)
        self.limits = limits_from_params(params, self.layout)
        self.chat_template = params.get("chat_template", "true").lower() != "false"

    def process(self, get: Any) -> tuple[list[int], RequestConfig]:
        """Validated request and its prompt ids; raises :class:`RequestError`.

        The project's layout: the prompt inside the chat template, one token per row. The
        paper's layout: ``input_ids`` are the start rows (seed row, header or the caller's
        grid) flattened row by row, and the user's text goes into ``user_ids`` for channel 0.
        """
        cfg = RequestConfig.from_inputs(get, self.limits)
        cfg.bad_words_ids = bad_word_ids(self.tokenizer, cfg.bad_words)
        if self.layout is None:
            ids = prompt_ids(
                self.tokenizer, cfg.text, self.chat_template and not cfg.raw_prompt, cfg.messages
            )
            cfg.check_context(len(ids), self.limits.max_context)
            return ids, cfg
        return grid_ids(self.tokenizer, self.layout, cfg, self.limits.max_context), cfg

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                ids, cfg = self.process(lambda name, r=request: input_array(r, name))
            except RequestError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
                        pb_utils.Tensor(
                            "request_json", np.array([[cfg.to_json().encode()]], dtype=np.object_)
                        ),
                    ]
                )
            )
        return responses
