"""The from-scratch Llama against transformers' modeling_llama, component by component."""
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama as hf

from _tiny import TINY, hf_model, mq_from_hf, pair
from minqlora import model as mq
from minqlora.config import LlamaConfig, rope_inv_freq
from minqlora.errors import BadInput
from minqlora.loss import causal_lm_loss

ATOL = 1e-5


def hf_cfg(**kw):
    c = transformers.LlamaConfig(**{**TINY, **kw})
    c._attn_implementation = "eager"
    return c


def causal_additive(B, T):
    m = torch.full((T, T), float("-inf")).triu(1)
    return m.expand(B, 1, T, T)


def test_rmsnorm_matches_hf():
    ref = hf.LlamaRMSNorm(64, eps=1e-5)
    ours = mq.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)
    xb = x.bfloat16()
    assert ours.to(torch.bfloat16)(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_matches_hf(scaling):
    kw = {"rope_parameters": {"rope_theta": 500.0, "rope_type": "default", **(scaling or {})}}
    ref = hf.LlamaRotaryEmbedding(hf_cfg(**kw))
    cfg = LlamaConfig.from_dict(hf_cfg(**kw).to_dict())
    pos = torch.tensor([[0, 1, 2, 5, 100], [3, 4, 5, 6, 7]])
    x = torch.randn(2, 5, 16)
    cos_ref, sin_ref = ref(x, pos)
    cos, sin = mq.rope_cos_sin(cfg, pos, x.dtype)
    torch.testing.assert_close(cos, cos_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rope_inv_freq(cfg), ref.inv_freq, atol=1e-7, rtol=1e-6)


def copy_into(ours, ref):
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize("n_kv", [4, 2, 1])  # no GQA, GQA, multi-query
def test_attention_matches_hf(n_kv):
    c = hf_cfg(num_key_value_heads=n_kv)
    torch.manual_seed(0)
    ref = hf.LlamaAttention(c, 0)
    ours = copy_into(mq.Attention(LlamaConfig.from_dict(c.to_dict()), 0), ref)
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = hf.LlamaRotaryEmbedding(c)(x, pos)
    y_ref, _ = ref(x, (cos, sin), causal_additive(2, 9))
    torch.testing.assert_close(ours(x, cos, sin), y_ref, atol=ATOL, rtol=0)


def test_mlp_and_decoder_layer_match_hf():
    c = hf_cfg()
    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    ref_mlp = hf.LlamaMLP(c)
    ours_mlp = copy_into(mq.MLP(LlamaConfig.from_dict(c.to_dict())), ref_mlp)
    torch.testing.assert_close(ours_mlp(x), ref_mlp(x), atol=ATOL, rtol=0)

    ref = hf.LlamaDecoderLayer(c, 0)
    with torch.no_grad():
        ref.input_layernorm.weight.uniform_(0.5, 1.5)
    ours = copy_into(mq.DecoderLayer(LlamaConfig.from_dict(c.to_dict()), 0), ref)
    pos = torch.arange(6).expand(2, 6)
    cos, sin = hf.LlamaRotaryEmbedding(c)(x, pos)
    y_ref = ref(x, attention_mask=causal_additive(2, 6), position_ids=pos, position_embeddings=(cos, sin))
    torch.testing.assert_close(ours(x, cos, sin), y_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_full_model_logits_and_loss(tied):
    ref, ours = pair(tie_word_embeddings=tied)
    ids = torch.randint(0, 128, (3, 17))
    labels = ids.clone()
    labels[:, :5] = -100
    out = ref(ids, labels=labels)
    logits = ours(ids)
    assert (logits - out.logits).abs().max() < ATOL
    assert abs(causal_lm_loss(logits, labels) - out.loss) < ATOL
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_padded_batch_in_one_pass():
    ref, ours = pair()
    lens = [11, 4, 8]
    T = max(lens)
    ids = torch.randint(3, 128, (3, T))
    keep = torch.tensor([[1] * n + [0] * (T - n) for n in lens])
    # Right padding (training): no mask needed, real positions equal each sequence alone.
    right = ours(ids)
    for b, n in enumerate(lens):
        alone = ref(ids[b:b + 1, :n]).logits[0]
        assert (right[b, :n] - alone).abs().max() < ATOL
    # Left padding (generation): mask and positions given; equals transformers with the same.
    left_ids = torch.stack([torch.cat([ids[b, n:], ids[b, :n]]) for b, n in enumerate(lens)])
    left_mask = torch.stack([torch.cat([keep[b, n:], keep[b, :n]]) for b, n in enumerate(lens)])
    pos = (left_mask.cumsum(1) - 1).clamp(min=0)
    ours_left = ours(left_ids, position_ids=pos, attention_mask=left_mask)
    ref_left = ref(left_ids, attention_mask=left_mask, position_ids=pos).logits
    for b, n in enumerate(lens):
        assert (ours_left[b, T - n:] - ref_left[b, T - n:]).abs().max() < ATOL
        assert (ours_left[b, T - n:] - right[b, :n]).abs().max() < ATOL
    assert torch.isfinite(ours_left).all()


def test_kv_cache_equals_full_forward():
    _, ours = pair()
    ids = torch.randint(3, 128, (2, 12))
    full = ours(ids)
    cache = mq.KVCache(ours.config, batch=2, max_len=16, dtype=torch.float32, device="cpu")
    steps = [ours(ids[:, :7], kv_cache=cache)]
    steps += [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 10)]
    steps.append(ours(ids[:, 10:12], kv_cache=cache))  # several tokens on top of a cache
    assert cache.pos == 12
    assert (torch.cat(steps, 1) - full).abs().max() < ATOL
    with pytest.raises(ValueError, match="KV cache holds 16 slots"):
        ours(ids[:, :5], kv_cache=cache)


def test_gradient_checkpointing_same_gradients():
    _, ours = pair()
    ids = torch.randint(3, 128, (2, 9))
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.train()
        ours.model.gradient_checkpointing = ckpt
        causal_lm_loss(ours(ids), ids).backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("key,value,msg", [
    ("model_type", "gpt2", "model_type='gpt2' is not Llama-like"),
    ("attention_bias", True, "attention_bias=True is not supported"),
    ("mlp_bias", True, "mlp_bias=True is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic' is not implemented"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "'yarn' is not implemented"),
    ("num_key_value_heads", 3, "does not divide num_attention_heads"),
])
def test_config_refuses_what_it_cannot_run(tmp_path, key, value, msg):
    import json
    (tmp_path / "config.json").write_text(json.dumps({**TINY, key: value}))
    with pytest.raises(BadInput, match=msg) as e:
        LlamaConfig.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_config_reads_old_and_new_rope_spelling():
    old = LlamaConfig.from_dict({**TINY, "rope_theta": 500000.0, "head_dim": 32, "architectures": ["X"]})
    new = LlamaConfig.from_dict({**TINY, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}})
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.head_dim == 32 and new.head_dim == 16
    assert old.extra == {"architectures": ["X"]} and old.to_dict()["architectures"] == ["X"]


def test_config_defaults_equal_transformers_for_omitted_keys():
    ref = transformers.LlamaConfig()
    ours = LlamaConfig.from_dict({})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
