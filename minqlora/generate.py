"""Text generation with a preallocated KV cache: prefill the prompt once, then one token per step.

A batch of prompts of different lengths is left-padded into one cache: every row's keys and values
live in the same slots, an attention mask over all slots hides the padding, and per-row position ids
give each real token the RoPE position it has when the prompt runs alone; so each sequence gets what
it would get alone, token for token (gpt-fast's `generate`, with transformers' batching semantics).
Logit processing follows transformers' `generate`, in its order: repetition penalty
(RepetitionPenaltyLogitsProcessor), then temperature, top-k and top-p (nucleus, Holtzman et al.
2019) when sampling. Checked against transformers' greedy `generate` in tests/test_generate.py.

Context: a prompt must leave room for one new token (prompt length < max_position_embeddings), or
PromptTooLongError names it; `max_new_tokens` is clamped per row so prompt + new <= the context.
No paper section.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm import tqdm

from . import fused
from .cudagraph import capture
from .model import KVCache


class PromptTooLongError(ValueError):
    pass


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside, the model's train/eval state restored after (dropout off while scoring)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


DECODE_MODES = ("auto", "plain", "static", "graph", "compile")
CACHE_BUCKET = 256  # "compile": cache slots rounded up to a multiple of this, so one compiled step serves
# every call in the bucket (a new shape is a new compilation, tens of seconds on a GPU)
# Inductor's options for "compile". Coordinate-descent tuning also makes inductor write batch-1 matmuls
# (the fp32 LoRA path's A and B, lm_head) as reductions it can fuse with their casts, scale and add (gpt-fast);
# emulate_precision_casts rounds fused bf16 intermediates where eager rounds them. With it a random 7B's first
# 32 greedy tokens equalled eager's in one run and parted at token 25 in the next (bench/NOTES.md, #10, #14).
COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "emulate_precision_casts": True}
_compiled = None


def _graphs_on(device) -> bool:
    """Whether CUDA graphs serve decoding on this device (tests stand in for them on the CPU)."""
    return device.type == "cuda"


def model_step(model, cache, tok, pos, key_mask):
    """The static decode step: logits (B, 1, V) for tokens tok (B, 1) at positions pos (B, 1)."""
    return model(tok, position_ids=pos, attention_mask=key_mask, kv_cache=cache)


def compiled_step():
    """model_step through torch.compile, built once: dynamo keeps one compiled graph per shape set."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(model_step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)
    return _compiled


class Decoder:
    """One decode step for every row: the model on one new token per row, against the KV cache.

    plain: the model called as is, on the slots filled so far (the path the reading guide walks).
    static: the cache's fixed-shape form (every slot, written at a slot tensor), still called eagerly.
    graph: the static step captured once as a CUDA graph and replayed each token: one launch instead of
    a few thousand small ones, which is what bounds batch-1 decoding (the fast path; "auto" on CUDA). The
    prompt and the step run with fused.py's kernels, which give the plain modules' bits in fewer launches.
    compile: the static step through torch.compile (elementwise work fused, batch-1 LoRA matmuls as fused
    reductions), then captured as graph is; the first call of a shape compiles (~100 s for a 7B), and its
    fused kernels round differently, so it is chosen only when asked for (bench/NOTES.md #10, #14).
    Static equals plain token for token on CPU (tests/test_generate.py), graph equals plain bit for bit on the
    GPU (tests/test_fused.py; the benchmark's G1 gate). Compile's tokens equal plain's in fp32 on CPU (the same
    test); in bf16 on a GPU the first 32 greedy tokens of a random 7B (near-tied logits) equalled plain's in one
    run and not in another, so it is not the default.
    A decoder kept in a DecodeGraphs serves later batches of its shape: start() takes the new prompts.
    """

    def __init__(self, model, cache: KVCache, key_mask, mode: str):
        self.model, self.cache, self.key_mask, self.mode, self.graph = model, cache, key_mask, mode, None
        self.seen, self.prefills = set(), {}  # prompt lengths met; P -> captured prefill (graph, logits, inputs)
        if mode != "plain":
            B = key_mask.shape[0]
            self.tok = torch.zeros(B, 1, dtype=torch.long, device=key_mask.device)  # (B, 1) static inputs
            self.pos = torch.zeros(B, 1, dtype=torch.long, device=key_mask.device)  # (B, 1)
            self.slot = torch.zeros(1, dtype=torch.long, device=key_mask.device)  # (1,) the slot written
            cache.slots = self.slot

    def prefill(self, tokens, positions, key_mask):
        """Logits (B, 1, V) of the prompts tokens (B, P), whose keys and values fill slots 0..P-1. In graph mode
        a prompt length met before in this decoder's life runs from a captured graph: a capture costs three
        forwards, so it pays only when a shape comes back (the decoder kept in a DecodeGraphs)."""
        P = tokens.shape[1]

        def forward(t=tokens, p=positions, m=key_mask):
            self.cache.static, self.cache.pos = False, 0
            return self.model(t, position_ids=p, attention_mask=m, kv_cache=self.cache, last_only=True)

        if self.mode != "graph" or not _graphs_on(tokens.device):
            return forward()
        if P not in self.seen:  # first time: eager, and remember the length
            self.seen.add(P)
            return forward()
        if P not in self.prefills:
            if len(self.prefills) >= 4:  # at most 4 prompt graphs a decoder: the oldest goes
                self.prefills.pop(next(iter(self.prefills)))
            bufs = (tokens.clone(), positions.clone(), key_mask.clone())  # the graph's fixed inputs
            self.prefills[P] = (*capture(lambda: forward(*bufs)), bufs)
        graph, out, bufs = self.prefills[P]
        for buf, new in zip(bufs, (tokens, positions, key_mask)):
            buf.copy_(new)
        graph.replay()
        self.cache.pos = P
        return out

    def start(self, lengths, prompt_len: int):
        """A new batch of prompts (lengths (B,), left-padded to prompt_len) whose prompt fills the cache."""
        self.lengths, self.P = lengths, prompt_len

    def _static_step(self):
        step = compiled_step() if self.mode == "compile" else model_step
        return step(self.model, self.cache, self.tok, self.pos, self.key_mask)

    def __call__(self, nxt, t: int):
        """Feed each row's token `nxt` (B,) at its step t; return the logits (B, 1, V)."""
        if self.mode == "plain":
            return self.model(nxt[:, None], position_ids=(self.lengths + t)[:, None],
                              attention_mask=self.key_mask[:, :self.P + t + 1], kv_cache=self.cache)
        self.tok.copy_(nxt[:, None])
        self.pos.copy_((self.lengths + t)[:, None])
        self.slot.fill_(self.P + t)
        if self.mode == "static" or not _graphs_on(self.tok.device):  # no CUDA graphs off CUDA
            return self._static_step()
        if self.graph is None:  # captured at the first step; the warm-up writes slot P, which it rewrites
            self.graph, self.out = capture(self._static_step)
        self.graph.replay()
        return self.out


class DecodeGraphs:
    """Decoders kept between generate_ids calls of one model, each with its KV cache, static inputs and
    captured CUDA graph: a capture costs three eager steps (~0.15 s for a 7B), once per shape (batch,
    cache slots rounded up to CACHE_BUCKET) instead of once per batch. At most `keep` shapes are kept, each
    holding its cache (a 7B at batch 8 and 512 slots: 2 GiB) and its graphs' memory; a new shape drops the
    oldest before it allocates. The model must not be rebuilt or re-dtyped while it lives."""

    def __init__(self, keep: int = 1):
        self.keep, self.decoders = keep, {}

    def get(self, key, make):
        """The decoder kept for `key`; else `make()`'s, kept."""
        if key not in self.decoders:
            while len(self.decoders) >= self.keep:
                self.decoders.pop(next(iter(self.decoders)))  # the oldest shape's cache and graphs go first
            self.decoders[key] = make()
        return self.decoders[key]


def repetition_penalty_(logits, seen, penalty: float):
    """In place: tokens already seen get positive logits divided and negative ones multiplied."""
    if penalty != 1.0:
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    return logits


def top_k_top_p(logits, top_k: int = 0, top_p: float = 1.0):
    """Set to -inf every logit outside the top k, and outside the smallest set holding p of the mass."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # As transformers' TopPLogitsWarper: sort ascending, drop the tokens whose cumulative mass
        # stays within 1 - p; the most likely token always survives.
        sorted_logits, order = torch.sort(logits, dim=-1)  # (B, V) ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits, seen, *, do_sample, temperature, top_k, top_p, repetition_penalty, generator):
    """The next token of every row (B,), from the last position's logits (B, V)."""
    logits = repetition_penalty_(logits.float(), seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling (use greedy instead)")
    logits = top_k_top_p(logits / temperature, top_k, top_p)
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], *, eos_ids, max_new_tokens: int, pad_id: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
                 names: list[str] | None = None, decode: str = "auto",
                 graphs: DecodeGraphs | None = None) -> list[list[int]]:
    """Generate for one batch of token-id prompts; return each row's new tokens (its stop token included).

    Greedy unless do_sample. A row stops at any of `eos_ids`, after max_new_tokens, or at the
    model's context; the batch stops when every row has. `names` label prompts in errors.
    `decode`: how each step runs (see Decoder); "auto" is "graph" on CUDA, "plain" elsewhere; "compile"
    is the fastest on CUDA once compiled, for long generations. `graphs` (a DecodeGraphs, on CUDA) keeps the
    captured decode step between calls of one model, so a later batch of the same shape skips the capture.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: must be one of {DECODE_MODES}")
    if not prompt_ids:
        return []
    with eval_mode(model):
        return _generate_batch(model, prompt_ids, eos_ids, max_new_tokens, pad_id, names, decode, graphs, dict(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, generator=generator))


def check_context(prompt_ids, ctx: int, names=None):
    for i, ids in enumerate(prompt_ids):
        name = names[i] if names else f"prompt {i}"
        if not ids:
            raise PromptTooLongError(f"{name} is empty (no tokens)")
        if len(ids) >= ctx:
            raise PromptTooLongError(f"{name} has {len(ids)} tokens; the model's context "
                                     f"(max_position_embeddings) is {ctx}, leaving no room to generate")


def _generate_batch(model, prompt_ids, eos_ids, max_new_tokens, pad_id, names, decode, graphs, sampling):
    cfg = model.config
    ctx = cfg.max_position_embeddings
    check_context(prompt_ids, ctx, names)
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)  # (B,)
    B, P = len(prompt_ids), int(lengths.max())
    limits = (ctx - lengths).clamp(max=max_new_tokens)  # (B,) new tokens each row may add
    steps = int(limits.max())
    if steps <= 0:
        return [[] for _ in prompt_ids]

    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)  # (B, P) left-padded
    for i, ids in enumerate(prompt_ids):
        tokens[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long, device=device)
    if decode == "auto":
        decode = "graph" if device.type == "cuda" and steps > 1 else "plain"
    S_max = P + steps
    reuse = graphs is not None and decode in ("graph", "compile") and _graphs_on(device)
    if decode == "compile" or reuse:  # one compiled step / captured graph then serves every call in the bucket
        S_max = -(-S_max // CACHE_BUCKET) * CACHE_BUCKET  # slots past P + steps are never attended
    key_mask = torch.ones(B, S_max, dtype=torch.long, device=device)  # (B, S_max) 1 = real
    key_mask[:, :P] = torch.arange(P, device=device)[None, :] >= (P - lengths)[:, None]
    positions = (key_mask[:, :P].cumsum(1) - 1).clamp(min=0)  # (B, P) each row's own positions
    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)  # (B, V)
    for i, ids in enumerate(prompt_ids):  # padding is no part of any prompt
        seen[i, torch.tensor(ids, device=device)] = True

    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    def make():
        return Decoder(model, KVCache(cfg, B, S_max, dtype, device), torch.empty_like(key_mask), decode)

    step = graphs.get((id(model), B, S_max, dtype, decode), make) if reuse else make()
    step.key_mask.copy_(key_mask)  # a kept decoder's graph reads this buffer: new contents, same tensor
    cache = step.cache  # slots left by an earlier batch are rewritten before any is attended
    with fused.kernels(decode == "graph"):  # the fused kernels give the plain bits in fewer launches
        logits = step.prefill(tokens, positions, key_mask[:, :P])  # (B, 1, V): slots 0..P-1 filled
        cache.static = decode != "plain"  # decode steps then see every slot, unwritten ones masked
        step.start(lengths, P)
        out = torch.full((B, steps), pad_id, dtype=torch.long, device=device)  # (B, steps)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n_new = torch.zeros(B, dtype=torch.long, device=device)
        for t in range(steps):
            nxt = next_tokens(logits[:, -1], seen, **sampling)  # (B,)
            nxt = torch.where(done, pad_id, nxt)
            out[:, t] = nxt
            n_new += (~done).long()
            seen[torch.arange(B, device=device), nxt] |= ~done
            done |= torch.isin(nxt, eos) | (n_new >= limits)
            if bool(done.all()):
                break
            logits = step(nxt, t)  # (B, 1, V)
    return [out[i, :n].tolist() for i, n in enumerate(n_new.tolist())]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """BOS + the prompt's tokens, as the course's scripts feed a prompt."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return [bos + tokenizer.encode(p) for p in prompts]


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the tokenizer's eos and stop ids and config.json's eos ids."""
    ids = set(model.config.eos_token_ids) | set(getattr(tokenizer, "stop_ids", ()))
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return sorted(ids)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None, names: list[str] | None = None,
             progress: bool = True) -> list[str]:
    """Generate a completion of every prompt (BOS + prompt tokens); return the decoded new text.

    Prompts are batched by length (similar lengths together, less padding) and results returned in
    input order; special tokens are dropped from the text. With do_sample, `seed` fixes the draw
    for a given batch_size. Every prompt is checked against the context before any generation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    ids = encode_prompts(tokenizer, prompts)
    names = names or [f"prompt {i}" for i in range(len(prompts))]
    check_context(ids, model.config.max_position_embeddings, names)  # all of them, before any work
    device = model.lm_head.weight.device
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    results: list[str | None] = [None] * len(ids)
    eos = stop_ids(model, tokenizer)
    graphs = DecodeGraphs()  # batches of one shape share one captured decode step
    with eval_mode(model), tqdm(total=len(ids), desc="generating", unit="example",
                                 disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new = generate_ids(model, [ids[i] for i in batch], eos_ids=eos,
                               max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                               do_sample=do_sample, temperature=temperature, top_k=top_k,
                               top_p=top_p, repetition_penalty=repetition_penalty,
                               generator=generator, names=[names[i] for i in batch], graphs=graphs)
            for i, toks in zip(batch, new):
                results[i] = tokenizer.decode(toks, skip_special=True)
            bar.update(len(batch))
    return results
