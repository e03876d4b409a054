"""Llama, from scratch: the decoder-only transformer that QLoRA fine-tunes.

Plain PyTorch, no NF4 and no LoRA here: nf4.py and lora.py wrap this model's nn.Linear layers from
outside, after it is built. (Decoding on a GPU runs three elementwise chains here, RMSNorm, RoPE and SwiGLU,
as fused kernels with the same bits: fused.py; the code below is what they compute.) Module and parameter names equal the Hugging Face checkpoint keys
(`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`), so loading is a name-by-name copy.
Architecture: Touvron et al. 2023 (Llama 2) §2; RoPE: Su et al. 2021; GQA: Ainslie et al. 2023.
Checked layer by layer against transformers' modeling_llama in tests/test_model.py.

Shape legend:
    B  batch            T  new tokens in this call       S  key/value slots (cache + new)
    C  hidden_size      nh attention heads               nkv key/value heads (GQA: nkv divides nh)
    hd head_dim         I  intermediate_size             V  vocab_size
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fused
from .config import LlamaConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if fused.active(x):  # inference on a GPU: the same arithmetic in 3 kernels instead of 8 (fused.py)
            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()  # the mean of squares in fp32, whatever the model's dtype
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(cfg: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for each position: (B, T, hd), computed in fp32 and cast to `dtype`."""
    inv_freq = rope_inv_freq(cfg, device=position_ids.device)  # (hd/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # rotate_half layout: HF checkpoints store q/k rows in this order, so weights load unpermuted.
    return x * cos[:, None] + rotate_half(x) * sin[:, None]  # x (B, h, T, hd), cos (B, 1, T, hd)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` slots and filled left to right.

    Slot s of every row holds the token fed at step s; a row's RoPE position may differ from its
    slot (left padding), which the caller expresses with position_ids and an attention mask.
    `static = True` (set by generate.py after the prompt) is the CUDA-graph form: every call sees all
    `max_len` slots and writes the slots of a tensor the caller sets (`slots`): shapes never change.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        # One tensor a layer, not views of one (L, ...) tensor: a compiled step (generate.py) then
        # writes each layer's slot in place instead of copying the whole cache back.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0  # slots filled so far (dynamic form)
        self.max_len = max_len
        self.static = False
        self.slots: torch.Tensor | None = None  # static form: (T,) the slots this call writes

    def update(self, layer: int, k, v):
        """Write this call's keys/values (B, nkv, T, hd); return all slots so far (B, nkv, S, hd)."""
        if self.static:  # S = max_len; slots not yet written are masked out by the caller's mask
            self.k[layer].index_copy_(2, self.slots, k)
            self.v[layer].index_copy_(2, self.slots, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if fused.active(q) and fused.rope_fits(q, cos):  # the same bits in 2 kernels instead of 10 (fused.py)
            q, k = fused.rope_pair(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        if self.nkv != self.nh:  # GQA: each key/value head serves nh/nkv query heads
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)  # (B, nh, S, hd)
        # SDPA takes the softmax in fp32 internally; mask None means plain causal (or one new token).
        causal = mask is None and T > 1  # an `if`, not a flag: a compiled layer (compiled.py) may see T symbolic
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True if causal else False)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU: (B, T, C) -> (B, T, I) -> (B, T, C)
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fused.silu_mul(g, u) if fused.active(g) else F.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing it

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None):
        B, T = input_ids.shape
        if kv_cache is not None and kv_cache.static:  # fixed shapes: the caller sets slots and positions
            if position_ids is None:
                raise ValueError("a static KV cache needs explicit position_ids")
            S, q_slot = kv_cache.max_len, kv_cache.slots  # q_slot (T,)
        else:
            start = 0 if kv_cache is None else kv_cache.pos
            S = start + T
            if kv_cache is not None and S > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} slots; this call needs {S}")
            if position_ids is None:
                position_ids = torch.arange(start, S, device=input_ids.device).expand(B, T)  # (B, T)
            plain_causal = attention_mask is None and (start == 0 or T == 1)
            q_slot = None if plain_causal else torch.arange(start, S, device=input_ids.device)  # (T,)
        window = self.config.sliding_window
        if window is not None and S > window:
            raise ValueError(f"sequence of {S} tokens exceeds sliding_window={window}, "
                             "which this implementation does not apply")
        mask = None if q_slot is None else self.attention_mask(q_slot, S, attention_mask)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)  # (B, T, hd)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None and not kv_cache.static:
            kv_cache.pos = S
        return self.norm(x)

    @staticmethod
    def attention_mask(q_slot, S, key_mask):
        """A bool mask (B or 1, 1, T, S), True = may attend: query slots `q_slot` (T,) see slots <= their own.

        key_mask (B, S) marks real tokens 1 and padding 0 over every slot so far. Right padding
        needs no mask (real tokens never look right); left padding and cached steps do.
        """
        k_slot = torch.arange(S, device=q_slot.device)[None, :]  # (1, S)
        mask = (k_slot <= q_slot[:, None])[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :S].bool()  # (B, 1, T, S)
            # A padding query would see no key at all (NaN); let it see itself. Its output is unused.
            mask = mask | (k_slot == q_slot[:, None])[None, None]
        return mask


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None,
                last_only=False):
        """Logits (B, T, V) for every position, or (B, 1, V) for the last one with last_only."""
        h = self.model(input_ids, position_ids, attention_mask, kv_cache)  # (B, T, C)
        if last_only:
            h = h[:, -1:]  # (B, 1, C)
        return self.lm_head(h)
