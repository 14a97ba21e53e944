"""InstructionCritic: single-token A/B judgements read from log-probabilities, in batches.

The answer slot is the last position of the prompt; the critic reads log P(" A") and log P(" B")
there, and the margin log P(A) - log P(B) decides: accepted when margin >= threshold. No sampling.
With `label_swap`, each item is asked a second time with the letters traded (A = bad) and the two
margins are averaged, which cancels a constant preference for one letter (position bias).
Each decision records log P(A), log P(B), the margin, the threshold and its prompt's version. Each
label must be one token of the model's tokenizer; where it is not, the critic refuses to start
(BadInputError, exit 2, naming the label and its tokens).
With `compile=True` on a GPU the forward pass is compiled (torch.compile: norms, rotary embeddings
and activations fused); the first batches of each new shape pay the compilation.

Relevance (`relevance_scores`): log p(completion | the bare instruction block) and log p(completion |
the bare response delimiter), where the completion is the response as it is trained (" " + response,
then EOS), over the completion tokens only, in batched forward passes (`continuation_logprobs`).
Their difference is a pointwise mutual information: positive when the instruction helps predict the
answer; `relevance` is it per completion token, `pmi` the total. The EOS makes an answer that stops
short of what its instruction asks for less likely given the instruction (measured on the bundled
model: the probe's truncated answers otherwise score above complete ones). The prompt is the one
training uses, so the score is about the pair as it will be trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from .completion_prompts import PROMPT_VERSIONS, CompletionStylePrompts
from .exit_codes import BadInputError
from .generation import left_pad
from .prompt_guards import encode_continuation, encode_prompt
from .static_decode import report_compile_failure

__all__ = ["InstructionCritic", "LOGIT_BUDGET", "logit_budget"]

# At most this many logits (rows x kept positions x vocabulary) per forward pass of the relevance
# scorer: 2^27 floats = 512 MiB, where a 262k vocabulary makes 256 response tokens alone 67M per row.
LOGIT_BUDGET = 1 << 27
# On a GPU a kept logit costs its bf16 value, plus at most LOGIT_BUDGET float32 values at once for the log-softmax
# (_continuation_sums). Until 2026-11-28 a float32 copy and a float32 log-softmax of every logit were made beside it
# (10 bytes); a scale shard's response scoring then reserved 63-78 GiB of an H100 (docs/measurements.md).
BYTES_PER_LOGIT = 2
MAX_LOGIT_BUDGET = 1 << 31


def logit_budget(device) -> int:
    """Logits per relevance forward pass: LOGIT_BUDGET, or on a GPU what a quarter of the memory this process can have
    holds (at most MAX_LOGIT_BUDGET). With a 262k vocabulary LOGIT_BUDGET alone cuts a batch of 30-token answers to 16
    rows: on an H100 the pilot's response scoring took 42.0 s under it and 11.8 s under this budget (docs/measurements.md).
    The memory this process can have is the device's free memory, no more than its allocator may still reserve under
    a per-process memory fraction (a scale rank sharing its GPU), plus what its own allocator holds unused: the driver
    counts that cache as taken, and a scale shard's response generation reserved 28-29 GiB of an H100."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return LOGIT_BUDGET
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    allowed = int(torch.cuda.get_per_process_memory_fraction(device) * total)
    available = min(free, max(0, allowed - reserved)) + reserved - torch.cuda.memory_allocated(device)
    return max(LOGIT_BUDGET, min(available // 4 // BYTES_PER_LOGIT, MAX_LOGIT_BUDGET))


def _hand_back_cached_memory(device) -> None:
    """Return the scoring's cached logit blocks to the driver. They are the largest this process allocates, in sizes
    that vary batch by batch; kept, they count as taken for another process on the same GPU (two scale ranks per GPU)."""
    import torch

    if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class InstructionCritic:
    def __init__(self, model, tokenizer, batch_size: int = 16, confidence_threshold: float = 1.0,
                 label_swap: bool = False, max_prompt_tokens: int | None = None, show_progress: bool = False,
                 compile: bool = False):
        self.model = model
        self.forward = model
        if compile and model.device.type == "cuda":
            import torch

            # Not the decoder's wrapper (dynamic=False): critic batches vary in width, and dynamo
            # turns to dynamic shapes after the second one instead of compiling each.
            self.forward = torch.compile(model)
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.confidence_threshold = confidence_threshold
        self.label_swap = label_swap
        self.show_progress = show_progress
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)
        self.label_ids = _single_token_labels(tokenizer)

    # -- public API ------------------------------------------------------------------------
    def critique_instruction(self, instruction: str, confidence_threshold: float | None = None) -> dict:
        return self.critique_instructions_batch([instruction], confidence_threshold)[0]

    def critique_pair(self, instruction: str, response: str, confidence_threshold: float | None = None) -> dict:
        return self.critique_pairs_batch([(instruction, response)], confidence_threshold)[0]

    def critique_instructions_batch(self, instructions: Sequence[str], confidence_threshold: float | None = None) -> list[dict]:
        build = CompletionStylePrompts.create_instruction_critic_prompt
        return self._judge([build(text) for text in instructions],
                           [build(text, swapped=True) for text in instructions] if self.label_swap else None,
                           confidence_threshold, PROMPT_VERSIONS["instruction_critic"])

    def critique_pairs_batch(self, pairs: Sequence[tuple[str, str]], confidence_threshold: float | None = None,
                             label_swap: bool | None = None) -> list[dict]:
        """`label_swap` (default: the critic's own) asks each pair again with the letters traded; the
        decision then holds the direct reading (logp_a - logp_b) and the averaged `margin`."""
        build = CompletionStylePrompts.create_pair_critic_prompt
        swap = self.label_swap if label_swap is None else label_swap
        return self._judge([build(i, r) for i, r in pairs], [build(i, r, swapped=True) for i, r in pairs] if swap else None,
                           confidence_threshold, PROMPT_VERSIONS["pair_critic"])

    def relevance_scores(self, pairs: Sequence[tuple[str, str]]) -> list[dict]:
        """Per pair: {"logp_conditioned", "logp_unconditioned", "n_tokens", "pmi", "relevance"}, where
        pmi = log p(y|x) - log p(y) over the n_tokens completion tokens (EOS included) and
        relevance = pmi / n_tokens; pmi and relevance are None for an empty response.

        Both sides score the same completion tokens; the unconditioned side sees the bare response
        delimiter, so the score isolates what the instruction adds, not what the answer format adds.
        """
        prompts = CompletionStylePrompts
        completions = [prompts.format_completion(response) if response.strip() else "" for _, response in pairs]
        contexts = [prompts.create_response_prompt(instruction) for instruction, _ in pairs]
        contexts += [prompts.unconditioned_response_prompt()] * len(pairs)
        scored = self.continuation_logprobs(contexts, completions + completions, append_eos=True)
        scores = []
        for (conditioned, n), (unconditioned, _), text in zip(scored[:len(pairs)], scored[len(pairs):], completions, strict=True):
            pmi = conditioned - unconditioned if text else None
            scores.append({"logp_conditioned": round(conditioned, 6), "logp_unconditioned": round(unconditioned, 6),
                           "n_tokens": n, "pmi": None if pmi is None else round(pmi, 6),
                           "relevance": None if pmi is None else round(pmi / n, 6)})
        return scores

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str],
                              append_eos: bool = False) -> list[tuple[float, int]]:
        """(sum of log P(continuation tokens | prompt), number of those tokens) per pair, batched;
        with `append_eos` the model's EOS ends each non-empty continuation, as in training.

        Rows are left-padded so every continuation ends at the last position, with positions
        counted from each row's first real token (as generation does). `logits_to_keep` asks the
        model for the continuation's positions only, and a batch holds at most `logit_budget` logits.
        A prompt too long for the context loses its front (after BOS); the continuation is never cut.
        """
        from tqdm.auto import tqdm

        rows, lengths = [], []
        for prompt, continuation in zip(prompts, continuations, strict=True):
            tail = encode_continuation(self.tokenizer, continuation) if continuation else []
            if tail and append_eos:
                tail.append(self.tokenizer.eos_token_id)
            rows.append(self._fit(encode_prompt(self.tokenizer, prompt), reserve=len(tail)) + tail)
            lengths.append(len(tail))
        # Longest continuation first: rows of a batch keep about as many positions as they need.
        order = sorted(range(len(rows)), key=lambda i: (-lengths[i], -len(rows[i]), i))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        out: list[tuple[float, int] | None] = [None] * len(rows)
        pad_id = self.tokenizer.pad_token_id
        progress = tqdm(total=len(rows), desc="relevance", disable=not self.show_progress)
        start = 0
        while start < len(order):
            keep = lengths[order[start]]
            # Asked again for every batch: a process sharing the GPU may hold more or less memory by now.
            fits = max(1, min(self.batch_size, logit_budget(self.model.device) // ((keep + 1) * vocab)))
            batch = order[start:start + fits]
            input_ids, attention = left_pad([rows[i] for i in batch], pad_id)
            if keep:
                sums = self._continuation_sums(input_ids, attention, keep, [lengths[i] for i in batch])
            else:
                sums = [0.0] * len(batch)
            for r, i in enumerate(batch):
                out[i] = (sums[r], lengths[i])
            start += len(batch)
            progress.update(len(batch))
        progress.close()
        _hand_back_cached_memory(self.model.device)
        return out  # type: ignore[return-value]

    def _continuation_sums(self, input_ids, attention, keep: int, lengths: list[int]) -> list[float]:
        import torch

        device = self.model.device
        # Position t predicts token t + 1: the logits for the last `keep` tokens are those at the
        # positions width-keep-1 .. width-2, i.e. the last keep + 1 positions without the final one.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        mask = None if bool(attention.all()) else attention.to(device)
        targets = input_ids[:, -keep:].to(device)
        with torch.inference_mode():
            logits = self._logits(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                                  logits_to_keep=keep + 1)[:, :-1, :]
            # log_softmax(x)[target] = x[target] - logsumexp(x), in float32 a few rows at a time: only the model's own
            # logits are ever whole (BYTES_PER_LOGIT), not a float32 copy and a float32 log-softmax beside them.
            rows_at_once = max(1, LOGIT_BUDGET // (keep * logits.shape[-1]))
            picked = torch.cat([
                chunk.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1).float() - torch.logsumexp(chunk.float(), dim=-1)
                for chunk, chunk_targets in zip(logits.split(rows_at_once), targets.split(rows_at_once), strict=True)]).cpu()
        return [float(picked[r, keep - n:].sum()) for r, n in enumerate(lengths)]

    def _logits(self, **inputs):
        """The model's logits, through the compiled forward where there is one."""
        if self.forward is not self.model:
            try:
                return self.forward(**inputs).logits
            except Exception as err:  # noqa: BLE001 - a compiler failure must not stop the scoring
                report_compile_failure(err, "critic")
                self.forward = self.model
        return self.model(**inputs).logits

    # -- internals -------------------------------------------------------------------------
    def _judge(self, prompts: list[str], swapped_prompts: list[str] | None, threshold: float | None,
               prompt_version: str) -> list[dict]:
        threshold = self.confidence_threshold if threshold is None else threshold
        direct = self.label_logprobs(prompts)
        swapped = self.label_logprobs(swapped_prompts) if swapped_prompts is not None else None
        decisions = []
        for index, (logp_a, logp_b) in enumerate(direct):
            decision = {"logp_a": round(logp_a, 6), "logp_b": round(logp_b, 6), "margin": round(logp_a - logp_b, 6)}
            if swapped is not None:
                # In the swapped item B means good, so its margin for "good" is logP(B) - logP(A).
                swap_a, swap_b = swapped[index]
                decision.update(swapped_logp_a=round(swap_a, 6), swapped_logp_b=round(swap_b, 6),
                                swapped_margin=round(swap_b - swap_a, 6),
                                margin=round((logp_a - logp_b + swap_b - swap_a) / 2, 6))
            decision.update(threshold=threshold, label_swap=swapped is not None, accepted=decision["margin"] >= threshold,
                            prompt_version=prompt_version)
            decisions.append(decision)
        return decisions

    def label_logprobs(self, prompts: list[str]) -> list[tuple[float, float]]:
        """(log P(A), log P(B)) at the answer slot of each prompt, batched by length."""
        return self._score_encoded([encode_prompt(self.tokenizer, text) for text in prompts])

    def _score_encoded(self, encoded_prompts: list[list[int]]) -> list[tuple[float, float]]:
        import torch
        from tqdm.auto import tqdm

        encoded = [self._fit(ids) for ids in encoded_prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out: list[tuple[float, float] | None] = [None] * len(encoded)
        pad_id = self.tokenizer.pad_token_id
        for start in tqdm(range(0, len(order), self.batch_size), desc="critic", disable=not self.show_progress):
            rows = order[start:start + self.batch_size]
            input_ids, attention = left_pad([encoded[i] for i in rows], pad_id)
            # Without padding no mask is passed, so SDPA can take its causal flash kernel.
            mask = None if bool(attention.all()) else attention.to(self.model.device)
            with torch.inference_mode():
                logits = self._last_logits(input_ids.to(self.model.device), mask)
            logprobs = torch.log_softmax(logits, dim=-1)[:, list(self.label_ids)].cpu()
            for r, i in enumerate(rows):
                out[i] = (float(logprobs[r, 0]), float(logprobs[r, 1]))
        return out  # type: ignore[return-value]

    def _last_logits(self, input_ids, mask):
        # Only the last position is needed: logits_to_keep=1 avoids a (batch, len, vocab) tensor.
        return self._logits(input_ids=input_ids, attention_mask=mask, logits_to_keep=1)[:, -1, :].float()

    def _fit(self, ids: list[int], reserve: int = 0) -> list[int]:
        """Shorten from the front (after BOS), never the end: the answer slot must stay last, and
        `reserve` positions stay free for a continuation that follows (at least one prompt token is kept)."""
        room = self.max_prompt_tokens - reserve
        if len(ids) <= room:
            return ids
        keep_bos = self.tokenizer.stage1_guard["prepend_bos"]
        head = ids[:1] if keep_bos else []
        if room - len(head) < 1:
            raise BadInputError(f"a continuation of {reserve} tokens leaves no room for its prompt in the critic's "
                                f"{self.max_prompt_tokens}-token context")
        return head + ids[len(ids) - (room - len(head)):]


def _single_token_labels(tokenizer) -> tuple[int, int]:
    """The token ids of the two labels. Each must be one token, else P(label) is not one number at
    one position; which tokenizers split them depends on the model, so this is bad input, not a bug."""
    labels = CompletionStylePrompts.critic_label_texts()
    ids = [encode_continuation(tokenizer, label) for label in labels]
    for label, label_ids in zip(labels, ids, strict=True):
        if len(label_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(label_ids)
            raise BadInputError(f"the critic label {label!r} is {len(label_ids)} tokens for this model's tokenizer "
                                f"(ids {label_ids}, pieces {pieces}); the A/B critic needs each label to be one token")
    if ids[0] == ids[1]:
        raise BadInputError(f"the critic labels {labels[0]!r} and {labels[1]!r} are the same token ({ids[0][0]}) "
                            "for this model's tokenizer")
    return ids[0][0], ids[1][0]
