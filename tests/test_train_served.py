"""The shipped stream model (``--model-dir streams-demo``) through a real tritonserver.

A fixed held-out sample (two examples of each family, never trained on), greedy: every
answer must be right, and with the thinking channel forced silent (``ablate_channels``)
most of them must change, which shows the answer is read from the thinking channel
through the grid. The sample and the expected answers come from ``train.tasks``; the model
comes from the adapter in the checkout, merged into the cache on first use.
"""

from __future__ import annotations

import pytest

from backend.model_store import resolve_model_dir
from client import MultiStreamClient
from tests.server_helpers import small_server
from train.tasks import FAMILIES, held_out, score

pytestmark = pytest.mark.server

SAMPLE = held_out()[: 2 * len(FAMILIES)]
THINKING = "reasoning/Analytical"
#: Greedy, and no silence penalty: the model answers on time by itself (docs/streams.md).
OPTIONS = {"max_tokens": 40, "temperature": 0.0, "reasoning_streams": 1, "silence_penalty": 0.0}


@pytest.fixture(scope="module")
def demo_server(gil_check):
    with small_server(model_dir="streams-demo", max_sessions=8, max_context=512) as handle:
        yield handle


def _ask(url: str, text: str, **extra) -> tuple[str, str]:
    """(Output's text, the thinking channel's text) of one greedy generation."""
    out, think = "", ""
    for ev in MultiStreamClient(url).generate(text, **{**OPTIONS, **extra}):
        if getattr(ev, "stream", None) == "output":
            out += ev.text
        elif getattr(ev, "stream", None) == THINKING:
            think += ev.text
    return out, think


def test_the_shipped_model_answers_a_held_out_sample(demo_server) -> None:
    for ex in SAMPLE:
        out, think = _ask(demo_server.grpc_url, ex.text)
        assert score(ex, out), f"{ex.text!r}: answered {out!r}, expected {ex.answer!r} (thinking {think!r})"
        # The thinking channel tracked the state while the user talked: its last word is the answer.
        assert think.split()[-1] == ex.answer, (ex.text, think)


def test_silencing_the_thinking_channel_changes_the_answers(demo_server) -> None:
    changed = []
    for ex in SAMPLE:
        out, think = _ask(demo_server.grpc_url, ex.text, ablate_channels=[2])
        assert think == ""  # forced silence is never sent
        changed.append(not score(ex, out))
    assert sum(changed) >= 0.75 * len(SAMPLE), changed


def test_the_answer_is_complete_four_rows_after_the_input(demo_server) -> None:
    """``max_tokens`` bounds the rows a grid session generates: with the user's rows + 4 the
    answer is there, with one row less it is not (train/render.py, ANSWER_DELAY)."""
    from backend.engine.layout import user_tokens
    from backend.tokenizer import Tokenizer
    from train.render import ANSWER_DELAY

    tok = Tokenizer.from_dir(resolve_model_dir("streams-demo"))
    for ex in SAMPLE[:4]:
        rows = len(user_tokens(tok, ex.text)) + ANSWER_DELAY
        full, _ = _ask(demo_server.grpc_url, ex.text, max_tokens=rows)
        short, _ = _ask(demo_server.grpc_url, ex.text, max_tokens=rows - 1)
        assert score(ex, full) and short == "", (ex.text, full, short)
