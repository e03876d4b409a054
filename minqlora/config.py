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

from .errors import BadInput, is_int, is_number

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Each RoPE scaling type and the keys rope_inv_freq reads from its dict (each a finite number > 0).
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
SUPPORTED_ROPE_TYPES = tuple(ROPE_KEYS)


# What each word of a field's annotation admits, and how a refusal says it (_admits adds the bounds).
# Integers are sizes (>= 1) except the *_token_id fields (any: early Llama conversions say pad_token_id -1);
# floats (rms_norm_eps, rope_theta) are > 0.
_TYPES = {
    "int": (is_int, "a whole number"),
    "float": (is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "an object {...}"),
    "list[int]": (lambda v: isinstance(v, list) and all(is_int(x) for x in v), "a list of whole numbers"),
    "None": (lambda v: v is None, "null"),
}


def _admits(name: str, word: str, value) -> bool:
    """Whether `value` is what one word of field `name`'s annotation allows (see _TYPES)."""
    if not _TYPES[word][0](value):
        return False
    if word == "int":
        return name.endswith("_token_id") or value >= 1
    return value > 0 if word == "float" else True


def _said(name: str, word: str) -> str:
    """How a refusal says what one word of the annotation allows."""
    bound = {"int": "" if name.endswith("_token_id") else " >= 1", "float": " > 0"}.get(word, "")
    return _TYPES[word][1] + bound


def _rope_kind(s: dict, default=None):
    return s.get("rope_type", s.get("type", default))


def read_json_object(path) -> dict:
    """A model folder's JSON file as a dict ({} when absent); one that is not UTF-8 JSON holding an object
    is refused naming it (config.json here; the tokenizer's, chat templates' and adapters' files)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: cannot read it: not valid JSON (line {e.lineno}, column {e.colno}): "
                       f"{e.msg}") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: cannot read it: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(d, dict):
        raise BadInput(f"{path}: cannot read it: must hold a JSON object {{...}}, not {type(d).__name__}")
    return d


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
        self.check_types()  # first: the defaults below divide and index
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:  # transformers 5 moves rope_theta and the scaling into one dict
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if _rope_kind(self.rope_parameters, "default") != "default":
                self.rope_scaling = self.rope_parameters
        self.validate()

    def check_types(self):
        """Each field against its annotation: a wrong type, a size < 1, a bool where a number belongs, a
        non-finite float are refused naming the key and what it must be; then the RoPE dicts."""
        for f in dataclasses.fields(self):
            value, words = getattr(self, f.name), f.type.split(" | ")
            if f.name != "extra" and not any(_admits(f.name, w, value) for w in words):
                want = " or ".join(_said(f.name, w) for w in words)
                raise BadInput(f"config.json: {f.name}={value!r}: must be {want}")
        for key in ("rope_scaling", "rope_parameters"):
            if getattr(self, key) is not None:
                self._check_rope(key, getattr(self, key))

    @staticmethod
    def _check_rope(key: str, s: dict):
        """A RoPE dict: a type written here, with the keys rope_inv_freq reads (finite numbers > 0)."""
        kind = _rope_kind(s, "default" if key == "rope_parameters" else None)
        if kind not in ROPE_KEYS:
            raise BadInput(f"config.json: {key} type {kind!r} is not implemented; "
                           f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        for k in ROPE_KEYS[kind] + (("rope_theta",) if "rope_theta" in s else ()):
            if k not in s:
                raise BadInput(f"config.json: {key} of type {kind!r} has no {k!r} (a finite number > 0)")
            if not is_number(s[k]) or s[k] <= 0:
                raise BadInput(f"config.json: {key}[{k!r}]={s[k]!r}: must be a finite number > 0")
        if kind == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
            raise BadInput(f"config.json: {key}: high_freq_factor={s['high_freq_factor']!r} must be above "
                           f"low_freq_factor={s['low_freq_factor']!r}")

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
        if self.head_dim < 1:  # the default, hidden_size // num_attention_heads
            refuse("head_dim", "(hidden_size // num_attention_heads) must be at least 1")

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise BadInput(f"config.json: must hold a JSON object {{...}}, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "dtype" in d:  # transformers >= 4.56 spells torch_dtype so: one key, read and written as torch_dtype
            d = {**{k: v for k, v in d.items() if k != "dtype"}, "torch_dtype": d.get("torch_dtype") or d["dtype"]}
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
        d = read_json_object(path)
        missing = [k for k in REQUIRED if k not in d]
        if missing:  # the defaults are Llama-2-7B's: a smaller checkpoint would fail later as a shape mismatch
            raise BadInput(f"{path}: no {', '.join(map(repr, missing))}; a Llama config.json names the model's "
                           f"sizes ({', '.join(REQUIRED)})")
        try:
            return cls.from_dict(d)
        except BadInput as e:  # "config.json: key=..." from validate becomes "<path>: key=..."
            raise BadInput(f"{path}: {str(e).removeprefix('config.json: ')}") from None

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
    kind = _rope_kind(s)
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
