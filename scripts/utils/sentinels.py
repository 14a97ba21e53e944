"""Behavioural sentinels run by the loader: is this a working *base* model?

knowledge: "The capital of France is" must put " Paris" among the top `PARIS_MAX_RANK` next tokens
  or produce it within a few greedy tokens. Failing it means a broken model or tokenizer; it is
  recorded and warned about, not refused (tiny random test models fail it by design).
chat_probe: a bare request in plain text. An instruction-tuned model answers it in assistant
  style ("Sure! Here is ...") or reaches for its chat-control tokens; a base model just continues
  the document. Flagged when the greedy reply opens in assistant style or the next-token
  probability mass on chat-control tokens is at least `CHAT_TOKEN_MASS_MAX`.
"""

from __future__ import annotations

import warnings

from .prompt_guards import encode_prompt, looks_assistant_style

__all__ = ["run_sentinels", "PARIS_MAX_RANK", "CHAT_TOKEN_MASS_MAX", "KNOWLEDGE_PROMPT", "CHAT_PROBE_PROMPT"]

PARIS_MAX_RANK = 10
CHAT_TOKEN_MASS_MAX = 0.05
GREEDY_TOKENS = 16
KNOWLEDGE_PROMPT = "The capital of France is"
CHAT_PROBE_PROMPT = "Hi! Could you please write me a short poem about the sea?\n"


def _next_token_logprobs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def _greedy(model, tokenizer, ids: list[int]) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                             max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=False)


def run_sentinels(model, tokenizer, chat_ids: dict[str, int]) -> dict:
    ids = encode_prompt(tokenizer, KNOWLEDGE_PROMPT)
    logprobs = _next_token_logprobs(model, ids)
    paris_ids = tokenizer.encode(" Paris", add_special_tokens=False)
    paris_first = paris_ids[0]
    rank = int((logprobs > logprobs[paris_first]).sum().item()) + 1
    continuation = _greedy(model, tokenizer, ids)
    knowledge_passed = rank <= PARIS_MAX_RANK or "Paris" in continuation
    knowledge = {"prompt": KNOWLEDGE_PROMPT, "continuation": continuation, "paris_rank": rank,
                 "paris_logprob": round(float(logprobs[paris_first]), 4), "max_rank": PARIS_MAX_RANK,
                 "passed": knowledge_passed}
    if not knowledge_passed:
        warnings.warn(f"knowledge sentinel failed: 'The capital of France is' -> {continuation!r} (Paris rank {rank})", stacklevel=2)

    probe_ids = encode_prompt(tokenizer, CHAT_PROBE_PROMPT)
    probe_logprobs = _next_token_logprobs(model, probe_ids)
    chat_mass = float(probe_logprobs[list(chat_ids.values())].exp().sum()) if chat_ids else 0.0
    reply = _greedy(model, tokenizer, probe_ids)
    reasons = []
    if looks_assistant_style(reply):
        reasons.append(f"reply opens in assistant style: {reply[:60]!r}")
    if chat_mass >= CHAT_TOKEN_MASS_MAX:
        reasons.append(f"next-token mass on chat-control tokens {chat_mass:.3f} >= {CHAT_TOKEN_MASS_MAX}")
    chat_probe = {"prompt": CHAT_PROBE_PROMPT, "reply": reply, "chat_token_mass": round(chat_mass, 5),
                  "chat_token_mass_max": CHAT_TOKEN_MASS_MAX, "flagged": bool(reasons), "reason": "; ".join(reasons)}
    return {"knowledge": knowledge, "chat_probe": chat_probe, "passed": knowledge_passed and not reasons}
