"""The benchmark's correctness gates: before its lines are trusted, each training fast path is compared with the
plain eager path on the same step (fp32: loss within 1e-2 relative, LoRA-gradient cosine >= 0.999), and the
one-call optimizer with bitsandbytes' per-tensor PagedAdamW32bit (equal to the bit). GPU only."""
import contextlib

import bitsandbytes as bnb
import torch

from minqlora import accumulate, compiled
from minqlora.lora import computing_in, lora_modules
from minqlora.optim import build_optimizer
from minqlora.trainer import accumulate_gradients

from bench_decode import compute_in  # this folder
from workloads import PASS_TOKENS, log, random_window  # this folder


def configure(model, *, pass_tokens=0, graphs=None):
    return lambda win: accumulate_gradients(model, win, "cuda", "example", pad_id=0, pass_tokens=pass_tokens,
                                            graphs=graphs)


def grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])


def gate_train(model, g, with_compiled=False):
    """Each training fast path against the plain path (batch-1 eager passes) on the same step, dropout at 0.

    The pass/fail gate computes in fp32: it checks that a fast path computes the same function. In bf16
    a random 7B network amplifies rounding, so that two valid orders of the same sums already differ
    (packing at 512 vs 4096 tokens a pass): those cosines are logged beside the gate, for reference."""
    win = random_window(g, 1, 256, 16)
    with gate_weights(model):
        gate_paths(model, win, with_compiled)


def gate_optimizer(model, steps=3):
    """The one-call optimizer (optim.FlatPagedAdamW) against bitsandbytes' per-tensor PagedAdamW32bit on the
    GPU: copies of the LoRA tensors of the first layer, the same gradients, `steps` updates: equal to the bit."""
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n]
    g = torch.Generator(device="cuda").manual_seed(0)
    start = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(steps)]
    out = []
    for make in (lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-2, weight_decay=0.0),
                 lambda ps: build_optimizer(ps, "paged_adamw_32bit", lr=1e-2)):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(ps)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        out.append(ps)
    equal = all(torch.equal(a, b) for a, b in zip(*out))
    log(event="gate", line="optimizer (one call vs bnb per tensor)", tensors=len(shapes), steps=steps, ok=equal)


def fresh_compile():
    """Forget compiled graphs (they stay wrapped, and compile again on their next call), so that a "-compile"
    line sees only its own shapes, as a training run would: shapes of earlier lines (the fp32 gate, T1's
    varied pass lengths) would otherwise leave it the dynamic-length graph."""
    torch._dynamo.reset()


@contextlib.contextmanager
def gate_weights(model):
    """A gate's setting: a non-zero LoRA B (so that lora_A gets gradients too; the same on every process, the
    same seed), dropout 0; on leaving, the fresh adapter (B = 0, no gradients) and the dropout it had."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 1e-3)
    drops = [m.lora_dropout for m in lora_modules(model).values() if hasattr(m.lora_dropout, "p")]
    saved = [d.p for d in drops]
    for d in drops:
        d.p = 0.0
    try:
        yield
    finally:
        for d, p in zip(drops, saved):
            d.p = p
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.zero_()


def gate_paths(model, win, with_compiled):
    """gate_train's comparisons on one window: fp32 gates, then the bf16 figures logged for reference."""
    model.train()  # as in training (checkpointing on)
    packed = dict(pass_tokens=PASS_TOKENS)
    compiled_variant = (("T1-compile", packed),) if with_compiled else ()  # the packed pass, layers compiled
    for dtype, variants in ((torch.float32, (("T1-strict", dict(graphs=accumulate.GraphedLoss(pad_id=0))),
                                             ("T1", packed)) + compiled_variant),
                            (torch.bfloat16, (("T1", packed), ("T1 at 512 tokens a pass", dict(pass_tokens=512)),
                                              ("plain+lora16", {}), ("T1+lora16", packed))
                             + compiled_variant + tuple((n + "+lora16", kw) for n, kw in compiled_variant))):
        compute_in(model, dtype)
        results = {}
        for name, kw in (("plain", {}),) + variants:
            model.zero_grad(set_to_none=True)
            # "+lora16": the LoRA matmuls in bf16 (--lora_in_compute_dtype), against the fp32-LoRA plain path
            with (contextlib.nullcontext() if "-compile" in name else compiled.eager()), \
                    computing_in(model, torch.bfloat16 if name.endswith("+lora16") else None):
                loss = float(configure(model, **kw)(win))
            results[name] = (loss, grads(model))
        ref_loss, ref_grad = results.pop("plain")
        for name, (loss, grad) in results.items():
            rel = abs(loss - ref_loss) / abs(ref_loss)
            cos = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
            ok = rel <= 1e-2 and cos >= 0.999
            if dtype == torch.float32:
                log(event="gate", line=name, dtype="float32", loss_rel=rel, grad_cos=cos, ok=ok)
            else:
                log(event="bf16_reference", line=name, loss_rel=rel, grad_cos=cos)
        torch.cuda.empty_cache()
