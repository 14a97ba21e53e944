"""The static decode loop against `model.generate`: greedy token for token, sampling in distribution."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from utils.static_decode import StaticDecoder, nucleus_keep_mask, process_scores  # noqa: E402

VOCAB = 300


def _random_model(family: str, attention: str, lora: bool = False):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    if family == "gemma3":  # sliding-window and full layers, soft-capped logits
        config, cls = Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=64, **shape), Gemma3ForCausalLM
    else:
        config, cls = LlamaConfig(num_hidden_layers=2, **shape), LlamaForCausalLM
    config._attn_implementation = attention
    model = cls(config).eval()
    model.config._attn_implementation = attention
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    return model


def _left_padded_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 10), generator=generator)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 3), (2, 6)):
        ids[row, :pads] = 0
        mask[row, :pads] = 0
    return ids, mask


@pytest.mark.parametrize("family,lora", [("llama", False), ("gemma3", False), ("llama", True)])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_equals_generate_token_for_token(family, lora, attention):
    model = _random_model(family, attention, lora)
    ids, mask = _left_padded_batch()
    # An end token the model actually produces, so rows finish at different steps.
    free_run = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                              repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)[:, 10:]
    end_token = int(free_run[0, 5])
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                              repetition_penalty=1.3, pad_token_id=0, eos_token_id=end_token)[:, 10:]
    got = StaticDecoder(model, ids, mask, 24, 0, {end_token}, temperature=0.0, top_p=1.0, repetition_penalty=1.3).decode()
    assert (expected == 0).any(), "the end token must finish at least one row for this test to mean anything"
    width = expected.shape[1]  # generate stops early once every row has ended
    assert torch.equal(got[:, :width], expected)
    assert (got[:, width:] == 0).all()


def _hf_probabilities(logits, input_ids, penalty, temperature, top_p):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature),
                                      TopPLogitsWarper(top_p)])
    return torch.softmax(processors(input_ids, logits.clone()), dim=-1)


def _our_probabilities(logits, input_ids, penalty, temperature, top_p):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, input_ids, True)
    probs = torch.softmax(process_scores(logits, seen, penalty, temperature), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    kept = sorted_probs * nucleus_keep_mask(sorted_probs, top_p)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, kept)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 0.5), (1.3, 0.99)])
def test_processed_distribution_equals_transformers_processors(temperature, top_p):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(8, VOCAB, generator=generator) * 3
    input_ids = torch.randint(0, VOCAB, (8, 12), generator=generator)
    expected = _hf_probabilities(logits, input_ids, 1.1, temperature, top_p)
    got = _our_probabilities(logits, input_ids, 1.1, temperature, top_p)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got > 0, expected > 0)  # the same nucleus, token for token


@pytest.mark.parametrize("candidates", [512, 4])  # 4: every row's nucleus is larger, so the full-sort path samples
def test_sampled_first_tokens_follow_the_generate_distribution(candidates, monkeypatch):
    from scipy.stats import chisquare

    monkeypatch.setattr("utils.static_decode.TOP_P_CANDIDATES", candidates)
    model = _random_model("llama", "sdpa")
    with torch.no_grad():  # sharpen the random model so the nucleus is a few dozen tokens
        model.lm_head.weight.mul_(8)
    rows = 6000
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    ids, mask = prompt.repeat(rows, 1), torch.ones(rows, 6, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=prompt).logits[:, -1, :]
    expected = _hf_probabilities(logits, prompt, 1.2, 0.8, 0.9)[0]
    torch.manual_seed(4)
    decoder = StaticDecoder(model, ids, mask, 1, 0, set(), temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    first = decoder.decode()[:, 0]
    assert bool(decoder.uncovered.all()) == (candidates == 4)
    counts = torch.bincount(first, minlength=VOCAB).double()
    support = expected > 0
    assert int(support.sum()) > 8, "the nucleus must hold several tokens for the test to mean anything"
    assert counts[~support].sum() == 0, "a token outside the top-p nucleus was sampled"
    expected_counts = expected[support].double() / expected[support].double().sum() * rows
    _, p_value = chisquare(counts[support].numpy(), expected_counts.numpy())
    assert p_value > 1e-3


def test_engine_static_loop_matches_generate_with_stop_strings(trained_model_dir):
    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    items = [(f"k{i}", P.create_response_prompt(text)) for i, text in enumerate(
        ["Name three facts about the moon.", "Give a tip.", "Explain rain to a child in two sentences.", "List colours."])]
    items.append(("list", P.create_instruction_generation_prompt(random.Random(0), 3)[0]))
    params = SamplingParams(0.0, 1.0, 1.1, 40)
    stops = P.response_stop_strings() + P.instruction_stop_strings(3)
    run = lambda loop: sorted((r.key, r.text, r.finish_reason, r.token_ids) for r in GenerationEngine(
        model, tokenizer, batch_size=3, show_progress=False, decode_loop=loop).generate(items, params, stop_strings=stops))
    static, plain = run("static"), run("generate")
    assert static == plain
    assert {reason for _, _, reason, _ in static} >= {"stop"}, "some sequence must end on a stop string"


def test_decode_steps_use_grouped_attention_and_restore_the_model_setting():
    import utils.static_decode as static_decode
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _random_model("gemma3", "sdpa")
    name = static_decode._register_decode_attention()
    calls = []
    original = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = lambda *args, **kwargs: calls.append(args[1].shape) or original(*args, **kwargs)
    try:
        ids, mask = _left_padded_batch()
        StaticDecoder(model, ids, mask, 5, 0, set(), temperature=0.0, top_p=1.0, repetition_penalty=1.0).decode()
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = original
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * 4 and all(shape[2] == 1 for shape in calls)  # 4 decode steps after the prefill
    assert model.config._attn_implementation == "sdpa"
