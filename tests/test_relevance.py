"""Likelihood relevance through the critic: log p(y|x), log p(y), their per-token difference, batched and
left-padded, pinned against stored values and against a plain unbatched forward pass."""

import pytest
import torch

PAIRS = [("Name two planets.", "Mars and Venus."),
         ("Explain rain briefly, please.", "Water falls from clouds when drops grow heavy."),
         ("Say hi.", "Hi!")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader

    model, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    return model, tokenizer


def _plain_logprob(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """The definition, one pair at a time: full logits, no padding, no logits_to_keep."""
    from utils.prompt_guards import encode_continuation, encode_prompt

    head = encode_prompt(tokenizer, prompt)
    tail = encode_continuation(tokenizer, continuation) + [tokenizer.eos_token_id]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = sum(float(logprobs[len(head) + k - 1, token]) for k, token in enumerate(tail))
    return total, len(tail)


def test_relevance_equals_a_plain_unbatched_forward_pass(tiny):
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = tiny
    scores = InstructionCritic(model, tokenizer, batch_size=4).relevance_scores(PAIRS)
    for (instruction, response), score in zip(PAIRS, scores, strict=True):
        conditioned, n = _plain_logprob(model, tokenizer, P.create_response_prompt(instruction), P.format_completion(response))
        unconditioned, _ = _plain_logprob(model, tokenizer, P.unconditioned_response_prompt(), P.format_completion(response))
        assert score["n_tokens"] == n  # the completion tokens and EOS
        assert score["logp_conditioned"] == pytest.approx(conditioned, abs=1e-3)
        assert score["logp_unconditioned"] == pytest.approx(unconditioned, abs=1e-3)
        assert score["pmi"] == pytest.approx(conditioned - unconditioned, abs=2e-3)
        assert score["relevance"] == pytest.approx((conditioned - unconditioned) / n, abs=1e-4)


def test_relevance_is_pinned_on_the_tiny_fixture(tiny):
    """Stored values from the seeded random tiny model: a change in the prompts, the EOS, padding or the
    positions read shows up here."""
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = tiny
    scores = InstructionCritic(model, tokenizer, batch_size=2).relevance_scores(PAIRS)
    got = [(s["logp_conditioned"], s["logp_unconditioned"], s["n_tokens"]) for s in scores]
    for (cond, uncond, n), (want_cond, want_uncond, want_n) in zip(got, PINNED_RELEVANCE, strict=True):
        assert n == want_n
        assert cond == pytest.approx(want_cond, abs=2e-3) and uncond == pytest.approx(want_uncond, abs=2e-3)


PINNED_RELEVANCE = [(-74.905, -75.117, 16), (-225.1, -224.812, 48), (-23.373, -23.928, 5)]


def test_batch_size_and_the_logit_budget_do_not_change_the_scores(tiny, monkeypatch):
    import utils.instruction_critic as critic_module
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = tiny
    one_by_one = InstructionCritic(model, tokenizer, batch_size=1).relevance_scores(PAIRS)
    # A budget of one row: every batch is cut to a single row, whatever the batch size.
    monkeypatch.setattr(critic_module, "LOGIT_BUDGET", 1)
    budgeted = InstructionCritic(model, tokenizer, batch_size=8).relevance_scores(PAIRS)
    monkeypatch.undo()
    batched = InstructionCritic(model, tokenizer, batch_size=8).relevance_scores(PAIRS)
    for a, b, c in zip(one_by_one, budgeted, batched, strict=True):
        assert a["n_tokens"] == b["n_tokens"] == c["n_tokens"]
        for key in ("logp_conditioned", "logp_unconditioned"):
            assert a[key] == pytest.approx(b[key], abs=1e-3) and a[key] == pytest.approx(c[key], abs=1e-3)


def test_the_logit_budget_grows_with_the_memory_a_gpu_process_can_have_only(monkeypatch):
    import torch

    from utils.instruction_critic import BYTES_PER_LOGIT, LOGIT_BUDGET, MAX_LOGIT_BUDGET, logit_budget

    assert logit_budget(torch.device("cpu")) == LOGIT_BUDGET
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gib = 2**30
    quarter = 4 * BYTES_PER_LOGIT  # a quarter of the memory, in logits
    # (driver's free, this process's reserved, its allocated, its memory fraction): its own unused cache counts as
    # free, its tensors do not; under a fraction (a rank sharing its GPU) it can reserve only up to its part.
    for free, reserved, allocated, fraction, want in (
            (100 * gib, 0, 0, 1.0, MAX_LOGIT_BUDGET), (8 * gib, 0, 0, 1.0, 8 * gib // quarter),
            (2 * gib, 6 * gib, 2 * gib, 1.0, 6 * gib // quarter), (2 * gib, 6 * gib, 6 * gib, 1.0, 2 * gib // quarter),
            (2**20, 0, 0, 1.0, LOGIT_BUDGET),
            (60 * gib, 30 * gib, 20 * gib, 0.4375, (5 * gib + 10 * gib) // quarter),  # part 35 GiB of 80: 5 more, 10 unused
            (60 * gib, 40 * gib, 36 * gib, 0.4375, 4 * gib // quarter)):  # past its part: only its own unused cache
        assert LOGIT_BUDGET <= want <= MAX_LOGIT_BUDGET
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * gib))
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device, fraction=fraction: fraction)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device, reserved=reserved: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device, allocated=allocated: allocated)
        assert logit_budget(torch.device("cuda", 0)) == want


def test_an_empty_response_has_no_relevance(tiny):
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = tiny
    empty, full = InstructionCritic(model, tokenizer).relevance_scores([("Say hi.", "  "), ("Say hi.", "Hi!")])
    assert empty == {"logp_conditioned": 0.0, "logp_unconditioned": 0.0, "n_tokens": 0, "pmi": None, "relevance": None}
    assert full["n_tokens"] == 5 and full["relevance"] is not None


def test_a_long_prompt_loses_its_front_never_the_continuation(tiny):
    from utils.exit_codes import BadInputError
    from utils.instruction_critic import InstructionCritic

    model, tokenizer = tiny
    critic = InstructionCritic(model, tokenizer, max_prompt_tokens=60)
    ids = list(range(10, 110))  # a 100-token prompt
    fitted = critic._fit(ids, reserve=25)
    assert len(fitted) == 35 and fitted[0] == ids[0] and fitted[1:] == ids[-34:]  # BOS kept, then the end
    from utils.prompt_guards import encode_continuation

    answer = " word" * 8
    [(total, n)] = critic.continuation_logprobs(["Instruction about " + "x" * 200], [answer])
    assert n == len(encode_continuation(tokenizer, answer)) and total < 0  # the whole continuation was scored
    with pytest.raises(BadInputError, match="leaves no room"):
        critic._fit(ids, reserve=60)
