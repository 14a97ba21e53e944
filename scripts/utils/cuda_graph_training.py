"""CUDA-graph training steps: each batch shape's forward and backward pass captured once, then replayed.

Why: the bundled model's training step is bound by the host, not the GPU. On an H100 and an H200 a 16-bit LoRA step
of 8 examples took 200-250 ms of Python and kernel launches (thousands of small kernels through peft's LoRA layers and
gemma's float32 norms) for about 28 ms of kernel time. A CUDA graph replays all of a captured step's kernels from one
launch, so the step costs about its GPU time.

What stays the same: the examples of each optimizer step, the loss (the sum of the completion tokens' negative
log-likelihood divided by the Trainer's count of label tokens, as TRL's SFTTrainer computes it), the gradient
accumulation, clipping, optimizer and learning-rate schedule (they run eagerly after each replay), evaluation (eager).
What changes:
  - batches are padded to a multiple of PAD_MULTIPLE tokens, so that a few shapes repeat (the padding carries no loss
    and is masked out of attention);
  - the loss comes from the model's full logits and cross-entropy, not TRL's fused LM head (same value up to
    rounding; more memory: the logits of the longest batch in float32);
  - dropout draws its masks from the same generator in another order;
  - TRL's per-step entropy and token-accuracy metrics are not logged for graphed steps (the loss and the token count
    are; the count is summed on the device and read when the Trainer logs);
  - batches are copied to the GPU without blocking (pinned memory), so the host queues the next step while the GPU
    replays this one.
A shape is captured the first time it comes (WARMUP_RUNS eager passes on a side stream, then the capture); after
MAX_GRAPHS shapes, new shapes run eagerly through the same code. All graphs share one memory pool: steps run one at
a time, so no two graphs' intermediates are alive together.

Without CUDA the same class runs each step eagerly (the tests use this to pin its loss and gradients against
TRL's own step); the command-line flag refuses a machine without CUDA (`cuda_graphs_device_problem`).
"""

from __future__ import annotations

import os

__all__ = ["PAD_MULTIPLE", "MAX_GRAPHS", "WARMUP_RUNS", "cuda_graphs_device_problem", "cuda_graphs_problem", "completion_loss", "GraphedTrainStep",
           "graphed_trainer_class"]

PAD_MULTIPLE = 64  # tokens: up to --max-seq-length 512 this leaves at most 8 lengths per batch size
MAX_GRAPHS = 32
WARMUP_RUNS = 2  # eager passes before a capture (lazy initialisation: cuBLAS handles, workspaces)


def cuda_graphs_device_problem() -> str | None:
    """Why this process cannot replay training steps (None when it can): checked while parsing the flags."""
    import torch

    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device, and this machine has none"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "one process only (DDP and FSDP reduce gradients in hooks that a replayed backward pass does not run)"
    return None


def cuda_graphs_problem(*, gradient_checkpointing: bool, padding_free: bool, torch_compile: str, liger_kernel: bool) -> str | None:
    """Why --cuda-graphs cannot run with these settings here (None when it can)."""
    device = cuda_graphs_device_problem()
    if device:
        return device
    clashes = [name for name, on in (("--gradient-checkpointing on", gradient_checkpointing),
                                     ("--padding-free or --packing (a batch's shape follows its token count)", padding_free),
                                     ("--torch-compile", torch_compile != "off"), ("--liger-kernel", liger_kernel)) if on]
    if clashes:
        return "not combined with " + ", ".join(clashes)
    return None


def completion_loss(logits, labels, denominator):
    """Summed next-token negative log-likelihood of the labelled positions (-100 is ignored) over `denominator`."""
    import torch.nn.functional as F

    shifted = logits[:, :-1, :].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum") / denominator


class GraphedTrainStep:
    """Forward + backward of one batch: replayed from a CUDA graph per shape; the gradients are added to `.grad`."""

    def __init__(self, model, autocast_dtype=None, max_graphs: int = MAX_GRAPHS, warmup_runs: int = WARMUP_RUNS):
        import torch

        self.model, self.autocast_dtype = model, autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_graphs, self.warmup_runs = max_graphs, warmup_runs
        self.use_graphs = torch.cuda.is_available() and next(model.parameters()).is_cuda
        self.graphs: dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.counts = {"captured": 0, "replayed": 0, "eager": 0}

    def _forward_backward(self, input_ids, attention_mask, labels, denominator):
        """(loss, gradients of the trainable parameters). The model's class forward is called: accelerate's autocast
        wrapper on the instance caches weight casts, which a graph must not keep, so autocast is set here without it."""
        import contextlib

        import torch

        autocast = (torch.autocast(input_ids.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            logits = type(self.model).forward(self.model, input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).logits
        loss = completion_loss(logits, labels, denominator)
        return loss.detach(), torch.autograd.grad(loss, self.params)

    def _capture(self, inputs: tuple):
        import torch

        static = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self._forward_backward(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss, grads = self._forward_backward(*static)
        self.counts["captured"] += 1
        return graph, static, loss, grads

    def __call__(self, input_ids, attention_mask, labels, denominator):
        """The batch's loss (a new tensor); its gradients are added to the parameters' `.grad`."""
        import torch

        inputs = (input_ids, attention_mask, labels, torch.as_tensor(denominator, dtype=torch.float32, device=input_ids.device))
        key = tuple(input_ids.shape)
        if self.use_graphs and (key in self.graphs or len(self.graphs) < self.max_graphs):
            if key not in self.graphs:
                self.graphs[key] = self._capture(inputs)
            graph, static, loss, grads = self.graphs[key]
            for target, value in zip(static, inputs, strict=True):
                target.copy_(value)
            graph.replay()
            self.counts["replayed"] += 1
            loss = loss.clone()  # the next replay overwrites the static output
        else:
            loss, grads = self._forward_backward(*inputs)
            self.counts["eager"] += 1
        self._accumulate(grads)
        return loss

    def _accumulate(self, grads) -> None:
        import torch

        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if len(missing) == len(self.params):  # after zero_grad(set_to_none): one fused copy, not a kernel per tensor
            for param, grad in zip(self.params, torch._foreach_mul(list(grads), 1.0), strict=True):
                param.grad = grad
            return
        for i in missing:
            self.params[i].grad = torch.zeros_like(self.params[i])
        torch._foreach_add_([p.grad for p in self.params], list(grads))


def graphed_trainer_class(base):
    """`base` (TRL's SFTTrainer) with training steps run by a `GraphedTrainStep`; evaluation stays TRL's own."""
    import torch

    class GraphedSFTTrainer(base):
        graphed_step, pending_tokens = None, None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "labels" not in inputs or "attention_mask" not in inputs:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            inputs = self._prepare_inputs(inputs)
            if self.graphed_step is None:
                dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
                self.graphed_step = GraphedTrainStep(self.accelerator.unwrap_model(model), autocast_dtype=dtype)
            labels = inputs["labels"]
            # As TRL and the Trainer scale it: over the accumulated steps' label tokens when the Trainer counted them,
            # else this batch's label tokens times the accumulation steps.
            denominator = num_items_in_batch if num_items_in_batch is not None else (
                labels[:, 1:].ne(-100).sum().clamp(min=1) * self.current_gradient_accumulation_steps)
            loss = self.graphed_step(inputs["input_ids"], inputs["attention_mask"], labels, denominator)
            # TRL's count of train tokens, summed on the device: reading it every step (as TRL does) would make the host
            # wait for each replay before it can queue the next step; `log` reads it.
            tokens = inputs["attention_mask"].sum()
            self.pending_tokens = tokens if self.pending_tokens is None else self.pending_tokens + tokens
            return loss

        def count_pending_tokens(self) -> int:
            """TRL's running count of train tokens, with the steps not yet read added (one sync)."""
            if self.pending_tokens is not None:
                self._total_train_tokens += int(self.pending_tokens)
                self.pending_tokens = None
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return self._total_train_tokens

        def log(self, logs, *args, **kwargs):
            self.count_pending_tokens()
            return super().log(logs, *args, **kwargs)

    return GraphedSFTTrainer
