"""Generate an output for every record of a test file: [{"id", "output"}], what the course's run.sh writes.

    python scripts/predict.py --base_model_path DIR --peft_path ADAPTER \
        --test_data_path IN.json --output_path OUT.json

Greedy by default, prompted with the same template as ppl.py. Flags -> load -> run -> write; the
generation loop is minqlora/generate.py. Exit status 2 for bad input, found before the model loads;
the output file is replaced only when every record has its output.
Checked in tests/test_infer_scripts.py. No paper section.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora import distributed  # noqa: E402
from minqlora.atomic import atomic_file  # noqa: E402
from minqlora.cli import (PROMPT_TEMPLATE_HELP, ModelArgs, check_positive, inference_prompt,  # noqa: E402
                          parse_dataclasses)
from minqlora.data import read_records  # noqa: E402
from minqlora.errors import BadInput, run_main  # noqa: E402
from minqlora.generate import generate  # noqa: E402
from minqlora.loader import load_with_adapter, resolve_device_dtype  # noqa: E402
from minqlora.outputs import check_number, check_output_file_path, check_seed  # noqa: E402


@dataclass
class PredictArgs:
    test_data_path: str = field(default="data/example/predict.json", metadata={
        "help": "records with id and instruction"})
    output_path: str = field(default="output/predictions.json", metadata={
        "help": "where to write [{id, output}] (replaced only when the run completes)"})
    prompt_template: str = field(default="course", metadata={"help": PROMPT_TEMPLATE_HELP})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens at most per example"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample from the k likeliest tokens; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "1.0 = off; >1 discourages repeats"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together"})
    seed: int = field(default=42, metadata={"help": "seed of the sampling"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def predict(m: ModelArgs, args: PredictArgs) -> list[dict]:
    # 1. Flags and data, every check before the model loads.
    check_positive(batch_size=(args.batch_size, 1), max_new_tokens=(args.max_new_tokens, 1), top_k=(args.top_k, 0))
    check_number("top_p", args.top_p, low=0, high=1, low_open=True, hint="1.0 turns nucleus sampling off")
    check_number("temperature", args.temperature, low=0, low_open=True, hint="or greedy: --do_sample False")
    check_number("repetition_penalty", args.repetition_penalty, low=0, low_open=True, hint="1.0 turns it off")
    check_seed("seed", args.seed)
    device, dtype = resolve_device_dtype(m.device, m.dtype)
    prompt = inference_prompt(args.prompt_template, m)  # adapter: recorded by training; chat: the folder's
    path = args.test_data_path
    records = read_records(path, required=prompt.fields, unique_ids=True)
    for i, rec in enumerate(records):
        if rec.get("id") is None:
            raise BadInput(f"{path}: record {i} has no 'id' field; predictions are keyed by id")
    check_output_file_path(args.output_path, "--output_path", inputs={
        "--test_data_path": path, "--base_model_path": m.base_model_path, "--peft_path": m.peft_path})
    world = distributed.start(m.device)  # under torchrun: records dealt out, process 0 writes
    progress = args.progress and world.main

    # 2. Load: the 4-bit base, the adapter on it.
    model, tokenizer = load_with_adapter(m.base_model_path, m.peft_path, bits=m.bits, quant_type=m.quant_type,
                                         double_quant=m.double_quant, dtype=dtype, device=device,
                                         progress=progress)

    # 3. Run: every prompt checked against the context, then generated in batches of similar length
    # (this process's share of the records, gathered back in record order).
    names = [f"{path}: record {i} (id {rec['id']!r})" for i, rec in enumerate(records)]
    mine = distributed.shard(list(range(len(records))), world)
    outputs = generate(model, tokenizer, [prompt(records[i]) for i in mine], max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, do_sample=args.do_sample, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                       seed=args.seed, names=[names[i] for i in mine], progress=progress)
    outputs = distributed.gather(outputs, world)

    # 4. Write, under a temporary name renamed when complete.
    result = [{"id": rec["id"], "output": out} for rec, out in zip(records, outputs)]
    if world.main:
        with atomic_file(args.output_path) as f:
            json.dump(result, f, ensure_ascii=False, indent=2)
            f.write("\n")
        print(f"Wrote {len(result)} predictions to {args.output_path}")
    distributed.stop(world)
    return result


def main(argv=None) -> int:
    _, (model_args, predict_args) = parse_dataclasses(
        {"model": ModelArgs, "generation": PredictArgs}, argv, prog="predict.py",
        description="Write [{id, output}] predictions for a test file.")
    return run_main(predict, model_args, predict_args)


if __name__ == "__main__":
    sys.exit(main())
