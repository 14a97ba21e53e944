"""A generation run hands back its decoders' memory when it returns, not at some later garbage collection: a next
shard in the same process, or another scale rank on the same GPU, needs it (two ranks sharing an H100 ran out of memory
in their second shards, docs/measurements.md)."""

from __future__ import annotations

import gc
import weakref

import pytest


@pytest.fixture
def tiny(tiny_model_dir):
    from utils.clean_model_loader import CleanModelLoader

    model, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    return model, tokenizer


def test_a_generation_run_frees_its_decoders_without_a_garbage_collection(tiny, tmp_path, monkeypatch):
    import utils.generation as generation
    from utils.stage1_generation import Stage1Config, run_stage1_generation

    model, tokenizer = tiny
    decoders = []
    build = generation.StaticDecoder

    def tracked(*args, **kwargs):
        decoder = build(*args, **kwargs)
        decoders.append(weakref.ref(decoder))
        return decoder

    monkeypatch.setattr(generation, "StaticDecoder", tracked)
    gc.disable()  # a collection during the run would hide a decoder kept only by a reference cycle
    try:
        summary = run_stage1_generation(model, tokenizer, Stage1Config(count=4, max_rounds=1), tmp_path, batch_size=8,
                                        show_progress=False)
        alive = [ref for ref in decoders if ref() is not None]
    finally:
        gc.enable()
    assert decoders, "the run built no static decoder, so this test checks nothing"
    assert alive == []
    assert set(summary["phase_seconds"]) >= {"instructions", "responses"}
    assert summary["phase_peak_gpu_gib"] == {}  # on the CPU there is no GPU memory to report


def test_a_captured_step_does_not_keep_its_decoder_alive(tiny):
    from utils.generation import GenerationEngine, SamplingParams
    from utils.static_decode import _replay_then_finish

    model, tokenizer = tiny
    engine = GenerationEngine(model, tokenizer, batch_size=2, show_progress=False, decode_loop="static")
    engine.generate([("a", "Hello"), ("b", "One two")], SamplingParams(0.7, 0.9, 1.0, 6))
    (decoder,) = engine._decoders.values()
    # The step a GPU decoder keeps where rows may be re-sampled (the CPU has no graph to replay); it must not refer
    # back to the decoder that holds it.
    decoder._step = _replay_then_finish(decoder, lambda: None, decoder.cur_token.squeeze(1), None)
    watched = weakref.ref(decoder)
    del decoder
    gc.disable()
    try:
        engine.release()
        alive = watched() is not None
    finally:
        gc.enable()
    assert not alive
