"""Log probabilities on the paper's stream layout, through a real tritonserver.

The grid's answer is Output's visible tokens (silence is never sent), so its
``output_log_probs`` / ``top_logprobs_*`` must be exactly one per Output token the client
sees, and equal the model's distribution at the row that token was sampled in. The
reference is computed independently of the sampler's bookkeeping: the same grid in this
process, Output's logits caught by ``Engine.logits_hook`` at each row, ``log_softmax`` here
(no silence penalty and no repetition penalty, so the sampled distribution is the raw one).
The same answer then goes through the OpenAI front (chat and responses), which must report
the same tokens and values.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
import torch

from backend.engine import Engine
from backend.engine.layout import StreamLayout, find_silence, seed_row, user_tokens
from backend.serving.request import RequestConfig
from client import MultiStreamClient, StreamDelta
from tests.server_helpers import PAPER_CHANNELS
from tests.test_frontend import Front

pytestmark = pytest.mark.server

C = PAPER_CHANNELS
K = 3
PROMPT = "Tell me what two plus two is"
ROWS = 16
#: Greedy, no silence penalty: the reported distribution is the model's own (sampling.py).
GREEDY = {"temperature": 0.0, "silence_penalty": 0.0, "reasoning_streams": 1}


def reference(engine: Engine, session_id: str) -> list[tuple[int, list[float]]]:
    """``(token, log_softmax of its row)`` per visible Output token of the greedy grid."""
    tok = engine.tokenizer
    cfg = RequestConfig(text=PROMPT, max_tokens=ROWS, session_id=session_id)
    cfg.layout, cfg.num_channels, cfg.silence_id = "paper", C, find_silence(tok)
    cfg.temperature, cfg.top_k, cfg.top_p, cfg.silence_penalty = 0.0, 0, 1.0, 0.0
    layout = StreamLayout(C, cfg.silence_id)
    rows: dict[int, torch.Tensor] = {}
    tokens: list[tuple[int, int]] = []
    done = threading.Event()
    live = [C - 1]

    def hook(sid: str, stream: str, row: int, logits: torch.Tensor) -> None:
        if sid == session_id and stream == "output":
            rows[row + 1] = torch.log_softmax(logits.float(), dim=-1)  # the event's row

    def on_event(ev) -> None:
        if ev.kind == "user":
            return
        if ev.stream == "output":
            tokens.extend((ev.row, t) for t in ev.token_ids)
        if ev.finished:
            live[0] -= 1
            if live[0] == 0:
                done.set()

    engine.logits_hook = hook
    try:
        engine.submit(
            layout.prefix(seed_row(tok, cfg.silence_id, C)),
            layout.stream_specs(cfg.grid_sampling),
            on_event=on_event,
            rules=cfg.grid_rules(),
            user_ids=user_tokens(tok, PROMPT),
            session_id=session_id,
        )
        assert done.wait(120)
    finally:
        engine.logits_hook = None
    return [(t, rows[row].tolist()) for row, t in tokens]


def _served(url: str, session_id: str) -> tuple[list[StreamDelta], list]:
    with MultiStreamClient(url) as c:
        events = list(
            c.generate(
                PROMPT,
                max_tokens=ROWS,
                return_log_probs=True,
                top_logprobs=K,
                session_id=session_id,
                **GREEDY,
            )
        )
    return [e for e in events if isinstance(e, StreamDelta)], events


def test_grid_logprobs_are_output_s_visible_tokens(paper_server, paper_engine) -> None:
    deltas, _ = _served(paper_server.grpc_url, "paper-lp")
    silence = find_silence(paper_engine.tokenizer)
    out = [d for d in deltas if d.stream == "output"]
    ids = [t for d in out for t in d.token_ids]
    lps = [v for d in out for v in d.logprobs]
    tops = [a for d in out for a in d.top_logprobs]
    assert ids and silence not in ids, "silence is never sent, as text or as a token"
    assert len(lps) == len(tops) == len(ids), "one log probability per token the client sees"
    for d in deltas:
        if d.stream != "output":
            assert not d.logprobs and not d.top_logprobs, d  # the thinking channels: none asked
    ref = reference(paper_engine, "paper-lp")
    assert [t for t, _ in ref] == ids
    for tok, lp, alts, (_, row) in zip(ids, lps, tops, ref, strict=True):
        assert lp == pytest.approx(row[tok], abs=2e-3)
        values = [a.logprob for a in alts]
        assert len(alts) == K and values == sorted(values, reverse=True)
        assert values == pytest.approx(sorted(row, reverse=True)[:K], abs=2e-3)  # the row's k best
        assert all(a.logprob == pytest.approx(row[a.id], abs=2e-3) for a in alts)
        assert alts[0].id == tok and alts[0].logprob == lp  # greedy: the chosen one is the best


def test_grid_sampled_logprobs_rank_the_chosen_token(paper_server) -> None:
    """The paper's sampling defaults (0.8 / 20 / 0.95): the chosen token's log probability is
    its alternative's value when listed, else at most the k-th one's."""
    with MultiStreamClient(paper_server.grpc_url) as c:
        events = list(
            c.generate(
                PROMPT, max_tokens=ROWS, seed=7, return_log_probs=True, top_logprobs=K, reasoning_streams=1
            )
        )
    out = [e for e in events if isinstance(e, StreamDelta) and e.stream == "output" and e.token_ids]
    assert out
    for d in out:
        for tok, lp, alts in zip(d.token_ids, d.logprobs, d.top_logprobs, strict=True):
            assert lp <= 0 and len(alts) == K
            by_id = {a.id: a.logprob for a in alts}
            if tok in by_id:
                assert by_id[tok] == lp
            else:
                assert lp <= alts[-1].logprob


def test_grid_non_streaming_logprobs(paper_server, paper_engine) -> None:
    """HTTP ``generate`` (one response): the whole answer's log probabilities and their sum."""
    body = {
        "text_input": PROMPT,
        "max_tokens": ROWS,
        "return_log_probs": True,
        "top_logprobs": K,
        "session_id": "paper-lp-nostream",
        **GREEDY,
    }
    req = urllib.request.Request(
        f"http://{paper_server.http_url}/v2/models/multistream/generate", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    ref = reference(paper_engine, "paper-lp-nostream")
    ids = out["output_ids"]
    assert ids == [t for t, _ in ref] and len(out["output_log_probs"]) == len(ids)
    for lp, (tok, row) in zip(out["output_log_probs"], ref, strict=True):
        assert lp == pytest.approx(row[tok], abs=2e-3)
    assert out["cum_log_probs"] == pytest.approx(sum(out["output_log_probs"]), abs=1e-3)
    assert len(out["top_logprobs_ids"]) == len(ids) * K and out["top_logprobs_ids"][::K] == ids


def test_grid_logprobs_through_the_front(paper_server) -> None:
    """The OpenAI front on a paper-layout deployment: chat's ``logprobs`` and the Responses
    API's ``output_text.logprobs`` report the same greedy tokens as the project's client."""
    deltas, _ = _served(paper_server.grpc_url, "paper-lp-front")
    lps = [v for d in deltas if d.stream == "output" for v in d.logprobs]
    front = Front(paper_server.grpc_url)
    try:
        sdk = front.sdk()
        extra = {"silence_penalty": 0.0, "reasoning_streams": 1}
        chat = sdk.chat.completions.create(
            model="multistream",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=ROWS,
            temperature=0.0,
            logprobs=True,
            top_logprobs=K,
            extra_body=extra,
        )
        content = chat.choices[0].logprobs.content
        r = sdk.responses.create(
            model="multistream",
            input=PROMPT,
            max_output_tokens=ROWS,
            temperature=0.0,
            include=["message.output_text.logprobs"],
            top_logprobs=K,
            extra_body=extra,
        )
    finally:
        front.stop()
    part = next(o for o in r.output if o.type == "message").content[0]
    assert [e.logprob for e in content] == pytest.approx(lps, abs=1e-5)
    assert [e.token for e in part.logprobs] == [e.token for e in content]
    assert [e.logprob for e in part.logprobs] == pytest.approx(lps, abs=1e-5)
    assert "".join(e.token for e in part.logprobs) == part.text == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == K and e.top_logprobs[0].logprob == e.logprob for e in part.logprobs)
