"""Convert a llama.cpp GGUF file (Llama architecture) into a Hugging Face folder minqlora can train.

    python scripts/convert_gguf.py SRC.gguf OUT_DIR [--dtype float16|bfloat16]

Writes config.json, model.safetensors (the file's dequantized values in 16 bits), generation_config.json,
tokenizer.json and tokenizer_config.json (special tokens, chat template). See minqlora/from_gguf.py.
Bad input (not GGUF, another architecture, a tensor type it cannot read) exits 2 naming the file;
the folder is written under a temporary name and renamed, so it is never half-written.
Checked in tests/test_gguf.py. No paper section.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora.from_gguf import DTYPES, GGUFError, convert  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="convert_gguf.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("src", help="the .gguf file")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES),
                   help="dtype of the written weights (default float16: closest to Q4_1/Q8_0's fp16 scales)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: {out}: exists and is not empty (--overwrite replaces it)", file=sys.stderr)
        return 2
    try:
        convert(args.src, out, args.dtype)
    except (GGUFError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
