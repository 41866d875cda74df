"""The sampling surface both client ecosystems send (no server): presence / frequency
penalties, ``min_tokens``, bad words and log probabilities of ``backend.engine.sampling``.

Checked against code nobody here wrote: ``transformers``' ``NoBadWordsLogitsProcessor`` and
``MinNewTokensLengthLogitsProcessor``, and OpenAI's published penalty formula
(``mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty``).
"""

from __future__ import annotations

import torch
from transformers import MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor

from backend.engine.sampling import StreamSampler
from backend.engine.sampling_params import SamplingParams

VOCAB = 50
EOS = 7


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))


def _sampler(generated: list[int], **params) -> StreamSampler:
    s = StreamSampler(SamplingParams(max_tokens=100, **params), eos_ids=[EOS])
    for t in generated:
        s.observe(t)
    return s


def test_presence_and_frequency_follow_openais_formula() -> None:
    generated = [3, 3, 3, 9, 12, 12]
    logits = _logits()
    got = _sampler(generated, presence_penalty=0.5, frequency_penalty=0.25)._penalise(logits)
    want = logits.clone()
    for tok in set(generated):
        c = generated.count(tok)
        want[tok] -= c * 0.25 + 0.5
    assert torch.allclose(got, want)
    # Negative penalties encourage repeats; zero leaves the logits alone.
    assert torch.equal(_sampler(generated)._penalise(logits), logits)
    assert _sampler(generated, presence_penalty=-1.0)._penalise(logits)[3] > logits[3]


def test_bad_words_match_transformers() -> None:
    bad = [[5], [20, 21], [30, 31, 32]]
    for generated in ([1, 2, 3], [1, 20], [30, 31], [31, 30], []):
        logits = _logits(len(generated))
        ours = _sampler(generated, bad_words_ids=bad)._penalise(logits)
        ref = NoBadWordsLogitsProcessor(bad, eos_token_id=EOS)(
            torch.tensor([generated or [0]]), logits.clone().unsqueeze(0)
        )[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), generated


def test_min_tokens_matches_transformers() -> None:
    for n_generated in range(0, 6):
        generated = list(range(10, 10 + n_generated))
        logits = _logits(n_generated)
        ours = _sampler(generated, min_tokens=4)._penalise(logits)
        ref = MinNewTokensLengthLogitsProcessor(0, 4, EOS)(
            torch.tensor([generated or [0]]), logits.clone().unsqueeze(0)
        )[0]
        if not generated:  # transformers counts the dummy input token; with none generated, EOS is banned
            assert torch.isinf(ours[EOS])
            continue
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), n_generated
    # A stop token is held back like the end of sequence.
    s = _sampler([], min_tokens=2, stop_token_ids=[11])
    out = s._penalise(_logits())
    assert torch.isinf(out[11]) and torch.isinf(out[EOS])


def test_greedy_never_picks_a_banned_token() -> None:
    logits = torch.zeros(VOCAB)
    logits[EOS] = 10.0  # the model wants to end
    s = _sampler([], min_tokens=3, bad_words_ids=[[4]])
    logits[4] = 9.0
    assert s.sample(logits) not in (EOS, 4)


def test_logprobs_are_the_models_distribution() -> None:
    logits = _logits(3)
    s = _sampler([], logprobs=True, temperature=0.7, seed=1)
    tok = s.sample(logits)
    assert s.logprobs == [float(torch.log_softmax(logits, -1)[tok])]
    greedy = _sampler([], logprobs=True)
    tok = greedy.sample(logits)
    assert tok == int(logits.argmax()) and greedy.logprobs[0] == float(torch.log_softmax(logits, -1).max())


def test_top_logprobs_are_log_softmax_topk_of_the_same_distribution() -> None:
    logits = _logits(5)
    want = torch.topk(torch.log_softmax(logits, -1), 4)
    for params in ({}, {"temperature": 0.9, "seed": 3, "presence_penalty": 1.0}):
        s = _sampler([2, 2], logprobs=True, top_logprobs=4, **params)
        tok = s.sample(logits)
        (ids, values), lp = s.top_logprobs[0], s.logprobs[0]
        assert ids == want.indices.tolist() and values == want.values.tolist()
        assert values == sorted(values, reverse=True) and lp == float(torch.log_softmax(logits, -1)[tok])
        if not params:  # greedy: the sampled token is the first alternative
            assert ids[0] == tok and values[0] == lp
    only_top = _sampler([], top_logprobs=2)
    only_top.sample(logits)
    assert only_top.logprobs == [] and len(only_top.top_logprobs) == 1


def test_validation_names_the_rule() -> None:
    import pytest

    with pytest.raises(ValueError, match="top_logprobs must be in 0..20, got 21"):
        SamplingParams(top_logprobs=21).validate()
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=3).validate()
    with pytest.raises(ValueError, match="min_tokens must be in 0..max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5).validate()
