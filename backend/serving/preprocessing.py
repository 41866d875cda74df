"""Triton model ``preprocessing``: validate the request, apply the chat template, tokenize.

Why first and alone: validation happens once, here, so a bad request fails before any KV
is allocated, with a message naming the input (CONTRACTS §4: later models trust
``request_json``). Tokenizing here keeps the engine instances busy with forwards only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend.serving.instance import instance_parameters
from backend.serving.request import Limits, RequestConfig, RequestError
from backend.serving.tensors import input_array
from backend.tokenizer import Tokenizer

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


def limits_from_params(params: dict[str, str]) -> Limits:
    max_context = int(params.get("max_context", "2048"))
    return Limits(
        max_tokens_limit=int(params.get("max_tokens_limit", str(max_context))),
        max_reasoning_streams=int(params.get("max_reasoning_streams", "4")),
        max_reasoning_budget=int(params.get("max_reasoning_budget", str(max_context))),
        max_context=max_context,
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


class PreprocessingModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from backend.model_store import resolve_model_dir

        params = instance_parameters(args)
        self.tokenizer = Tokenizer.from_dir(Path(resolve_model_dir(params.get("model_dir") or "default")))
        self.limits = limits_from_params(params)
        self.chat_template = params.get("chat_template", "true").lower() != "false"

    def process(self, get: Any) -> tuple[list[int], RequestConfig]:
        """Validated request and its prompt ids; raises :class:`RequestError`."""
        cfg = RequestConfig.from_inputs(get, self.limits)
        ids = prompt_ids(self.tokenizer, cfg.text, self.chat_template and not cfg.raw_prompt, cfg.messages)
        cfg.check_context(len(ids), self.limits.max_context)
        return ids, cfg

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
