"""Range checks for numeric flags and for the same values when they are read back from a manifest.

One table of allowed ranges serves both: argparse `type=` functions (a bad flag exits 2 with
argparse's own "argument --flag: ..." line) and `check_values` for values an upstream manifest
hands to a later stage (a bad value there exits 2 naming the manifest and the field).

    parser.add_argument("--top-p", type=in_range(float, 0, 1, low_open=True), ...)
    check_values({"response_top_p": 2.0}, RANGES, source="artifacts/pilot/session_manifest.json")
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .exit_codes import BadInputError

__all__ = ["Range", "in_range", "positive_int", "non_negative_int", "positive_float", "probability",
           "check_value", "check_values", "add_training_run_flags", "parse_training_args", "add_training_speed_flags"]


@dataclass(frozen=True)
class Range:
    """kind in [low, high]; an open end excludes its bound; None leaves that side unbounded."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        name = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{name} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{name} {'<' if self.high_open else '<='} {self.high}"
        return name

    def problem(self, value) -> str | None:
        """Why `value` is not allowed, or None when it is."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"got {value!r}, expected {self.describe()}"
        if self.kind is int and (isinstance(value, float) and not value.is_integer()):
            return f"got {value!r}, expected {self.describe()}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"got {value!r}, expected a finite {self.describe()}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"got {value!r}, expected {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"got {value!r}, expected {self.describe()}"
        return None

    def __call__(self, text: str):
        """argparse `type=`: parse, then check (argparse turns the error into exit 2 naming the flag)."""
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {self.describe()}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.describe()


def in_range(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Range:
    return Range(kind, low, high, low_open, high_open)


positive_int = Range(int, 1)
non_negative_int = Range(int, 0)
positive_float = Range(float, 0, low_open=True)
probability = Range(float, 0, 1)


def check_value(name: str, value, allowed: Range, source: str) -> None:
    problem = allowed.problem(value)
    if problem:
        raise BadInputError(f"{source}: {name}: {problem}")


def check_values(values: dict, ranges: dict[str, Range], source: str) -> None:
    """Check every `values[name]` that has a range (missing names are not checked)."""
    for name, allowed in ranges.items():
        if name in values and values[name] is not None:
            check_value(name, values[name], allowed, source)


def add_training_run_flags(add) -> None:
    """The run-control flags both training scripts share (resume, checkpoints, logging, step limit, the
    instruct-model override); `add` is the parser's add_argument. Pair with `parse_training_args`."""
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in <output>/checkpoints")
    add("--allow-changed-hyperparameters", action="store_true",
        help="let --resume continue with hyperparameters other than the recorded ones (the changes are recorded)")
    add("--save-steps", type=positive_int, default=100, help="checkpoint (and eval) every N optimizer steps")
    add("--save-total-limit", type=positive_int, default=3, help="checkpoints kept on disk")
    add("--logging-steps", type=positive_int, default=10, help="log (and NaN-check) the loss every N optimizer steps")
    add("--max-steps", type=in_range(int, -1), default=-1, help="stop after N >= 1 optimizer steps (-1: run --epochs)")
    add("--allow-instruct-model", action="store_true", help="override the loader's instruct-model refusal (recorded)")


def parse_training_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, refusing --max-steps 0 (argparse's exit 2) as the range type cannot say it alone."""
    args = parser.parse_args(argv)
    if args.max_steps == 0:
        parser.error("argument --max-steps: got 0, expected -1 (run --epochs) or an integer >= 1")
    return args


class _MachineDependentFlag(argparse.Action):
    """An on/off flag refused at parse time (argparse's exit 2) where this machine cannot run it: `problem()` says why,
    or None. --liger-kernel and --cuda-graphs."""

    def __init__(self, option_strings, dest, problem=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)
        self.problem = problem

    def __call__(self, parser, namespace, values, option_string=None):
        problem = self.problem()
        if problem:
            parser.error(f"argument {option_string}: {problem}")
        setattr(namespace, self.dest, True)


def _liger_problem():
    from .sft_training import liger_kernel_problem

    return liger_kernel_problem()


def _cuda_graphs_problem():
    from .cuda_graph_training import cuda_graphs_device_problem

    return cuda_graphs_device_problem()


def add_training_speed_flags(add) -> None:
    """Training speed options that keep the training semantics (examples per optimizer step, epochs,
    learning-rate schedule); `add` is the parser's add_argument. Defaults are today's behaviour; what
    each one gains is measured by benchmark_training.py (its configuration of the same name)."""
    add("--kbit-upcast", action=argparse.BooleanOptionalAction, default=True,
        help="4-bit base: let peft cast every weight that is not 4-bit (norms; the embedding, which gemma ties to the "
             "output projection) to float32; --no-kbit-upcast keeps them in the loaded 16-bit dtype, as TRL's own k-bit "
             "preparation does (numerics change slightly; no effect without 4-bit) [benchmark: no_upcast]")
    add("--group-by-length", action="store_true",
        help="batch examples of similar length together (transformers' LengthGroupedSampler): less padding, the same "
             "number of examples per step; changes which examples share a batch [benchmark: group_by_length]")
    add("--torch-compile", choices=["off", "model", "regional"], default="off",
        help="torch.compile through the Trainer, with dynamic shapes (fuses the small kernels of a launch-bound step; the "
             "first steps pay the compilation): model = the whole model, regional = each decoder layer class compiled once "
             "and reused (accelerate's regional compilation: much shorter compilation) [benchmark: torch_compile, compile_regional]")
    add("--liger-kernel", action=_MachineDependentFlag, problem=_liger_problem,
        help="Liger's Triton kernels for norms, rotary embedding and the MLP activation (TRL keeps its own fused LM head "
             "and loss); needs the optional liger-kernel package and CUDA, else exit 2 [benchmark: liger]")
    add("--cudnn-attention", action=argparse.BooleanOptionalAction, default=True,
        help="CUDA: let PyTorch's attention use cuDNN's fused kernel, which it prefers on Hopper GPUs. cuDNN builds an "
             "execution plan on the host for every new batch shape, and padded training batches change shape almost every "
             "step; --no-cudnn-attention leaves attention to PyTorch's memory-efficient and flash kernels (the same "
             "attention; numerics change slightly) [benchmark: no_cudnn_attention]")
    add("--cuda-graphs", action=_MachineDependentFlag, problem=_cuda_graphs_problem,
        help="CUDA: capture each batch shape's forward and backward pass as a CUDA graph and replay it (the step then "
             "costs about its GPU time instead of thousands of kernel launches from Python); batches are padded to a "
             "multiple of 64 tokens so shapes repeat. Needs CUDA and one process (else exit 2 here), and no gradient "
             "checkpointing, --torch-compile, --liger-kernel or --padding-free (else exit 2 once the model is loaded) "
             "[benchmark: graphed_16bit, graphed_4bit]")
    add("--eval-steps", type=positive_int, default=None,
        help="evaluate every N optimizer steps (default: --save-steps); each evaluation pauses training")
    add("--eval-batch-size", type=positive_int, default=None,
        help="examples per evaluation batch (default: --per-device-batch-size); fewer, larger batches evaluate faster, and "
             "the evaluation loss (a mean of per-batch token means) moves slightly with the batch size")
