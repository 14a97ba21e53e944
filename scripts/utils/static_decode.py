"""A static-cache decode loop for batches of left-padded prompts, replayed as one CUDA graph per step.

`model.generate` spends most of a decode step on the host (logits processors, stopping criteria,
cache bookkeeping) and, for a small model, on launching hundreds of kernels one by one. Here the
cache, the attention mask, the repetition-penalty set and the output are preallocated, so a whole
step (forward, penalty, temperature, top-p, sampling, bookkeeping) is captured once and replayed.

Semantics follow `generate` with `RepetitionPenaltyLogitsProcessor` -> `TemperatureLogitsWarper` ->
`TopPLogitsWarper` -> multinomial, in that order, float32 scores, EOS rows padded afterwards:
greedy output is the same token for token, and sampling draws from the same distribution (the
random numbers differ). Each row's random numbers come from a generator of its own (`decode(row_seeds=...)`,
all drawn when the batch loads), and each token is picked by the inverse CDF at one of them: a row samples
the same tokens whatever batch it is in, wherever in it, and in whatever decoder, so a resumed run whose
batches start at other records writes what the uninterrupted run wrote.

Top-p looks at the `TOP_P_CANDIDATES` most probable tokens only; a row whose nucleus is larger is
re-sampled from its `TOP_P_WIDE_CANDIDATES` most probable tokens, or, where even those hold less than
top_p of the mass, from the fully sorted distribution, so nothing is approximated.
Under `compile_forward` the sampled step draws by rejection instead (`nucleus_rejection_sample`: a few
draws from the whole distribution, the first inside the nucleus kept), compiled together with the penalty,
the temperature and the softmax, with neither a top-k nor a sort nor a host check per step. A row whose
draws all miss (at most REJECTION_MISS = 1e-6 of them) takes its most probable token, so that step's
distribution is within 1e-6 total variation of the nucleus; the decoder counts such rows.

During decoding, attention for the one new token goes through `decode_attention`, which reads each
key/value head once for its whole query-head group. transformers' SDPA path with a mask first copies
K and V out to every query head (`repeat_kv`); measured on an H100 for the 7B shape at batch 256,
that copy and the masked SDPA kernel took about half of each step. Prefill keeps the model's own
attention.

Sliding-window layers (gemma-3: 15 of 18 layers, window 512) get a full-length cache like every other
layer, so nothing rolls, and the model is handed one mask per layer type (`{"full_attention": ...,
"sliding_attention": ...}`, which gemma-style forwards take as is); the sliding one also hides keys
whose *position* is `window` or more before the query's, which is transformers' own rule
(`masking_utils.sliding_window_overlay`) on a left-padded row. A model family whose forward does not
take such a dict keeps the old limit: no sequence longer than its window.

With `prefix_length=P` the first P columns of every row hold the same tokens (few-shot
demonstrations, or N copies of one prompt): they are prefilled once, at batch 1, and their keys and
values copied into every row's cache; only each row's suffix (left-padded inside columns [P, width))
is prefilled at batch size. Masks use each key's position (a per-row buffer), never its column, so
the padding between prefix and suffix changes nothing. Rows that are copies of one prompt (N candidates
for one instruction) have their suffix prefilled once (`group_copies`), and its keys and values copied
to every copy; columns that are padding in every row are not computed at all (decoding masks them).

Rows finish at different steps (answers of 10 to 256 tokens in one batch), and a step costs about the
same whether 256 rows are live or 3. So once at most a quarter of the rows are live, they move into a
decoder a quarter the size (`compact_rows`; its own cache and graph, kept for the next batch) and go on
there, and so on down to `MIN_TAIL_BATCH` rows, their random numbers with them, so no token changes. Not
under `compile_forward`, where each new batch size would compile the step again.

On the CPU the same loop runs eagerly. `supports_static_decode` says when the loop applies; the
engine falls back to `generate` otherwise.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

__all__ = ["StaticDecoder", "supports_static_decode", "accepts_mask_mapping", "sliding_window_of", "process_scores",
           "nucleus_keep_mask", "nucleus_rejection_sample", "inverse_cdf_draws", "rejection_draws", "decode_attention",
           "report_compile_failure", "TOP_P_CANDIDATES", "TOP_P_WIDE_CANDIDATES", "REJECTION_MISS", "COMPACTION_FACTOR",
           "MIN_TAIL_BATCH"]

TOP_P_CANDIDATES = 512
# A second, wider look before sorting a whole row: on the random-init 7B shape (nearly flat logits) the
# full sort of the rows that fell through took about 1 ms of a 15 ms step on an H100.
TOP_P_WIDE_CANDIDATES = 8192
# The compiled step's rejection sampler (nucleus_rejection_sample) draws until every draw of a row misses its
# nucleus with probability at most REJECTION_MISS: each lands in it with probability at least top_p, so that is
# 8 draws at the response phase's top_p of 0.85. Such a row takes its most probable token, which is always in
# the nucleus. Where that would take more than MAX_REJECTION_DRAWS (top_p below 0.58), the step samples the exact way.
REJECTION_MISS = 1e-6
MAX_REJECTION_DRAWS = 16
CDF_BLOCK = 512  # tokens per block of the two-level inverse CDF (inverse_cdf_draws)
COMPACTION_FACTOR = 4  # rows live at most 1/COMPACTION_FACTOR of the batch: go on in a decoder that size
MIN_TAIL_BATCH = 8
SERVED_LAYER_TYPES = {"full_attention", "sliding_attention"}
# How a gemma-style decoder's forward takes ready-made per-layer-type masks instead of building its own.
_MASK_MAPPING_SOURCE = "isinstance(causal_mask_mapping := attention_mask, dict)"
_accepts_mapping_by_class: dict[type, bool] = {}


def _text_config(model):
    return model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config


def _layer_types(model) -> list[str]:
    # The same inference StaticCache makes (a config without layer_types but with a window is all sliding).
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(_text_config(model))[0])


def sliding_window_of(model) -> int | None:
    """The window of the model's sliding-window layers; None where it has none."""
    window = getattr(_text_config(model), "sliding_window", None)
    return window if "sliding_attention" in _layer_types(model) and window else None


def accepts_mask_mapping(model) -> bool:
    """Whether the model's decoder takes `attention_mask` as a dict of masks by layer type (gemma2/3, qwen2/3,
    cohere2, gpt-oss and others do); read from its forward's source, once per class."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return False
    cls = type(decoder)
    if cls not in _accepts_mapping_by_class:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _accepts_mapping_by_class[cls] = _MASK_MAPPING_SOURCE in source
    return _accepts_mapping_by_class[cls]


def supports_static_decode(model, total_length: int) -> bool:
    """True where this loop reproduces `generate`: SDPA or eager attention (a LoRA adapter on top is
    fine), no 4-bit weights, only full and sliding-window layers, and, for a sequence longer than the
    sliding window, a model that takes per-layer-type masks (the loop's own sliding mask)."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return False
    if not set(_layer_types(model)) <= SERVED_LAYER_TYPES:
        return False
    window = sliding_window_of(model)
    return window is None or total_length <= window or accepts_mask_mapping(model)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     softcap: float | None = None, shared_prefix: int = 0, **kwargs):
    """Attention of one query position over the static cache, grouped-query aware, in the layout
    transformers' attention functions return ((batch, 1, heads, head_dim), None).

    With `shared_prefix=P`, the first P cached keys and values are the same in every row: they are read
    once, from row 0, for the queries of all rows together (one matrix product over the whole batch),
    instead of once per row. For the 7B shape at batch 256 behind 672 shared tokens that is about 10 of
    the 29 GB a step would read; measured on an H200, the response-shape call went from 17.0k to 17.9k
    tokens/s (the matrix products of the layers, not the reads, bound the step there)."""
    import torch

    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group, head_dim)
    prefix = shared_prefix
    if prefix:
        every_row = grouped.transpose(0, 1).reshape(kv_heads, batch * group, head_dim)
        prefix_scores = torch.matmul(every_row, key[0, :, :prefix].transpose(-1, -2))  # (kv heads, batch * group, P)
        prefix_scores = prefix_scores.reshape(kv_heads, batch, group, prefix).transpose(0, 1)
        scores = torch.cat([prefix_scores, torch.matmul(grouped, key[:, :, prefix:].transpose(-1, -2))], dim=-1)
    else:
        scores = torch.matmul(grouped, key.transpose(-1, -2))
    scores = scores * (scaling if scaling is not None else head_dim ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # (batch, 1, 1, cache length): bool = may attend, float = additive
        mask = attention_mask[:, :, :, :key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    if prefix:
        every_row = probs[..., :prefix].transpose(0, 1).reshape(kv_heads, batch * group, prefix)
        from_prefix = torch.matmul(every_row, value[0, :, :prefix]).reshape(kv_heads, batch, group, head_dim).transpose(0, 1)
        output = from_prefix + torch.matmul(probs[..., prefix:], value[:, :, prefix:])
    else:
        output = torch.matmul(probs, value)
    return output.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


DECODE_ATTENTION = "stage1_decode"
COMPILE_BACKEND = "inductor"


def report_compile_failure(err: Exception, where: str) -> None:
    """After a compiled call raised: out-of-memory goes on up (the engine halves its batch); anything
    else is taken as a compiler failure (no Triton, no C++ toolchain), reported, and the caller
    carries on uncompiled."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        raise err
    print(f"[{where}] torch.compile failed, running uncompiled: {type(err).__name__}: {err}", flush=True)


def _compiled(model):
    """The model's compiled wrapper, made once and kept on the model itself (so it lives and dies with
    it); every decoder of that model shares it."""
    import torch

    compiled = model.__dict__.get("_stage1_compiled")
    if compiled is None:
        compiled = torch.compile(model, backend=COMPILE_BACKEND, dynamic=False)
        object.__setattr__(model, "_stage1_compiled", compiled)  # not registered as a submodule
    return compiled


def _register_decode_attention() -> str:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if DECODE_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    return DECODE_ATTENTION


def process_scores(logits, seen_ids, repetition_penalty: float, temperature: float):
    """float32 scores after the repetition penalty and the temperature, as `generate` computes them.
    `seen_ids` (batch, n): the ids each row has seen (repeats allowed), gathered and scattered back as
    `RepetitionPenaltyLogitsProcessor` does, so only those columns are touched: a dense mask over the
    vocabulary (262k entries for gemma) cost several more passes over the scores every step."""
    import torch

    scores = logits.to(torch.float32, copy=True)
    if repetition_penalty != 1.0:
        previous = scores.gather(1, seen_ids)
        scores.scatter_(1, seen_ids, torch.where(previous < 0, previous * repetition_penalty, previous / repetition_penalty))
    if temperature > 0 and temperature != 1.0:
        scores.div_(temperature)
    return scores


def nucleus_keep_mask(sorted_probs_desc, top_p: float):
    """Which of the descending-sorted candidates survive top-p: a token stays while the probability
    mass ranked above it is below `top_p` (the same set `TopPLogitsWarper` keeps), the first always."""
    import torch

    mass_above = torch.cumsum(sorted_probs_desc, dim=-1) - sorted_probs_desc
    keep = mass_above < top_p
    keep[..., 0] = True
    return keep


def _nucleus_sample(probs, candidates: int, top_p: float, uniforms):
    """(a token per row drawn from its top-p nucleus among its `candidates` most probable tokens, whether
    those candidates hold less than top_p of the mass), by the inverse CDF at each row's uniform (batch, 1). A
    covered row's draw is exact: every token outside its candidates then has at least top_p above it and is
    dropped by top-p as well."""
    import torch

    top_probs, top_ids = torch.topk(probs, candidates, dim=-1)
    choice = inverse_cdf_draws(top_probs * nucleus_keep_mask(top_probs, top_p), uniforms)
    return top_ids.gather(1, choice).squeeze(1), top_probs.sum(dim=-1) < top_p


def rejection_draws(top_p: float) -> int:
    """Draws per row for which all of them miss a top-p nucleus with probability at most REJECTION_MISS; 0
    where that takes more than MAX_REJECTION_DRAWS."""
    import math

    if not 0.0 < top_p < 1.0:
        return 0
    draws = max(1, math.ceil(math.log(REJECTION_MISS) / math.log1p(-top_p) - 1e-9))  # 0.01 ** 3 is 1e-6, not above it
    return draws if draws <= MAX_REJECTION_DRAWS else 0


def inverse_cdf_draws(probs, uniforms):
    """(batch, draws) token ids, each drawn from its row's distribution by the inverse CDF at `uniforms` (a row of
    weights that need not sum to 1 is drawn from in proportion to them: the nucleus's kept candidates).
    Accumulated in float64 (in float32 a token's share of a CDF near 1 rounds by up to 6e-8, about 1% of a
    token's probability in a flat 152k-token row), and in two levels, so no row is scanned whole:
    the sums of blocks of `CDF_BLOCK` tokens, then the cumulative sum inside the one block a draw lands in."""
    import torch

    batch, vocab = probs.shape
    whole = vocab // CDF_BLOCK * CDF_BLOCK
    block_sums = [probs[:, :whole].reshape(batch, -1, CDF_BLOCK).sum(dim=-1, dtype=torch.float64)]
    if whole < vocab:
        block_sums.append(probs[:, whole:].sum(dim=-1, keepdim=True, dtype=torch.float64))
    block_cdf = torch.cat(block_sums, dim=1).cumsum(dim=-1)
    targets = uniforms.to(torch.float64) * block_cdf[:, -1:]
    # A block whose sum is 0 is never landed in: right=True lands where the CDF first exceeds the target.
    block = torch.searchsorted(block_cdf, targets, right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    # Eager even inside a compiled caller: inductor (torch 2.11) fails to generate this gather's indexing
    # (a TypeError in its block shapes), and it touches draws x CDF_BLOCK values per row only.
    return torch.compiler.disable(_draw_inside_blocks)(probs, block, targets - before)


def _draw_inside_blocks(probs, block, remainders):
    import torch

    vocab = probs.shape[1]
    columns = block[..., None] * CDF_BLOCK + torch.arange(CDF_BLOCK, device=probs.device)
    inside = probs.gather(1, columns.clamp(max=vocab - 1).flatten(1)).reshape(columns.shape)
    within = torch.where(columns < vocab, inside, 0.0).cumsum(dim=-1, dtype=torch.float64)
    offset = torch.searchsorted(within, remainders[..., None], right=True).squeeze(-1).clamp_(max=CDF_BLOCK - 1)
    return (block * CDF_BLOCK + offset).clamp_(max=vocab - 1)


def nucleus_rejection_sample(probs, uniforms, top_p: float):
    """(a token per row drawn from its top-p nucleus, rows where every draw missed the nucleus).

    Rejection sampling without a sort or a top-k: each row draws `uniforms.shape[1]` tokens from its whole
    distribution (`inverse_cdf_draws`) and keeps the first that lies in its nucleus, which makes a kept token
    an exact draw from the nucleus. A token is in it while the mass ranked above it is below top_p
    (`nucleus_keep_mask`'s rule), ranked as a stable descending sort ranks: every more probable token, and
    equally probable ones with a lower id. A draw is kept with probability the nucleus's mass, at least
    top_p. Compiled (the decode step's sampler under `compile_forward`), the per-draw masses are one kernel
    that reads each row once; the top-k look and the full sort this replaces took about 3 ms of a 15 ms
    step on a nearly flat row (the random-weight 7B shape at batch 256 on an H100). A missed row is the
    caller's to serve (`_draw_from_nucleus` gives it its most probable token)."""
    import torch

    drawn = inverse_cdf_draws(probs, uniforms)
    ids = torch.arange(probs.shape[-1], device=probs.device)
    kept = []
    for draw in range(drawn.shape[1]):  # one reduction per draw over the same row: compiled, they fuse into one pass
        token = drawn[:, draw:draw + 1]
        token_prob = probs.gather(1, token)
        ranked_above = (probs > token_prob) | ((probs == token_prob) & (ids < token))
        kept.append(torch.where(ranked_above, probs, 0.0).sum(dim=-1) < top_p)
    accepted = torch.stack(kept, dim=1)
    first = accepted.to(torch.int8).argmax(dim=-1)  # the first kept draw (argmax returns the first maximum)
    return drawn.gather(1, first[:, None]).squeeze(1), ~accepted.any(dim=-1)


def _draw_from_nucleus(logits, seen_ids, uniforms, repetition_penalty: float, temperature: float, top_p: float):
    """(tokens, probabilities, rows every draw missed, which take their most probable token): the sampled
    step's whole selection, compiled as one."""
    import torch

    probs = torch.softmax(process_scores(logits, seen_ids, repetition_penalty, temperature), dim=-1)
    tokens, missed = nucleus_rejection_sample(probs, uniforms, top_p)
    return torch.where(missed, probs.argmax(dim=-1), tokens), probs, missed


def _compiled_function(function):
    """`function` compiled once per process and backend (fixed shapes: one compilation per decoder shape)."""
    import torch

    key = (function, COMPILE_BACKEND)
    if key not in _compiled_functions:
        _compiled_functions[key] = torch.compile(function, backend=COMPILE_BACKEND, dynamic=False)
    return _compiled_functions[key]


_compiled_functions: dict = {}


def _replay_then_finish(decoder, replay, next_tokens, probs):
    """The captured step where rows may need re-sampling: replay the graph, then, outside it, re-sample an uncovered
    row and commit the token. The decoder keeps this step, so it refers back to the decoder weakly: a strong
    reference would be a cycle that holds the KV cache and the graph's memory pool until a garbage collection
    (a scale shard's second shard started with 31 GiB of the first's on an H100, docs/measurements.md)."""
    owner = weakref.ref(decoder)

    def step() -> None:
        replay()
        owner()._finish_step(next_tokens, probs)

    return step


class StaticDecoder:
    """Decodes batches of one shape (batch, prompt width, shared prefix length, new tokens) and one set
    of sampling settings.

    The buffers, the cache and the captured graph stay with the decoder, so the next batch of the same
    shape replays the graph without a new warm-up and capture: `decode(ids, mask)` once per batch
    returns the generated ids (batch, max_new_tokens), pad after the end. With `prefix_length=P`, the
    first P columns of `ids` must be the same tokens in every row, unpadded (see the module docstring).
    With `compile_forward`, the decode step's forward pass is compiled (torch.compile fuses the many
    small elementwise kernels of norms, rotary embeddings and activations) before it is captured."""

    capture_failed = False  # set once per process, so a model that cannot be captured is not retried
    compile_failed = False
    sampler_compile_failed = False

    def __init__(self, model, batch: int, width: int, max_new_tokens: int, pad_id: int, end_ids: set[int],
                 temperature: float, top_p: float, repetition_penalty: float, device=None,
                 check_every: int = 8, use_cuda_graph: bool | None = None, compile_forward: bool = False,
                 prefix_length: int = 0, group_copies: bool = True, compact_rows: bool = True):
        import torch

        self.torch = torch
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        self.batch, self.width = batch, width
        self.max_new_tokens = max_new_tokens
        self.length = width + max_new_tokens
        if not 0 <= prefix_length < width:
            raise ValueError(f"prefix_length must be in [0, width={width}), got {prefix_length}: each row needs a token of its own")
        self.prefix_length = prefix_length
        self.group_copies = group_copies
        self.compact_rows = compact_rows
        self._tails: dict[int, StaticDecoder] = {}  # smaller decoders the live rows move into (compact_rows)
        self.compacted_batches = 0  # batches whose last rows finished in a smaller decoder
        self._settings = dict(pad_id=pad_id, end_ids=set(end_ids), temperature=temperature, top_p=top_p,
                              repetition_penalty=repetition_penalty, check_every=check_every, use_cuda_graph=use_cuda_graph)
        # (prompt tokens computed, tokens an unshared prefill of the same rows computes), for the last batch
        self.last_prefill_tokens = (0, 0)
        self.sliding_window = sliding_window_of(model)
        self.mask_mapping = self.sliding_window is not None and accepts_mask_mapping(model)
        if self.sliding_window is not None and not self.mask_mapping and self.length > self.sliding_window:
            raise ValueError(f"{type(model).__name__} does not take per-layer-type masks, so this loop cannot serve "
                             f"{self.length} positions beyond its sliding window of {self.sliding_window} (supports_static_decode)")
        self.pad_id = pad_id
        self.greedy = temperature <= 0
        self.temperature, self.top_p, self.repetition_penalty = temperature, top_p, repetition_penalty
        self.stop_check = None
        self.check_every = max(1, check_every)
        self.use_cuda_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.compile_forward = compile_forward and not StaticDecoder.compile_failed
        self.eager_mask = model.config._attn_implementation == "eager"
        self.mask_dtype = next(model.parameters()).dtype
        vocab = model.get_output_embeddings().weight.shape[0]
        self.candidates = min(TOP_P_CANDIDATES, vocab)
        self.end_ids = torch.tensor(sorted(end_ids) or [-1], device=self.device)

        # Static state: the addresses a captured graph reads and writes, refilled for every batch.
        def zeros(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        self.prompt_ids = zeros(batch, width, dtype=torch.long)
        self.valid = zeros(batch, self.length, dtype=torch.bool)
        # Every id a row has seen, like generate's input_ids (the prompt, left padding included, then each
        # new token); the columns not generated yet repeat the row's first id, which changes nothing.
        self.seen_ids = zeros(batch, self.length, dtype=torch.long)
        self.done = zeros(batch, dtype=torch.bool)
        self.out = zeros(batch, max_new_tokens, dtype=torch.long)
        self.cur_token = zeros(batch, 1, dtype=torch.long)
        self.position = zeros(batch, 1, dtype=torch.long)
        self.column = zeros(1, dtype=torch.long)
        self.step_index = zeros(1, dtype=torch.long)
        self.uncovered = zeros(batch, dtype=torch.bool)
        self.draws = rejection_draws(top_p) if temperature > 0 else 0
        # Every random number a sampled batch uses: (row, step, draw), filled when the batch loads.
        self.row_uniforms = None if self.greedy else zeros(batch, max_new_tokens, max(self.draws, 1), dtype=torch.float64)
        # Rows of the last batch whose rejection draws all missed (each then took its most probable token).
        self.sampling_misses = zeros(1, dtype=torch.long)
        self.last_sampling_misses = 0
        self.key_position = zeros(batch, self.length, dtype=torch.long)  # each column's position, for the sliding mask
        self._prefill_positions = None
        self._step = None  # the captured step, once there is one
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        # Sliding layers full-length too: the mask, not a rolling buffer, keeps them inside their window
        # (a rolled cache has no fixed column for a key, and so no fixed place for its position).
        self.cache.layers = [StaticLayer(max_cache_len=self.length) if layer.is_sliding else layer for layer in self.cache.layers]

    def _load(self, input_ids, attention_mask, row_seeds=None) -> None:
        """Put a new batch into the static buffers, in place (a captured graph keeps their addresses)."""
        if tuple(input_ids.shape) != (self.batch, self.width):
            raise ValueError(f"this decoder serves batches of shape {(self.batch, self.width)}, got {tuple(input_ids.shape)}")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        prefix = self.prefix_length
        if prefix and not (bool(attention_mask[:, :prefix].all()) and bool((input_ids[:, :prefix] == input_ids[:1, :prefix]).all())):
            raise ValueError(f"the first {prefix} columns must be the same unpadded tokens in every row (prefix_length)")
        self.prompt_ids.copy_(input_ids)
        self.valid.zero_()
        self.valid[:, :self.width] = attention_mask.bool()
        self.seen_ids[:, :self.width] = input_ids
        self.seen_ids[:, self.width:] = input_ids[:, :1]
        self.done.zero_()
        self.out.fill_(self.pad_id)
        self.cur_token.zero_()
        positions = attention_mask.long().cumsum(-1) - 1
        self.position.copy_(positions[:, -1:] + 1)
        self.key_position[:, :self.width] = positions
        self.key_position[:, self.width:] = positions[:, -1:] + 1 + self.torch.arange(self.max_new_tokens, device=self.device)
        self.column.fill_(self.width)
        self.step_index.zero_()
        self.uncovered.zero_()
        self.sampling_misses.zero_()
        self.cache.reset()  # keys and values zeroed, lengths back to 0, same tensors
        self._prefill_positions = positions.masked_fill(attention_mask == 0, 1)
        self._draw_row_uniforms(row_seeds)

    def _draw_row_uniforms(self, row_seeds) -> None:
        """Each row's random numbers for the whole batch, from a generator seeded by its own seed (from the
        global generator where `row_seeds` is None): what a row samples then depends on its seed and its
        prompt only, not on the other rows, its place, or the decoder it finishes in."""
        if self.row_uniforms is None:
            return
        torch = self.torch
        shape = tuple(self.row_uniforms.shape[1:])
        if row_seeds is None:
            self.row_uniforms.copy_(torch.rand((self.batch, *shape), dtype=torch.float64))
            return
        if len(row_seeds) != self.batch:
            raise ValueError(f"row_seeds must give one seed per row ({self.batch}), got {len(row_seeds)}")
        self.row_uniforms.copy_(torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                                             for seed in row_seeds]))

    def _step_uniforms(self):
        """(batch, draws): the rows' random numbers for the token this step picks."""
        return self.row_uniforms.index_select(1, self.step_index).squeeze(1)

    # -- one step ----------------------------------------------------------------------------
    def _mask(self, allowed):
        if not self.eager_mask:
            return allowed
        torch = self.torch
        return torch.zeros((), dtype=self.mask_dtype, device=self.device).masked_fill(~allowed, torch.finfo(self.mask_dtype).min)

    def _in_window(self, query_positions, key_position=None):
        """Keys a query at each of `query_positions` (batch, queries) may see through a sliding layer,
        by position: (batch, queries, cache length)."""
        key_position = self.key_position if key_position is None else key_position
        return key_position[:, None, :] > query_positions[:, :, None] - self.sliding_window

    def _forward(self, input_ids, position_ids, allowed, sliding=None, model=None, cache=None, **attention_kwargs):
        """Logits at the last input position. `allowed`: what full-attention layers may see; `sliding`:
        what sliding-window layers may see, where the model takes per-layer-type masks. `attention_kwargs`
        reach the attention function (the model passes its forward's extra keywords down)."""
        forward = self.model if model is None else model
        mask = self._mask(allowed)
        if self.mask_mapping:
            mask = {"full_attention": mask, "sliding_attention": self._mask(sliding)}
        return forward(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                       past_key_values=self.cache if cache is None else cache, **attention_kwargs).logits[:, -1, :]

    def _select(self, logits):
        """(next tokens, the probabilities they were drawn from); those serve `_resample`, and are
        passed along rather than kept on the decoder, where the next prefill would replace the
        captured graph's own tensor."""
        torch = self.torch
        if self._samples_by_rejection:
            uniforms = self._step_uniforms()
            try:
                next_tokens, probs, missed = _compiled_function(_draw_from_nucleus)(
                    logits, self.seen_ids, uniforms, self.repetition_penalty, self.temperature, self.top_p)
            except Exception as err:  # noqa: BLE001 - a compiler failure must not lose the batch
                report_compile_failure(err, "static_decode sampler")
                StaticDecoder.sampler_compile_failed = True  # the forward stays compiled; sampling goes the exact way
                return self._select(logits)
            self.sampling_misses += missed.sum()
            return next_tokens, probs
        scores = process_scores(logits, self.seen_ids, self.repetition_penalty, self.temperature)
        if self.greedy:
            return scores.argmax(dim=-1), scores
        probs = torch.softmax(scores, dim=-1)
        uniforms = self._step_uniforms()[:, :1]
        if self.top_p >= 1.0:
            return inverse_cdf_draws(probs, uniforms).squeeze(1), probs
        next_tokens, uncovered = _nucleus_sample(probs, self.candidates, self.top_p, uniforms)
        self.uncovered.copy_(uncovered)
        return next_tokens, probs

    def _resample(self, next_tokens, probs) -> None:
        """Rows whose nucleus exceeds the candidates: sample from a wider top-k, or where that does not
        hold top_p of the mass either, from the whole sorted distribution."""
        torch = self.torch
        rows = self.uncovered.nonzero().squeeze(1)
        row_probs = probs[rows]
        # The row's own uniform again: the first pick is discarded, so this draw alone decides, and exactly.
        uniforms = self._step_uniforms()[rows, :1]
        tokens, uncovered = _nucleus_sample(row_probs, min(TOP_P_WIDE_CANDIDATES, row_probs.shape[-1]), self.top_p, uniforms)
        if bool(uncovered.any()):
            flat = uncovered.nonzero().squeeze(1)
            sorted_probs, order = torch.sort(row_probs[flat], dim=-1, descending=True)
            choice = inverse_cdf_draws(sorted_probs * nucleus_keep_mask(sorted_probs, self.top_p), uniforms[flat])
            tokens[flat] = order.gather(1, choice).squeeze(1)
        next_tokens[rows] = tokens

    def _commit(self, next_tokens) -> None:
        torch = self.torch
        next_tokens = torch.where(self.done, torch.full_like(next_tokens, self.pad_id), next_tokens)
        self.out.index_copy_(1, self.step_index, next_tokens[:, None])
        self.seen_ids.index_copy_(1, self.step_index + self.width, next_tokens[:, None])
        self.done |= (next_tokens[:, None] == self.end_ids[None, :]).any(dim=-1)
        self.cur_token.copy_(next_tokens[:, None])
        self.step_index += 1

    def _decode_logits(self):
        self.valid.index_fill_(1, self.column, True)
        allowed = self.valid[:, None, None, :]
        sliding = (allowed & self._in_window(self.position)[:, None]) if self.mask_mapping else None
        logits = self._forward(self.cur_token, self.position, allowed, sliding, _compiled(self.model) if self.compile_forward else None,
                               **({"shared_prefix": self.prefix_length} if self.prefix_length else {}))
        self.column += 1
        self.position += 1
        return logits

    # -- the loop ----------------------------------------------------------------------------
    def decode(self, input_ids, attention_mask, stop_check: Callable[[list[list[int]], list[int]], set[int]] | None = None,
               row_seeds: list[int] | None = None):
        """Generate for one left-padded batch of this decoder's shape. `stop_check(tokens, rows)` is
        asked every `check_every` steps which of the live rows have produced a stop string. `row_seeds`:
        one seed per row for its random numbers (the global generator's where None)."""
        torch = self.torch
        config = self.model.config
        implementation = config._attn_implementation
        self.stop_check = stop_check
        with torch.no_grad():
            self._load(input_ids, attention_mask, row_seeds)
            self._prefill()  # the model's own attention over the whole prompt
            config._attn_implementation = _register_decode_attention()
            try:
                tokens = self._decode_steps().clone()  # the buffer itself belongs to the next batch
                self.last_sampling_misses = int(self.sampling_misses.item())
                return tokens
            finally:
                config._attn_implementation = implementation

    def _decode_steps(self):
        self._run_steps(self.max_new_tokens - 1)
        return self.out

    def _run_steps(self, steps_left: int) -> None:
        step_fn = self._eager_step
        if self._step is not None:
            step_fn = self._step
        elif self.use_cuda_graph and steps_left > 2 and not StaticDecoder.capture_failed:
            self._step = self._rehearse_and_capture()
            if self._step is not None:
                step_fn = self._step
            else:  # capture failed: the rehearsal step stands, the loop carries on eagerly
                steps_left -= 1
        elif self.compile_forward and steps_left > 0:
            self._warm_up_step()
            steps_left -= 1
        for step in range(steps_left):
            step_fn()
            if (step + 1) % self.check_every == 0 and (self._all_finished() or self._compacted(steps_left - step - 1)):
                return

    def _compacted(self, steps_left: int) -> bool:
        """Whether the live rows went on in a smaller decoder and finished there (their tokens are
        back in `out`); False where they stay here."""
        torch = self.torch
        size = self.batch // COMPACTION_FACTOR
        if not self.compact_rows or self.compile_forward or size < MIN_TAIL_BATCH or steps_left < 2 * self.check_every:
            return False
        live = (~self.done).nonzero().squeeze(1)
        if len(live) > size:
            return False
        tail = self._tails.get(size)
        if tail is None:
            tail = self._tails[size] = StaticDecoder(self.model, size, self.width, self.max_new_tokens, device=self.device,
                                                     prefix_length=self.prefix_length, group_copies=self.group_copies,
                                                     **self._settings)
        # The spare rows repeat a live one (no empty attention row) and are done from the start.
        rows = torch.cat([live, live[:1].expand(size - len(live))])
        tail._take_rows(self, rows, len(live))
        tail.stop_check = self.stop_check
        tail._run_steps(steps_left)
        self.out[live] = tail.out[:len(live)]
        self.done[live] = tail.done[:len(live)]
        self.compacted_batches += 1
        return True

    def _take_rows(self, parent: StaticDecoder, rows, live: int) -> None:
        """Continue `parent`'s rows `rows` (the first `live` of them unfinished) from where they are."""
        for name in ("valid", "seen_ids", "done", "out", "cur_token", "position", "key_position", "uncovered", "row_uniforms"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(parent, name)[rows])
        self.done[live:] = True
        self.column.copy_(parent.column)
        self.step_index.copy_(parent.step_index)
        self._initialize_cache()
        for mine, theirs in zip(self.cache.layers, parent.cache.layers, strict=True):
            mine.keys.copy_(theirs.keys[rows])
            mine.values.copy_(theirs.values[rows])
            mine.cumulative_length.copy_(theirs.cumulative_length)

    def _warm_up_step(self) -> None:
        if not self.compile_forward:
            return self._eager_step()
        try:
            return self._eager_step()
        except Exception as err:  # noqa: BLE001 - a compiler failure must not lose the batch
            report_compile_failure(err, "static_decode")
            # Compilation fails before the step runs any kernel, so no state has moved yet.
            StaticDecoder.compile_failed = True
            self.compile_forward = False
            return self._eager_step()

    def _prefill(self) -> None:
        """The model's own attention over the prompt columns after the shared prefix (all of them
        without one); the prefix is in the cache by then. Columns that are padding in every row are
        skipped, and a suffix that several rows share is computed once (`_distinct_rows`)."""
        torch = self.torch
        start = self.prefix_length
        if start:
            self._prefill_prefix()
        # Every row has a token of its own, so some row uses a column at or after `start`.
        first = start + int(self.valid[:, start:self.width].any(dim=0).long().argmax())
        representatives, copy_of = self._distinct_rows(first)
        rows = slice(None) if representatives is None else representatives
        queries = torch.arange(first, self.width, device=self.device)
        columns = torch.arange(self.length, device=self.device)
        positions = self._prefill_positions[rows, first:]
        # Column order is position order for every row's real tokens (prefix, then its left-padded suffix).
        allowed = (queries[None, :, None] >= columns[None, None, :]) & self.valid[rows, None, :]
        sliding = (allowed & self._in_window(positions, self.key_position[rows])) if self.mask_mapping else None
        # A padding row attends to itself so no row is empty (an empty softmax row gives NaN that the
        # cache would carry into every later step).
        itself = (queries[:, None] == columns[None, :])[None]
        allowed |= itself
        if sliding is not None:
            sliding |= itself
        cache = self.cache if representatives is None else self._row_view_cache(len(representatives))
        for layer in cache.layers:
            layer.cumulative_length.fill_(first)
        logits = self._forward(self.prompt_ids[rows, first:], positions, allowed[:, None], None if sliding is None else sliding[:, None],
                               cache=cache)
        if representatives is not None:
            for layer in self.cache.layers:  # row u of the view holds distinct prompt u: give each row its own
                layer.keys[:, :, first:self.width] = layer.keys[copy_of, :, first:self.width]
                layer.values[:, :, first:self.width] = layer.values[copy_of, :, first:self.width]
                layer.cumulative_length.fill_(self.width)
            logits = logits[copy_of]
        computed_rows = self.batch if representatives is None else len(representatives)
        self.last_prefill_tokens = (start + computed_rows * (self.width - first), self.batch * (self.width - first + start))
        self._finish_step(*self._select(logits))

    def _distinct_rows(self, first: int):
        """(one row index per distinct prompt, each row's index into those), or (None, None) when every
        row is distinct or grouping is off."""
        torch = self.torch
        if not self.group_copies or self.batch == 1:
            return None, None
        rows = torch.cat([self.prompt_ids[:, first:], self.valid[:, first:self.width].long()], dim=1)
        distinct, copy_of = torch.unique(rows, dim=0, return_inverse=True)
        if len(distinct) == self.batch:
            return None, None
        representatives = torch.full((len(distinct),), self.batch, dtype=torch.long, device=self.device)
        representatives.scatter_reduce_(0, copy_of, torch.arange(self.batch, device=self.device), reduce="amin")
        return representatives, copy_of

    def _row_view_cache(self, rows: int):
        """A cache over the first `rows` rows of the static cache (views: what the model writes there
        lands in the static cache itself), for a prefill at that batch size."""
        import copy

        from transformers.cache_utils import Cache

        self._initialize_cache()
        views = []
        for layer in self.cache.layers:
            view = copy.copy(layer)
            view.keys, view.values = layer.keys[:rows], layer.values[:rows]
            view.batch_size = rows
            view.cumulative_length = layer.cumulative_length.clone()
            views.append(view)
        return Cache(layers=views)

    def _initialize_cache(self) -> None:
        """Allocate the static cache's layers at full batch size (a forward pass would on its first write)."""
        config = _text_config(self.model)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(self.batch, heads, head_dim, self.mask_dtype, self.device)

    def _prefill_prefix(self) -> None:
        """The shared prefix once, at batch 1, into a cache of its own; its keys and values then go
        into every row's first `prefix_length` columns."""
        torch = self.torch
        from transformers.cache_utils import Cache, DynamicLayer

        prefix = self.prefix_length
        own = Cache(layers=[DynamicLayer() for _ in self.cache.layers])
        positions = torch.arange(prefix, device=self.device)
        causal = (positions[:, None] >= positions[None, :])[None, None]
        sliding = (causal & (positions[None, :] > positions[:, None] - self.sliding_window)) if self.mask_mapping else None
        self._forward(self.prompt_ids[:1, :prefix], positions[None], causal, sliding, cache=own)
        self._initialize_cache()
        for layer, computed in zip(self.cache.layers, own.layers, strict=True):
            layer.keys[:, :, :prefix].copy_(computed.keys)  # broadcast over the rows
            layer.values[:, :, :prefix].copy_(computed.values)
            layer.cumulative_length.fill_(prefix)  # the suffix prefill writes from column `prefix` on

    @property
    def _samples_by_rejection(self) -> bool:
        """Whether the step samples by compiled rejection draws: then it never waits on the host, which the
        exact way's check for rows to re-sample makes it do every step."""
        return self.compile_forward and self.draws > 0 and not StaticDecoder.sampler_compile_failed

    @property
    def _may_resample(self) -> bool:
        return not self.greedy and self.top_p < 1.0 and not self._samples_by_rejection

    def _finish_step(self, next_tokens, probs) -> None:
        if self._may_resample and bool(self.uncovered.any()):
            self._resample(next_tokens, probs)
        self._commit(next_tokens)

    def _eager_step(self) -> None:
        self._finish_step(*self._select(self._decode_logits()))

    def _rehearse_and_capture(self):
        """Capture the step after one rehearsal step (lazy kernels, cuBLAS workspaces, compilation),
        then rewind the state to before the rehearsal (the step index with it, so the batch's random
        numbers are used from the same place whether its decoder is new or reused). Returns None where
        capture fails; the rehearsal then stands as the batch's first decode step."""
        buffers = [self.valid, self.seen_ids, self.done, self.out, self.cur_token, self.position, self.column,
                   self.step_index] + [layer.cumulative_length for layer in self.cache.layers]
        saved = [buffer.clone() for buffer in buffers]
        self._warm_up_step()
        try:
            step = self._capture()
        except RuntimeError as err:
            # Nothing ran during the failed capture (kernels are only recorded).
            StaticDecoder.capture_failed = True
            print(f"[static_decode] CUDA graph capture failed, decoding eagerly from now on: {err}", flush=True)
            return None
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)  # the key/value slot the rehearsal wrote is rewritten by the real step
        return step

    def _capture(self):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        holder = {}
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                holder["next"], holder["probs"] = self._select(self._decode_logits())
                if not self._may_resample:
                    self._commit(holder["next"])
        torch.cuda.current_stream().wait_stream(side)
        if not self._may_resample:
            return graph.replay
        return _replay_then_finish(self, graph.replay, holder["next"], holder["probs"])

    def _all_finished(self) -> bool:
        if self.stop_check is not None:
            live = (~self.done).nonzero().squeeze(1).tolist()
            if live:
                produced = int(self.step_index.item())
                tokens = self.out[live, :produced].tolist()
                for row in self.stop_check(tokens, live):
                    self.done[row] = True
        return bool(self.done.all())
