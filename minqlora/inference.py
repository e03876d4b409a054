"""What scripts/ppl.py and scripts/predict.py share: model flags, loading, and the two runs.

Model flags mirror training's (qlora.py's --bits, --quant_type, --double_quant); the course's
ppl.py loads Taiwan-LLM in 4-bit NF4 with double quantization and bf16 compute, which is this
file's default on CUDA (`--dtype auto`: bfloat16 on CUDA, float32 on CPU). An adapter is loaded
through adapter.load_adapter (minqlora's or peft's files). Every user error (bad data, flags,
checkpoint, adapter, a prompt longer than the context) is raised as one of USER_ERRORS, which the
scripts print as `error: ...` with exit code 2, before any output file is touched.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterError, load_adapter
from .atomic import atomic_file
from .chat import prompt_for
from .cli import DTYPES, FlagError, resolve_device
from .config import ConfigError
from .fewshot import FewShotError, FewShotPrompt, direction_counts, plan_draws
from .generate import PromptTooLongError, generate
from .loader import LoadError, load_model
from .perplexity import mean_perplexity, perplexities, summarize, write_per_example
from .prompts import NAMES as PROMPT_NAMES
from .records import DataError, read_records
from .tokenizer import Tokenizer

class InferenceError(FlagError):
    pass


USER_ERRORS = (FlagError, DataError, LoadError, ConfigError, AdapterError, FewShotError,
               PromptTooLongError, FileNotFoundError)


@dataclass
class ModelArgs:
    base_model_path: str = field(default="weights/tiny", metadata={"help": "Hugging Face model folder"})
    peft_path: str | None = field(default=None, metadata={"help": "LoRA adapter folder (peft format)"})
    bits: int = field(default=4, metadata={"help": "4: NF4/FP4 base weights (QLoRA); 16: unquantized",
                                           "choices": [4, 16]})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type", "choices": ["nf4", "fp4"]})
    double_quant: bool = field(default=True, metadata={"help": "quantize the 4-bit absmax constants too"})
    dtype: str = field(default="auto", metadata={
        "help": "compute dtype; auto = bfloat16 on CUDA, float32 on CPU",
        "choices": ["auto", *DTYPES]})
    device: str = field(default="auto", metadata={"help": "auto = cuda if available",
                                                  "choices": ["auto", "cpu", "cuda"]})


def resolve_device_dtype(args: ModelArgs) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(args.device)
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[args.dtype]


def load_for_inference(args: ModelArgs, progress: bool = True):
    """(model in eval mode with the adapter applied, tokenizer) for the flags in `args`."""
    device, dtype = resolve_device_dtype(args)
    model = load_model(args.base_model_path, bits=args.bits, quant_type=args.quant_type,
                       double_quant=args.double_quant, dtype=dtype, device=device, progress=progress)
    tokenizer = Tokenizer.from_dir(args.base_model_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InferenceError(f"{args.base_model_path}: the tokenizer has {tokenizer.vocab_size} tokens, "
                             f"more than the model's vocab_size={model.config.vocab_size}")
    if tokenizer.eos_id is None:
        raise InferenceError(f"{args.base_model_path}: the tokenizer names no eos token")
    if args.peft_path:
        load_adapter(model, args.peft_path)  # LoRA weights land on each base layer's device
    return model.eval(), tokenizer


def check_output_path(path, flag: str):
    """Refuse, before any model work, an output path that cannot become a file."""
    p = Path(path)
    if p.is_dir():
        raise InferenceError(f"{flag} {path}: is a folder; give a file name")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InferenceError(f"{flag} {path}: {parent} is a file, not a folder")


def make_prompt(template: str, model_dir=None):
    try:
        return prompt_for(template, model_dir)  # chat.py: "chat" renders the folder's chat template
    except ValueError as e:
        raise InferenceError(f"--prompt_template: {e}") from None


def run_cli(fn, *args) -> int:
    """Call fn(*args); a user error becomes `error: ...` on stderr and exit code 2."""
    try:
        fn(*args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@dataclass
class PplArgs:
    test_data_path: str = field(default="data/example/test.json", metadata={
        "help": "records with instruction and output (.json list or .jsonl)"})
    prompt_template: str = field(default="course", metadata={
        "help": f"{', '.join(PROMPT_NAMES)}, chat (the model folder's chat template), "
                "or a file holding {instruction}"})
    max_length: int = field(default=2048, metadata={"help": "cut each example to this many tokens"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass"})
    few_shot: int = field(default=0, metadata={"help": "solved examples put in front of each prompt"})
    few_shot_pool: str | None = field(default=None, metadata={
        "help": "file to draw the examples from; None: the test file (drawn records are not scored)"})
    balanced: bool = field(default=False, metadata={
        "help": "draw the examples evenly from both translation directions"})
    repeats: int = field(default=1, metadata={"help": "number of few-shot draws; prints each, mean and std"})
    seed: int = field(default=42, metadata={"help": "seed of the few-shot draws"})
    per_example_out: str | None = field(default=None, metadata={
        "help": "write each example's id and perplexity here (.csv, else JSON)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def _check_positive(**values):
    for name, (value, low) in values.items():
        if value < low:
            raise InferenceError(f"--{name} {value}: must be at least {low}")


def run_ppl(margs: ModelArgs, args: PplArgs) -> list[float]:
    """Score the test file (zero- or few-shot, one or more draws); print as the course does."""
    _check_positive(batch_size=(args.batch_size, 1), max_length=(args.max_length, 2),
                    few_shot=(args.few_shot, 0), repeats=(args.repeats, 1))
    if args.few_shot == 0 and (args.repeats > 1 or args.balanced or args.few_shot_pool):
        raise InferenceError("--repeats, --balanced and --few_shot_pool need --few_shot K (K > 0)")
    prompt = make_prompt(args.prompt_template, margs.base_model_path)
    required = (*prompt.fields, "output")
    test = read_records(args.test_data_path, required=required, unique_ids=True)
    draws = [([], list(range(len(test))))]
    if args.few_shot:
        same = (args.few_shot_pool is None
                or Path(args.few_shot_pool).resolve() == Path(args.test_data_path).resolve())
        pool = None if same else read_records(args.few_shot_pool, required=required)
        draws = plan_draws(test, pool, k=args.few_shot, repeats=args.repeats, seed=args.seed,
                           balanced=args.balanced, pool_name=args.few_shot_pool or args.test_data_path)
    if args.per_example_out:
        check_output_path(args.per_example_out, "--per_example_out")
    model, tokenizer = load_for_inference(margs, progress=args.progress)

    means, rows = [], []
    for r, (shots, scored) in enumerate(draws, 1):
        p = FewShotPrompt(prompt, shots) if shots else prompt
        values = perplexities(model, tokenizer, [test[i] for i in scored], p,
                              batch_size=args.batch_size, max_length=args.max_length,
                              progress=args.progress, source=args.test_data_path)
        means.append(mean_perplexity(values))
        for i, v in zip(scored, values):
            rows.append({**({"draw": r} if len(draws) > 1 else {}),
                         "id": test[i].get("id"), "index": i, "perplexity": v})
        if shots:
            counts = direction_counts(shots)
            print(f"Draw {r}/{len(draws)}: {args.few_shot} shots ({counts['modern->classical']} "
                  f"modern->classical, {counts['classical->modern']} classical->modern), "
                  f"{len(scored)} scored, mean perplexity: {means[-1]}")
    mean, std = summarize(means)
    print("Mean perplexity:", mean)
    if len(draws) > 1:
        print(f"Std perplexity: {std} (sample std over {len(draws)} draws)")
    if args.per_example_out:
        write_per_example(args.per_example_out, rows)
    return means


@dataclass
class PredictArgs:
    test_data_path: str = field(default="data/example/predict.json", metadata={
        "help": "records with id and instruction"})
    output_path: str = field(default="output/predictions.json", metadata={
        "help": "where to write [{id, output}] (replaced only when the run completes)"})
    prompt_template: str = field(default="course", metadata={
        "help": f"{', '.join(PROMPT_NAMES)}, chat (the model folder's chat template), "
                "or a file holding {instruction}"})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens at most per example"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample from the k likeliest tokens; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "1.0 = off; >1 discourages repeats"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together"})
    seed: int = field(default=42, metadata={"help": "seed of the sampling"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def run_predict(margs: ModelArgs, args: PredictArgs) -> list[dict]:
    """Write [{"id", "output"}] for every record of the test file, in its order."""
    _check_positive(batch_size=(args.batch_size, 1), max_new_tokens=(args.max_new_tokens, 1),
                    top_k=(args.top_k, 0))
    if not 0 < args.top_p <= 1:
        raise InferenceError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.temperature <= 0 or args.repetition_penalty <= 0:
        raise InferenceError("--temperature and --repetition_penalty must be > 0")
    prompt = make_prompt(args.prompt_template, margs.base_model_path)
    path = args.test_data_path
    records = read_records(path, required=prompt.fields, unique_ids=True)
    for i, rec in enumerate(records):
        if rec.get("id") is None:
            raise InferenceError(f"{path}: record {i} has no 'id' field; predictions are keyed by id")
    check_output_path(args.output_path, "--output_path")
    model, tokenizer = load_for_inference(margs, progress=args.progress)
    names = [f"{path}: record {i} (id {rec['id']!r})" for i, rec in enumerate(records)]
    outputs = generate(model, tokenizer, [prompt(r) for r in records],
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                       seed=args.seed, names=names, progress=args.progress)
    result = [{"id": rec["id"], "output": out} for rec, out in zip(records, outputs)]
    with atomic_file(args.output_path) as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"Wrote {len(result)} predictions to {args.output_path}")
    return result
