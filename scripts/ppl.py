"""Mean perplexity of a model (+ adapter) on a test file, as the course's ppl.py computes it.

    python scripts/ppl.py --base_model_path DIR [--peft_path ADAPTER] --test_data_path FILE
    python scripts/ppl.py ... --few_shot 10 --repeats 5 [--balanced] [--few_shot_pool train.json]

Prints `Mean perplexity: X` (and, with several few-shot draws, each draw's mean and their std). Flags ->
load -> run -> write; the metric is minqlora/perplexity.py, the course's protocol and few-shot draws
minqlora/course.py. Exit status 2 for bad input, found before the model loads and before any file is written.
Checked in tests/test_infer_scripts.py and tests/test_perplexity.py. No paper section.
"""
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora import distributed  # noqa: E402
from minqlora.atomic import atomic_file  # noqa: E402
from minqlora.cli import (PROMPT_TEMPLATE_HELP, ModelArgs, check_positive, inference_prompt,  # noqa: E402
                          parse_dataclasses)
from minqlora.course import FewShotPrompt, direction_counts, plan_draws  # noqa: E402
from minqlora.data import read_records  # noqa: E402
from minqlora.errors import BadInput, run_main  # noqa: E402
from minqlora.loader import load_with_adapter, resolve_device_dtype  # noqa: E402
from minqlora.outputs import check_output_file_path, check_seed  # noqa: E402
from minqlora.perplexity import mean_perplexity, perplexities  # noqa: E402


@dataclass
class PplArgs:
    test_data_path: str = field(default="data/example/test.json", metadata={
        "help": "records with instruction and output (.json list or .jsonl)"})
    prompt_template: str = field(default="course", metadata={"help": PROMPT_TEMPLATE_HELP})
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


def ppl(m: ModelArgs, args: PplArgs) -> list[float]:
    # 1. Flags and data, every check before the model loads.
    check_positive(batch_size=(args.batch_size, 1), max_length=(args.max_length, 2),
                   few_shot=(args.few_shot, 0), repeats=(args.repeats, 1))
    if args.few_shot == 0 and (args.repeats > 1 or args.balanced or args.few_shot_pool):
        raise BadInput("--repeats, --balanced and --few_shot_pool need --few_shot K (K > 0)")
    check_seed("seed", args.seed)
    device, dtype = resolve_device_dtype(m.device, m.dtype)
    prompt = inference_prompt(args.prompt_template, m)  # adapter: recorded by training; chat: the folder's
    required = (*prompt.fields, "output")
    test = read_records(args.test_data_path, required=required, unique_ids=True)
    draws = [([], list(range(len(test))))]  # (shots, indices of the scored records): zero-shot scores all
    if args.few_shot:
        same = (args.few_shot_pool is None
                or Path(args.few_shot_pool).resolve() == Path(args.test_data_path).resolve())
        pool = None if same else read_records(args.few_shot_pool, required=required)
        draws = plan_draws(test, pool, k=args.few_shot, repeats=args.repeats, seed=args.seed,
                           balanced=args.balanced, pool_name=args.few_shot_pool or args.test_data_path)
    if args.per_example_out:
        check_output_file_path(args.per_example_out, "--per_example_out", inputs={
            "--test_data_path": args.test_data_path, "--few_shot_pool": args.few_shot_pool,
            "--base_model_path": m.base_model_path, "--peft_path": m.peft_path})
    world = distributed.start(m.device)  # under torchrun: records dealt out, process 0 prints and writes
    progress = args.progress and world.main
    say = print if world.main else (lambda *a, **k: None)

    # 2. Load: the 4-bit base, the adapter on it.
    model, tokenizer = load_with_adapter(m.base_model_path, m.peft_path, bits=m.bits, quant_type=m.quant_type,
                                         double_quant=m.double_quant, dtype=dtype, device=device,
                                         progress=progress)

    # 3. Run: each draw scores its records with its shots in front of every prompt.
    means, rows = [], []
    for r, (shots, scored) in enumerate(draws, 1):
        p = FewShotPrompt(prompt, shots) if shots else prompt
        values = distributed.gather(perplexities(
            model, tokenizer, [test[i] for i in distributed.shard(scored, world)], p, batch_size=args.batch_size,
            max_length=args.max_length, progress=progress, source=args.test_data_path), world)
        means.append(mean_perplexity(values))
        for i, v in zip(scored, values):
            rows.append({**({"draw": r} if len(draws) > 1 else {}), "id": test[i].get("id"), "index": i,
                         "perplexity": v})
        if shots:
            counts = direction_counts(shots)
            say(f"Draw {r}/{len(draws)}: {args.few_shot} shots ({counts['modern->classical']} "
                f"modern->classical, {counts['classical->modern']} classical->modern), "
                f"{len(scored)} scored, mean perplexity: {means[-1]}")

    # 4. Write: the course's line; over several draws their mean and sample std; each example's number.
    say("Mean perplexity:", math.fsum(means) / len(means))
    if len(draws) > 1:
        say(f"Std perplexity: {statistics.stdev(means)} (sample std over {len(draws)} draws)")
    if args.per_example_out and world.main:
        write_per_example(args.per_example_out, rows)
    distributed.stop(world)
    return means


def write_per_example(path, rows: list[dict]):
    """Rows (id, index, perplexity, ...) as CSV for a .csv path, else a JSON list, atomically; NaN
    perplexities become null in JSON and empty cells in CSV."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    if str(path).lower().endswith(".csv"):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(clean[0]) if clean else ["id", "index", "perplexity"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(clean)
        text = buf.getvalue()
    else:
        text = json.dumps(clean, ensure_ascii=False, indent=1) + "\n"
    with atomic_file(path) as f:
        f.write(text)


def main(argv=None) -> int:
    _, (model_args, ppl_args) = parse_dataclasses(
        {"model": ModelArgs, "perplexity": PplArgs}, argv, prog="ppl.py",
        description="Mean perplexity of the outputs of a test file (the course's metric).")
    return run_main(ppl, model_args, ppl_args)


if __name__ == "__main__":
    sys.exit(main())
