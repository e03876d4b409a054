"""The benchmark in one command: the peer (transformers + peft + bitsandbytes, qlora.py's settings) and
minqlora on the same card, the same random Llama-2-7B-shaped checkpoint, in one run; one table, one JSON.

    python bench/bench.py --shared SHARED --out OUT_DIR
    python bench/bench.py --shared SHARED --out OUT_DIR --skip_peer --lines L1 --gpus 2   # several GPUs

SHARED holds the peer's scripts (bench/hf_qlora_baseline.py, bench/hf_real_workload.py), the course data
(data/adl2023-hw3/) and the Llama-2 tokenizer (tokenizers/llama2/): the project's shared folder, or a copy.
The peer's baseline writes the checkpoint (--ckpt) once; then the peer's real-workload lines
(bench/peer_real.py), then minqlora (bench/bench_qlora.py), each in its own process so that peaks and host
memory are each one's own. A line whose correctness gate fails prints FAIL instead of a ratio.
--gpus W adds T2 and T3 of the data-parallel step (bench/bench_ddp.py under torchrun) on 1 and on W GPUs
of this host, and the speed-up: 1- and W-process runs alternated --ddp_repeats times (2), the ratio of the means.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB_7B_LINEARS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000  # weights in matmuls (lm_head too)

# line: (peer event, minqlora event, the figure, unit, higher is better)
ROWS = [
    ("T1", "train:1x256x16", "T1", "tokens_per_s", "tokens/s"),
    ("T1-strict", "train:1x256x16", "T1-strict", "tokens_per_s", "tokens/s"),
    ("T1-plain", "train:1x256x16", "T1-plain", "tokens_per_s", "tokens/s"),
    ("T2", "train:16x256x1", "T2", "tokens_per_s", "tokens/s"),
    ("T3", "T3_train_real", "T3", "tokens_per_s", "tokens/s"),
    ("T1-compile", "train:1x256x16", "T1-compile", "tokens_per_s", "tokens/s"),  # layers compiled (compiled.py)
    ("T2-compile", "train:16x256x1", "T2-compile", "tokens_per_s", "tokens/s"),
    ("T3-compile", "T3_train_real", "T3-compile", "tokens_per_s", "tokens/s"),
    ("T1-compile+lora16", "train:1x256x16", "T1-compile+lora16", "tokens_per_s", "tokens/s"),  # LoRA in bf16
    ("T2+lora16", "train:16x256x1", "T2+lora16", "tokens_per_s", "tokens/s"),
    ("T2-compile+lora16", "train:16x256x1", "T2-compile+lora16", "tokens_per_s", "tokens/s"),
    ("T3-compile+lora16", "T3_train_real", "T3-compile+lora16", "tokens_per_s", "tokens/s"),
    ("E1", "eval_forward:1", "E1", "examples_per_s", "examples/s"),
    ("E1b", "eval_forward:16", "E1b", "examples_per_s", "examples/s"),
    ("E2", "E2_course_ppl", "E2", "examples_per_s", "examples/s"),
    ("G1", "generate", "G1", "tokens_per_s", "tokens/s"),
    ("G1-compile", "generate", "G1-compile", "tokens_per_s", "tokens/s"),  # the peer's one G1 figure
    ("L1", "loaded", "L1", "seconds", "s (lower is better)"),
]
GATES = {"T1": "T1", "T1-strict": "T1-strict", "T2": "T1", "T3": "T1", "E1": "E1", "G1": "G1", "G1-compile": "G1-compile",
         "E2": "E2", "T1-compile": "T1-compile", "T2-compile": "T1-compile", "T3-compile": "T1-compile",
         # "+lora16" (LoRA matmuls in bf16) is a setting of the run's dtype: in the fp32 gate it is the fp32 path,
         # so those lines share their path's gate; their bf16 distance from the fp32 LoRA is logged (bf16_reference)
         "T1-compile+lora16": "T1-compile", "T2+lora16": "T1", "T2-compile+lora16": "T1-compile",
         "T3-compile+lora16": "T1-compile"}


def run(cmd, log_path):
    """Run one side, echoing its output; return its JSON lines."""
    print("+", " ".join(map(str, cmd)), flush=True)
    lines = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            log.write(line)
            if line.startswith("{"):
                lines.append(json.loads(line))
                print("  ", line.rstrip(), flush=True)
        if proc.wait() != 0:
            print(f"error: {cmd[1]} exited with {proc.returncode}; see {log_path}", flush=True)
    return lines


def peer_key(r):
    if r.get("event") == "train":
        return f"train:{r['batch']}x{r['seq']}x{r['accum']}"
    if r.get("event") == "eval_forward":
        return f"eval_forward:{r['batch']}"
    return r.get("event")


def table(peer, mine, gates, ceiling_tflops):
    peer_by = {peer_key(r): r for r in peer}
    mine_by = {r["line"]: r for r in mine if "line" in r and r.get("event") not in ("gate", "bf16_reference")}
    out = ["| line | peer | minqlora | minqlora / peer | peer peak GiB | minqlora peak GiB | minqlora MFU |",
           "|---|---|---|---|---|---|---|"]
    for line, pkey, mkey, field, unit in ROWS:
        p, m = peer_by.get(pkey), mine_by.get(mkey)
        pv, mv = (p or {}).get(field), (m or {}).get(field)
        ratio = ""
        if pv and mv:
            ratio = f"{pv / mv:.2f}x faster" if line == "L1" else f"{mv / pv:.2f}x"
        gate = gates.get(GATES.get(line))
        if gate is not None and not gate:
            ratio = "FAIL"
        mfu = ""
        if m and field == "tokens_per_s" and line.startswith("T"):  # forward + input-gradient backward: 4N/token
            mfu = f"{100 * mv * 4 * GIB_7B_LINEARS / (ceiling_tflops * 1e12):.1f}%"
        out.append(f"| {line} ({unit}) | {pv if pv is not None else '-'} | {mv if mv is not None else '-'} | {ratio} "
                   f"| {(p or {}).get('peak_gib', '')} | {(m or {}).get('peak_gib', '')} | {mfu} |")
    return "\n".join(out)


def several_gpus(py, w, args, shared, out):
    """bench_ddp.py on 1 and on w processes, alternated `--ddp_repeats` times (a single run's pace moves by up
    to 10-15% between runs on these hosts: bench/NOTES.md #24, #26); a table of T2 and T3 tokens/s, each the mean of
    its runs, every run's figure beside it, and the speed-up of the means."""
    runs = {1: [], w: []}
    for i in range(args.ddp_repeats):
        for n in (1, w):
            runs[n].append(run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                                HERE / "bench_ddp.py", "--ckpt", args.ckpt, "--shared", shared, "--steps", args.steps]
                               + args.ddp_flags.split() + (["--skip_gate"] if i else []),  # the gate once
                               out / f"ddp_{n}_{i}.log"))
    gate = next((r for r in runs[w][0] if r.get("event") == "gate"), None)
    rows = [f"| line | 1 GPU | {w} GPUs | speed-up | runs, 1 GPU | runs, {w} GPUs | peak GiB a GPU (1 / {w}) |",
            "|---|---|---|---|---|---|---|"]
    def train(rs, line, deal):  # a run's figure for the line, its W processes' share dealt this way
        return next((r for r in rs if r.get("event") == "train" and r.get("deal") == deal
                     and r["line"].split("-")[0].split("+")[0] == line), None)

    # --compare_deal's row: T3 on W processes dealt by token count, against the same 1-process runs
    for line, deal, name in (("T2", "packed", ""), ("T3", "packed", ""), ("T3", "tokens", ", dealt by tokens")):
        found = {n: [train(rs, line, "packed" if n == 1 else deal) for rs in runs[n]] for n in (1, w)}
        if all(found[1]) and all(found[w]):
            speed = {n: [r["tokens_per_s"] for r in found[n]] for n in (1, w)}
            mean = {n: sum(v) / len(v) for n, v in speed.items()}
            ratio = "FAIL" if not (gate and gate["ok"]) else f"{mean[w] / mean[1]:.2f}x"
            rows.append(f"| {found[1][0]['line']}{name} (tokens/s) | {mean[1]:.1f} | {mean[w]:.1f} | {ratio} | "
                        f"{', '.join(map(str, speed[1]))} | {', '.join(map(str, speed[w]))} | "
                        f"{found[1][0]['peak_gib']} / {found[w][0]['peak_gib']} |")
    return "\n".join(rows), {"gate": gate, "runs": runs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", required=True, help="folder with bench/, data/adl2023-hw3/, tokenizers/llama2/")
    ap.add_argument("--out", required=True, help="folder for results.json, table.md and the logs")
    ap.add_argument("--ckpt", default="/tmp/llama2-7b-random")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--t3_records", type=int, default=128)
    ap.add_argument("--skip_peer", action="store_true", help="minqlora only")
    ap.add_argument("--skip_peer_real", action="store_true", help="the peer's baseline lines only (no T3, E2)")
    ap.add_argument("--lines", default=None, help="minqlora's lines to run (bench_qlora.py --lines)")
    ap.add_argument("--profile", default=None, help="write torch profiles of minqlora's steps to this folder")
    ap.add_argument("--gpus", type=int, default=1, help="also T2/T3 of the data-parallel step on 1 and this many GPUs")
    ap.add_argument("--ddp_flags", default="",
                    help="bench_ddp.py's flags for those runs, e.g. \"--torch_compile --lora16\"")
    ap.add_argument("--ddp_repeats", type=int, default=2, help="1- and W-process runs, alternated, this many times")
    args = ap.parse_args()
    shared, out = Path(args.shared).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    peer = []
    if args.skip_peer and not (Path(args.ckpt) / "config.json").exists():  # the peer's own checkpoint writer
        run([py, "-c", f"import sys; sys.path.insert(0, {str(shared / 'bench')!r}); from hf_qlora_baseline "
             f"import make_ckpt; make_ckpt({args.ckpt!r}, 32)"], out / "ckpt.log")
    if not args.skip_peer:
        peer += run([py, shared / "bench/hf_qlora_baseline.py", "--ckpt", args.ckpt, "--steps", args.steps],
                    out / "peer_baseline.log")
        if not args.skip_peer_real:
            peer += run([py, HERE / "peer_real.py", "--peer_dir", shared / "bench", "--shared", shared,
                         "--ckpt", args.ckpt, "--t3_records", args.t3_records], out / "peer_real.log")
    mine = run([py, HERE / "bench_qlora.py", "--ckpt", args.ckpt, "--shared", shared, "--steps", args.steps,
                "--t3_records", args.t3_records] + (["--lines", args.lines] if args.lines else [])
               + (["--profile", args.profile] if args.profile else []), out / "minqlora.log")
    ddp_md, ddp = several_gpus(py, args.gpus, args, shared, out) if args.gpus > 1 else ("", None)
    gates = {r["line"]: bool(r["ok"]) for r in mine if r.get("event") == "gate"}
    p_e2 = next((r for r in peer if r.get("event") == "E2_course_ppl"), None)
    m_e2 = next((r for r in mine if r.get("event") == "E2_course_ppl"), None)
    if p_e2 and m_e2:
        rel = abs(m_e2["mean_ppl"] - p_e2["mean_ppl"]) / abs(p_e2["mean_ppl"])
        gates["E2"] = rel <= 2e-3
        print(f"E2 gate: mean perplexity peer {p_e2['mean_ppl']} minqlora {m_e2['mean_ppl']:.4f} "
              f"(relative difference {rel:.2e}, limit 2e-3): {'ok' if gates['E2'] else 'FAIL'}")
    ceiling = next((r["bf16_matmul_tflops"] for r in peer if r.get("event") == "ceilings"), 792.0)
    md = table(peer, mine, gates, ceiling)
    env = next((r for r in mine if r.get("event") == "env"), {})
    (out / "table.md").write_text(md + "\n" + (f"\n{ddp_md}\n" if ddp else ""))
    (out / "results.json").write_text(json.dumps({"env": env, "peer": peer, "minqlora": mine, "gates": gates,
                                                  "bf16_matmul_tflops": ceiling, "several_gpus": ddp}, indent=1))
    print(f"\n{env.get('gpu')} | torch {env.get('torch')} | bitsandbytes {env.get('bnb')} | "
          f"bf16 matmul ceiling {ceiling} TFLOP/s")
    print("gates:", ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in gates.items()))
    print(md)
    if ddp:
        g = ddp["gate"] or {}
        print(f"\nseveral GPUs: gate (fp32, {args.gpus} processes against one computing the whole window): "
              f"loss rel {g.get('loss_rel')}, grad cosine {g.get('grad_cos')}: {'ok' if g.get('ok') else 'FAIL'}")
        print(ddp_md)


if __name__ == "__main__":
    main()
