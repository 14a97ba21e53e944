"""Batched generation engine: left padding, length-sorted batches, stop strings, finish reasons,
seeded sampling, a progress bar, and recovery from out-of-memory by halving the batch.

Decoding runs through `static_decode.StaticDecoder` (static cache, one CUDA graph per step on a
GPU) wherever `supports_static_decode` holds, and through `model.generate` otherwise or with
`decode_loop="generate"`; both give the same greedy tokens and the same sampling distribution.
A stop string is matched in the generated text only, never across the prompt's end. On the static
loop each record samples from a seed of its own (the engine's seed and its key), so it draws the same
tokens whatever batch it lands in: a resumed run, or one whose batches an out-of-memory error halved,
writes what an uninterrupted run writes (`generate` seeds a whole batch by its first key instead).

On a GPU the engine keeps its last decoders (buffers, cache, captured graph) and left-pads each
batch to a multiple of `width_multiple` tokens, so batches sorted by length mostly share a shape and
replay one graph instead of capturing their own. `compile=True` also compiles the decode step
(torch.compile, once per shape; it pays off over many batches of one shape). `release()` frees them;
assigning `engine.model` releases them too (a graph replays the model it was captured from).

When every row of a static batch starts with the same tokens (at least `MIN_SHARED_PREFIX` of them:
few-shot demonstrations, or N copies of one prompt), that prefix is prefilled once and its keys and
values shared by all rows, and the rest of a prompt that several rows repeat (N candidates) is
prefilled once for all of them (`share_prefix=False` turns both off); `prefix_tokens_saved` counts the
prefill tokens this spared, `prefill_tokens` those computed (padding included, but not columns that
are padding in every row). The prefix length is rounded down to a multiple of `width_multiple`, so
batches behind one fixed prefix keep one decoder shape. When few rows of a batch are still writing,
they finish in a smaller decoder (`static_decode`'s batch tails), not at the full batch's step cost.

    engine = GenerationEngine(model, tokenizer, batch_size=32, seed=42)
    results = engine.generate([(key, prompt_text), ...], SamplingParams(...), stop_strings=[...],
                              on_result=appender_callback)

Each result carries `finish_reason`: "stop" (a stop string ended it; the text is cut before it),
"eos" (the model's end-of-sequence token), or "length" (max_new_tokens reached).

A prompt whose tokens plus max_new_tokens exceed the model's context (`context_length`) is refused
with a BadInputError naming its key before any batch is built: a prompt is never cut silently,
and a runaway one (a 5 MB instruction) must not size the attention mask and cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from .exit_codes import BadInputError
from .prompt_guards import encode_prompt
from .static_decode import StaticDecoder, supports_static_decode

__all__ = ["SamplingParams", "GenerationResult", "GenerationEngine", "is_out_of_memory", "context_length",
           "check_prompts_fit", "left_pad", "shared_prefix_length", "prefix_layout", "MIN_SHARED_PREFIX"]

# Below this, prefilling a prefix on its own (one more forward pass) saves less than it costs.
MIN_SHARED_PREFIX = 32


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """(input_ids, attention_mask) with every row right-aligned, so each one's last token (the next
    token's slot, or a scored continuation's end) sits at the same last position."""
    import torch

    width = max(len(ids) for ids in sequences) if width is None else width
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


def shared_prefix_length(sequences: Sequence[Sequence[int]], multiple: int = 1, minimum: int = MIN_SHARED_PREFIX) -> int:
    """Tokens every sequence starts with, leaving each at least one of its own (its last token gives the
    next token's logits), rounded down to a multiple of `multiple`; 0 below `minimum`."""
    common = len(os.path.commonprefix([list(ids) for ids in sequences]))
    length = min(common, min(len(ids) for ids in sequences) - 1) // multiple * multiple
    return length if length >= max(1, minimum) else 0


def prefix_layout(sequences: Sequence[Sequence[int]], prefix: int, pad_id: int, width: int | None = None):
    """(input_ids, attention_mask) for `StaticDecoder(prefix_length=prefix)`: the shared prefix in the first
    `prefix` columns, each row's rest left-padded after it up to `width`. With prefix 0, `left_pad`."""
    import torch

    ids, mask = left_pad([seq[prefix:] for seq in sequences], pad_id, None if width is None else width - prefix)
    if not prefix:
        return ids, mask
    head = list(sequences[0][:prefix])
    if any(list(seq[:prefix]) != head for seq in sequences):
        raise ValueError(f"the sequences do not all start with the same {prefix} tokens")
    head = torch.tensor(head, dtype=torch.long).expand(len(sequences), -1)
    return torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head), mask], dim=1)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 80

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    key: str
    text: str
    finish_reason: str
    n_generated_tokens: int
    token_ids: list[int]


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def context_length(model) -> int | None:
    """Positions the model can attend over (its config's max_position_embeddings); None where unknown."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_prompts_fit(encoded: Sequence[tuple[str, list[int]]], max_new_tokens: int, limit: int | None) -> None:
    """Refuse (BadInputError naming the record) a prompt that leaves no room for max_new_tokens."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if limit is None:
        return
    for key, ids in encoded:
        if len(ids) + max_new_tokens > limit:
            raise BadInputError(f"prompt of record {key!r} is {len(ids)} tokens; with max_new_tokens {max_new_tokens} that "
                                f"exceeds the model's context of {limit} tokens (max_position_embeddings): "
                                "shorten that record or lower max_new_tokens")


def _key_seed(seed: int, key: str) -> int:
    # Seeded by content, not by position: a record's seed is the same in every run with this seed.
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


class GenerationEngine:
    KEPT_DECODERS = 2  # instruction and response batches may alternate; each decoder holds a KV cache

    def __init__(self, model, tokenizer, batch_size: int = 16, seed: int = 0, show_progress: bool = True,
                 decode_loop: str = "auto", cuda_graph: bool = True, compile: bool = False,
                 width_multiple: int | None = None, share_prefix: bool = True):
        if decode_loop not in ("auto", "static", "generate"):
            raise ValueError(f"decode_loop must be auto, static or generate, not {decode_loop!r}")
        self._decoders: dict[tuple, StaticDecoder] = {}
        self.decode_loop = decode_loop
        self.cuda_graph = cuda_graph
        on_gpu = getattr(model, "device", None) is not None and model.device.type == "cuda"
        self.compile = compile and on_gpu
        # Extra left padding is masked out, but it changes the shapes the kernels reduce over; on the
        # CPU (no graph to share) the width stays exact.
        self.width_multiple = max(1, width_multiple if width_multiple is not None else (32 if on_gpu else 1))
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.show_progress = show_progress
        self.oom_events = 0
        self.share_prefix = share_prefix
        self.prefill_tokens = 0  # prompt tokens the static loop prefilled, padding included
        self.prefix_tokens_saved = 0  # prompt tokens it did not prefill, thanks to a shared prefix or repeated prompts
        self.sampling_misses = 0  # sampled tokens whose rejection draws all missed the nucleus (static_decode.REJECTION_MISS)

    def generate(self, items: Iterable[tuple[str, str]], params: SamplingParams,
                 stop_strings: Sequence[str] = (), on_result: Callable[[GenerationResult], None] | None = None,
                 description: str = "generating") -> list[GenerationResult]:
        encoded = [(key, encode_prompt(self.tokenizer, text)) for key, text in items]
        return self.generate_encoded(encoded, params, stop_strings, on_result, description)

    def generate_encoded(self, encoded: list[tuple[str, list[int]]], params: SamplingParams,
                         stop_strings: Sequence[str] = (), on_result: Callable[[GenerationResult], None] | None = None,
                         description: str = "generating") -> list[GenerationResult]:
        """Like `generate`, for prompts already encoded by `encode_prompt` (benchmarks use this)."""
        from tqdm.auto import tqdm

        encoded = list(encoded)
        check_prompts_fit(encoded, params.max_new_tokens, context_length(self.model))
        # Longest first: similar lengths share a batch (little padding), and an out-of-memory
        # error shows up on the first batch rather than after an hour.
        encoded.sort(key=lambda item: (-len(item[1]), item[0]))
        results: list[GenerationResult] = []
        progress = tqdm(total=len(encoded), desc=description, disable=not self.show_progress, unit="seq")
        start = 0
        while start < len(encoded):
            batch = encoded[start:start + self.batch_size]
            try:
                batch_results = self._generate_batch(batch, params, list(stop_strings))
            except Exception as err:  # noqa: BLE001 - only out-of-memory is recovered
                if not is_out_of_memory(err) or self.batch_size == 1:
                    raise
                self._recover_from_oom(err)
                continue
            for result in batch_results:
                if on_result is not None:
                    on_result(result)
                results.append(result)
            start += len(batch)
            progress.update(len(batch))
        progress.close()
        return results

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        # A kept graph replays the kernels of the model it was captured from: a new model (an adapter
        # loaded on top, another checkpoint) must not inherit it.
        self._model = model
        self.release()

    def release(self) -> None:
        """Drop the kept decoders (their KV caches and graphs) and hand their memory back to the driver, where another
        process on the same GPU can have it; the next batch builds its own again."""
        import torch

        self._decoders.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _recover_from_oom(self, err: BaseException) -> None:
        self.oom_events += 1
        self.batch_size = max(1, self.batch_size // 2)
        self.release()
        print(f"[generation] out of memory ({type(err).__name__}); batch size halved to {self.batch_size}", flush=True)

    def _generate_batch(self, batch: list[tuple[str, list[int]]], params: SamplingParams,
                        stop_strings: list[str]) -> list[GenerationResult]:
        import torch

        pad_id = self.tokenizer.pad_token_id
        sequences = [ids for _, ids in batch]
        width = max(len(ids) for ids in sequences)
        static = self._use_static_loop(width + params.max_new_tokens)
        device = self.model.device
        if static:
            prefix = shared_prefix_length(sequences, self.width_multiple) if self.share_prefix and len(batch) > 1 else 0
            # The prefix keeps its exact (rounded) length; the suffix region is what gets padded up.
            padded = prefix + -(-(width - prefix) // self.width_multiple) * self.width_multiple
            if supports_static_decode(self.model, padded + params.max_new_tokens):
                width = padded
            input_ids, attention = prefix_layout(sequences, prefix, pad_id, width)
            # A seed per record: it samples the same tokens in whatever batch it lands (a resumed run's
            # batches start at other records; an out-of-memory retry halves them).
            row_seeds = [_key_seed(self.seed, key) for key, _ in batch]
            new_tokens = self._static_decode(input_ids.to(device), attention.to(device), params, stop_strings, prefix, row_seeds).tolist()
            return [self._finish(key, tokens, params, stop_strings) for (key, _), tokens in zip(batch, new_tokens, strict=True)]
        input_ids, attention = left_pad(sequences, pad_id, width)
        # generate draws for the whole batch from one generator: the same batch samples the same way, but a
        # record sampled in another batch (after a resume or an out-of-memory retry) draws other tokens.
        torch.manual_seed(_key_seed(self.seed, batch[0][0]))
        kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad_id,
                      eos_token_id=self.tokenizer.eos_token_id, repetition_penalty=params.repetition_penalty)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=self.tokenizer)
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        new_tokens = output[:, width:].tolist()
        return [self._finish(key, tokens, params, stop_strings) for (key, _), tokens in zip(batch, new_tokens, strict=True)]

    def _use_static_loop(self, total_length: int) -> bool:
        if self.decode_loop == "generate":
            return False
        supported = supports_static_decode(self.model, total_length)
        if self.decode_loop == "static" and not supported:
            raise ValueError("decode_loop='static' but this model/length is not supported by the static loop")
        return supported

    def _enders(self) -> set[int]:
        # A chat-control token ends a sequence like EOS does: it must never reach the data.
        enders = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} | self.tokenizer.stage1_guard["forbidden_ids"]
        return {tok for tok in enders if tok is not None}

    def _static_decode(self, input_ids, attention, params: SamplingParams, stop_strings: list[str], prefix: int = 0,
                       row_seeds: list[int] | None = None):
        enders = self._enders()
        window = 8

        def stopped_rows(tokens: list[list[int]], rows: list[int]) -> set[int]:
            # Only the newest tokens can complete a stop string since the last check; the overlap
            # covers a stop string that spans the previous window's end.
            tails = [row_tokens[-2 * window:] for row_tokens in tokens]
            texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
            return {row for row, text in zip(rows, texts, strict=True) if any(s in text for s in stop_strings)}

        # A new model object already released the kept decoders (the `model` setter); the module
        # count catches an adapter injected into the same object in place. Other in-place changes
        # need release().
        # The shared prefix length is part of the shape: it sets which columns the prefill computes.
        key = (sum(1 for _ in self.model.modules()), tuple(input_ids.shape), prefix, params.max_new_tokens,
               params.temperature, params.top_p, params.repetition_penalty, tuple(sorted(enders)))
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            while len(self._decoders) >= self.KEPT_DECODERS:
                self._decoders.pop(next(iter(self._decoders)))  # the least recently used
            decoder = StaticDecoder(self.model, *input_ids.shape, params.max_new_tokens, self.tokenizer.pad_token_id,
                                    enders, temperature=params.temperature, top_p=params.top_p,  # <= 0: greedy
                                    repetition_penalty=params.repetition_penalty, device=input_ids.device,
                                    check_every=window, use_cuda_graph=self.cuda_graph and input_ids.device.type == "cuda",
                                    compile_forward=self.compile, prefix_length=prefix, group_copies=self.share_prefix)
        self._decoders[key] = decoder  # most recently used last
        tokens = decoder.decode(input_ids, attention, stop_check=stopped_rows if stop_strings else None, row_seeds=row_seeds)
        computed, unshared = decoder.last_prefill_tokens
        self.prefill_tokens += computed
        self.prefix_tokens_saved += unshared - computed
        self.sampling_misses += decoder.last_sampling_misses
        return tokens

    def _shortest_stopped_prefix(self, kept: list[int], stop_strings: list[str]) -> int:
        """Tokens up to the one that completes the first stop string, as `generate` would have stopped."""
        low, high = 1, len(kept)
        while low < high:
            middle = (low + high) // 2
            text = self.tokenizer.decode(kept[:middle], skip_special_tokens=False)
            if any(s in text for s in stop_strings):
                high = middle
            else:
                low = middle + 1
        return high

    def _finish(self, key: str, tokens: list[int], params: SamplingParams, stop_strings: list[str]) -> GenerationResult:
        enders = self._enders()
        end = next((i for i, tok in enumerate(tokens) if tok in enders), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        if cut >= 0:
            kept = kept[:self._shortest_stopped_prefix(kept, stop_strings)]
            return GenerationResult(key, text[:cut], "stop", len(kept), kept)
        if end is not None:
            return GenerationResult(key, text, "eos", end + 1, kept)
        reason = "length" if len(tokens) >= params.max_new_tokens else "eos"
        return GenerationResult(key, text, reason, len(kept), kept)
