"""Redraw learning curves from one or several training logs, one line per run.

    python scripts/plot.py output/run1/log.jsonl output/run2/log.jsonl -o compare.png
    python scripts/plot.py output/run1/log.jsonl -o run1.png --csv run1.csv

Each run is labelled with its log's folder name unless --labels is given. Bad input (a log that is not
a log.jsonl, an output that is a folder, one of the logs, or in a folder that may not be written) ends
with one `error:` line and exit status 2, before anything is written.
Checked in tests/test_checkpoint.py and tests/test_bad_files.py. No paper section.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minqlora.errors import BadInput, run_main  # noqa: E402
from minqlora.outputs import check_output_file_path  # noqa: E402


def check_outputs(args):
    """-o and --csv: writable files, neither a log read here nor the other output (BadInput)."""
    if args.labels and len(args.labels) != len(args.logs):
        raise BadInput(f"--labels: {len(args.labels)} labels for {len(args.logs)} logs")
    if args.csv and len(args.logs) != 1:
        raise BadInput("--csv takes exactly one log")
    logs = {"the log" if len(args.logs) == 1 else f"log {i}": p for i, p in enumerate(args.logs, 1)}
    check_output_file_path(args.output, "-o", inputs=logs)
    if args.csv:
        check_output_file_path(args.csv, "--csv", inputs=logs)
        if Path(args.csv).resolve() == Path(args.output).resolve():
            raise BadInput(f"--csv {args.csv}: is also -o: give two different files")


def plot_logs(args):
    """Check the outputs, read every log, then write the CSV (if asked) and the PNG."""
    from minqlora.curves import plot, read_log, write_csv

    check_outputs(args)
    labels = args.labels or [Path(p).resolve().parent.name for p in args.logs]
    runs = [(label, read_log(path)) for label, path in zip(labels, args.logs)]
    if args.csv:
        write_csv(runs[0][1], args.csv)
    plot(runs, args.output, title=args.title)
    print(f"wrote {args.output}" + (f" and {args.csv}" if args.csv else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot train loss, eval loss and eval perplexity from log.jsonl files.")
    p.add_argument("logs", nargs="+", help="log.jsonl files written by scripts/train.py")
    p.add_argument("-o", "--output", default="curves.png", help="PNG to write (default: curves.png)")
    p.add_argument("--labels", nargs="+", help="one label per log (default: the log's folder name)")
    p.add_argument("--csv", help="also write the numbers of a single log as CSV here")
    p.add_argument("--title", help="figure title")
    return run_main(plot_logs, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
