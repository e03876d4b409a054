"""Tiny random Llama models shared by the tests: a transformers model and a minqlora model
holding the same weights, so any difference in outputs is a difference in code."""
import torch

from minqlora.config import LlamaConfig
from minqlora.model import LlamaForCausalLM

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)


def hf_model(seed=0, **overrides):
    import transformers
    kw = {**TINY, **overrides}
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones; random norms make the test stronger
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def mq_from_hf(hf) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_dict(hf.config.to_dict())
    m = LlamaForCausalLM(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    m.load_state_dict(sd, strict=True)
    return m


def pair(seed=0, **overrides):
    hf = hf_model(seed, **overrides)
    return hf, mq_from_hf(hf)
