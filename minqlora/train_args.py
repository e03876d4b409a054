"""The flags of `scripts/train.py`: qlora.py's argument groups, with its names and defaults.

artidoro/qlora's `qlora.py` reads ModelArguments, DataArguments, TrainingArguments (transformers'
Seq2SeqTrainingArguments) and GenerationArguments; each of minqlora's own flags is a dataclass field
below, documented once (its help). What exists only so that qlora.py command lines run (aliases, flags
with no effect here, refusals) is qlora_compat.py. Defaults are qlora.py's (transformers' where qlora.py
has none); where a qlora.py default names a Hugging Face hub repo, the embedded tiny model and example
data stand in. No paper section. Checked against qlora.py's defaults and the seed command in
tests/test_train.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import qlora_compat as compat
from .cli import parse_dataclasses
from .chat import prompt_for
from .data import check_limits, make_data_module
from .errors import BadInput
from .loader import DTYPES
from .lora import target_module_names
from .outputs import check_number, check_output_dir_path, check_seed


def _f(default, help, choices=None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class ModelArguments:
    model_name_or_path: str = _f("weights/tiny", "Model folder (Hugging Face layout: config.json, "
                                 "safetensors or .bin weights, tokenizer). qlora.py's default was a hub name")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    dtype: str | None = _f(None, "Model/compute dtype. None: bfloat16 with --bf16, float16 with --fp16, "
                           "else float32 (as qlora.py, whose compute dtype is fp32 without them)",
                           [*DTYPES, None])


@dataclass
class DataArguments:
    eval_dataset_size: int = _f(1024, "Records held out of --dataset for evaluation (when --do_eval and no "
                                "--eval_dataset), chosen at random with --data_seed (else --seed)")
    max_train_samples: int | None = _f(None, "Keep only the first N training records")
    max_eval_samples: int | None = _f(None, "Keep only the first N evaluation records")
    source_max_len: int = _f(1024, "Prompt tokens kept ([BOS]+prompt, cut at the end)")
    target_max_len: int = _f(256, "Output tokens kept (output+[EOS], cut at the end)")
    dataset: str = _f("data/example/train.json", "Training data: a JSON list or JSON Lines file of records")
    dataset_format: str = _f("input-output", "How a record becomes prompt text: alpaca (qlora.py's Alpaca "
                             "prompt), input-output (the record's 'input' verbatim; qlora.py's choice for a "
                             "local file when no format is given), course (the ADL HW3 chat prompt)",
                             ["alpaca", "input-output", "course"])
    eval_dataset: str | None = _f(None, "Evaluation data file (e.g. public_test.json); if given, nothing "
                                  "is held out of --dataset")
    eval_prompt_template: str | None = _f(None, "Prompt for the eval perplexity metric: course, alpaca, "
                                          "input-output, chat or a template file. None: --prompt_template's")
    prompt_template: str | None = _f(None, "Prompt for training and eval: course, alpaca, input-output, chat (the "
                                     "model folder's chat template) or a template file. None: --dataset_format's")


@dataclass
class TrainingArguments:
    output_dir: str = _f("./output", "Where checkpoints, log.jsonl, curves and the final adapter go")
    overwrite_output_dir: bool = _f(False, "Allow an --output_dir that holds another run (its checkpoints, "
                                    "log and adapter are deleted)")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint-N folder, or 'latest' (the newest in --output_dir): "
                                            "continue with its optimizer, schedule, RNG and data order")
    do_train: bool = _f(True, "Train")
    do_eval: bool = _f(False, "Evaluate (eval loss and mean perplexity) at the end, and during training "
                       "per --evaluation_strategy (which implies it, as in transformers)")
    eval_strategy: str = _f("no", "When to evaluate", ["no", "steps", "epoch"])
    eval_steps: int | None = _f(None, "Evaluate every N optimizer steps. None: --logging_steps")
    eval_on_start: bool = _f(False, "Also evaluate before the first step (the base model's numbers)")
    per_device_eval_batch_size: int = _f(8, "Evaluation batch size")
    early_stopping_patience: int | None = _f(None, "Stop after N evaluations without a lower eval perplexity")
    logging_strategy: str = _f("steps", "When to log the training loss", ["no", "steps", "epoch"])
    logging_steps: int = _f(10, "Log every N optimizer steps")
    save_strategy: str = _f("steps", "When to write a checkpoint (and always at the end unless 'no')",
                            ["no", "steps", "epoch"])
    save_steps: int = _f(250, "Write a checkpoint every N optimizer steps")
    save_total_limit: int | None = _f(40, "Keep at most N checkpoints (the oldest go; never the best, "
                                      "never the newest)")
    seed: int = _f(42, "Seed for LoRA init, dropout and (without --data_seed) the data order and split")
    data_seed: int | None = _f(None, "Seed for the data order and the eval split")
    max_steps: int = _f(10000, "Optimizer steps to train; <= 0: use --num_train_epochs")
    num_train_epochs: float = _f(3.0, "Epochs to train when --max_steps <= 0")
    per_device_train_batch_size: int = _f(1, "Examples per forward/backward pass (micro-batch)")
    gradient_accumulation_steps: int = _f(16, "Micro-batches per optimizer step")
    loss_normalization: str = _f("example", "How accumulated micro-batch losses combine: example (each "
                                 "micro-batch's own token mean / gradient_accumulation_steps: what qlora.py's "
                                 "Trainer did) or token (sum over every target token of the step / their count: "
                                 "current transformers; equals one big batch)", ["example", "token"])
    learning_rate: float = _f(0.0002, "Peak learning rate")
    lr_scheduler_type: str = _f("constant", "constant (no warmup, as transformers), constant_with_warmup, "
                                "linear or cosine", ["constant", "constant_with_warmup", "linear", "cosine"])
    warmup_ratio: float = _f(0.03, "Warmup steps as a fraction of the total (ignored by 'constant')")
    warmup_steps: int = _f(0, "Warmup steps; > 0 overrides --warmup_ratio")
    optim: str = _f("paged_adamw_32bit", "Optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"])
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = _f(0.3, "Clip the gradient's global L2 norm to this (0: no clipping)")
    bits: int = _f(4, "Base weights: 4 (NF4/FP4, QLoRA) or 16 (unquantized). 8 is not implemented")
    quant_type: str = _f("nf4", "4-bit data type", ["nf4", "fp4"])
    double_quant: bool = _f(True, "Quantize the 4-bit block scales again (QLoRA section 3)")
    lora_r: int = _f(64, "LoRA rank")
    lora_alpha: float = _f(16, "LoRA alpha (update scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input")
    lora_in_compute_dtype: bool = _f(False, "Run the LoRA matmuls of training passes in the model's dtype (bf16 "
                                     "with --bf16), as qlora.py casts its LoRA layers; the LoRA weights, "
                                     "their gradients and the optimizer stay fp32, and evaluation stays fp32 "
                                     "(as peft scores). Faster (bench/NOTES.md #18), gradients within bf16's "
                                     "rounding. Off: fp32, as peft computes them")
    lora_modules: str = _f("all", "LoRA targets: all (every linear but lm_head) or names, e.g. q_proj,v_proj")
    train_on_source: bool = _f(False, "Also score the prompt tokens")
    gradient_checkpointing: bool = _f(True, "Recompute each layer in backward (less memory, ~30%% slower)")
    pass_tokens: int = _f(-1, "Fast path, same gradient: pack each optimizer step's micro-batches into passes of "
                          "at most N tokens (lower N to cap memory). 0: one pass per micro-batch, as "
                          "transformers. -1: 4096 on a GPU, 0 on the CPU")
    cuda_graphs: bool = _f(False, "Fast path on a GPU with one pass per micro-batch: replay each pass's forward "
                           "and backward from CUDA graphs (lengths padded to a multiple of 128; no gradient "
                           "checkpointing inside a graph, so for short sequences)")
    torch_compile: bool = _f(False, "Fast path on a GPU: torch.compile each decoder layer for training passes (the "
                             "first pass of each shape compiles, tens of seconds); fuses the elementwise work")
    group_by_length: bool = _f(True, "Order examples so each optimizer step holds similar lengths")
    bf16: bool = _f(False, "Train in bfloat16 (model dtype; LoRA weights and optimizer stay fp32)")
    fp16: bool = _f(False, "Train in float16 (model dtype) with a gradient scaler")


GROUPS = {"model arguments": ModelArguments, "data arguments": DataArguments,
          "training arguments": TrainingArguments, "generation arguments": compat.GenerationArguments,
          "qlora.py compatibility arguments": compat.QloraArguments}

@dataclass
class RunArgs:
    model: ModelArguments
    data: DataArguments
    train: TrainingArguments
    generation: compat.GenerationArguments
    qlora: compat.QloraArguments

    def to_dict(self) -> dict:
        return {k: v for part in (self.model, self.data, self.train, self.generation, self.qlora)
                for k, v in asdict(part).items()}


def validate(a: RunArgs) -> RunArgs:
    """Check combinations, fill the derived values (eval_strategy, do_eval, eval_steps, optim)."""
    m, d, t = a.model, a.data, a.train
    compat.check(a.qlora, t, t.bits)
    if t.bits not in (4, 16):
        raise BadInput(f"--bits {t.bits}: expected 4 or 16")
    if t.eval_strategy != "no":
        t.do_eval = True  # transformers' TrainingArguments does the same
    if t.eval_steps is None:
        t.eval_steps = t.logging_steps
    if t.bf16 and t.fp16:
        raise BadInput("--bf16 and --fp16: choose one")
    want = "bfloat16" if t.bf16 else "float16" if t.fp16 else None
    if want and m.dtype not in (None, want):
        raise BadInput(f"--dtype {m.dtype} disagrees with --{'bf16' if t.bf16 else 'fp16'}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                 "logging_steps", "save_steps", "eval_steps", "lora_r"):
        if getattr(t, name) < 1:
            raise BadInput(f"--{name} must be at least 1, got {getattr(t, name)}")
    check_limits(d.source_max_len, d.target_max_len)
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(d, name) is not None and getattr(d, name) < 0:
            raise BadInput(f"--{name} {getattr(d, name)}: must be at least 0 (or None: all)")
    if t.max_steps <= 0 and not (math.isfinite(t.num_train_epochs) and t.num_train_epochs > 0):
        raise BadInput(f"--num_train_epochs {t.num_train_epochs}: must be a finite number > 0 when --max_steps "
                       f"is {t.max_steps} (<= 0 means: train --num_train_epochs epochs)")
    if t.pass_tokens < -1:
        raise BadInput(f"--pass_tokens {t.pass_tokens}: expected N > 0, 0 (off) or -1 (auto)")
    if not 0 <= t.lora_dropout < 1:
        raise BadInput(f"--lora_dropout {t.lora_dropout}: expected 0 <= p < 1")
    check_numbers(t)
    check_seed("seed", t.seed)
    check_seed("data_seed", t.data_seed)
    check_output_dir_path(t.output_dir)
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise BadInput(f"--save_total_limit {t.save_total_limit}: must be at least 1 (or None: keep all)")
    if t.early_stopping_patience is not None and (t.early_stopping_patience < 1 or t.eval_strategy == "no"):
        raise BadInput("--early_stopping_patience needs N >= 1 and evaluation (--evaluation_strategy steps)")
    if "chat" in (d.prompt_template, d.eval_prompt_template) and d.dataset_format == "input-output":
        raise BadInput("--prompt_template chat puts each record's instruction in the user turn: pass "
                       "--dataset_format course or alpaca (input-output records have no instruction)")
    if not t.do_train:
        raise BadInput("--do_train False: nothing to do here; evaluate an adapter with scripts/ppl.py")
    return a


def check_numbers(t):
    """The ranges of the float flags (and warmup_steps), each refused by name: NaN and inf never pass."""
    check_number("learning_rate", t.learning_rate, low=0, low_open=True)
    check_number("lora_alpha", t.lora_alpha, low=0, low_open=True,
                 hint="the update is scaled by alpha / r, so 0 trains an adapter that does nothing")
    check_number("adam_beta1", t.adam_beta1, low=0, high=1, high_open=True)
    check_number("adam_beta2", t.adam_beta2, low=0, high=1, high_open=True)
    check_number("adam_epsilon", t.adam_epsilon, low=0, low_open=True,
                 hint="it keeps AdamW from dividing by zero (the default is 1e-8)")
    check_number("weight_decay", t.weight_decay, low=0)
    check_number("warmup_ratio", t.warmup_ratio, low=0, high=1, hint="a fraction of the total steps")
    check_number("warmup_steps", t.warmup_steps, low=0)
    check_number("max_grad_norm", t.max_grad_norm, low=0, hint="0 turns clipping off")


def parse_args(argv=None, prog="train.py", description=None):
    """(parser, RunArgs) from the command line; BadInput for refused flags or combinations."""
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    compat.refuse_unimplemented(argv)
    parser, parts = parse_dataclasses(GROUPS, argv, description=description, prog=prog)
    return parser, validate(RunArgs(*parts))


def lora_targets(spec: str, model=None):
    """'all' or a comma-separated list of module names; with `model` (loader.skeleton's: no weights), each
    name must match some of its linear layers."""
    if spec == "all":
        return "all"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise BadInput(f"--lora_modules {spec!r}: expected 'all' or names such as q_proj,v_proj")
    if model is not None:
        try:
            target_module_names(model, names)
        except ValueError as e:
            raise BadInput(f"--lora_modules {spec}: {e}") from None
    return names


def training_data(a: RunArgs, tok, context=None, progress=True):
    """train.py's data from its flags: data.make_data_module with the prompt of --prompt_template (else
    --dataset_format) and the split seed (--data_seed, else --seed)."""
    d, t = a.data, a.train
    return make_data_module(
        tok, dataset=d.dataset, dataset_format=d.dataset_format, eval_dataset=d.eval_dataset, do_eval=t.do_eval,
        eval_dataset_size=d.eval_dataset_size, max_train_samples=d.max_train_samples,
        max_eval_samples=d.max_eval_samples, source_max_len=d.source_max_len, target_max_len=d.target_max_len,
        train_on_source=t.train_on_source, seed=t.data_seed if t.data_seed is not None else t.seed,
        context=context, progress=progress,
        prompt=prompt_for(d.prompt_template or d.dataset_format, a.model.model_name_or_path))


def dtype_name(a: RunArgs) -> str:
    """--dtype, else bfloat16 with --bf16, float16 with --fp16, else float32 (qlora.py's compute dtype)."""
    return a.model.dtype or ("bfloat16" if a.train.bf16 else "float16" if a.train.fp16 else "float32")
