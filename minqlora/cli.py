"""Command-line flags made from dataclasses: one field, one flag, with the field's default and help.

Follows transformers' HfArgumentParser conventions, which qlora.py's users type: a bool flag works
bare (`--group_by_length`) or with a value (`--group_by_length False`); `Optional[X]` fields accept
the value `None`. Unknown flags are errors (argparse's), prefixes are not accepted as abbreviations. Every script's
flags are dataclasses read here. No paper section: plumbing. Checked in tests/test_inputs.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .errors import BadInput


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {v!r}")


def _base_type(tp):
    """int for `int`, `int | None` and `Optional[int]`; also whether None is allowed."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return tp, False


def _optional(conv):
    def parse(v):
        return None if v == "None" else conv(v)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str | None = None):
    """Add one flag per field of `cls` (help from `field(metadata={"help": ...})`)."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, nullable = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw = dict(default=default, dest=f.name,
                  help=f"{f.metadata.get('help', '')} (default: {default})".strip())
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw.update(type=str2bool, nargs="?", const=True, metavar="True|False")
        else:
            conv = tp if tp in (int, float, str) else str
            kw["type"] = _optional(conv) if nullable else conv
        group.add_argument(f"--{f.name}", **kw)
    return group


def parse_dataclasses(classes, argv=None, description=None, prog=None):
    """Parse argv into one instance of each dataclass in `classes` (a dict title -> class)."""
    parser = argparse.ArgumentParser(description=description, prog=prog, allow_abbrev=False)
    for title, cls in classes.items():
        add_dataclass_args(parser, cls, title)
    ns = parser.parse_args(argv)
    out = []
    for cls in classes.values():
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False]
        out.append(cls(**{n: getattr(ns, n) for n in names}))
    return parser, out


@dataclasses.dataclass
class ModelArgs:
    """The model flags of ppl.py and predict.py (training's are qlora.py's: train_args.py). The course's
    ppl.py loads Taiwan-LLM in 4-bit NF4 with double quantization and bf16 compute: the default on CUDA."""
    base_model_path: str = dataclasses.field(default="weights/tiny", metadata={"help": "Hugging Face model folder"})
    peft_path: str | None = dataclasses.field(default=None, metadata={"help": "LoRA adapter folder (peft format)"})
    bits: int = dataclasses.field(default=4, metadata={"help": "4: NF4/FP4 base weights (QLoRA); 16: unquantized",
                                                       "choices": [4, 16]})
    quant_type: str = dataclasses.field(default="nf4", metadata={"help": "4-bit data type", "choices": ["nf4", "fp4"]})
    double_quant: bool = dataclasses.field(default=True, metadata={"help": "quantize the 4-bit absmax constants too"})
    dtype: str = dataclasses.field(default="auto", metadata={
        "help": "compute dtype; auto = bfloat16 on CUDA, float32 on CPU",
        "choices": ["auto", "float32", "bfloat16", "float16"]})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda or cuda:N"})


def check_positive(**values):
    """values: flag name -> (value, lowest allowed)."""
    for name, (value, low) in values.items():
        if value < low:
            raise BadInput(f"--{name} {value}: must be at least {low}")


PROMPT_TEMPLATE_HELP = ("course, alpaca, input-output, chat (the model folder's chat template), a file holding "
                        "{instruction}, or adapter: the one the --peft_path adapter was trained with")


def inference_prompt(asked: str, m: ModelArgs):
    """ppl.py's and predict.py's --prompt_template: the prompt to use (`adapter`: the one the --peft_path adapter
    recorded; `chat`: the model folder's template); a differing recorded one is warned about on stderr (by
    process 0 alone under torchrun)."""
    import sys

    from .adapter import choose_prompt
    from .chat import prompt_for
    from .distributed import is_main
    template, warning = choose_prompt(asked, m.peft_path)
    if warning and is_main():
        print(warning, file=sys.stderr)
    try:
        return prompt_for(template, m.base_model_path)
    except ValueError as e:  # BadInput included
        raise BadInput(f"--prompt_template: {e}") from None
