"""qlora.py compatibility: the flags that exist only so that a qlora.py command line runs unchanged.

artidoro/qlora's `qlora.py` parses its flags with HfArgumentParser and `return_remaining_strings=True`,
so a mistyped or unsupported flag was silently ignored (`--lora_modules all` in the course's seed
command never did anything there). Here every flag is checked; the ones below are what a qlora.py
command line may hold beyond minqlora's own flags (train_args.py), each with what it does here:
    honoured, as an alias   --evaluation_strategy (= --eval_strategy), --adam8bit (= --optim paged_adamw_8bit)
    accepted, no effect     NO_EFFECT below (generation, multi-GPU memory, reporting, dataloader flags):
                            named once at start when a command line sets them
    refused, with a reason  --trust_remote_code True, --full_finetune True, --bits 8 (in `check`), and
                            the flag names of NOT_IMPLEMENTED
Defaults are qlora.py's. No paper section. Checked by the seed command run verbatim and the refusal
tests in tests/test_train.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import BadInput


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


@dataclass
class QloraArguments:
    trust_remote_code: bool = _f(False, "qlora.py: run the checkpoint's own Python code. Refused: minqlora runs "
                                 "its own Llama code only")
    full_finetune: bool = _f(False, "qlora.py: train every weight. Not implemented (LoRA only)")
    evaluation_strategy: str | None = _f(None, "transformers < 4.41 spelling of --eval_strategy",
                                         ["no", "steps", "epoch", None])
    adam8bit: bool = _f(False, "qlora.py's flag (unused there): same as --optim paged_adamw_8bit")
    max_memory_MB: int = _f(80000, "qlora.py: per-GPU memory for spreading weights over GPUs. minqlora runs on "
                            "one device: no effect")
    report_to: str = _f("none", "Only 'none': progress goes to log.jsonl and curves.png", ["none"])
    remove_unused_columns: bool = _f(False, "No effect (records are tokenized here, no columns to remove)")
    dataloader_num_workers: int = _f(0, "No effect: the data is tokenized once, before training, and batches "
                                     "are built in memory")


@dataclass
class GenerationArguments:
    """qlora.py used these only with --do_predict; training does not generate (scripts/predict.py does).
    Accepted with no effect; kept in run_config.json."""
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


NO_EFFECT = ("max_memory_MB", "report_to", "remove_unused_columns", "dataloader_num_workers",
             *(f.name for f in fields(GenerationArguments)))

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
    "auto_find_batch_size": "not implemented: set --per_device_train_batch_size",
}


def flag_names(argv) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


def refuse_unimplemented(argv):
    for name in flag_names(argv):
        if name in NOT_IMPLEMENTED:
            raise BadInput(f"--{name} is accepted by qlora.py/transformers but not implemented in minqlora: "
                           f"{NOT_IMPLEMENTED[name]}")


def check(q: QloraArguments, t, bits: int):
    """Refuse what minqlora cannot do; resolve the aliases into `t` (the TrainingArguments)."""
    if q.trust_remote_code:
        raise BadInput("--trust_remote_code True: minqlora never runs a checkpoint's own code; it runs its "
                       "own Llama implementation (drop the flag)")
    if q.full_finetune:
        raise BadInput("--full_finetune True is not implemented: minqlora trains LoRA adapters only")
    if bits == 8:
        raise BadInput("--bits 8 (LLM.int8) is not implemented: use --bits 4 (QLoRA) or --bits 16")
    if q.evaluation_strategy is not None:
        if t.eval_strategy not in ("no", q.evaluation_strategy):
            raise BadInput(f"--evaluation_strategy {q.evaluation_strategy} and --eval_strategy {t.eval_strategy} "
                           "disagree")
        t.eval_strategy = q.evaluation_strategy
    if q.adam8bit:
        if t.optim not in ("paged_adamw_32bit", "paged_adamw_8bit"):
            raise BadInput(f"--adam8bit and --optim {t.optim} disagree")
        t.optim = "paged_adamw_8bit"


def no_effect_note(argv) -> str | None:
    """The line printed once at start naming the flags of this command line that do nothing here."""
    given = [n for n in dict.fromkeys(flag_names(argv)) if n in NO_EFFECT]
    if not given:
        return None
    return ("note: accepted for qlora.py command lines, no effect here: " + ", ".join(f"--{n}" for n in given)
            + " (python scripts/train.py --help says why)")
