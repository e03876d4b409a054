"""The flags of `scripts/train.py`: qlora.py's four argument groups, with its names and defaults.

artidoro/qlora's `qlora.py` parses ModelArguments, DataArguments, TrainingArguments (a subclass of
transformers' Seq2SeqTrainingArguments) and GenerationArguments with HfArgumentParser and
`return_remaining_strings=True`, so a mistyped or unsupported flag was silently ignored (`--lora_modules
all` in the course's seed command never did anything there). Here every flag is a dataclass field; an
unknown flag is an error, and a flag qlora.py or transformers accepts that minqlora does not implement
is an error that says so. Defaults are qlora.py's (transformers' where qlora.py has none); where a
qlora.py default names a Hugging Face hub repo, the embedded tiny model and example data stand in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .cli import DTYPES, FlagError, parse_dataclasses


class ArgsError(FlagError):
    pass


def _f(default, help, choices=None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class ModelArguments:
    model_name_or_path: str = _f("weights/tiny", "Model folder (Hugging Face layout: config.json, "
                                 "safetensors or .bin weights, tokenizer). qlora.py's default was a hub name")
    trust_remote_code: bool = _f(False, "qlora.py: run the checkpoint's own Python code. Refused: "
                                 "minqlora runs its own Llama code only")
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
    evaluation_strategy: str | None = _f(None, "transformers < 4.41 spelling of --eval_strategy",
                                         ["no", "steps", "epoch", None])
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
    adam8bit: bool = _f(False, "qlora.py's flag (unused there): same as --optim paged_adamw_8bit")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = _f(0.3, "Clip the gradient's global L2 norm to this (0: no clipping)")
    bits: int = _f(4, "Base weights: 4 (NF4/FP4, QLoRA) or 16 (unquantized). 8 is not implemented")
    quant_type: str = _f("nf4", "4-bit data type", ["nf4", "fp4"])
    double_quant: bool = _f(True, "Quantize the 4-bit block scales again (QLoRA section 3)")
    full_finetune: bool = _f(False, "qlora.py: train every weight. Not implemented (LoRA only)")
    lora_r: int = _f(64, "LoRA rank")
    lora_alpha: float = _f(16, "LoRA alpha (update scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input")
    lora_modules: str = _f("all", "LoRA targets: all (every linear but lm_head) or names, e.g. q_proj,v_proj")
    train_on_source: bool = _f(False, "Also score the prompt tokens")
    gradient_checkpointing: bool = _f(True, "Recompute each layer in backward (less memory, ~30%% slower)")
    group_by_length: bool = _f(True, "Order examples so each optimizer step holds similar lengths")
    bf16: bool = _f(False, "Train in bfloat16 (model dtype; LoRA weights and optimizer stay fp32)")
    fp16: bool = _f(False, "Train in float16 (model dtype) with a gradient scaler")
    max_memory_MB: int = _f(80000, "qlora.py: per-GPU memory for spreading weights over GPUs. minqlora runs "
                            "on one device: accepted, no effect")
    report_to: str = _f("none", "Only 'none': progress goes to log.jsonl and curves.png", ["none"])
    remove_unused_columns: bool = _f(False, "Accepted for qlora.py's command lines; no effect (records are "
                                     "tokenized here, no columns to remove)")
    dataloader_num_workers: int = _f(0, "Accepted for qlora.py's command lines; no effect: the data is "
                                     "tokenized once, before training, and batches are built in memory")


@dataclass
class GenerationArguments:
    """qlora.py used these only with --do_predict; training does not generate. Kept in run_config.json."""
    max_new_tokens: int | None = _f(256, "Generation: most new tokens (no effect on training)")
    min_new_tokens: int | None = _f(None, "Generation: fewest new tokens (no effect on training)")
    do_sample: bool = _f(False, "Generation: sample (no effect on training)")
    num_beams: int = _f(1, "Generation (no effect on training)")
    num_beam_groups: int = _f(1, "Generation (no effect on training)")
    penalty_alpha: float | None = _f(None, "Generation (no effect on training)")
    use_cache: bool = _f(True, "Generation (no effect on training)")
    temperature: float = _f(1.0, "Generation (no effect on training)")
    top_k: int = _f(50, "Generation (no effect on training)")
    top_p: float = _f(1.0, "Generation (no effect on training)")
    typical_p: float = _f(1.0, "Generation (no effect on training)")
    diversity_penalty: float = _f(0.0, "Generation (no effect on training)")
    repetition_penalty: float = _f(1.0, "Generation (no effect on training)")
    length_penalty: float = _f(1.0, "Generation (no effect on training)")
    no_repeat_ngram_size: int = _f(0, "Generation (no effect on training)")


GROUPS = {"model arguments": ModelArguments, "data arguments": DataArguments,
          "training arguments": TrainingArguments, "generation arguments": GenerationArguments}

# Flags qlora.py or transformers accept that minqlora does not implement: refused by name.
NOT_IMPLEMENTED = {
    **{f: "MMLU evaluation is not implemented (it needs the MMLU data from the hub)"
       for f in ("do_mmlu_eval", "mmlu_split", "mmlu_dataset", "max_mmlu_samples", "mmlu_source_max_len")},
    "do_predict": "prediction is a separate step: use scripts/predict.py",
    "predict_with_generate": "prediction is a separate step: use scripts/predict.py",
    "deepspeed": "DeepSpeed is not supported: minqlora trains on one device",
    "fsdp": "FSDP is not supported: minqlora trains on one device",
    "local_rank": "distributed training is not supported: minqlora trains on one device",
    "cache_dir": "there is no hub download, so no cache: pass a local --model_name_or_path",
    "load_best_model_at_end": "the best adapter is always kept in OUTPUT_DIR/best (the final one is the last "
                              "step's)",
    "metric_for_best_model": "the best checkpoint is always the one with the lowest eval perplexity",
    "torch_compile": "torch.compile is not used",
    "auto_find_batch_size": "not implemented: set --per_device_train_batch_size",
}


@dataclass
class RunArgs:
    model: ModelArguments
    data: DataArguments
    train: TrainingArguments
    generation: GenerationArguments

    def to_dict(self) -> dict:
        return {**asdict(self.model), **asdict(self.data), **asdict(self.train), **asdict(self.generation)}


def _refuse_unimplemented(argv):
    for a in argv:
        name = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if name in NOT_IMPLEMENTED:
            raise ArgsError(f"--{name} is accepted by qlora.py/transformers but not implemented in minqlora: "
                            f"{NOT_IMPLEMENTED[name]}")


def validate(a: RunArgs) -> RunArgs:
    """Check combinations, fill the derived values (eval_strategy, do_eval, eval_steps, optim)."""
    m, d, t = a.model, a.data, a.train
    if m.trust_remote_code:
        raise ArgsError("--trust_remote_code True: minqlora never runs a checkpoint's own code; it runs its "
                        "own Llama implementation (drop the flag)")
    if t.full_finetune:
        raise ArgsError("--full_finetune True is not implemented: minqlora trains LoRA adapters only")
    if t.bits == 8:
        raise ArgsError("--bits 8 (LLM.int8) is not implemented: use --bits 4 (QLoRA) or --bits 16")
    if t.bits not in (4, 16):
        raise ArgsError(f"--bits {t.bits}: expected 4 or 16")
    if t.evaluation_strategy is not None:
        if t.eval_strategy not in ("no", t.evaluation_strategy):
            raise ArgsError(f"--evaluation_strategy {t.evaluation_strategy} and --eval_strategy {t.eval_strategy} "
                            "disagree")
        t.eval_strategy = t.evaluation_strategy
    if t.eval_strategy != "no":
        t.do_eval = True  # transformers' TrainingArguments does the same
    if t.eval_steps is None:
        t.eval_steps = t.logging_steps
    if t.adam8bit:
        if t.optim not in ("paged_adamw_32bit", "paged_adamw_8bit"):
            raise ArgsError(f"--adam8bit and --optim {t.optim} disagree")
        t.optim = "paged_adamw_8bit"
    if t.bf16 and t.fp16:
        raise ArgsError("--bf16 and --fp16: choose one")
    want = "bfloat16" if t.bf16 else "float16" if t.fp16 else None
    if want and m.dtype not in (None, want):
        raise ArgsError(f"--dtype {m.dtype} disagrees with --{'bf16' if t.bf16 else 'fp16'}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                 "logging_steps", "save_steps", "eval_steps", "lora_r"):
        if getattr(t, name) < 1:
            raise ArgsError(f"--{name} must be at least 1, got {getattr(t, name)}")
    for name, special in (("source_max_len", "BOS"), ("target_max_len", "EOS")):
        if getattr(d, name) < 1:
            raise ArgsError(f"--{name} {getattr(d, name)}: must be at least 1 (it counts the {special} token)")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(d, name) is not None and getattr(d, name) < 0:
            raise ArgsError(f"--{name} {getattr(d, name)}: must be at least 0 (or None: all)")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ArgsError("--max_steps <= 0 and --num_train_epochs <= 0: nothing to train")
    if not 0 <= t.lora_dropout < 1:
        raise ArgsError(f"--lora_dropout {t.lora_dropout}: expected 0 <= p < 1")
    if t.learning_rate <= 0:
        raise ArgsError(f"--learning_rate {t.learning_rate}: must be positive")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise ArgsError(f"--save_total_limit {t.save_total_limit}: must be at least 1 (or None: keep all)")
    if t.early_stopping_patience is not None and (t.early_stopping_patience < 1 or t.eval_strategy == "no"):
        raise ArgsError("--early_stopping_patience needs N >= 1 and evaluation (--evaluation_strategy steps)")
    if "chat" in (d.prompt_template, d.eval_prompt_template) and d.dataset_format == "input-output":
        raise ArgsError("--prompt_template chat puts each record's instruction in the user turn: pass "
                        "--dataset_format course or alpaca (input-output records have no instruction)")
    if not t.do_train:
        raise ArgsError("--do_train False: nothing to do here; evaluate an adapter with scripts/ppl.py")
    return a


def parse_args(argv=None, prog="train.py", description=None):
    """(parser, RunArgs) from the command line; ArgsError for refused flags or combinations."""
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    _refuse_unimplemented(argv)
    parser, parts = parse_dataclasses(GROUPS, argv, description=description, prog=prog)
    return parser, validate(RunArgs(*parts))


def lora_targets(spec: str):
    """'all' or a comma-separated list of module names."""
    if spec == "all":
        return "all"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ArgsError(f"--lora_modules {spec!r}: expected 'all' or names such as q_proj,v_proj")
    return names


def resolve_dtype(a: RunArgs) -> torch.dtype:
    name = a.model.dtype or ("bfloat16" if a.train.bf16 else "float16" if a.train.fp16 else "float32")
    return getattr(torch, name)
