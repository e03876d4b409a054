"""Train a QLoRA adapter: qlora.py's command line, minqlora's loop.

    python scripts/train.py                     # the embedded demo: weights/tiny on data/example, ~2 min on a CPU
    python scripts/train.py --model_name_or_path weights/Taiwan-LLM-7B-v2.0-chat --dataset data/train.json \\
        --dataset_format alpaca --output_dir output/run1 --bf16 ...   # any qlora.py command line
    python scripts/train.py --output_dir output/run1 --resume_from_checkpoint latest
    torchrun --nproc_per_node 2 scripts/train.py <the same flags>   # data parallel on 2 GPUs

Exit status: 0 done; 2 bad input (flags, data, model folder, output_dir, checkpoint), found before the
first step, nothing written; 1 training failed once started (loss or weights NaN/inf, out of memory, or
any error during the loop, e.g. a full disk: the trainer reports it as a TrainingError), earlier
checkpoints kept; 130 interrupted (Ctrl-C), after saving a checkpoint to resume from (minqlora/errors.py).
Checked in tests/test_train.py (gradients against transformers + peft), tests/test_checkpoint.py and
tests/test_distributed.py. QLoRA §3-4 (minqlora/trainer.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# With no flags at all: the embedded tiny model (weights/tiny, 1M parameters, 4-bit) learns the example
# data visibly: 600 steps (12 epochs), train loss 0.50 -> ~0.07, eval perplexity 3.24 -> ~2.64, in about
# 75 s on 2 CPU cores. A model this small needs a far higher learning rate than qlora.py's 2e-4 for 7B.
DEMO = ["--model_name_or_path", "weights/tiny", "--dataset", "data/example/train.json",
        "--eval_dataset", "data/example/eval.json", "--dataset_format", "alpaca", "--output_dir", "output/default",
        "--overwrite_output_dir", "--max_steps", "600", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--learning_rate", "0.003", "--lr_scheduler_type", "linear",
        "--source_max_len", "128", "--target_max_len", "128", "--lora_r", "16", "--lora_alpha", "32",
        "--logging_steps", "10", "--evaluation_strategy", "steps", "--eval_steps", "25", "--eval_on_start",
        "--save_steps", "100", "--save_total_limit", "3"]

DESCRIPTION = ("Fine-tune a Llama-family model with QLoRA. Flags, names and defaults are qlora.py's; with no flags "
               "at all it runs a small demo: " + " ".join(DEMO))


def run(argv):
    from minqlora import distributed
    from minqlora.qlora_compat import no_effect_note
    from minqlora.train_args import parse_args
    from minqlora.trainer import train

    _, args = parse_args(argv, prog="train.py", description=DESCRIPTION)
    world = distributed.start(args.model.device)  # one process, or torchrun's (minqlora/distributed.py)
    note = no_effect_note(argv)
    if note and world.main:
        print(note)
    result = train(args, world=world)
    distributed.stop(world)
    if not world.main:
        return
    out = Path(result["output_dir"])
    earlier = f" ({result['elapsed']:.0f} s with the earlier sessions)" if result["resumed"] else ""
    print(f"done: {result['step']} steps ({result['stop']}) in {result['session']:.0f} s{earlier}")
    print(f"  adapter     {out}/adapter_model.safetensors (+ adapter_config.json)")
    if result["best_dir"]:
        print(f"  best        {result['best_dir']} (eval perplexity {result['best_eval_ppl']:.4f} "
              f"at step {result['best_step']})")
    print(f"  log         {out}/log.jsonl")
    print(f"  curves      {out}/curves.png, {out}/curves.csv")


def main(argv=None):
    from minqlora.errors import run_main

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print("no flags: running the demo (python scripts/train.py --help lists the flags):\n  "
              "python scripts/train.py " + " ".join(DEMO), flush=True)
        argv = DEMO
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
