"""Merge a LoRA adapter into its base model and write an unquantized Hugging Face checkpoint.

    python scripts/merge.py --base_model_path weights/tiny --peft_path output/default --output_dir output/merged

By default the base is loaded unquantized (--bits 16), so the result is W0 + B·A·alpha/r on the original
weights; --bits 4 merges into the dequantized 4-bit weights the adapter was trained against instead.
The weights are written in --dtype (auto: the base's own torch_dtype, e.g. float32 for weights/tiny).
--overwrite_output_dir replaces a checkpoint folder and refuses one holding other files. An adapter on
lm_head of a base whose lm_head is its input embeddings (tie_word_embeddings) gives an untied checkpoint.
Checked in tests/test_merge.py: transformers reads the result, equal to peft's model. QLoRA §2 (LoRA).
"""
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora.adapter import check_adapter, load_adapter  # noqa: E402
from minqlora.cli import parse_dataclasses  # noqa: E402
from minqlora.distributed import one_process_only  # noqa: E402
from minqlora.config import LlamaConfig  # noqa: E402
from minqlora.errors import BadInput, run_main  # noqa: E402
from minqlora.loader import DTYPES, load_model, resolve_device_dtype, save_checkpoint  # noqa: E402
from minqlora.lora import merge_lora  # noqa: E402
from minqlora.nf4 import dequantize_linears  # noqa: E402
from minqlora.outputs import check_output_dir_path  # noqa: E402


@dataclass
class MergeArgs:
    base_model_path: str = field(default="weights/tiny", metadata={"help": "base checkpoint folder"})
    peft_path: str = field(default="output/default", metadata={"help": "adapter folder (minqlora or peft)"})
    output_dir: str = field(default="output/merged", metadata={"help": "where the merged checkpoint goes"})
    bits: int = field(default=16, metadata={"help": "16: merge into the original weights; 4: into the "
                                                    "dequantized NF4 weights", "choices": [4, 16]})
    quant_type: str = field(default="nf4", metadata={"help": "with --bits 4", "choices": ["nf4", "fp4"]})
    double_quant: bool = field(default=True, metadata={"help": "with --bits 4"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing output_dir"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the written weights; auto = the base's "
                                                         "torch_dtype", "choices": ["auto", *DTYPES]})
    device: str = field(default="cpu", metadata={"help": "where to merge: cpu, cuda or cuda:N (auto: cuda if available)"})


# What a Hugging Face checkpoint folder holds: all that --overwrite_output_dir may replace.
CHECKPOINT_FILE = re.compile(r"config\.json|generation_config\.json|special_tokens_map\.json|tokenizer.*|"
                             r"model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?")


def check_output(args: MergeArgs):
    one_process_only("merge.py")
    out, base = Path(args.output_dir), Path(args.base_model_path)
    check_output_dir_path(args.output_dir)
    if out.resolve() in (base.resolve(), Path(args.peft_path).resolve()):
        raise BadInput(f"--output_dir {out}: is the base model or the adapter folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not args.overwrite_output_dir:
        raise BadInput(f"--output_dir {out}: exists and is not empty (--overwrite_output_dir replaces a "
                       "checkpoint there)")
    other = [n for n in present if not CHECKPOINT_FILE.fullmatch(n)]
    if present and other:
        shown = ", ".join(other[:5]) + (" ..." if len(other) > 5 else "")
        raise BadInput(f"--output_dir {out}: holds files that are not a checkpoint's ({shown}); "
                       "--overwrite_output_dir replaces only a checkpoint folder: choose another --output_dir")


def merge(args: MergeArgs):
    check_output(args)
    check_adapter(args.peft_path)  # before the base loads
    saved = LlamaConfig.from_json(args.base_model_path).torch_dtype
    auto = saved if saved in DTYPES else "float32"  # the base's own dtype
    device, dtype = resolve_device_dtype(args.device, auto if args.dtype == "auto" else args.dtype)
    model = load_model(args.base_model_path, bits=args.bits, quant_type=args.quant_type,
                       double_quant=args.double_quant, dtype=dtype, device=device)
    load_adapter(model, args.peft_path)
    merge_lora(model)
    dequantize_linears(model)  # with --bits 4, the layers the adapter did not touch
    cfg = model.config
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        # the adapter changed lm_head alone: the merged output layer is no longer the embedding matrix
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        print("note: the adapter changes lm_head, whose base shares the input embeddings: the merged checkpoint "
              "holds both matrices (tie_word_embeddings false)")
    out = save_checkpoint(model.state_dict(), cfg, args.output_dir, copy_from=args.base_model_path)
    print(f"merged checkpoint written to {out}")


def main(argv=None):
    _, (args,) = parse_dataclasses({"merge": MergeArgs}, argv, description=__doc__)
    return run_main(merge, args)


if __name__ == "__main__":
    sys.exit(main())
