"""Build a Llama from a Hugging Face checkpoint folder: build, quantize, fill; and save one back.
Also the device/dtype every script resolves its flags to, and base + adapter for inference.

`load_model` builds the model on the meta device (no memory), then streams the checkpoint tensor by
tensor: each linear weight is moved to the target device and quantized to 4 bits at once (QLoRA
§3: the 16-bit weights are never all in memory), every other tensor is copied by name. Every
checkpoint key is used, every parameter filled, every shape checked; any mismatch is an error that
names the tensor and the file. Reads `model.safetensors`, a `model.safetensors.index.json` with its
shards, or (older checkpoints) `pytorch_model*.bin` through torch.load(weights_only=True).
QLoRA §3 (4-bit base, quantized as it loads). Checked against transformers' `save_pretrained` output in
tests/test_loader.py, and through ppl.py/predict.py against transformers + peft in tests/test_infer_scripts.py.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .adapter import check_adapter, load_adapter
from .atomic import atomic_dir, save_safetensors
from .config import LlamaConfig
from .model import LlamaForCausalLM
from .nf4 import quantize_linear_weight
from .tokenizer import Tokenizer
from .errors import BadInput, unreadable

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # RoPE tables some old conversions saved; we recompute
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype values


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Every script's --device and --dtype. device: auto (cuda if available, else cpu), cpu, cuda or
    cuda:N; dtype: a DTYPES name, or auto (bfloat16 on CUDA, float32 on CPU)."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise BadInput(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None and torch.distributed.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device())  # torchrun: this process's GPU (distributed.start)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]



def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, in index order: safetensors first, .bin as a fallback."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise BadInput(f"{index}: not a checkpoint index ({e})") from None
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise BadInput(f"{index} names {f.name}, which is not in {folder}")
            return files
        if (folder / single).exists():
            return [folder / single]
    raise BadInput(f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json, "
                    "pytorch_model.bin or pytorch_model.bin.index.json)")


# safetensors dtype names -> torch dtypes (the format's header spells them like this)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class Staging:
    """One page-locked host buffer, reused for every tensor on its way to a GPU.

    Reading into pinned memory costs no page faults and lets the copy to the device run at full
    speed and asynchronously; the next tensor is read while the GPU quantizes this one. `take`
    waits for the previous copy out of the buffer before handing it out again.
    """

    def __init__(self):
        self.buf, self.copied = None, None

    def take(self, nbytes: int) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()  # the last tensor has left the buffer
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self.buf[:nbytes]

    def to_device(self, tensor: torch.Tensor, device) -> torch.Tensor:
        out = tensor.to(device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return out


def read_safetensors(path: Path, staging: Staging | None = None):
    """Yield (name, tensor) from a .safetensors file, reading one tensor's bytes at a time.

    safetensors' own safe_open memory-maps the whole shard, and every page it has read stays resident
    in this process until the file is closed: peak memory would be the largest shard plus the 4-bit
    model. Plain reads keep one tensor in memory at a time. Format: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the data. With `staging` (loading
    onto a GPU) each tensor is a view of that pinned buffer, valid until the next one is read.
    """
    with open(path, "rb") as f:
        size = path.stat().st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n > size - 8:
            raise BadInput(f"{path}: cannot read (the header says {n} bytes; the file has {size})")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            if 8 + n + end > size:
                raise BadInput(f"{path}: cannot read tensor {name!r}: the file ends at byte {size}, "
                                f"the tensor at {8 + n + end} (a truncated download?)")
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise BadInput(f"{path}: tensor {name!r} has dtype {info['dtype']}, which minqlora cannot read")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if end == start:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            f.seek(8 + n + start)
            if staging is not None:
                buf = staging.take(end - start)
                f.readinto(buf.numpy())
                yield name, buf.view(dtype).reshape(info["shape"])  # flat bytes -> the checkpoint's shape
                continue
            # An anonymous mapping of its own per tensor, returned to the OS when the tensor is freed;
            # malloc'd buffers would leave the heap fragmented, holding the freed 16-bit bytes.
            buf = mmap.mmap(-1, end - start, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            f.readinto(buf)
            yield name, torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])  # flat -> the checkpoint's shape


def read_tensors(path: Path, staging: Staging | None = None):
    """Yield (name, tensor) one at a time, so only one tensor is materialised at once."""
    try:
        if path.suffix == ".safetensors":
            yield from read_safetensors(path, staging)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except BadInput:
        raise
    except Exception as e:  # a corrupt file: say which, and what the reader said
        raise unreadable(path, e) from None


def skeleton(path) -> tuple[LlamaForCausalLM, list[Path]]:
    """The model a checkpoint folder describes, on the meta device (no memory, no weight read), and its weight
    files: the folder's config and files checked and the module names known, at no cost."""
    folder = Path(path)
    cfg = LlamaConfig.from_json(folder)  # (it names a file given for the folder, or a missing config.json)
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a model folder")
    files = weight_files(folder)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg), files


def load_model(path, *, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
               dtype: torch.dtype = torch.float32, device="cpu", progress: bool = True
               ) -> LlamaForCausalLM:
    """Load a checkpoint folder; `bits=4` quantizes every linear but lm_head, `bits=16` keeps them."""
    if bits not in (4, 16):
        raise ValueError(f"bits={bits}: only 4 (QLoRA) and 16 (no quantization) are supported")
    folder = Path(path)
    model, files = skeleton(folder)
    cfg = model.config
    expected = dict(model.named_parameters())  # tied lm_head.weight appears once, as embed_tokens
    modules = dict(model.named_modules())
    filled: dict[str, Path] = {}

    device = torch.device(device)
    staging = Staging() if device.type == "cuda" else None
    bar = tqdm(total=len(expected), desc="loading", unit="tensor", disable=not progress)
    for file in files:
        for name, tensor in read_tensors(file, staging):
            if name.endswith(IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise BadInput(f"{file}: tensor {name!r} is not a parameter of this model "
                                f"(model_type={cfg.model_type}, {cfg.num_hidden_layers} layers)")
            if name in filled:
                raise BadInput(f"{file}: tensor {name!r} appears again (first in {filled[name].name})")
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise BadInput(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                f"config.json implies {want}")
            if not tensor.is_floating_point():
                raise BadInput(f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
            module_name, _, attr = name.rpartition(".")
            module = modules[module_name]
            quantize = bits == 4 and isinstance(module, nn.Linear) and module_name != "lm_head"
            if staging is not None:
                tensor = staging.to_device(tensor, device)
            if quantize:
                q = quantize_linear_weight(tensor.to(device), quant_type=quant_type,
                                           double_quant=double_quant, compute_dtype=dtype)
                parent_name, _, child = module_name.rpartition(".")
                setattr(modules[parent_name], child, q)
            else:
                setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype)))
            filled[name] = file
            del tensor
            bar.update()
    bar.close()

    missing = [n for n in expected if n not in filled]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BadInput(f"{folder}: the checkpoint has no tensor for {shown}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not meta, f"left unfilled: {meta}"
    return model.eval()


def load_with_adapter(base, adapter=None, *, bits=4, quant_type="nf4", double_quant=True, dtype=torch.float32,
                      device="cpu", progress=True):
    """(model in eval mode with the adapter `adapter` (a peft or minqlora folder) applied, tokenizer)."""
    if adapter:
        check_adapter(adapter)  # a bad adapter folder or tokenizer is found before minutes of loading
    tokenizer = Tokenizer.from_dir(base)
    model = load_model(base, bits=bits, quant_type=quant_type, double_quant=double_quant, dtype=dtype,
                       device=device, progress=progress)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise BadInput(f"{base}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                       f"vocab_size={model.config.vocab_size}")
    if tokenizer.eos_id is None:
        raise BadInput(f"{base}: the tokenizer names no eos token")
    if adapter:
        load_adapter(model, adapter)  # LoRA weights land on each base layer's device
    return model.eval(), tokenizer


def save_checkpoint(state_dict: dict, cfg: LlamaConfig, out_dir, *, max_shard_bytes: int = 5 * 2**30,
                    copy_from=None) -> Path:
    """Write a Hugging Face layout folder: config.json, safetensors shards and their index.

    Written to a temporary folder and renamed, so `out_dir` is either complete or untouched.
    `copy_from` names a folder whose tokenizer and generation files are copied along.
    """
    out_dir = Path(out_dir)
    if cfg.tie_word_embeddings:  # the checkpoint holds the shared matrix once, as transformers writes it
        head, embed = state_dict.get("lm_head.weight"), state_dict.get("model.embed_tokens.weight")
        if head is not None and head is not embed and not torch.equal(head, embed):
            raise ValueError("save_checkpoint: tie_word_embeddings, but lm_head.weight differs from "
                             "model.embed_tokens.weight: it would be lost; save with tie_word_embeddings False")
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    for name, t in state_dict.items():
        if not t.is_floating_point():
            raise BadInput(f"save_checkpoint: {name!r} is {t.dtype} (a 4-bit layer?); "
                            "dequantize the model first (nf4.dequantize_linears)")
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    with atomic_dir(out_dir) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                     else "model.safetensors")
            save_safetensors(shard, tmp / fname, metadata={"format": "pt"})  # (ordinary permissions too)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        d = cfg.to_dict()
        first = next(iter(state_dict.values()))
        d["torch_dtype"] = str(first.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        if copy_from is not None:
            for f in Path(copy_from).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens_map", "generation_config")):
                    (tmp / f.name).write_bytes(f.read_bytes())
    return out_dir
