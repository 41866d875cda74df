"""The ``messages`` / ``raw_prompt`` inputs the OpenAI front sends (no server).

Checked against the default checkpoint's own chat template as rendered by ``transformers``
(code nobody here wrote), so the prompt a chat conversation becomes is the one the model was
trained on, not our guess of it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.serving.preprocessing import prompt_ids
from backend.serving.request import Limits, RequestConfig, RequestError, parse_messages
from backend.tokenizer import Tokenizer


def _get(values: dict):
    def get(name: str):
        if name not in values:
            return None
        v = values[name]
        if isinstance(v, str):
            return np.array([[v.encode()]], dtype=object)
        return np.array([[v]])

    return get


def parse(**values) -> RequestConfig:
    values.setdefault("text_input", "hello")
    values.setdefault("max_tokens", np.int32(8))
    return RequestConfig.from_inputs(_get(values), Limits(max_tokens_limit=100))


CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_messages_round_trip_through_request_json() -> None:
    cfg = parse(messages=json.dumps(CONVERSATION))
    assert cfg.messages == CONVERSATION
    assert RequestConfig.from_json(cfg.to_json()).messages == CONVERSATION
    assert parse().messages == [] and parse().raw_prompt is False


def test_developer_role_is_system() -> None:
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert parse_messages(json.dumps(msgs))[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("not json", "messages must be JSON"),
        ("{}", "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('[{"role": "user"}]', "messages[0] must be an object with a string 'content'"),
        ('[{"role": "tool", "content": "x"}]', "messages[0].role must be one of"),
        ('[{"role": "system", "content": "x"}]', "must contain a user message"),
    ],
)
def test_bad_messages_name_the_rule(raw: str, needle: str) -> None:
    with pytest.raises(RequestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse(messages=raw)


def test_raw_prompt_excludes_messages() -> None:
    with pytest.raises(RequestError, match="raw_prompt cannot be combined with messages"):
        parse(messages=json.dumps(CONVERSATION), raw_prompt=True)


def test_prompt_is_the_checkpoints_own_template(default_model_dir) -> None:
    """A conversation renders as transformers renders the checkpoint's template; raw is as is."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(default_model_dir)
    ref = AutoTokenizer.from_pretrained(str(default_model_dir))
    want = ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert prompt_ids(ours, "ignored", True, CONVERSATION) == ref(want, add_special_tokens=False)["input_ids"]
    raw = "Once upon a time"
    assert prompt_ids(ours, raw, False) == ref(raw, add_special_tokens=False)["input_ids"]
