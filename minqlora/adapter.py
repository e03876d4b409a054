"""Save and load LoRA adapters in peft's on-disk format.

An adapter is the trained part of QLoRA (arXiv 2305.14314 §3; LoRA, arXiv
2106.09685 §4): one (r x in) A and one (out x r) B per wrapped linear, plus
r, alpha and the target list. A folder holds
    adapter_config.json          peft's LoraConfig fields
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight, ...
                                 (or adapter_model.bin, a torch.save'd dict)
which is what `peft.PeftModel.save_pretrained` writes and `from_pretrained`
reads; checked both ways against peft (0.21, 0.22) in tests/test_adapter.py.

Loading is strict: any key that has no LoRA module, any module without its
tensors, any shape or rank mismatch, a field of the wrong type, any peft
option this code does not implement (DoRA, rsLoRA, biases, modules_to_save,
per-layer ranks, ...) and any init that makes peft rebuild the base (PiSSA,
OLoRA, LoftQ, ...) is refused with a BadInput naming the file and the key,
before the model is modified. As in peft, a listed target that matches no
module is passed over (one must match), and the lm_head weight peft saves
beside a targeted lm_head's LoRA is checked against the base's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .atomic import atomic_dir, atomic_file, save_safetensors
from .lora import LoRALinear, apply_lora, lora_modules, target_module_names
from .config import read_json_object
from .errors import BadInput, is_int, is_number, unreadable

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
INFO_NAME = "minqlora.json"  # beside peft's files (which peft ignores): {"prompt_template": "alpaca"}
PREFIX = "base_model.model."
# <module>.lora_A.weight, or peft's in-memory <module>.lora_A.<adapter name>.weight
KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# peft also saves a targeted lm_head's (or embedding's) own weight, <module>.base_layer.weight
BASE_KEY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")

# Options that change the math; anything but these defaults (None, False, {}, []) is refused.
UNSUPPORTED_IF_SET = (
    "use_dora", "use_rslora", "use_qalora", "lora_bias", "fan_in_fan_out", "modules_to_save",
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication",
    "exclude_modules", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
    "use_bdlora", "velora_config", "monteclora_config", "arrow_config", "kasa_config",  # peft 0.22's variants
)
# init_lora_weights values whose adapter is added to the base as it is. The others (PiSSA, OLoRA, LoftQ, CorDA,
# ASTRA, ...) make peft rebuild a changed base (a residual) when it loads them; added to the unchanged base, the
# adapter would give another model, silently.
BASE_KEEPING_INITS = (True, False, "gaussian", "orthogonal", "nora", "mica", "eva", "lora_ga")



def _target_modules_for_config(model: nn.Module, wrapped: list[str]) -> list[str]:
    # Short names (["q_proj", "v_proj"]) when they select exactly the wrapped modules under
    # peft's suffix matching; otherwise full module names, which peft matches exactly.
    short = sorted({n.split(".")[-1] for n in wrapped})
    would_match = [n for n, _ in model.named_modules() if n.split(".")[-1] in short]
    return short if sorted(would_match) == sorted(wrapped) else sorted(wrapped)


def _write_files(folder: Path, tensors: dict, config: dict, info: dict | None = None):
    """Each file under a temporary name, then renamed: the pair is never seen half-written."""
    if info:
        with atomic_file(folder / INFO_NAME) as f:
            f.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
    save_safetensors(tensors, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    with atomic_file(folder / CONFIG_NAME) as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: str | list[str],
    base_model_name_or_path: str | None,
    prompt_template: str | None = None,
) -> Path:
    """Write the model's LoRA weights and config as a peft adapter folder.

    r/alpha must agree with the model's LoRA layers; `targets` is what was
    passed to apply_lora and only serves as a check: `target_modules` in the
    file lists the modules actually wrapped. `prompt_template` (the training
    data's format) goes into minqlora.json, for ppl.py and predict.py.
    """
    modules = lora_modules(model)
    if not modules:
        raise BadInput("save_adapter: the model has no LoRA layers")
    for name, m in modules.items():
        if m.r != r or abs(m.scaling - alpha / r) > 1e-12 * max(1.0, abs(m.scaling)):
            raise BadInput(f"save_adapter: {name} has r={m.r}, scaling={m.scaling}, but r={r}, alpha={alpha} given")
    if not isinstance(targets, str):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            raise BadInput(f"save_adapter: targets {missing} were not wrapped in this model")

    tensors = {}  # copies: during training the weights are views of the optimizer's one buffer (optim.py)
    for name, m in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu", copy=True)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu", copy=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules_for_config(model, list(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }

    info = {"prompt_template": prompt_template} if prompt_template else None
    # A new folder is built under a temporary name and renamed. An existing one may hold other files
    # (a training run's output_dir, a checkpoint): our two files are replaced one by one, atomically.
    out_dir = Path(out_dir)
    if not out_dir.exists():
        with atomic_dir(out_dir) as tmp:
            _write_files(tmp, tensors, config, info)
    else:
        _write_files(out_dir, tensors, config, info)
        stale_bin = out_dir / BIN_NAME
        if stale_bin.exists():  # peft would prefer our safetensors anyway; don't leave a stale .bin
            stale_bin.unlink()
    return out_dir


def trained_prompt(adapter_dir) -> str | None:
    """The prompt template an adapter was trained with (minqlora.json), None when not recorded (no file: a
    peft adapter); a file that does not say it is refused by name."""
    path = Path(adapter_dir) / INFO_NAME
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("prompt_template")
    except (OSError, ValueError, AttributeError) as e:  # (AttributeError: JSON, but not an object)
        raise BadInput(f"{path}: cannot read the recorded prompt template ({type(e).__name__})") from None
    if not isinstance(template, str):
        raise BadInput(f"{path}: prompt_template={template!r}, not a template's name")
    return template


def choose_prompt(asked: str, adapter_dir) -> tuple[str, str | None]:
    """--prompt_template of ppl.py / predict.py -> (the template to use, a warning or None). 'adapter'
    takes the adapter's recorded one; another template than the recorded one is used, with a warning
    (the course scores an alpaca-trained adapter with the course prompt on purpose)."""
    try:
        trained = trained_prompt(adapter_dir) if adapter_dir else None
    except BadInput:
        if asked == "adapter":
            raise
        trained = None  # a template is named: the record would only have been compared with it
    if asked == "adapter":
        if trained is None:
            where = f"{adapter_dir} has no {INFO_NAME}" if adapter_dir else "no --peft_path"
            raise BadInput(f"--prompt_template adapter: {where}, so no recorded template; name one (course, "
                           "alpaca, input-output or a file)")
        return trained, None
    if trained is not None and trained != asked:
        return asked, (f"warning: {adapter_dir} was trained with the {trained} prompt; this run uses "
                       f"--prompt_template {asked} (--prompt_template adapter uses {trained})")
    return asked, None


def _read_config(path: Path) -> dict:
    """adapter_config.json, every field minqlora uses checked for its type, every option it does not implement
    refused by name."""
    if not path.exists():
        raise BadInput(f"{path}: not found; an adapter folder needs {CONFIG_NAME}")
    cfg = read_json_object(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BadInput(f"{path}: peft_type={cfg['peft_type']!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise BadInput(f"{path}: missing {key!r}")
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    if not (is_int(r) and r >= 1):
        raise BadInput(f"{path}: r={r!r}; the rank must be a whole number, at least 1")
    if not is_number(alpha):
        raise BadInput(f"{path}: lora_alpha={alpha!r}; must be a number")
    if not (is_number(dropout) and 0 <= dropout < 1):
        raise BadInput(f"{path}: lora_dropout={dropout!r}; must be a number in [0, 1)")
    if cfg.get("bias", "none") != "none":
        raise BadInput(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    for key in UNSUPPORTED_IF_SET:
        if cfg.get(key) not in (None, {}, []) and cfg.get(key) is not False:  # 0 is set (layers_to_transform)
            raise BadInput(f"{path}: {key}={cfg[key]!r} is not supported by minqlora")
    init = cfg.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in BASE_KEEPING_INITS):
        raise BadInput(f"{path}: init_lora_weights={init!r}: peft loads such an adapter onto a changed base "
                       "(its residual), which minqlora does not rebuild; convert it to a plain LoRA first (peft's "
                       "save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if targets != "all-linear":  # peft's "all-linear" = every linear but the output layer
            raise BadInput(f"{path}: target_modules={targets!r} is a regex; only a list or 'all-linear' is supported")
        cfg["target_modules"] = "all"
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise BadInput(f"{path}: target_modules={targets!r}; must be a list of module names or 'all-linear'")
    return cfg


def _tensor_file(folder: Path) -> Path:
    """The adapter's weights file: the safetensors one if both are there (as peft prefers it)."""
    for path in (folder / SAFETENSORS_NAME, folder / BIN_NAME):
        if path.exists():
            return path
    raise BadInput(f"{folder}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def check_adapter(adapter_dir: str | os.PathLike) -> dict:
    """What can be checked before the base model loads (minutes for a 7B): the config, and a weights file."""
    cfg = _read_config(Path(adapter_dir) / CONFIG_NAME)
    _tensor_file(Path(adapter_dir))
    return cfg


def _read_tensors(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = _tensor_file(folder)
    try:
        tensors = (load_file(str(path), device="cpu") if path.name == SAFETENSORS_NAME
                   else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # truncated or corrupt: say which file, and what the reader said
        raise unreadable(path, e) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise BadInput(f"{path}: not a dict of tensors")
    return path, tensors


def _check_base_weight(model: nn.Module, module: str, saved: torch.Tensor, where: str):
    """A base weight saved beside the LoRA weights (peft's, for a targeted lm_head) must be this model's: the
    adapter is added to the base as it is."""
    layer = model.get_submodule(module)
    w = getattr(layer, "base_layer", layer).weight.detach()
    if not w.is_floating_point() or w.shape != saved.shape or not torch.equal(saved.to(w.dtype), w.cpu()):
        raise BadInput(f"{where} is a base weight {tuple(saved.shape)} that differs from this model's "
                       f"{module}.weight {tuple(w.shape)} (another base, or a resized vocabulary?)")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict:
    """Load a peft LoRA adapter into `model` (wrapping it first if needed); return its config."""
    folder = Path(adapter_dir)
    cfg_path = folder / CONFIG_NAME
    cfg = _read_config(cfg_path)
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    path, raw = _read_tensors(folder)

    # Which modules carry LoRA, and their (in, out) features, before touching the model.
    existing = lora_modules(model)
    if existing:
        names = list(existing)
        for name, m in existing.items():
            if m.r != r or m.scaling != alpha / r:
                raise BadInput(
                    f"{cfg_path}: r={r}, lora_alpha={alpha}, but the model's {name} has r={m.r}, scaling={m.scaling}"
                )
    else:
        try:  # as peft: a listed name that matches nothing here is passed over
            names = target_module_names(model, cfg["target_modules"], each_must_match=False)
        except ValueError as e:
            raise BadInput(f"{cfg_path}: {e}") from None
    features = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}

    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in raw.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        base = BASE_KEY_RE.match(k)
        if base and base["module"] in features:
            _check_base_weight(model, base["module"], t, f"{path}: key {key!r}")
            continue
        m = KEY_RE.match(k)
        if m is None:
            raise BadInput(f"{path}: unexpected key {key!r} (only lora_A / lora_B weights are supported)")
        module, which = m["module"], m["which"]
        if module not in features:
            raise BadInput(f"{path}: key {key!r} names module {module!r}, which has no LoRA layer in this model")
        if (module, which) in tensors:
            raise BadInput(f"{path}: key {key!r} duplicates another key for {module}.{which}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise BadInput(f"{path}: key {key!r} is {t.dtype}" + (", not floating point" if not t.is_floating_point()
                           else " with non-finite values (NaN or inf): the adapter is damaged"))
        fin, fout = features[module]
        expected = (r, fin) if which == "lora_A" else (fout, r)
        if tuple(t.shape) != expected:
            found_r = t.shape[0] if which == "lora_A" else t.shape[-1]
            raise BadInput(
                f"{path}: key {key!r} has shape {tuple(t.shape)}, expected {expected} "
                f"(rank {r} from {CONFIG_NAME}, module in_features={fin}, out_features={fout}; "
                f"the tensor implies rank {found_r})"
            )
        tensors[(module, which)] = t
    for name in names:
        for which in ("lora_A", "lora_B"):
            if (name, which) not in tensors:
                raise BadInput(f"{path}: no tensor for {PREFIX}{name}.{which}.weight (module {name} is a LoRA target)")

    if not existing:
        apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=names, verbose=False)
    with torch.no_grad():
        for (name, which), t in tensors.items():
            layer: LoRALinear = model.get_submodule(name)
            getattr(layer, which).weight.copy_(t)
    return cfg
