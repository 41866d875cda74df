"""The scheduler's plans, without a model: what each step feeds, samples and stops.

The scheduler is plain Python over ints (nano-vllm's split): these tests drive it the way
the engine does (``admit`` -> ``schedule`` -> ``update`` with chosen samples) and check
the plan itself: chunking, row layout, budgets, the paper's silence penalty and stop rules.
"""

from __future__ import annotations

import pytest
import torch

from backend.engine import GridRules, Prefix, SamplingParams, StreamSpec
from backend.engine.attention import FIRST_STREAM_CHANNEL, PROMPT_CHANNEL, USER_CHANNEL
from backend.engine.kv_cache import KVPool
from backend.engine.scheduler import Scheduler, StepPlan
from backend.engine.session import Session, new_session
from backend.tokenizer import Tokenizer

EOS = 2
SILENCE = 7


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def _scheduler(max_step_tokens: int = 64, prefill_chunk: int = 8, slots: int = 4) -> Scheduler:
    pool = KVPool(1, 1, 2, slots, 256, torch.float32, "cpu")
    return Scheduler(pool, max_step_tokens=max_step_tokens, prefill_chunk=prefill_chunk, eos_ids={EOS})


def _session(tokenizer: Tokenizer, sid: str, prefix, specs, **kw) -> Session:
    if not isinstance(prefix, Prefix):
        prefix = Prefix.prompt(prefix)
    args = dict(attention="isolated", on_event=None, rules=None, user_ids=(), silence_token_id=None)
    args.update(kw)
    return new_session(sid, prefix, specs, tokenizer=tokenizer, eos_ids={EOS}, **args)


def _greedy(name: str, kind: str = "output", **kw) -> StreamSpec:
    return StreamSpec(name=name, kind=kind, sampling=SamplingParams(temperature=0.0, **kw))


def _run(sched: Scheduler, pick=lambda sample: 100) -> tuple[StepPlan, list]:
    plan = sched.schedule()
    assert plan is not None
    return plan, sched.update(plan, [pick(s) for s in plan.samples])


def test_prompt_is_chunked_and_streams_start_on_its_last_token(tokenizer) -> None:
    sched = _scheduler(prefill_chunk=8)
    s = _session(tokenizer, "a", list(range(10, 30)), [_greedy("output"), _greedy("r", "reasoning")])
    sched.add(s)
    assert sched.admit() == [] and s.slot >= 0
    sizes = []
    for _ in range(3):
        plan, _ = _run(sched)
        (sl,) = plan.slices
        assert sl.prefill and sl.session is s
        sizes.append(sl.count)
        assert plan.chans == [PROMPT_CHANNEL] * sl.count
    assert sizes == [8, 8, 4]
    # The last chunk starts both streams from the prompt's last token (index 3 of the step).
    assert [x.index for x in plan.samples] == [3, 3] and plan.started == [s]
    assert [x.row for x in plan.samples] == [20, 20]


def test_decode_row_has_one_entry_per_stream_and_the_user_token(tokenizer) -> None:
    sched = _scheduler()
    s = _session(
        tokenizer, "a", [11, 12, 13], [_greedy("output"), _greedy("r", "reasoning")], user_ids=[50, 51]
    )
    sched.add(s)
    sched.admit()
    _run(sched)  # prefill + first samples
    plan, events = _run(sched, pick=lambda sample: 200 + sample.stream.channel)
    assert plan.positions == [3, 3, 3]  # one row: every entry at grid row 3
    assert sorted(plan.chans) == [USER_CHANNEL, FIRST_STREAM_CHANNEL, FIRST_STREAM_CHANNEL + 1]
    assert plan.tokens[plan.chans.index(USER_CHANNEL)] == 50
    assert [e.kind for _, e in events if e.stream == "user"] == ["user"]
    # The next row feeds what was sampled: each stream its own last token.
    plan, _ = _run(sched)
    fed = dict(zip(plan.chans, plan.tokens, strict=True))
    assert (
        fed[FIRST_STREAM_CHANNEL] == 202 and fed[FIRST_STREAM_CHANNEL + 1] == 203 and fed[USER_CHANNEL] == 51
    )


def test_decode_rows_come_first_and_prefill_takes_the_rest_of_the_budget(tokenizer) -> None:
    sched = _scheduler(max_step_tokens=6, prefill_chunk=100)
    a = _session(tokenizer, "a", [11, 12], [_greedy("o1"), _greedy("o2")])
    sched.add(a)
    sched.admit()
    _run(sched)
    b = _session(tokenizer, "b", list(range(10, 30)), [_greedy("o")])
    sched.add(b)
    sched.admit()
    plan, _ = _run(sched)
    assert [(sl.session.id, sl.prefill, sl.count) for sl in plan.slices] == [("a", False, 2), ("b", True, 4)]
    assert len(plan) == 6


def test_the_last_prefix_row_is_never_split(tokenizer) -> None:
    rules = GridRules(silence_id=SILENCE, num_channels=3)
    prefix = Prefix.grid([[20, 21, 22], [23, 24, 25], [26, 27, 28]])
    specs = [_greedy("output"), _greedy("think", "reasoning")]
    specs[0].channel, specs[1].channel = 1, 2
    sched = _scheduler(prefill_chunk=4)
    s = _session(tokenizer, "g", prefix, specs, rules=rules)
    sched.add(s)
    sched.admit()
    counts = []
    while s.in_prefill:
        plan, _ = _run(sched)
        counts.append(plan.slices[0].count)
    assert counts == [4, 2, 3]  # 4, then up to the last row's start, then the whole last row
    # Each stream starts from its own channel's entry of the last row.
    assert sorted((x.stream.channel, x.index) for x in plan.samples) == [(1, 1), (2, 2)]


def _grid_session(tokenizer, sched: Scheduler, user_ids, **rules_kw) -> Session:
    rules = GridRules(silence_id=SILENCE, num_channels=3, **rules_kw)
    specs = [_greedy("output", max_tokens=100), _greedy("think", "reasoning", max_tokens=100)]
    specs[0].channel, specs[1].channel = 1, 2
    s = _session(tokenizer, "g", Prefix.grid([[SILENCE, SILENCE, 30]]), specs, rules=rules, user_ids=user_ids)
    sched.add(s)
    sched.admit()
    return s


def test_paper_silence_penalty_ramps_after_the_user_stops(tokenizer) -> None:
    sched = _scheduler()
    _grid_session(tokenizer, sched, [50, 51])
    penalties = []
    for _ in range(8):
        plan, _ = _run(sched)
        out = next(x for x in plan.samples if x.stream.channel == 1)
        think = next(x for x in plan.samples if x.stream.channel == 2)
        assert think.bias == ()  # thinking channels are not pushed (think_silence_penalty 0)
        penalties.append(-dict(out.bias).get(SILENCE, 0.0))
    # Rows 1, 2 carry user tokens; k = rows since the last one: 10 * min(1, k / 5).
    assert penalties == pytest.approx([0.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 10.0])


def test_paper_grid_stops_on_an_all_silent_row_and_at_max_rows(tokenizer) -> None:
    sched = _scheduler()
    s = _grid_session(tokenizer, sched, [50, 51])
    _run(sched)  # the seed row's samples, for row 1 (which carries the user's 50)
    # Silence sampled for row 2, which carries the user's 51: the row is not all silent.
    _, events = _run(sched, pick=lambda sample: SILENCE)
    assert s.id in sched.active
    _, events = _run(sched, pick=lambda sample: SILENCE)
    assert s.id not in sched.active
    finals = {e.stream: e.finish_reason for _, e in events if e.finished}
    assert finals == {"output": "stop", "think": "stop"}
    # Silence is never sent as text.
    assert all(not e.token_ids for _, e in events if e.kind != "user")

    sched = _scheduler()
    s = _grid_session(tokenizer, sched, [], max_rows=3)
    reasons = []
    for _ in range(3):
        _, events = _run(sched)
        reasons += [e.finish_reason for _, e in events if e.finished]
    assert reasons == ["length", "length"] and s.id not in sched.active


def test_max_tokens_and_eos_end_a_stream(tokenizer) -> None:
    sched = _scheduler()
    s = _session(tokenizer, "a", [11, 12], [_greedy("o", max_tokens=2), _greedy("e")])
    sched.add(s)
    sched.admit()
    _, events = _run(sched, pick=lambda sample: EOS if sample.stream.name == "e" else 100)
    assert [(e.stream, e.finish_reason) for _, e in events if e.finished] == [("e", "stop")]
    _, events = _run(sched)
    assert [(e.stream, e.finish_reason) for _, e in events if e.finished] == [("o", "length")]
    assert s.id not in sched.active and s.slot == -1 and sched.pool.free_slots == 4
