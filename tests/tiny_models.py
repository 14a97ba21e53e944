"""Tiny random-init causal LMs with a character-level tokenizer, saved as model folders.

They load through CleanModelLoader like any local model, in well under a second. Variants cover
what the guards must tell apart: BOS or no BOS, a chat template, a chat-control EOS, an
instruct-looking name.
"""

from __future__ import annotations

import json
import random
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


_SUBJECTS = ["cats", "dogs", "rivers", "the moon", "bread", "music", "trees", "rain", "books", "the sun", "birds", "apples"]
_TASKS = ["Name three facts about {s}.", "Describe {s} in one sentence.", "Explain why {s} matter.",
          "Write a short line about {s}.", "List two things about {s}.", "Give a tip about {s}."]
_ANSWERS = ["{S} are common and well known.", "{S} can be found in many places.", "People often talk about {s}.",
            "{S} are simple to describe."]


def _pipeline_corpus(rng) -> list[str]:
    """Documents in the pipeline's own formats, so a tiny model learns to fill them plausibly."""
    from utils.completion_prompts import RESPONSE_END_MARKER
    from utils.completion_prompts import CompletionStylePrompts as P

    docs = []
    for _ in range(300):
        subject = rng.choice(_SUBJECTS)
        task = rng.choice(_TASKS).format(s=subject)
        answer = rng.choice(_ANSWERS).format(s=subject, S=subject[0].upper() + subject[1:])
        kind = rng.random()
        if kind < 0.35:
            items = [rng.choice(_TASKS).format(s=rng.choice(_SUBJECTS)) for _ in range(7)]
            docs.append("Below is a list of short, varied tasks.\n" + "\n".join(f"{i}. {t}" for i, t in enumerate(items, 1)))
        elif kind < 0.7:
            docs.append(P.create_response_prompt(task) + P.format_completion(answer) + "\n" + P.create_response_prompt(task))
        elif kind < 0.85:
            docs.append(P.create_instruction_critic_prompt(task)[-300:] + " A")
        else:
            docs.append(P.create_pair_critic_prompt(task, answer)[-300:] + " A")
    # Documents in the demonstration format (the response_v3 demonstrations, then three answers, each
    # ending at the end marker), drawn from their own generator so that the documents above stay what
    # they were. The v3 set keeps this fixture the model its pinned values were measured on (a v4-trained
    # one named the subject less: probe AUC of relevance_total 0.51 instead of 0.70); the pipeline
    # prompts it with the default template's longer set, in the same format.
    extra = random.Random(f"v3:{len(docs)}")
    for _ in range(200):
        blocks = []
        for subject in extra.sample(_SUBJECTS, 3):
            answer = extra.choice(_ANSWERS).format(s=subject, S=subject[0].upper() + subject[1:])
            blocks.append(P.create_response_prompt(extra.choice(_TASKS).format(s=subject)) + P.format_completion(answer)
                          + f"\n{RESPONSE_END_MARKER}\n\n")
        docs.append(P.demonstration_prefix("response_v3") + "".join(blocks))
    return docs


def build_trained_tiny_model(folder: Path, *, steps: int = 250, seed: int = 0) -> Path:
    """A tiny word-piece model trained for a few seconds on pipeline-format documents.

    Random weights emit character noise that every filter rejects; this one writes short,
    well-formed instructions and answers, so the pilot, scale and training paths can pass QC
    end to end in tests. The tests load the copy stored in TRAINED_FIXTURE (see there why).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from utils.completion_prompts import RESPONSE_END_MARKER

    rng = random.Random(seed)
    docs = _pipeline_corpus(rng)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    specials = ["<pad>", "</s>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=list(_CHARS))
    backend.train_from_iterator(docs, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    # 2048 positions: a response_v4 prompt (the demonstrations first) is about 1,100 of its tokens.
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"], tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    encoded, long_docs = [], []
    for doc in docs:
        ids = tokenizer.encode(doc, add_special_tokens=False) + [vocab["</s>"]]
        # A demonstration document is trained whole (about 550 tokens), four to a batch of their own:
        # the model must answer after attending over all the demonstrations, as the pipeline prompts it.
        if RESPONSE_END_MARKER in doc:
            long_docs.append(ids)
        else:
            encoded.append(ids[:128])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(2 * steps):
        batch = [rng.choice(long_docs) for _ in range(4)] if step % 2 else [rng.choice(encoded) for _ in range(16)]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), vocab["<pad>"])
        labels = torch.full((len(batch), width), -100)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


__all__.append("build_trained_tiny_model")

# The tests' trained tiny model is stored, not trained per run: 250 float32 steps on the CPU amplify rounding, and the
# weights depend on the CPU's kernels. On one 2-core machine, six settings of ATEN_CPU_CAPABILITY x
# MKL_ENABLE_INSTRUCTIONS gave four different models; the relevance probe's AUC on mismatched pairs ranged over
# 0.72-0.85 among them, and the AUCs pinned on an earlier machine's model failed on all four. Inference on stored
# weights gives the same AUCs to four places under every kernel setting tried. The stored build is
# MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx512, chosen as one whose relevance tells an answer from another
# pair's (mismatched AUC 0.83), the property test_response_selection.py relies on.
# Rewrite it, then re-pin what is measured on it, with:  python tests/tiny_models.py tests/fixtures/tiny-trained
TRAINED_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-trained"
__all__.append("TRAINED_FIXTURE")

# Generation flags for running the pipeline on the trained tiny model. Its critic signals need not reach the
# default probe AUC on a pilot's own pairs (tests/test_response_selection.py pins them on a fixed probe set) and its
# A/B critic always answers "A": these trust every signal and let that critic accept, so the pipeline's
# mechanics run end to end on it. It never writes an answer that meets a sampled constraint (0 of 4
# in a pilot of 6), so answering under constraints would only turn pairs into rejections and make the
# exit-0 runs depend on how many rounds that takes: these runs leave it off, and
# test_pilot.py::test_answers_written_under_constraints_are_checked_end_to_end turns it on.
# TRAINED_PIPELINE_OVERRIDES is how a manifest records them.
TRAINED_PIPELINE_FLAGS = ["--min-signal-auc", "0", "--confidence-threshold", "-100", "--generated-constraint-fraction", "0"]
TRAINED_PIPELINE_OVERRIDES = {"min_signal_auc": {"from": 0.75, "to": 0.0}, "confidence_threshold": {"from": 1.0, "to": -100.0},
                              "generated_constraint_fraction": {"from": 0.3, "to": 0.0}}
__all__ += ["TRAINED_PIPELINE_FLAGS", "TRAINED_PIPELINE_OVERRIDES"]


# Random-init models for the decode-loop tests (test_static_decode.py, test_shared_prefix.py).
DECODE_VOCAB = 300


def random_decode_model(family: str, attention: str, lora: bool = False):
    """A random-init llama or gemma3 (sliding and full layers) of DECODE_VOCAB tokens, optionally with a LoRA adapter."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=DECODE_VOCAB)
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


def transformers_probabilities(logits, input_ids, penalty, temperature, top_p):
    """The sampling distribution transformers' own processors give (penalty, temperature, top-p)."""
    import torch
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature),
                                      TopPLogitsWarper(top_p)])
    return torch.softmax(processors(input_ids, logits.clone()), dim=-1)


def sliding_gemma3(attention: str, window: int = 8, vocab: int = DECODE_VOCAB):
    """A tiny gemma3 whose sliding window (8) is far shorter than prompt + new tokens, full layer among sliding ones."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=window, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])
    config._attn_implementation = attention
    model = Gemma3ForCausalLM(config).eval()
    model.config._attn_implementation = attention
    return model


__all__ += ["DECODE_VOCAB", "random_decode_model", "transformers_probabilities", "sliding_gemma3"]


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    print(build_trained_tiny_model(Path(sys.argv[1])))
