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
"""

from __future__ import annotations

from collections.abc import Sequence

from .completion_prompts import PROMPT_VERSIONS, CompletionStylePrompts
from .exit_codes import BadInputError
from .prompt_guards import encode_continuation, encode_prompt
from .static_decode import report_compile_failure

__all__ = ["InstructionCritic"]


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

    def critique_pairs_batch(self, pairs: Sequence[tuple[str, str]], confidence_threshold: float | None = None) -> list[dict]:
        build = CompletionStylePrompts.create_pair_critic_prompt
        return self._judge([build(i, r) for i, r in pairs],
                           [build(i, r, swapped=True) for i, r in pairs] if self.label_swap else None,
                           confidence_threshold, PROMPT_VERSIONS["pair_critic"])

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
            decision.update(threshold=threshold, label_swap=self.label_swap, accepted=decision["margin"] >= threshold,
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
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attention[r, width - len(encoded[i]):] = 1
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
        run = lambda forward: forward(input_ids=input_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :].float()
        if self.forward is self.model:
            return run(self.model)
        try:
            return run(self.forward)
        except Exception as err:  # noqa: BLE001 - a compiler failure must not stop the scoring
            report_compile_failure(err, "critic")
            self.forward = self.model
            return run(self.model)

    def _fit(self, ids: list[int]) -> list[int]:
        """Shorten from the front (after BOS), never the end: the answer slot must stay last."""
        if len(ids) <= self.max_prompt_tokens:
            return ids
        keep_bos = self.tokenizer.stage1_guard["prepend_bos"]
        head = ids[:1] if keep_bos else []
        return head + ids[len(ids) - (self.max_prompt_tokens - len(head)):]


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
