"""Shared-prefix prefill: a prefix common to every row is prefilled once and its keys and values shared,
with the same greedy tokens as `model.generate` and the same sampling distribution."""

import pytest
import torch

# The random models and transformers' own processing chain, shared with the static loop's tests.
from tiny_models import DECODE_VOCAB as VOCAB
from tiny_models import random_decode_model as _random_model
from tiny_models import sliding_gemma3 as _sliding_gemma3
from tiny_models import transformers_probabilities as _hf_probabilities
from utils.generation import GenerationEngine, SamplingParams, left_pad, prefix_layout, shared_prefix_length
from utils.static_decode import StaticDecoder


def test_shared_prefix_length_keeps_a_token_per_row_and_rounds_down():
    shared = list(range(100, 170))  # 70 tokens
    rows = [shared + [1, 2], shared + [1, 3, 4], shared + [5]]
    assert shared_prefix_length(rows) == 70
    assert shared_prefix_length(rows, multiple=32) == 64
    assert shared_prefix_length(rows, minimum=71) == 0
    assert shared_prefix_length([shared + [9]] * 4) == 70  # N copies of one prompt: all but its last token
    assert shared_prefix_length([shared] * 4) == 69
    assert shared_prefix_length([shared[:40] + [1], shared[:40] + [2], shared[:20]]) == 0  # 19 < the minimum


def test_prefix_layout_puts_the_prefix_first_and_pads_each_suffix_after_it():
    rows = [[7, 8, 9, 1, 2], [7, 8, 9, 3], [7, 8, 9, 4, 5, 6]]
    ids, mask = prefix_layout(rows, 3, 0, width=7)
    assert ids.tolist() == [[7, 8, 9, 0, 0, 1, 2], [7, 8, 9, 0, 0, 0, 3], [7, 8, 9, 0, 4, 5, 6]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 1, 1, 1]]
    assert [t.tolist() for t in prefix_layout(rows, 0, 0)] == [t.tolist() for t in left_pad(rows, 0)]
    with pytest.raises(ValueError, match="do not all start"):
        prefix_layout(rows, 4, 0)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_decode_attention_reads_a_shared_prefix_once_with_the_same_result(mask_kind):
    from utils.static_decode import decode_attention

    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, group, head_dim, length, prefix = 3, 2, 3, 8, 12, 5
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, head_dim, generator=generator) for _ in range(2))
    key[:, :, :prefix], value[:, :, :prefix] = key[:1, :, :prefix], value[:1, :, :prefix]
    allowed = torch.rand(batch, 1, 1, length, generator=generator) > 0.3
    allowed[..., 0] = True
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    settings = dict(scaling=0.3, softcap=5.0)
    expected, _ = decode_attention(None, query, key, value, mask, **settings)
    shared, _ = decode_attention(None, query, key, value, mask, shared_prefix=prefix, **settings)
    assert shared.shape == expected.shape and torch.allclose(shared, expected, atol=1e-6)
    # The prefix is read from row 0 alone: what the other rows hold there is never looked at.
    key[1:, :, :prefix], value[1:, :, :prefix] = 99.0, -99.0
    assert torch.equal(decode_attention(None, query, key, value, mask, shared_prefix=prefix, **settings)[0], shared)


def _rows_with_a_shared_prefix(prefix: int, suffix_lengths, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    head = torch.randint(3, VOCAB, (prefix,), generator=generator).tolist()
    return [head + torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in suffix_lengths]


def _generate(model, rows, new_tokens, end_ids, **settings):
    ids, mask = (tensor.to(model.device) for tensor in left_pad(rows, 0))
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=end_ids,
                          **settings)[:, ids.shape[1]:]


def _shared_decoder(model, rows, prefix, new_tokens, end_ids, **settings):
    ids, mask = prefix_layout(rows, prefix, 0)
    return StaticDecoder(model, *ids.shape, new_tokens, 0, set(end_ids), prefix_length=prefix, **settings), ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma3_sliding"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_with_a_shared_prefix_equals_generate(family, attention):
    # Suffixes of 9, 4, 1 and 6 tokens after a 14-token prefix; the sliding model's window is 8, so its
    # mask must count positions, not columns, across the padding between prefix and suffix.
    model = _sliding_gemma3(attention) if family == "gemma3_sliding" else _random_model("llama", attention)
    rows = _rows_with_a_shared_prefix(14, [9, 4, 1, 6])
    settings = dict(repetition_penalty=1.3)
    end_token = int(_generate(model, rows, 20, None, do_sample=False, **settings)[0, 12])
    expected = _generate(model, rows, 20, end_token, do_sample=False, **settings)
    decoder, ids, mask = _shared_decoder(model, rows, 14, 20, [end_token], temperature=0.0, top_p=1.0, **settings)
    got = decoder.decode(ids, mask)
    assert (expected == 0).any(), "the end token must finish at least one row for this test to mean anything"
    width = expected.shape[1]
    assert torch.equal(got[:, :width], expected) and (got[:, width:] == 0).all()


def test_sampling_with_a_shared_prefix_draws_what_the_unshared_loop_draws():
    # Same seed, same random numbers consumed, logits equal to float precision: the same tokens, step after step.
    model = _sliding_gemma3("sdpa")
    rows = _rows_with_a_shared_prefix(12, [5, 3, 5, 7])
    settings = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2)
    ids, mask = left_pad(rows, 0)
    torch.manual_seed(3)
    unshared = StaticDecoder(model, *ids.shape, 16, 0, set(), **settings).decode(ids, mask)
    decoder, shared_ids, shared_mask = _shared_decoder(model, rows, 12, 16, [], **settings)
    torch.manual_seed(3)
    assert torch.equal(decoder.decode(shared_ids, shared_mask), unshared)


def test_sampled_first_tokens_with_a_shared_prefix_follow_the_generate_distribution():
    # N copies of one prompt (best-of-N): all but its last token shared.
    from scipy.stats import chisquare

    model = _random_model("llama", "sdpa")
    with torch.no_grad():  # sharpen the random model so the nucleus is a few dozen tokens
        model.lm_head.weight.mul_(8)
    copies = 4000
    prompt = _rows_with_a_shared_prefix(8, [1], seed=3)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1, :]
    expected = _hf_probabilities(logits, torch.tensor([prompt]), 1.2, 0.8, 0.9)[0]
    torch.manual_seed(4)
    decoder, ids, mask = _shared_decoder(model, [prompt] * copies, 8, 1, [], temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    counts = torch.bincount(decoder.decode(ids, mask)[:, 0], minlength=VOCAB).double()
    support = expected > 0
    assert int(support.sum()) > 8, "the nucleus must hold several tokens for the test to mean anything"
    assert counts[~support].sum() == 0, "a token outside the top-p nucleus was sampled"
    expected_counts = expected[support].double() / expected[support].double().sum() * copies
    assert chisquare(counts[support].numpy(), expected_counts.numpy())[1] > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3_sliding"])
@pytest.mark.parametrize("prefix", [0, 14])
def test_repeated_prompts_are_prefilled_once_with_the_same_tokens(family, prefix):
    # Three distinct prompts, one of them three times and one twice (N candidates), in a batch wider than its
    # longest row: the all-padding columns and the copies' suffixes are not computed, and nothing changes.
    model = _sliding_gemma3("sdpa") if family == "gemma3_sliding" else _random_model("llama", "sdpa")
    distinct = _rows_with_a_shared_prefix(14, [9, 4, 6], seed=11)
    rows = [distinct[i] for i in (0, 1, 0, 2, 1, 0)]
    width = 14 + 9 + 3  # three columns of padding in every row
    greedy = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.3)
    expected = _generate(model, rows, 12, None, do_sample=False, repetition_penalty=1.3)
    ids, mask = prefix_layout(rows, prefix, 0, width)
    decoder = StaticDecoder(model, *ids.shape, 12, 0, set(), prefix_length=prefix, **greedy)
    assert torch.equal(decoder.decode(ids, mask), expected)
    suffix_columns = width - prefix - 3
    assert decoder.last_prefill_tokens == (prefix + 3 * suffix_columns, 6 * (suffix_columns + prefix))
    sampling = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2)
    drawn = []
    for group_copies in (True, False):
        torch.manual_seed(8)
        drawn.append(StaticDecoder(model, *ids.shape, 12, 0, set(), prefix_length=prefix, group_copies=group_copies,
                                   **sampling).decode(ids, mask))
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0][0], drawn[0][2]), "copies of one prompt must still draw their own tokens"


def test_a_shared_prefix_decoder_reused_and_rehearsed_equals_fresh_decoders(monkeypatch):
    # Another batch's prefix must replace the first one's in every row; and the graph path (rehearse,
    # capture, rewind; here the "graph" is the eager step, as in test_rehearsal_before_capture_is_rewound)
    # samples what the eager path samples.
    monkeypatch.setattr(StaticDecoder, "_capture", lambda self: self._eager_step)
    model = _sliding_gemma3("sdpa")
    first, second = _rows_with_a_shared_prefix(10, [3, 6, 2], seed=7), _rows_with_a_shared_prefix(10, [6, 1, 4], seed=8)
    settings = dict(temperature=1.0, top_p=0.95, repetition_penalty=1.2)

    def decode(decoder, rows, seed):
        torch.manual_seed(seed)
        return decoder.decode(*prefix_layout(rows, 10, 0))

    fresh = lambda graph: StaticDecoder(model, 3, 16, 12, 0, set(), prefix_length=10, use_cuda_graph=graph, **settings)
    expected = [decode(fresh(False), first, 1), decode(fresh(False), second, 2)]
    assert not torch.equal(expected[0], expected[1])
    reused = fresh(True)
    got = [decode(reused, first, 1), decode(reused, second, 2), decode(reused, first, 1)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[0])
    ids, mask = prefix_layout(first, 10, 0)
    ids[1, 0] = 1  # one row's "prefix" differs
    with pytest.raises(ValueError, match="same unpadded tokens"):
        reused.decode(ids, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_captured_steps_with_a_shared_prefix_beyond_the_sliding_window_equal_generate(compiled):
    # On a GPU: the decode step (per-layer-type masks included) captured once, then replayed for a second
    # batch of the same shape; float32, so greedy tokens match generate's.
    model = _sliding_gemma3("sdpa").cuda()
    decoder = None
    for seed in (5, 6):
        rows = _rows_with_a_shared_prefix(14, [9, 4, 1, 6], seed=seed)
        expected = _generate(model, rows, 24, None, do_sample=False, repetition_penalty=1.3).cpu()
        if decoder is None:
            decoder, _, _ = _shared_decoder(model, rows, 14, 24, [], temperature=0.0, top_p=1.0, repetition_penalty=1.3,
                                            compile_forward=compiled)
        got = decoder.decode(*prefix_layout(rows, 14, 0)).cpu()
        assert decoder._step is not None and not StaticDecoder.capture_failed
        assert torch.equal(got, expected)


def _engine_results(model, tokenizer, items, params, stops, **options):
    engine = GenerationEngine(model, tokenizer, batch_size=3, show_progress=False, **options)
    results = sorted((r.key, r.text, r.finish_reason, r.token_ids) for r in engine.generate(items, params, stop_strings=stops))
    return results, engine


@pytest.mark.slow  # 35-49 s a case measured on 2 busy cores (four engine runs over ~470-token prompts)
@pytest.mark.parametrize("family", ["llama", "gemma3_sliding"])
def test_engine_shares_prefixes_with_the_same_results_as_generate(family, trained_model_dir):
    # The response phase's shape: response_v3 prompts (the demonstrations, then the instruction), one of
    # them three times (N candidates; the longest, so sorted first they fill a batch of their own).
    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.prompt_guards import encode_prompt

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    if family == "gemma3_sliding":  # random weights over the same tokenizer, a window of 16 tokens (prompts: ~470)
        model = _sliding_gemma3("sdpa", window=16, vocab=model.config.vocab_size)
    prompt = lambda text: P.create_generation_response_prompt(text, "response_v3")
    items = [(f"best{j}", prompt("Name three facts about the moon and the sun.")) for j in range(3)]
    items += [(f"k{i}", prompt(text)) for i, text in enumerate(["Give a tip.", "List colours.", "Describe rain."])]
    params = SamplingParams(0.0, 1.0, 1.1, 40)
    # A stop string taken from what the model writes, so that some rows end on it; never one that a prompt's
    # end and the first generated characters could form (generate would match it across the prompt's end).
    probe, _ = _engine_results(model, tokenizer, items, params, [], decode_loop="generate")
    prompts = dict(items)
    spans_prompt_end = lambda stop: any(stop in prompts[key][-len(stop):] + text[:len(stop)] for key, text, _, _ in probe)
    stop = next(text[i:i + 3] for _, text, _, _ in probe for i in range(4, len(text) - 3)
                if text[i:i + 3].strip() and not spans_prompt_end(text[i:i + 3]))
    stops = P.response_stop_strings("response_v3") + [stop]
    plain, _ = _engine_results(model, tokenizer, items, params, stops, decode_loop="generate")
    shared, engine = _engine_results(model, tokenizer, items, params, stops, decode_loop="static")
    unshared, off = _engine_results(model, tokenizer, items, params, stops, decode_loop="static", share_prefix=False)
    assert shared == plain and unshared == plain
    assert {reason for _, _, reason, _ in plain} >= {"stop"}, "some sequence must end on a stop string"
    encoded = {key: encode_prompt(tokenizer, text) for key, text in items}
    batches = [[encoded[f"best{j}"] for j in range(3)], [encoded[f"k{i}"] for i in range(3)]]
    prefixes = [shared_prefix_length(rows) for rows in batches]
    demonstrations = len(encode_prompt(tokenizer, P.demonstration_prefix("response_v3")))
    assert prefixes[0] == len(batches[0][0]) - 1 and prefixes[1] >= demonstrations - 1 > 32
    # The first batch is three copies of one prompt: its one token after the prefix is computed once, too.
    assert engine.prefix_tokens_saved == 2 * sum(prefixes) + 2 and off.prefix_tokens_saved == 0
    assert engine.prefill_tokens + engine.prefix_tokens_saved == off.prefill_tokens
