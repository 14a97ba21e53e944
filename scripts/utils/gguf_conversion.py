"""Turn a GGUF file into a normal model folder (dequantized weights + a correct tokenizer).

transformers 5.x rebuilds Gemma's GGUF tokenizer as a Unigram model over the stored scores, but
Gemma's scores are BPE merge ranks, so that tokenizer splits every word into single characters
("The" -> T, h, e) and the model degenerates. For Gemma we rebuild the BPE tokenizer from the
vocabulary and ranks instead; other architectures keep transformers' converter.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .exit_codes import BadInputError

__all__ = ["convert_gguf_to_folder", "read_gguf_metadata", "build_gemma_bpe_tokenizer"]

_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def read_gguf_metadata(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as err:  # noqa: BLE001 - whatever the parser trips on, the file is not a usable GGUF
        raise BadInputError(f"{gguf_path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith(("general.", "tokenizer.")):
            try:
                meta[key] = field.contents()
            except Exception:  # noqa: BLE001 - an odd field must not stop a conversion
                continue
    return meta


def build_gemma_bpe_tokenizer(meta: dict):
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    # GGUF stores SentencePiece's whitespace pieces with real spaces; the HF vocabulary uses U+2581.
    pieces = ["▁" * len(tok) if tok and not tok.strip(" ") else tok for tok in tokens]
    vocab = {}
    for index, piece in enumerate(pieces):
        vocab.setdefault(piece, index)
    ranks = {piece: score for piece, score in zip(pieces, scores, strict=True)}
    merges = generate_merges(vocab, ranks)
    special_ids = {int(meta.get(f"tokenizer.ggml.{name}_token_id", default))
                   for name, default in (("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0))}
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=merges,
        bos_token=tokens[int(meta.get("tokenizer.ggml.bos_token_id", 2))],
        eos_token=tokens[int(meta.get("tokenizer.ggml.eos_token_id", 1))],
        unk_token=tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 3))],
        pad_token=tokens[int(meta.get("tokenizer.ggml.padding_token_id", 0))],
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    # Control and user-defined pieces must stay whole (and be recognisable as such by the guard).
    # Only pieces that own their id: an added token whose text is already taken would get a new
    # id past the embedding matrix.
    extra = [AddedToken(pieces[i], special=True, normalized=False) for i, kind in enumerate(types)
             if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED) and i not in special_ids and vocab[pieces[i]] == i]
    tokenizer.add_special_tokens({"extra_special_tokens": extra})
    return tokenizer


def _plain_view_reader_class():
    import gguf
    import numpy as np

    class PlainViewReader(gguf.GGUFReader):
        """A reader whose file bytes are a plain ndarray view of its memory map. The header parse slices them
        about 9 million times (the 262k vocabulary strings), and each slice of an `np.memmap` also runs the
        subclass's bookkeeping, about half of the parse. The bundled model's first load on 2 CPU cores: 25.1 s
        with memmap slices, 17.2 s without (medians of 3, farm-bench)."""

        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, mapped):
            self._plain_data = mapped.view(np.ndarray)  # the same mapped bytes; the view keeps the map open

    return PlainViewReader


@contextmanager
def _parsed_once():
    """Every `gguf.GGUFReader(path)` made inside returns one reader per file (a `PlainViewReader`). Parsing
    the header walks each of the 262k vocabulary strings through numpy views, and our metadata read,
    transformers' config and its weight loading each did it: on 2 CPU cores the bundled model's first load
    took 47.8 s with three parses and 30.2 s with one (medians of 3, farm-bench)."""
    import gguf

    original = gguf.GGUFReader
    plain_view_reader = _plain_view_reader_class()
    readers = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = plain_view_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> dict:
    """Write a model folder for `gguf_path`; returns the identity facts read from its metadata."""
    with _parsed_once():
        return _convert(Path(gguf_path), folder)


def _convert(gguf_path: Path, folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_gguf_metadata(gguf_path)
    architecture = str(meta.get("general.architecture", ""))
    try:
        if architecture.startswith("gemma"):
            tokenizer = build_gemma_bpe_tokenizer(meta)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError) as err:
        # An architecture transformers cannot read, or metadata missing its tokenizer: the file's fault.
        raise BadInputError(f"{gguf_path}: transformers cannot load this GGUF ({type(err).__name__}: {err})") from None
    if meta.get("tokenizer.chat_template"):
        # Kept so that the loader's guard sees that this model ships a chat template.
        tokenizer.chat_template = str(meta["tokenizer.chat_template"])
    # The weights are dequantized now; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"general_name": meta.get("general.name"), "finetune": meta.get("general.finetune"),
            "architecture": architecture, "gguf_chat_template": bool(meta.get("tokenizer.chat_template"))}
