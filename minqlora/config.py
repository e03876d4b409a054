"""The model's shape, read from a checkpoint's config.json.

Field names are config.json keys, so `LlamaConfig.from_json(path)` is a key-by-key copy. Anything
this code cannot run faithfully (another architecture, biases, an activation other than SiLU, a
RoPE scaling type not written here) is refused with the key named, never run silently wrong.
No paper section (the Llama architecture). Checked against transformers' LlamaConfig in tests/test_model.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInput

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")



# Keys a config.json must have: the model's sizes (a missing one would silently take Llama-2-7B's).
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class LlamaConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 32000
    max_position_embeddings: int = 2048  # defaults are transformers' LlamaConfig's, for keys a file omits
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # transformers < 5 spelling
    rope_parameters: dict | None = None  # transformers >= 5 spelling (holds rope_theta too)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral; sequences longer than it are refused
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept for saving

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:  # transformers 5 moves rope_theta and the scaling into one dict
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if self.rope_parameters.get("rope_type", "default") != "default":
                self.rope_scaling = self.rope_parameters
        self.validate()

    def validate(self):
        def refuse(key, why):
            raise BadInput(f"config.json: {key}={getattr(self, key)!r} {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            refuse("model_type", f"is not Llama-like; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.hidden_act != "silu":
            refuse("hidden_act", "is not supported (Llama's MLP is SwiGLU: silu)")
        if self.attention_bias:
            refuse("attention_bias", "is not supported (Llama attention has no biases)")
        if self.mlp_bias:
            refuse("mlp_bias", "is not supported (Llama's MLP has no biases)")
        if self.num_attention_heads % self.num_key_value_heads:
            refuse("num_key_value_heads", f"does not divide num_attention_heads={self.num_attention_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise BadInput(f"config.json: rope_scaling type {kind!r} is not implemented; "
                                  f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "vocab_size", "head_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                refuse(key, "must be a positive integer")

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        elif path.is_file() and path.suffix != ".json":
            raise BadInput(f"{path}: is a file, not a model folder; give the folder that holds config.json, "
                           "the weights and the tokenizer")
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json; a model folder needs one")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}")
        missing = [k for k in REQUIRED if isinstance(d, dict) and k not in d]
        if missing:  # the defaults are Llama-2-7B's: a smaller checkpoint would fail later as a shape mismatch
            raise BadInput(f"{path}: no {', '.join(map(repr, missing))}; a Llama config.json names the model's "
                           f"sizes ({', '.join(REQUIRED)})")
        try:
            return cls.from_dict(d)
        except BadInput as e:
            raise BadInput(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return {k: v for k, v in d.items() if v is not None or k == "pad_token_id"}


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with the config's scaling (fp32)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":  # positions divided by the factor
        return inv_freq / s["factor"]
    if kind == "llama3":  # long wavelengths slowed by `factor`, a smooth ramp in between (Llama 3.1)
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, blended, scaled)
    return inv_freq  # "default"
