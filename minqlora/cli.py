"""Command-line flags made from dataclasses: one field, one flag, with the field's default and help.

Follows transformers' HfArgumentParser conventions, which qlora.py's users type: a bool flag works
bare (`--group_by_length`) or with a value (`--group_by_length False`); `Optional[X]` fields accept
the value `None`. Unknown flags are errors (argparse's), prefixes are not accepted as abbreviations.
Also the two flags every command shares: --dtype names and --device resolution.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype values


class FlagError(ValueError):
    """A flag's value that argparse accepted but that cannot be used here."""


def resolve_device(spec: str) -> torch.device:
    """--device: auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FlagError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {spec}: CUDA is not available on this machine")
    return dev


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
