"""The static decode loop against `model.generate`: greedy token for token, sampling in distribution."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from tiny_models import DECODE_VOCAB as VOCAB  # noqa: E402
from tiny_models import random_decode_model as _random_model  # noqa: E402
from tiny_models import sliding_gemma3 as _sliding_gemma3  # noqa: E402
from tiny_models import transformers_probabilities as _hf_probabilities  # noqa: E402
from utils.static_decode import StaticDecoder, nucleus_keep_mask, nucleus_rejection_sample, process_scores  # noqa: E402

_sort = torch.sort


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
    got = StaticDecoder(model, *ids.shape, 24, 0, {end_token}, temperature=0.0, top_p=1.0, repetition_penalty=1.3).decode(ids, mask)
    assert (expected == 0).any(), "the end token must finish at least one row for this test to mean anything"
    width = expected.shape[1]  # generate stops early once every row has ended
    assert torch.equal(got[:, :width], expected)
    assert (got[:, width:] == 0).all()


def _our_probabilities(logits, input_ids, penalty, temperature, top_p):
    probs = torch.softmax(process_scores(logits, input_ids, penalty, temperature), dim=-1)
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


def _one_prompt_many_rows(rows: int):
    """(model, prompt, its next-token logits, the prompt as `rows` rows, their mask); the random model sharpened
    so the nucleus is a few dozen tokens."""
    model = _random_model("llama", "sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=prompt).logits[:, -1, :]
    return model, prompt, logits, prompt.repeat(rows, 1), torch.ones(rows, 6, dtype=torch.long)


# (4, 512): every row's nucleus is larger than 4 tokens, so the wider look samples; (4, 6): the full sort does.
@pytest.mark.parametrize("candidates,wide", [(512, 8192), (4, 512), (4, 6)])
def test_sampled_first_tokens_follow_the_generate_distribution(candidates, wide, monkeypatch):
    from scipy.stats import chisquare

    monkeypatch.setattr("utils.static_decode.TOP_P_CANDIDATES", candidates)
    monkeypatch.setattr("utils.static_decode.TOP_P_WIDE_CANDIDATES", wide)
    sorted_rows = []
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: sorted_rows.append(args[0].shape[0]) or _sort(*args, **kwargs))
    model, prompt, logits, ids, mask = _one_prompt_many_rows(rows := 6000)
    expected = _hf_probabilities(logits, prompt, 1.2, 0.8, 0.9)[0]
    torch.manual_seed(4)
    decoder = StaticDecoder(model, *ids.shape, 1, 0, set(), temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    sorted_rows.clear()  # only the decoder's own sorts count
    first = decoder.decode(ids, mask)[:, 0]
    assert bool(decoder.uncovered.all()) == (candidates == 4)
    assert sum(sorted_rows) == (rows if wide == 6 else 0)
    counts = torch.bincount(first, minlength=VOCAB).double()
    support = expected > 0
    assert int(support.sum()) > 8, "the nucleus must hold several tokens for the test to mean anything"
    assert counts[~support].sum() == 0, "a token outside the top-p nucleus was sampled"
    expected_counts = expected[support].double() / expected[support].double().sum() * rows
    _, p_value = chisquare(counts[support].numpy(), expected_counts.numpy())
    assert p_value > 1e-3


def test_rows_with_seeds_of_their_own_sample_the_whole_distribution_at_top_p_1():
    # top_p 1 picks by the inverse CDF over the whole vocabulary, at each row's own number.
    from scipy.stats import chisquare

    model, prompt, logits, ids, mask = _one_prompt_many_rows(rows := 6000)
    expected = _hf_probabilities(logits, prompt, 1.2, 0.8, 1.0)[0].double() * rows
    decoder = StaticDecoder(model, *ids.shape, 1, 0, set(), temperature=0.8, top_p=1.0, repetition_penalty=1.2)
    counts = torch.bincount(decoder.decode(ids, mask, row_seeds=list(range(rows)))[:, 0], minlength=VOCAB).double()
    frequent = expected >= 5  # the rest pooled into one cell, as the test needs
    assert int(frequent.sum()) > 8 and expected[~frequent].sum() >= 5
    _, p_value = chisquare(torch.cat([counts[frequent], counts[~frequent].sum()[None]]).numpy(),
                           torch.cat([expected[frequent], expected[~frequent].sum()[None]]).numpy())
    assert p_value > 1e-3


def test_rejection_sampling_keeps_the_first_draw_inside_the_nucleus():
    from scipy.stats import chisquare

    # Three tokens tie at 0.2: a stable descending sort ranks them by id, so the nucleus for top_p = 0.6 is
    # ids 3 (0.3), 1 and 2 (0.2 each, with 0.3 and 0.5 above them), and not 4 (0.7 above it) or 0.
    probs = torch.tensor([[0.1, 0.2, 0.2, 0.3, 0.2]])
    cdf_starts = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8])
    inside, outside = cdf_starts[3] + 0.05, cdf_starts[4] + 0.05  # a uniform that draws id 3, one that draws id 4
    tokens, missed = nucleus_rejection_sample(probs.repeat(3, 1), torch.tensor([[outside, inside, outside],
                                                                                [inside, outside, outside],
                                                                                [outside, outside, outside]]), 0.6)
    assert tokens[:2].tolist() == [3, 3] and missed.tolist() == [False, False, True]
    rows = 60000
    generator = torch.Generator().manual_seed(5)
    tokens, missed = nucleus_rejection_sample(probs.repeat(rows, 1), torch.rand(rows, 2, generator=generator), 0.6)
    kept = tokens[~missed]
    counts = torch.bincount(kept, minlength=5).double()
    assert counts[0] == 0 and counts[4] == 0, "a token outside the nucleus was kept"
    assert abs(missed.double().mean() - 0.3 ** 2) < 0.01  # both draws miss with probability (1 - 0.7) ** 2
    _, p_value = chisquare(counts[1:4].numpy(), (torch.tensor([2, 2, 3], dtype=torch.float64) / 7 * len(kept)).numpy())
    assert p_value > 1e-3


def test_inverse_cdf_draws_equal_one_float64_cumulative_sum(monkeypatch):
    import utils.static_decode as static_decode

    monkeypatch.setattr(static_decode, "CDF_BLOCK", 4)  # 23 tokens: 5 whole blocks and a remainder of 3
    generator = torch.Generator().manual_seed(6)
    probs = torch.rand(64, 23, generator=generator)
    probs[:, 4:8] = 0  # a block that holds nothing
    probs[:, 13] = 0
    probs[:, 21:] = 0  # and zeros at the end of the remainder
    probs /= probs.sum(dim=-1, keepdim=True)
    uniforms = torch.rand(64, 50, generator=generator, dtype=torch.float64)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    expected = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    drawn = static_decode.inverse_cdf_draws(probs, uniforms)
    assert torch.equal(drawn, expected)
    assert (probs.gather(1, drawn) > 0).all()
    kept = probs * (torch.arange(23) < 12)  # weights that do not sum to 1 (the nucleus's kept candidates)
    kept_cdf = kept.cumsum(dim=-1, dtype=torch.float64)
    assert torch.equal(static_decode.inverse_cdf_draws(kept, uniforms), torch.searchsorted(kept_cdf, uniforms * kept_cdf[:, -1:], right=True))


def test_rejection_draws_follow_top_p():
    from utils.static_decode import rejection_draws

    assert [rejection_draws(p) for p in (0.85, 0.9, 0.95, 0.99)] == [8, 6, 5, 3]  # (1 - p) ** draws <= 1e-6
    assert rejection_draws(0.5) == 0  # 20 draws: the exact way instead
    assert rejection_draws(1.0) == 0


# One draw (REJECTION_MISS 0.5 at top_p 0.9) misses the nucleus for about a tenth of the rows, which take
# their most probable token; six draws miss for about one row in a million.
@pytest.mark.parametrize("miss", [1e-6, 0.5])
def test_compiled_step_samples_first_tokens_from_the_nucleus_without_host_checks(miss, monkeypatch):
    from scipy.stats import chisquare

    import utils.static_decode as static_decode

    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", "aot_eager")  # as test_compiled_decode_step_equals_generate
    monkeypatch.setattr(static_decode, "REJECTION_MISS", miss)
    monkeypatch.setattr(StaticDecoder, "_resample", lambda *a: pytest.fail("the rejection sampler never re-samples on the host"))
    model, prompt, logits, ids, mask = _one_prompt_many_rows(rows := 6000)
    torch.manual_seed(4)
    decoder = StaticDecoder(model, *ids.shape, 1, 0, set(), temperature=0.8, top_p=0.9, repetition_penalty=1.2,
                            compile_forward=True)
    assert decoder.draws == (6 if miss == 1e-6 else 1) and not decoder._may_resample
    first = decoder.decode(ids, mask)[:, 0]
    assert decoder.compile_forward and not StaticDecoder.compile_failed and not StaticDecoder.sampler_compile_failed
    nucleus = _hf_probabilities(logits, prompt, 1.2, 0.8, 0.9)[0].double()
    support = nucleus > 0
    assert int(support.sum()) > 8, "the nucleus must hold several tokens for the test to mean anything"
    # A draw from the whole distribution lands in the nucleus with probability its mass: a row misses with 1 - mass.
    full = torch.softmax(process_scores(logits, prompt, 1.2, 0.8), dim=-1)[0].double()
    missing = 1 - float(full[support].sum()) if miss == 0.5 else 0.0
    expected = nucleus / nucleus.sum() * (1 - missing)
    expected[int(full.argmax())] += missing
    if miss == 0.5:
        assert abs(decoder.last_sampling_misses - rows * missing) < 5 * (rows * missing) ** 0.5
    else:
        assert decoder.last_sampling_misses == 0
    counts = torch.bincount(first, minlength=VOCAB).double()
    assert counts[~support].sum() == 0, "a token outside the top-p nucleus was sampled"
    _, p_value = chisquare(counts[support].numpy(), (expected[support] * rows).numpy())
    assert p_value > 1e-3


def test_a_sampler_that_fails_to_compile_leaves_the_forward_compiled(monkeypatch, capsys):
    import utils.static_decode as static_decode

    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(StaticDecoder, "sampler_compile_failed", False)
    compiled = static_decode._compiled_function

    def failing(function):
        if function is static_decode._draw_from_nucleus:
            return lambda *args: (_ for _ in ()).throw(RuntimeError("no triton"))
        return compiled(function)

    monkeypatch.setattr(static_decode, "_compiled_function", failing)
    model = _random_model("llama", "sdpa")
    ids, mask = _left_padded_batch()
    decoder = StaticDecoder(model, *ids.shape, 6, 0, set(), temperature=1.0, top_p=0.9, repetition_penalty=1.2, compile_forward=True)
    assert decoder.decode(ids, mask).shape == (4, 6)
    assert StaticDecoder.sampler_compile_failed and decoder.compile_forward and not StaticDecoder.compile_failed
    assert decoder._may_resample  # the exact way, with its host check per step
    assert "torch.compile failed" in capsys.readouterr().out


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
    # Widths padded up to a multiple of 16 (as on a GPU) and decoders kept across batches: same results.
    engine = GenerationEngine(model, tokenizer, batch_size=2, show_progress=False, decode_loop="static", width_multiple=16)
    for _ in range(2):
        assert sorted((r.key, r.text, r.finish_reason, r.token_ids) for r in engine.generate(items, params, stop_strings=stops)) == plain
    assert 1 <= len(engine._decoders) <= GenerationEngine.KEPT_DECODERS
    assert all(decoder.width % 16 == 0 for decoder in engine._decoders.values())


def test_the_engine_samples_a_record_the_same_way_in_any_batch(trained_model_dir):
    # What a resumed run or an out-of-memory retry does: the records left are batched from another first record.
    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    items = [(f"k{i}", P.create_response_prompt(text)) for i, text in enumerate(
        ["Name three facts about the moon.", "Give a tip.", "Explain rain to a child.", "List colours.", "Describe a cat.", "Say hi."])]
    params = SamplingParams(1.0, 0.9, 1.1, 24)

    def run(records, batch_size, seed=3):
        engine = GenerationEngine(model, tokenizer, batch_size=batch_size, seed=seed, show_progress=False, decode_loop="static")
        return {r.key: r.token_ids for r in engine.generate(records, params)}

    whole = run(items, 4)
    assert run(items[2:], 4) == {key: whole[key] for key, _ in items[2:]}
    assert run(items, 1) == whole
    assert run(items, 4, seed=4) != whole


def test_engine_drops_its_kept_decoders_when_the_model_changes(trained_model_dir):
    # The evaluation generates with the base model, then sets engine.model to base + adapter: the
    # second model must not decode through the first one's kept decoder (on a GPU: its graph).
    from utils.clean_model_loader import CleanModelLoader
    from utils.generation import GenerationEngine, SamplingParams

    first, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    second, _, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    items = [("a", "The weather today is"), ("b", "Three facts about cats:")]
    params = SamplingParams(0.0, 1.0, 1.0, 12)
    texts = lambda results: [r.token_ids for r in sorted(results, key=lambda r: r.key)]
    engine = GenerationEngine(first, tokenizer, batch_size=2, show_progress=False, decode_loop="static")
    from_first = texts(engine.generate(items, params))
    engine.model = second
    expected = texts(GenerationEngine(second, tokenizer, batch_size=2, show_progress=False, decode_loop="static").generate(items, params))
    assert expected != from_first, "the two models must differ for this test to mean anything"
    assert texts(engine.generate(items, params)) == expected


def test_engine_does_not_reuse_a_decoder_after_an_adapter_is_injected_in_place(trained_model_dir):
    # On a GPU a kept decoder replays a graph without the adapter's kernels; on the CPU the reuse would
    # go unnoticed in the outputs, so the test checks that a new decoder is built.
    from peft import LoraConfig, inject_adapter_in_model

    from utils.clean_model_loader import CleanModelLoader
    from utils.generation import GenerationEngine, SamplingParams

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    engine = GenerationEngine(model, tokenizer, batch_size=2, show_progress=False, decode_loop="static")
    items, params = [("a", "The weather today is"), ("b", "Three facts about cats:")], SamplingParams(0.0, 1.0, 1.0, 6)
    engine.generate(items, params)
    before = list(engine._decoders.values())
    engine.generate(items, params)
    assert list(engine._decoders.values()) == before  # same model, same shape: kept
    inject_adapter_in_model(LoraConfig(r=2, target_modules="all-linear"), model)
    engine.generate(items, params)
    assert list(engine._decoders.values())[-1] not in before  # the most recently used one is new


def test_decode_steps_use_grouped_attention_and_restore_the_model_setting():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import utils.static_decode as static_decode

    model = _random_model("gemma3", "sdpa")
    name = static_decode._register_decode_attention()
    calls = []
    original = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = lambda *args, **kwargs: calls.append(args[1].shape) or original(*args, **kwargs)
    try:
        ids, mask = _left_padded_batch()
        StaticDecoder(model, *ids.shape, 5, 0, set(), temperature=0.0, top_p=1.0, repetition_penalty=1.0).decode(ids, mask)
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = original
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * 4 and all(shape[2] == 1 for shape in calls)  # 4 decode steps after the prefill
    assert model.config._attn_implementation == "sdpa"


def test_a_decoder_reused_across_batches_equals_fresh_decoders():
    model = _random_model("llama", "sdpa")
    first_ids, first_mask = _left_padded_batch()
    second_ids = torch.randint(3, VOCAB, first_ids.shape, generator=torch.Generator().manual_seed(7))
    second_mask = torch.ones_like(second_ids)
    second_mask[3, :4] = 0
    settings = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3)

    def decode(decoder, ids, mask, seed):
        torch.manual_seed(seed)
        return decoder.decode(ids, mask)

    fresh = lambda: StaticDecoder(model, *first_ids.shape, 12, 0, {5}, **settings)
    expected = [decode(fresh(), first_ids, first_mask, 1), decode(fresh(), second_ids, second_mask, 2)]
    reused = fresh()
    got = [decode(reused, first_ids, first_mask, 1), decode(reused, second_ids, second_mask, 2),
           decode(reused, first_ids, first_mask, 1)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[0])
    assert not torch.equal(expected[0], expected[1])
    with pytest.raises(ValueError, match="serves batches of shape"):
        reused.decode(first_ids[:2], first_mask[:2])


def test_compiled_decode_step_equals_generate(monkeypatch):
    # aot_eager traces the step through dynamo and AOT autograd like inductor does, without a C++ or
    # Triton toolchain; the GPU run uses inductor (docs/measurements.md).
    import utils.static_decode as static_decode

    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", "aot_eager")
    model = _random_model("gemma3", "sdpa")
    ids, mask = _left_padded_batch()
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                              repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)[:, 10:]
    decoder = StaticDecoder(model, *ids.shape, 8, 0, set(), temperature=0.0, top_p=1.0, repetition_penalty=1.3,
                            compile_forward=True)
    assert torch.equal(decoder.decode(ids, mask), expected)
    assert decoder.compile_forward and not StaticDecoder.compile_failed
    compiled = static_decode._compiled(model)
    assert model.__dict__["_stage1_compiled"] is compiled  # one wrapper per model, kept on the model
    assert all(module is not compiled for module in model.modules())  # not registered as a submodule
    assert torch.equal(decoder.decode(ids, mask), expected)  # the compiled step again, on reloaded buffers


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rehearsal_before_capture_is_rewound(monkeypatch, family):
    # On a GPU the first batch of a decoder rehearses one step, captures it, and rewinds; a reused
    # decoder goes straight to the graph. Both must sample the same tokens for the same seed. Here the
    # "graph" is the eager step itself, so the rewind is checked on the CPU.
    monkeypatch.setattr(StaticDecoder, "_capture", lambda self: self._eager_step)
    model = _random_model(family, "sdpa")
    ids, mask = _left_padded_batch()

    def sample(use_graph):
        torch.manual_seed(11)
        decoder = StaticDecoder(model, *ids.shape, 10, 0, set(), temperature=1.0, top_p=0.95, repetition_penalty=1.2,
                                use_cuda_graph=use_graph)
        return decoder.decode(ids, mask)

    rehearsed, plain = sample(True), sample(False)
    assert torch.equal(rehearsed, plain)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_beyond_the_sliding_window_equals_generate(attention):
    from utils.static_decode import supports_static_decode

    model = _sliding_gemma3(attention)
    ids = torch.randint(3, VOCAB, (4, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pads in ((1, 3), (2, 11), (3, 16)):  # 20, 17, 9 and 4 real tokens, then 30 new ones: far past the window
        ids[row, :pads] = 0
        mask[row, :pads] = 0
    assert supports_static_decode(model, 50)
    settings = dict(do_sample=False, max_new_tokens=30, repetition_penalty=1.3, pad_token_id=0)
    free_run = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **settings)[:, 20:]
    end_token = int(free_run[0, 20])
    expected = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=end_token, **settings)[:, 20:]
    decoder = StaticDecoder(model, *ids.shape, 30, 0, {end_token}, temperature=0.0, top_p=1.0, repetition_penalty=1.3)
    assert decoder.mask_mapping and all(not layer.is_sliding for layer in decoder.cache.layers)
    got = decoder.decode(ids, mask)
    assert (expected == 0).any(), "the end token must finish at least one row for this test to mean anything"
    width = expected.shape[1]
    assert torch.equal(got[:, :width], expected) and (got[:, width:] == 0).all()
    # The window must matter for this test to mean anything: the same weights with a window that covers
    # everything generate other tokens.
    model.config.sliding_window = 4096
    unwindowed = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **settings)[:, 20:]
    assert not torch.equal(unwindowed, free_run)


def test_sliding_models_without_per_layer_type_masks_stay_within_their_window():
    # Mistral builds its own masks from the attention mask it is given: beyond its window the engine
    # must fall back to generate, and a decoder must refuse rather than decode with the wrong mask.
    from transformers import MistralConfig, MistralForCausalLM

    from utils.static_decode import accepts_mask_mapping, supports_static_decode

    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, sliding_window=8)
    config._attn_implementation = "sdpa"
    model = MistralForCausalLM(config).eval()
    assert not accepts_mask_mapping(model) and accepts_mask_mapping(_sliding_gemma3("sdpa"))
    assert supports_static_decode(model, 8) and not supports_static_decode(model, 9)
    with pytest.raises(ValueError, match="sliding window"):
        StaticDecoder(model, 2, 6, 4, 0, set(), temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def _finish_all_but(kept: set[int]):
    """A stop check that ends every row but `kept` (original row numbers) at its first call, as stop strings would."""
    calls = []

    def stop_check(tokens, rows):
        calls.append(list(rows))
        return set(rows) - kept if len(calls) == 1 else set()

    return stop_check, calls


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_last_live_rows_finish_in_a_smaller_decoder_with_the_same_tokens(monkeypatch, family):
    # 32 rows; at the first check (step 8) all but 3 are done, so the 3 go on in a decoder of 8 rows (32 / 4).
    # The "graph" is the eager step, so the tail's rehearsal and rewind run too.
    monkeypatch.setattr(StaticDecoder, "_capture", lambda self: self._eager_step)
    model = _random_model(family, "sdpa")
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (32, 9), generator=generator)
    mask = torch.ones_like(ids)
    ids[5, :4], mask[5, :4] = 0, 0
    settings = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.3)
    kept = {2, 5, 30}
    outputs = {}
    for compact in (False, True):
        decoder = StaticDecoder(model, 32, 9, 40, 0, set(), compact_rows=compact, use_cuda_graph=True, **settings)
        stop_check, calls = _finish_all_but(kept)
        outputs[compact] = decoder.decode(ids, mask, stop_check=stop_check)
        assert decoder.compacted_batches == int(compact)
        # Later checks ask only about the kept rows, by their row numbers in whichever decoder holds them.
        assert all(len(rows) == 3 for rows in calls[1:]) and len(calls) > 2
    assert torch.equal(outputs[True], outputs[False])
    # The first check comes after the prefill's token and 8 steps: the other rows end there.
    assert (outputs[True][sorted(kept), 9:] != 0).all() and (outputs[True][[0, 1, 31], 9:] == 0).all()


def test_a_decoder_with_a_tail_reused_across_batches_samples_what_fresh_ones_sample(monkeypatch):
    monkeypatch.setattr(StaticDecoder, "_capture", lambda self: self._eager_step)
    model = _random_model("llama", "sdpa")
    generator = torch.Generator().manual_seed(6)
    batches = [torch.randint(3, VOCAB, (32, 7), generator=generator) for _ in range(2)]
    settings = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.2)

    def decode(decoder, ids, seed):
        torch.manual_seed(seed)
        return decoder.decode(ids, torch.ones_like(ids), stop_check=_finish_all_but({0, 17})[0])

    fresh = lambda: StaticDecoder(model, 32, 7, 30, 0, set(), use_cuda_graph=True, **settings)
    expected = [decode(fresh(), batches[0], 1), decode(fresh(), batches[1], 2)]
    reused = fresh()
    got = [decode(reused, batches[0], 1), decode(reused, batches[1], 2)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert reused.compacted_batches == 2 and list(reused._tails) == [8]


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_a_seeded_row_samples_the_same_tokens_in_any_batch(top_p):
    # A resumed run's batches start at other records, and an out-of-memory retry halves them: a row's tokens
    # must follow from its prompt and its seed alone, not from its companions, its place or the padding.
    model = _random_model("gemma3", "sdpa")
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (9, 9, 6, 9, 12)]
    settings = dict(temperature=1.0, top_p=top_p, repetition_penalty=1.2)

    def decode(rows):
        width = max(len(prompts[row]) for row in rows)
        ids = torch.tensor([[0] * (width - len(prompts[row])) + prompts[row] for row in rows])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(prompts[row]) for row in rows])[:, None]).long()
        decoder = StaticDecoder(model, len(rows), width, 20, 0, set(), **settings)
        return dict(zip(rows, decoder.decode(ids, mask, row_seeds=[100 + row for row in rows]).tolist(), strict=True))

    first, second = decode([0, 1, 2, 3]), decode([3, 4, 0])  # other companions, places and widths
    assert first[0] == second[0] and first[3] == second[3]
    assert first[0] != first[1], "two seeds drew the same 20 tokens: the test would not see a shared generator"
    assert decode([0, 1, 2, 3]) == first


def test_sampled_rows_that_finish_in_a_smaller_decoder_keep_their_tokens(monkeypatch):
    monkeypatch.setattr(StaticDecoder, "_capture", lambda self: self._eager_step)
    model = _random_model("llama", "sdpa")
    ids = torch.randint(3, VOCAB, (32, 9), generator=torch.Generator().manual_seed(4))
    settings = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.2)
    outputs = {}
    for compact in (False, True):
        decoder = StaticDecoder(model, 32, 9, 40, 0, set(), compact_rows=compact, use_cuda_graph=True, **settings)
        outputs[compact] = decoder.decode(ids, torch.ones_like(ids), stop_check=_finish_all_but({2, 5, 30})[0], row_seeds=list(range(32)))
        assert decoder.compacted_batches == int(compact)
    assert torch.equal(outputs[True], outputs[False])
