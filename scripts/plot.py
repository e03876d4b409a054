"""Redraw learning curves from one or several training logs, one line per run.

    python scripts/plot.py output/run1/log.jsonl output/run2/log.jsonl -o compare.png
    python scripts/plot.py output/run1/log.jsonl -o run1.png --csv run1.csv

Each run is labelled with its log's folder name unless --labels is given.
Checked in tests/test_checkpoint.py. No paper section.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from minqlora.curves import plot, read_log, write_csv

    p = argparse.ArgumentParser(description="Plot train loss, eval loss and eval perplexity from log.jsonl files.")
    p.add_argument("logs", nargs="+", help="log.jsonl files written by scripts/train.py")
    p.add_argument("-o", "--output", default="curves.png", help="PNG to write (default: curves.png)")
    p.add_argument("--labels", nargs="+", help="one label per log (default: the log's folder name)")
    p.add_argument("--csv", help="also write the numbers of a single log as CSV here")
    p.add_argument("--title", help="figure title")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        print(f"error: {len(args.labels)} labels for {len(args.logs)} logs", file=sys.stderr)
        return 2
    try:
        runs = [(label, read_log(path)) for label, path in
                zip(args.labels or [Path(p).resolve().parent.name for p in args.logs], args.logs)]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.csv:
        if len(runs) != 1:
            print("error: --csv takes exactly one log", file=sys.stderr)
            return 2
        write_csv(runs[0][1], args.csv)
    plot(runs, args.output, title=args.title)
    print(f"wrote {args.output}" + (f" and {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
