"""Generate an output for every record of a test file: [{"id", "output"}], what the course's run.sh writes.

    python scripts/predict.py --base_model_path DIR --peft_path ADAPTER \
        --test_data_path IN.json --output_path OUT.json

Greedy by default, prompted with the same template as ppl.py; see minqlora/generate.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora.cli import parse_dataclasses  # noqa: E402
from minqlora.inference import ModelArgs, PredictArgs, run_cli, run_predict  # noqa: E402


def main(argv=None) -> int:
    _, (model_args, predict_args) = parse_dataclasses(
        {"model": ModelArgs, "generation": PredictArgs}, argv, prog="predict.py",
        description="Write [{id, output}] predictions for a test file.")
    return run_cli(run_predict, model_args, predict_args)


if __name__ == "__main__":
    sys.exit(main())
