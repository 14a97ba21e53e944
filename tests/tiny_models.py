"""Tiny random-init causal LMs with a character-level tokenizer, saved as model folders.

They load through CleanModelLoader like any local model, in well under a second. Variants cover
what the guards must tell apart: BOS or no BOS, a chat template, a chat-control EOS, an
instruct-looking name.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

__all__ = ["build_tiny_model"]

_CHARS = list(string.ascii_letters + string.digits + string.punctuation) + ["\n", "\t", "▁"]
_MERGES = [("▁", "A"), ("▁", "B"), ("▁", "t"), ("▁", "a"), ("e", "s"), ("I", "n")]


def build_tiny_model(folder: Path, *, bos: bool = True, chat_template: str | None = None,
                     eos_token: str = "</s>", name_or_path: str | None = None,
                     chat_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>"), seed: int = 0,
                     hidden_size: int = 64, num_layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["<pad>", "</s>", "<s>", "<unk>", *chat_tokens]
    if eos_token not in specials:
        specials.append(eos_token)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_MERGES, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Replace("▁", " ")
    from tokenizers import processors

    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if bos else None,
                                        eos_token=eos_token, pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=list(chat_tokens))
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=vocab["<s>"] if bos else None,
                         eos_token_id=vocab[eos_token], pad_token_id=vocab["<pad>"], tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if name_or_path:
        config_path = folder / "config.json"
        data = json.loads(config_path.read_text())
        data["_name_or_path"] = name_or_path
        config_path.write_text(json.dumps(data, indent=2))
    return folder
