"""--cuda-graphs (issue 18): the graphed training step against TRL's own step, the flag's refusals, the padding it
asks for. Capture and replay need CUDA; on the CPU the same class runs each step eagerly, so its loss, gradients,
accumulation and token count are pinned here against TRL's step on the same batch (the GPU figures are in
docs/measurements.md)."""

from __future__ import annotations

import argparse

import pytest

from conftest import run_python_script


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here trains a tiny model."""


def _parse(argv):
    import train_stage1_sft as script

    return script.parse_args([str(a) for a in argv])


def _trainers(model_dir, tmp_path, grad_accum: int = 1):
    """TRL's trainer and the graphed one on two copies of the same tiny model, same LoRA start, no dropout."""
    import transformers

    from test_train_sft import load_tiny, write_dataset
    from utils import sft_training as sft

    args = _parse(["--epochs", "1", "--per-device-batch-size", "3", "--grad-accum", str(grad_accum), "--save-steps", "10",
                   "--logging-steps", "1", "--seed", "0"])
    trainers = []
    for graphed in (False, True):
        model, tokenizer, _ = load_tiny(model_dir)
        records = sft.load_sft_records(write_dataset(tmp_path / "data", n=6))
        examples, _ = sft.build_sft_examples(tokenizer, records, 512)
        config = sft.build_sft_config(args, tmp_path / f"ckpt{graphed}", padding_free=False, has_eval=False, gradient_checkpointing=False)
        transformers.set_seed(0)
        trainers.append(sft.build_trainer(model, tokenizer, examples, [], config, sft.make_lora_config(dropout=0.0), cuda_graphs=graphed))
    return trainers


def _lora_grads(trainer):
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def test_graphed_step_gives_trls_loss_gradients_and_token_count(tmp_path, tiny_model_dir):
    import torch

    plain, graphed = _trainers(tiny_model_dir, tmp_path)
    assert type(graphed).__name__ == "GraphedSFTTrainer" and type(plain).__name__ == "SFTTrainer"
    batch = plain.data_collator([plain.train_dataset[i] for i in range(3)])
    labels = batch["labels"][:, 1:].ne(-100).sum()
    losses = [trainer.training_step(trainer.model, dict(batch), num_items_in_batch=labels) for trainer in (plain, graphed)]
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses
    expected, got = _lora_grads(plain), _lora_grads(graphed)
    assert expected.keys() == got.keys() and any(g.abs().sum() > 0 for g in got.values())
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=1e-4, atol=1e-7), name
    assert graphed._total_train_tokens == 0  # summed on the device until the Trainer logs
    graphed.log({"loss": float(losses[1])})
    assert graphed._total_train_tokens == plain._total_train_tokens == int(batch["attention_mask"].sum())
    assert graphed.state.log_history[-1]["num_tokens"] == graphed._total_train_tokens and graphed.pending_tokens is None
    assert graphed.graphed_step.counts == {"captured": 0, "replayed": 0, "eager": 1}  # no CUDA here: eager


def test_graphed_step_accumulates_and_scales_without_a_token_count(tmp_path, tiny_model_dir):
    """Two micro-batches, no count from the Trainer: each loss is its batch's mean over the accumulation steps (as
    the Trainer scales TRL's), and the second batch's gradients add to the first's."""
    import torch

    plain, graphed = _trainers(tiny_model_dir, tmp_path, grad_accum=2)
    batches = [plain.data_collator([plain.train_dataset[i] for i in rows]) for rows in ((0, 1, 2), (3, 4, 5))]
    for trainer in (plain, graphed):
        trainer.current_gradient_accumulation_steps = 2
        trainer.losses = [trainer.training_step(trainer.model, dict(batch)) for batch in batches]
    for expected, got in zip(plain.losses, graphed.losses, strict=True):
        assert torch.allclose(expected, got, rtol=1e-5)
    expected, got = _lora_grads(plain), _lora_grads(graphed)
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=1e-4, atol=1e-7), name


def test_gradients_add_to_those_already_there_and_fill_the_missing():
    """A parameter without a gradient gets the step's own; one with a gradient gets the sum (accumulation)."""
    import torch

    from utils.cuda_graph_training import GraphedTrainStep

    model = torch.nn.Linear(3, 2)
    step = GraphedTrainStep(model)
    assert step.use_graphs is False and step.params == [model.weight, model.bias]
    first = (torch.ones(2, 3), torch.full((2,), 2.0))
    step._accumulate(first)
    assert torch.equal(model.weight.grad, first[0]) and model.weight.grad is not first[0]  # a copy, not the graph's output
    model.bias.grad = None
    step._accumulate((torch.ones(2, 3), torch.ones(2)))
    assert torch.equal(model.weight.grad, torch.full((2, 3), 2.0)) and torch.equal(model.bias.grad, torch.ones(2))


def test_flag_defaults_off_and_pads_batches_to_the_graph_multiple(tmp_path, monkeypatch):
    from utils import cuda_graph_training
    from utils import sft_training as sft
    from utils.cuda_graph_training import PAD_MULTIPLE

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _parse([]).cuda_graphs is False
    config = sft.build_sft_config(_parse([]), tmp_path, padding_free=False, has_eval=False, gradient_checkpointing=False)
    assert config.pad_to_multiple_of is None and config.accelerator_config.non_blocking is False
    monkeypatch.setattr(cuda_graph_training, "cuda_graphs_device_problem", lambda: None)  # as on a GPU machine
    config = sft.build_sft_config(_parse(["--cuda-graphs"]), tmp_path, padding_free=False, has_eval=False, gradient_checkpointing=False)
    assert config.pad_to_multiple_of == PAD_MULTIPLE == 64 and config.accelerator_config.non_blocking is True


def test_trl_collator_pads_to_the_multiple(tmp_path, tiny_model_dir):
    """The shapes the graphs are keyed by: every batch length a multiple of 64, the padding masked and unlabelled."""
    plain, _ = _trainers(tiny_model_dir, tmp_path)
    plain.data_collator.pad_to_multiple_of = 64
    batch = plain.data_collator([plain.train_dataset[i] for i in range(3)])
    lengths = [len(plain.train_dataset[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, 64) and max(lengths) < 64
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row, length:].sum() == 0 and (batch["labels"][row, length:] == -100).all()


@pytest.mark.parametrize("settings,needle", [
    (dict(gradient_checkpointing=True), "--gradient-checkpointing on"),
    (dict(padding_free=True), "--padding-free or --packing"),
    (dict(torch_compile="regional"), "--torch-compile"),
    (dict(liger_kernel=True), "--liger-kernel"),
])
def test_cuda_graphs_refuse_what_they_cannot_replay(settings, needle, monkeypatch):
    import torch

    from utils.cuda_graph_training import cuda_graphs_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = dict(gradient_checkpointing=False, padding_free=False, torch_compile="off", liger_kernel=False)
    assert cuda_graphs_problem(**base) is None
    assert needle in cuda_graphs_problem(**{**base, **settings})
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "one process only" in cuda_graphs_problem(**base)


def test_cuda_graphs_without_cuda_is_bad_input(tmp_path, monkeypatch):
    """Refused while parsing (exit 2), and by build_sft_config for a caller that skips the parser."""
    import torch

    from utils import sft_training as sft
    from utils.exit_codes import BadInputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        _parse(["--cuda-graphs"])
    assert exc.value.code == 2
    args = argparse.Namespace(**{**vars(_parse([])), "cuda_graphs": True})
    with pytest.raises(BadInputError, match="--cuda-graphs: CUDA graphs need a CUDA device"):
        sft.build_sft_config(args, tmp_path, padding_free=False, has_eval=False, gradient_checkpointing=False)


def test_train_command_refuses_cuda_graphs_on_a_cpu_before_any_work(tmp_path, tiny_model_dir):
    from test_train_sft import write_dataset

    data, out = write_dataset(tmp_path / "data"), tmp_path / "out"
    result = run_python_script("train_stage1_sft.py", "--data", data, "--model", tiny_model_dir, "--output", out, "--cuda-graphs")
    assert result.returncode == 2 and "argument --cuda-graphs: CUDA graphs need a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
