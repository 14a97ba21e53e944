"""The GGUF conversion parses the file's header once, however many readers transformers asks for."""

import gguf

from utils import gguf_conversion


def _tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_readers_made_during_a_conversion_share_one_parse(tmp_path, monkeypatch):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    parses = []
    original = gguf.GGUFReader

    class CountingReader(original):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    with gguf_conversion._parsed_once():
        from gguf import GGUFReader  # as transformers imports it, inside its loading function

        first, second = GGUFReader(path), GGUFReader(str(path))
        assert first is second
        assert gguf_conversion.read_gguf_metadata(path)["general.name"] == "tiny"
    assert len(parses) == 1
    assert gguf.GGUFReader is CountingReader  # put back afterwards
    assert gguf.GGUFReader(path) is not first and len(parses) == 2
