"""Memory and time, estimated before training and measured after.

Memory is resident set size (RSS) of the process, the number an out-of-memory killer looks at:

    estimate = max(peak so far,               (loading, e.g. a mapped checkpoint shard, and the probe)
                   process now                (interpreter, libraries, the loaded weights and data)
                   + gradients                (one fp32 value per trainable parameter)
                   + optimizer state          (AdamW: two fp32 values per trainable parameter)
                   + activations of one micro-batch (what backward keeps, see ``activation_bytes``))

Time is measured, not modelled: one micro-batch's forward + backward is run twice on the real data
(the second one timed; gradients are dropped and the RNG restored, so training is unaffected) and
multiplied by the micro-batches to come. ``peak_rss_mb`` reads the kernel's high-water mark.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import losses
from ..errors import ConfigError
from ..losses import unsupported_reason
from ..quant import autograd4

MB = 1024 * 1024


@dataclass
class Estimate:
    process_mb: float
    weights_mb: float  # part of process_mb
    gradients_mb: float
    optimizer_mb: float
    activations_mb: float
    step_seconds: float
    total_seconds: float
    steps: int
    peak_so_far_mb: float = 0.0  # the process's peak RSS when the estimate is made (loading, probe)

    @property
    def training_mb(self) -> float:
        return self.process_mb + self.gradients_mb + self.optimizer_mb + self.activations_mb

    @property
    def total_mb(self) -> float:
        # The run's peak is also at least what loading already reached (a quantized load maps the
        # checkpoint while it quantizes; for a small model that can exceed the training step).
        return max(self.training_mb, self.peak_so_far_mb)

    def to_dict(self) -> dict:
        return {**asdict(self), "training_mb": round(self.training_mb, 1), "total_mb": round(self.total_mb, 1)}

    def __str__(self) -> str:
        return (
            f"estimate: peak memory ≈ {self.total_mb:,.0f} MB — training {self.training_mb:,.0f} = process now "
            f"{self.process_mb:,.0f} (weights {self.weights_mb:,.1f}) + gradients {self.gradients_mb:,.1f} + optimizer "
            f"{self.optimizer_mb:,.1f} + activations {self.activations_mb:,.1f}; peak so far (loading, probe) "
            f"{self.peak_so_far_mb:,.0f}; "
            f"time ≈ {_duration(self.total_seconds)} ({self.steps} steps × {self.step_seconds:.3f} s)"
        )


def estimate_run(model: nn.Module, probe, args, seq_len: int, steps: int) -> Estimate:
    """The estimate for a run of ``steps`` optimizer steps; ``probe()`` runs one micro-batch's
    forward + backward (``args`` is the run's ``TrainArgs``; ``seq_len`` its longest example)."""
    trainable_mb = tensor_mb(p for p in model.parameters() if p.requires_grad)
    activations = (activation_bytes(model, args.batch_size, seq_len, args.bf16, args.gradient_checkpointing,
                                    chunked=_chunked_loss(model, args))
                   + dequantized_weight_bytes(model))
    check_fits(model, args, seq_len, activations)  # before the probe: it would run the whole micro-batch
    step_seconds = probe_step_seconds(probe) * args.grad_accum
    return Estimate(
        process_mb=current_rss_mb(),
        weights_mb=tensor_mb(list(model.parameters()) + [b for b in model.buffers() if hasattr(b, "_lorakit_params")]),
        gradients_mb=trainable_mb,
        optimizer_mb=optimizer_state_mb(model, getattr(args, "optim", "adamw")),
        activations_mb=activations / MB,
        step_seconds=step_seconds,
        total_seconds=step_seconds * steps,
        steps=steps,
        peak_so_far_mb=peak_rss_mb(),
    )


def optimizer_state_mb(model: nn.Module, optim: str = "adamw") -> float:
    """AdamW: two fp32 moments per trainable parameter. adamw8bit (``lorakit.quant.Adam8bit``): two
    1-byte codes plus one fp32 absmax per 256 values each, fp32 moments for tensors under 4096 values."""
    total = 0.0
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        n = p.numel()
        total += 8 * n if optim != "adamw8bit" or n < 4096 else 2 * (n + 4 * -(-n // 256))
    return total / MB


def dequantized_weight_bytes(model: nn.Module) -> float:
    """A quantized linear layer (``QuantLinear``) rebuilds its weight for each matmul: the largest one's
    dequantized copy (a tile of it on the CPU's 4-bit path, ``matmul_scratch_bytes``) is alive at the
    peak of a step; else its fp32 dequantization plus its cast to the compute dtype. Plus what the
    checkpoint recomputations will still add to the pool of kept weights (``recompute_kept_bytes``)."""
    biggest = 0.0
    for m in model.modules():
        if hasattr(m, "matmul_scratch_bytes"):
            biggest = max(biggest, m.matmul_scratch_bytes(next(iter(m.buffers())).device))
        elif hasattr(m, "dequantize_weight") and hasattr(m, "compute_dtype"):
            n = m.in_features * m.out_features
            biggest = max(biggest, n * (4 + torch.empty(0, dtype=m.compute_dtype).element_size()))
    return biggest + max(0, recompute_kept_bytes(model) - autograd4.pooled_bytes())


def recompute_kept_bytes(model: nn.Module) -> int:
    """The pool of W kept from checkpoint recomputations for their backward (``quant.autograd4``): per
    checkpointed block (the innermost modules with ``gradient_checkpointing`` on), its CPU 4-bit weights
    in the compute dtype, first fit within ``KEEP_BYTES``; the largest block's. Resident once a step ran
    (after the probe it is already in "process now", hence the subtraction in the caller)."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    blocks = [m for m in flagged if not any(c is not m and getattr(c, "gradient_checkpointing", False) is True
                                            for c in m.modules())]
    most = 0
    for block in blocks:
        sizes = []
        for m in block.modules():
            buffers = list(m.buffers(recurse=False)) if hasattr(m, "matmul_scratch_bytes") else []
            if buffers and autograd4.applies(m.layout, buffers[0].device):
                sizes.append(m.in_features * m.out_features * torch.empty(0, dtype=m.compute_dtype).element_size())
        most = max(most, autograd4.kept_bytes(sizes))
    return most


def check_fits(model: nn.Module, args, seq_len: int, activations: float) -> None:
    """Refuse a micro-batch whose activations alone are estimated at more than twice the memory the
    machine has available (``MemAvailable``): its first forward would be killed by the kernel's
    out-of-memory killer, with no message and nothing saved. The factor 2 leaves room for the estimate's
    error (``activation_bytes`` is a formula); CPU runs only (a GPU's memory is not this number)."""
    param = next(model.parameters(), None)
    available = available_bytes()
    if param is None or param.device.type != "cpu" or available is None or activations <= 2 * available:
        return
    gib = 1024 ** 3
    raise ConfigError(
        f"batch_size={args.batch_size} with sequences of up to {seq_len} tokens: one micro-batch's activations "
        f"need about {activations / gib:,.1f} GiB (estimated), but this machine has {available / gib:,.1f} GiB "
        "available, so the first step would be killed for lack of memory. Lower batch_size (grad_accum=N keeps "
        "the effective batch), or max_length, or set gradient_checkpointing=true."
    )


def available_bytes() -> int | None:
    """The memory the kernel says new allocations can get (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak RSS so far (kernel high-water mark)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def tensor_mb(params) -> float:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total / MB


def _chunked_loss(model: nn.Module, args) -> bool:
    """Whether the run's loss is ``lorakit.losses.chunked_cross_entropy`` (as the training loop decides)."""
    return (bool(getattr(args, "chunked_ce", False)) and getattr(args, "task", "causal-lm") == "causal-lm"
            and unsupported_reason(model) is None)


def loss_bytes(model: nn.Module, tokens: int, chunked: bool) -> float:
    """Bytes the loss holds at its peak. The plain loss: the fp32 logits with their log-softmax and
    gradient, ≈ 3 (N, V) tensors. The chunked CE (``lorakit.losses``): a trainable head's fused path
    keeps one fp32 (C, V) chunk (its softmax gradient in place) and ∂W; a frozen head read in tiles
    keeps one W tile in fp32, one (C, V_t) logits tile and four (N, H) fp32 accumulators."""
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", 0) or 0
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    if not chunked:
        return tokens * vocab * 4 * 3
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is not None and losses.frozen_weight_tiles(head) is not None:
        rows = min(vocab, max(256, losses.TILE_ELEMENTS // max(h, 1)))
        chunk = min(tokens, max(16, losses.LOGITS_TILE_ELEMENTS // max(rows, 1)))
        return (rows * h + chunk * rows + 4 * tokens * h) * 4
    chunk = min(tokens, losses.default_chunk_tokens(vocab))
    return chunk * vocab * 4 * 2 + tokens * h * 4


def activation_bytes(model: nn.Module, batch_size: int, seq_len: int, bf16: bool, checkpointing: bool,
                     chunked: bool = False) -> float:
    """Bytes autograd keeps for one micro-batch of a transformer (Korthikanti et al. 2022, §4.1).

    Per layer and token a block keeps ≈ 34·h + 5·a·s values at 2 bytes (attention scores included);
    the fp32 equivalent is ≈ 17·h + 2.5·a·s values at 4 bytes each, so the same formula in values ×
    element size. The loss: :func:`loss_bytes` (the plain loss keeps the fp32 logits with their
    softmax, ≈ 3·V values per token; the chunked CE a chunk or a tile of them).
    With checkpointing only each block's input (h values per token) is kept, plus one block at a time.
    """
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    if not h or not layers:  # not a transformer config: count nothing rather than guess
        return 0.0
    tokens = batch_size * seq_len
    values_per_layer = 17 * h + 2.5 * heads * seq_len  # fp32-equivalent values per token
    elem = 2 if bf16 else 4
    per_layer = tokens * values_per_layer * elem
    blocks = (tokens * h * elem * layers + per_layer) if checkpointing else per_layer * layers
    return blocks + loss_bytes(model, tokens, chunked)


def probe_step_seconds(run_micro_batch, repeats: int = 2) -> float:
    """Time ``run_micro_batch()`` (forward + backward of one micro-batch); the first run warms up."""
    import time

    rng = torch.get_rng_state()
    seconds = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_micro_batch()
        seconds = time.perf_counter() - t0
    torch.set_rng_state(rng)
    return seconds


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
