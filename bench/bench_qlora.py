"""minqlora's side of the peer benchmark: the same measurements as the transformers + peft + bitsandbytes
baseline (`hf_qlora_baseline.py`, qlora.py's settings), on the same random Llama-2-7B-shaped checkpoint.

Loads the checkpoint in NF4 with double quantization and bf16 compute, LoRA r=64 alpha=16 on every linear
but lm_head, gradient checkpointing, paged AdamW 32-bit; times training micro-steps, forward-only
perplexity batches and greedy KV-cached generation. One JSON line per measurement, same keys as the peer's,
so the two outputs of one run on one card give the ratios. Run the peer first: it writes the checkpoint.

    python bench/bench_qlora.py --ckpt /tmp/llama2-7b-random
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from minqlora.generate import generate_ids  # noqa: E402
from minqlora.loader import load_model  # noqa: E402
from minqlora.lora import apply_lora  # noqa: E402
from minqlora.loss import causal_lm_loss  # noqa: E402


def log(**kw):
    print(json.dumps({"impl": "minqlora", **kw}), flush=True)


def load(path):
    t = time.time()
    model = load_model(path, bits=4, quant_type="nf4", double_quant=True, dtype=torch.bfloat16,
                       device="cuda", progress=False)
    apply_lora(model, r=64, alpha=16, dropout=0.01, targets="all")  # freezes the rest, prints counts
    model.model.gradient_checkpointing = True
    log(event="loaded", seconds=round(time.time() - t, 1),
        mem_gib=round(torch.cuda.memory_allocated() / 2**30, 2))
    return model


def train_speed(model, batch, seq, accum, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)

    def step():
        for _ in range(accum):
            ids = torch.randint(3, 32000, (batch, seq), device="cuda", generator=g)
            labels = ids.clone()
            labels[:, : seq // 2] = -100  # source tokens are not scored
            loss = causal_lm_loss(model(ids), labels) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.time() - t
    log(event="train", batch=batch, seq=seq, accum=accum, opt_steps=steps,
        tokens_per_s=round(steps * accum * batch * seq / dt, 1), s_per_opt_step=round(dt / steps, 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del opt
    torch.cuda.empty_cache()


@torch.inference_mode()
def eval_speed(model, n, seq, batch):
    model.eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(3, 32000, (n, seq), device="cuda", generator=g)
    model(ids[:batch])
    torch.cuda.synchronize()
    t = time.time()
    for i in range(0, n, batch):
        model(ids[i:i + batch])
    torch.cuda.synchronize()
    log(event="eval_forward", examples=n, seq=seq, batch=batch, examples_per_s=round(n / (time.time() - t), 2))


def gen_speed(model, prompt_len, new_tokens):
    model.eval()
    prompt = torch.randint(3, 32000, (prompt_len,)).tolist()
    generate_ids(model, [prompt], eos_ids=[], max_new_tokens=4)
    torch.cuda.synchronize()
    t = time.time()
    out = generate_ids(model, [prompt], eos_ids=[], max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    log(event="generate", prompt=prompt_len, new_tokens=len(out[0]),
        tokens_per_s=round(len(out[0]) / (time.time() - t), 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    log(event="env", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    model = load(args.ckpt)
    train_speed(model, batch=1, seq=256, accum=16, steps=args.steps)  # the seed's setting
    train_speed(model, batch=16, seq=256, accum=1, steps=args.steps)  # same tokens per step, one pass
    eval_speed(model, n=64, seq=256, batch=1)
    eval_speed(model, n=64, seq=256, batch=16)
    gen_speed(model, prompt_len=64, new_tokens=128)


if __name__ == "__main__":
    main()
