"""Fast path for training passes: torch.compile over each decoder layer (--torch_compile; off by default).

Why (bench/NOTES.md, attempt 13): a 16 x 256 training pass is GPU-bound, and about 40% of its GPU time is
elementwise work between the matmuls, ~90 kernels a layer: the fp32 LoRA path's casts, dropout and adds,
RMSNorm in fp32, RoPE's concatenation, SwiGLU. Inductor fuses each run of them into one kernel (and writes
the backward's the same way), so fewer bytes cross memory and the CPU issues fewer kernels; the matmuls,
bitsandbytes' dequantization and attention stay the kernels the eager path calls.

What: `compile_layers` calls `nn.Module.compile` on every DecoderLayer. It compiles in place, so parameter
names, the state dict and the saved adapters are unchanged; the model's code (model.py, nf4.py, lora.py)
is the same code, traced. All layers share one compiled graph (their parameters are graph inputs); layer 0
gets its own (its input needs no gradient), as does a batch of one row (dynamo specializes size-1
dimensions); a second length turns the length into a symbol, so other lengths reuse that graph. The first
pass of each compiles (tens of seconds for a 7B on a GPU). Gradient checkpointing wraps the compiled layer
(model.py) and recomputes it in backward with the forward's RNG state, hence the forward's dropout masks.

Only training passes run compiled: `eager()` wraps evaluation (and the benchmark's plain reference), where
every new batch shape would otherwise be a new compilation. CUDA-graph passes (--cuda_graphs) are not
compiled: the two do not combine here.

Checked: tests/test_compiled.py (CPU, fp32, 4-bit + LoRA, checkpointing): the loss and LoRA gradients of a
compiled pass equal the eager pass's; with dropout, a checkpointed compiled pass gives the gradient of the
masks its forward drew. On a GPU: the benchmark's fp32 gate (bench/gates.py, T1-compile against the
plain path). No paper section.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import BadInput

RECOMPILE_LIMIT = 16  # graphs per layer code: grad/no-grad input x one-row/many-row batch x static/dynamic length


def choose(torch_compile: bool, cuda_graphs: bool, device) -> tuple[bool, str | None]:
    """--torch_compile -> (compile or not, the choice in words, for train.py to print)."""
    if not torch_compile:
        return False, None
    if cuda_graphs:
        raise BadInput("--torch_compile True and --cuda_graphs True do not combine: choose one")
    return True, ("decoder layers compiled with torch.compile (--torch_compile): the first pass of each shape "
                  "compiles" + (", tens of seconds on a GPU" if device.type == "cuda" else ""))


def compile_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer in place; returns how many. Evaluation should run under `eager()`."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    layers = model.model.layers
    for layer in layers:
        # Not fullgraph: past RECOMPILE_LIMIT a layer then runs eagerly (with a warning) instead of stopping
        # a long run; tests/test_compiled.py checks that the layer compiles without a graph break.
        layer.compile()
    return len(layers)


def eager():
    """Run whatever was compiled eagerly inside this block (evaluation, reference passes)."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()  # pragma: no cover (torch < 2.6 has no stance, nor compile_layers' use)
