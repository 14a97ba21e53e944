"""The GGUF conversion parses the file's header once, however many readers transformers asks for."""

import gguf
import numpy as np

from utils import gguf_conversion


def _tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("weight", np.arange(12, dtype=np.float32).reshape(3, 4))
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


def test_the_plain_view_reader_reads_what_the_stock_reader_reads(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    stock, plain = gguf.GGUFReader(path), gguf_conversion._plain_view_reader_class()(path)
    assert isinstance(stock.data, np.memmap) and type(plain.data) is np.ndarray
    assert list(plain.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        assert plain.fields[name].contents() == field.contents(), name
    (tensor,), (expected,) = plain.tensors, stock.tensors
    assert tensor.name == expected.name == "weight"
    assert np.array_equal(tensor.data, expected.data) and np.array_equal(tensor.data, np.arange(12).reshape(3, 4))
