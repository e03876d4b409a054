"""Mean perplexity of a model (+ adapter) on a test file, as the course's ppl.py computes it.

    python scripts/ppl.py --base_model_path DIR [--peft_path ADAPTER] --test_data_path FILE
    python scripts/ppl.py ... --few_shot 10 --repeats 5 [--balanced] [--few_shot_pool train.json]

Prints `Mean perplexity: X`; see minqlora/perplexity.py (the metric) and minqlora/fewshot.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora.cli import parse_dataclasses  # noqa: E402
from minqlora.inference import ModelArgs, PplArgs, run_cli, run_ppl  # noqa: E402


def main(argv=None) -> int:
    _, (model_args, ppl_args) = parse_dataclasses(
        {"model": ModelArgs, "perplexity": PplArgs}, argv, prog="ppl.py",
        description="Mean perplexity of the outputs of a test file (the course's metric).")
    return run_cli(run_ppl, model_args, ppl_args)


if __name__ == "__main__":
    sys.exit(main())
