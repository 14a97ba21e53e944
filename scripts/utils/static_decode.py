"""A static-cache decode loop for batches of left-padded prompts, replayed as one CUDA graph per step.

`model.generate` spends most of a decode step on the host (logits processors, stopping criteria,
cache bookkeeping) and, for a small model, on launching hundreds of kernels one by one. Here the
cache, the attention mask, the repetition-penalty set and the output are preallocated, so a whole
step (forward, penalty, temperature, top-p, sampling, bookkeeping) is captured once and replayed.

Semantics follow `generate` with `RepetitionPenaltyLogitsProcessor` -> `TemperatureLogitsWarper` ->
`TopPLogitsWarper` -> multinomial, in that order, float32 scores, EOS rows padded afterwards:
greedy output is the same token for token, and sampling draws from the same distribution (the
random numbers differ). Top-p looks at the `TOP_P_CANDIDATES` most probable tokens only; a row whose
nucleus is larger is re-sampled from the fully sorted distribution, so nothing is approximated.

During decoding, attention for the one new token goes through `decode_attention`, which reads each
key/value head once for its whole query-head group. transformers' SDPA path with a mask first copies
K and V out to every query head (`repeat_kv`); measured on an H100 for the 7B shape at batch 256,
that copy and the masked SDPA kernel took about half of each step. Prefill keeps the model's own
attention.

On the CPU the same loop runs eagerly. `supports_static_decode` says when the loop applies; the
engine falls back to `generate` otherwise.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["StaticDecoder", "supports_static_decode", "process_scores", "nucleus_keep_mask", "decode_attention",
           "TOP_P_CANDIDATES"]

TOP_P_CANDIDATES = 512


def supports_static_decode(model, total_length: int) -> bool:
    """True where this loop reproduces `generate`: SDPA or eager attention (a LoRA adapter on top is
    fine), no 4-bit weights, and a sequence that never outgrows a sliding window (a rolling window
    would need its own mask)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types and window is not None and total_length > window:
        return False
    return True


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     softcap: float | None = None, **kwargs):
    """Attention of one query position over the static cache, grouped-query aware, in the layout
    transformers' attention functions return ((batch, 1, heads, head_dim), None)."""
    import torch

    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * (scaling if scaling is not None else head_dim ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # (batch, 1, 1, cache length): bool = may attend, float = additive
        mask = attention_mask[:, :, :, :key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    output = torch.matmul(probs, value).reshape(batch, heads, 1, head_dim)
    return output.transpose(1, 2).contiguous(), None


DECODE_ATTENTION = "stage1_decode"


def _register_decode_attention() -> str:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if DECODE_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    return DECODE_ATTENTION


def process_scores(logits, seen, repetition_penalty: float, temperature: float):
    """float32 scores after the repetition penalty and the temperature, as `generate` computes them."""
    import torch

    scores = logits.float()
    if repetition_penalty != 1.0:
        penalized = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = torch.where(seen, penalized, scores)
    if temperature > 0 and temperature != 1.0:
        scores = scores / temperature
    return scores


def nucleus_keep_mask(sorted_probs_desc, top_p: float):
    """Which of the descending-sorted candidates survive top-p: a token stays while the probability
    mass ranked above it is below `top_p` (the same set `TopPLogitsWarper` keeps), the first always."""
    import torch

    mass_above = torch.cumsum(sorted_probs_desc, dim=-1) - sorted_probs_desc
    keep = mass_above < top_p
    keep[..., 0] = True
    return keep


def _exponential_race(probs):
    # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i / sum(p): exact, and unlike
    # multinomial it is a fixed sequence of kernels that a CUDA graph can hold.
    import torch

    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


class StaticDecoder:
    """Decodes one batch. `decode()` returns the generated ids (batch, max_new_tokens), pad after the end."""

    capture_failed = False  # set once per process, so a model that cannot be captured is not retried

    def __init__(self, model, input_ids, attention_mask, max_new_tokens: int, pad_id: int, end_ids: set[int],
                 temperature: float, top_p: float, repetition_penalty: float,
                 stop_check: Callable[[list[list[int]], list[int]], set[int]] | None = None,
                 check_every: int = 8, use_cuda_graph: bool | None = None):
        import torch

        self.torch = torch
        self.model = model
        self.device = input_ids.device
        self.batch, self.width = input_ids.shape
        self.max_new_tokens = max_new_tokens
        self.length = self.width + max_new_tokens
        self.pad_id = pad_id
        self.greedy = temperature <= 0
        self.temperature, self.top_p, self.repetition_penalty = temperature, top_p, repetition_penalty
        self.stop_check = stop_check
        self.check_every = max(1, check_every)
        self.use_cuda_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.eager_mask = model.config._attn_implementation == "eager"
        self.mask_dtype = next(model.parameters()).dtype
        vocab = model.get_output_embeddings().weight.shape[0]
        self.candidates = min(TOP_P_CANDIDATES, vocab)
        self.end_ids = torch.tensor(sorted(end_ids) or [-1], device=self.device)

        # Static state: the addresses a captured graph reads and writes.
        self.prompt_ids = input_ids
        self.valid = torch.zeros(self.batch, self.length, dtype=torch.bool, device=self.device)
        self.valid[:, :self.width] = attention_mask.bool()
        self.seen = torch.zeros(self.batch, vocab, dtype=torch.bool, device=self.device)
        self.seen.scatter_(1, input_ids, True)  # like generate: the prompt, left padding included
        self.done = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        self.out = torch.full((self.batch, max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        self.cur_token = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        positions = attention_mask.long().cumsum(-1) - 1
        self.position = positions[:, -1:].clone() + 1
        self.column = torch.tensor([self.width], dtype=torch.long, device=self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.uncovered = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        self.scores = None
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        self._prefill_positions = positions.masked_fill(attention_mask == 0, 1)

    # -- one step ----------------------------------------------------------------------------
    def _mask(self, allowed):
        if not self.eager_mask:
            return allowed
        torch = self.torch
        return torch.zeros((), dtype=self.mask_dtype, device=self.device).masked_fill(~allowed, torch.finfo(self.mask_dtype).min)

    def _forward(self, input_ids, position_ids, allowed):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=self._mask(allowed),
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    def _select(self, logits):
        torch = self.torch
        scores = process_scores(logits, self.seen, self.repetition_penalty, self.temperature)
        if self.greedy:
            return scores.argmax(dim=-1)
        self.scores = scores
        probs = torch.softmax(scores, dim=-1)
        if self.top_p >= 1.0:
            return _exponential_race(probs)
        top_probs, top_ids = torch.topk(probs, self.candidates, dim=-1)
        keep = nucleus_keep_mask(top_probs, self.top_p)
        # Covered when the candidates hold at least top_p of the mass: every token outside them then
        # has at least that much above it and is dropped by top-p as well.
        self.uncovered.copy_(top_probs.sum(dim=-1) < self.top_p)
        choice = _exponential_race(top_probs * keep)
        return top_ids.gather(1, choice[:, None]).squeeze(1)

    def _full_sort_resample(self, next_tokens) -> None:
        """Rows whose nucleus exceeds the candidates: sample from the whole sorted distribution."""
        torch = self.torch
        rows = self.uncovered.nonzero().squeeze(1)
        probs = torch.softmax(self.scores[rows], dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        choice = _exponential_race(sorted_probs * nucleus_keep_mask(sorted_probs, self.top_p))
        next_tokens[rows] = order.gather(1, choice[:, None]).squeeze(1)

    def _commit(self, next_tokens) -> None:
        torch = self.torch
        next_tokens = torch.where(self.done, torch.full_like(next_tokens, self.pad_id), next_tokens)
        self.out.index_copy_(1, self.step_index, next_tokens[:, None])
        self.seen.scatter_(1, next_tokens[:, None], True)
        self.done |= (next_tokens[:, None] == self.end_ids[None, :]).any(dim=-1)
        self.cur_token.copy_(next_tokens[:, None])
        self.step_index += 1

    def _decode_logits(self):
        self.valid.index_fill_(1, self.column, True)
        logits = self._forward(self.cur_token, self.position, self.valid[:, None, None, :])
        self.column += 1
        self.position += 1
        return logits

    # -- the loop ----------------------------------------------------------------------------
    def decode(self):
        torch = self.torch
        config = self.model.config
        implementation = config._attn_implementation
        with torch.no_grad():
            self._prefill()  # the model's own attention over the whole prompt
            config._attn_implementation = _register_decode_attention()
            try:
                return self._decode_steps()
            finally:
                config._attn_implementation = implementation

    def _decode_steps(self):
        steps_left = self.max_new_tokens - 1
        step_fn = self._eager_step
        if self.use_cuda_graph and steps_left > 2 and not StaticDecoder.capture_failed:
            step_fn()  # the warm-up step (lazy kernels, cuBLAS workspaces) is a real step
            steps_left -= 1
            step_fn = self._capture_or_eager()
        for step in range(steps_left):
            step_fn()
            if (step + 1) % self.check_every == 0 and self._all_finished():
                break
        return self.out

    def _prefill(self) -> None:
        torch = self.torch
        rows = torch.arange(self.width, device=self.device)
        causal = rows[None, :self.width, None] >= torch.arange(self.length, device=self.device)[None, None, :]
        allowed = causal & self.valid[:, None, :]
        # A padding row attends to itself so no row is empty (an empty softmax row gives NaN that the
        # cache would carry into every later step).
        allowed |= (rows[:, None] == torch.arange(self.length, device=self.device)[None, :])[None]
        logits = self._forward(self.prompt_ids, self._prefill_positions, allowed[:, None])
        self._finish_step(self._select(logits))

    @property
    def _may_resample(self) -> bool:
        return not self.greedy and self.top_p < 1.0

    def _finish_step(self, next_tokens) -> None:
        if self._may_resample and bool(self.uncovered.any()):
            self._full_sort_resample(next_tokens)
        self._commit(next_tokens)

    def _eager_step(self) -> None:
        self._finish_step(self._select(self._decode_logits()))

    def _capture_or_eager(self):
        try:
            return self._capture()
        except RuntimeError as err:
            # Nothing ran during the failed capture (kernels are only recorded), so the state is
            # where the warm-up step left it and the eager loop carries on from there.
            StaticDecoder.capture_failed = True
            print(f"[static_decode] CUDA graph capture failed, decoding eagerly from now on: {err}", flush=True)
            return self._eager_step

    def _capture(self):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        holder = {}
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                holder["next"] = self._select(self._decode_logits())
                if not self._may_resample:
                    self._commit(holder["next"])
        torch.cuda.current_stream().wait_stream(side)
        next_tokens = holder["next"]

        def replay() -> None:
            graph.replay()
            if self._may_resample:
                # Outside the graph: an uncovered row is re-sampled before the token is committed.
                self._finish_step(next_tokens)

        return replay

    def _all_finished(self) -> bool:
        if self.stop_check is not None:
            live = (~self.done).nonzero().squeeze(1).tolist()
            if live:
                produced = int(self.step_index.item())
                tokens = self.out[live, :produced].tolist()
                for row in self.stop_check(tokens, live):
                    self.done[row] = True
        return bool(self.done.all())
