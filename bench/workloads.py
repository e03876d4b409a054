"""The benchmark's workloads and shared helpers (bench_qlora.py, bench_ddp.py): random windows (T1, T2), the
course's windows with the seed's flags (T3), the prompts, the JSON log line, GPU-synchronised time."""
import json
import time

import torch

from minqlora.loss import IGNORE_INDEX

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response: ")
COURSE = ("你是人工智慧助理，以下是用戶和人工智能助理之間的對話。"
          "你要對用戶的問題提供有用、安全、詳細和禮貌的回答。USER: {} ASSISTANT:")
PASS_TOKENS = 4096


def log(**kw):
    print(json.dumps({"impl": "minqlora", **kw}), flush=True)


def sync_time():
    torch.cuda.synchronize()
    return time.perf_counter()


def batch_of(rows, pad_id=0):
    """Right-padded {input_ids, labels, attention_mask} from (ids, labels) lists."""
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def random_window(g, batch, seq, accum):
    out = []
    for _ in range(accum):
        rows = []
        for _ in range(batch):
            ids = torch.randint(3, 32000, (seq,), generator=g).tolist()
            rows.append((ids, [IGNORE_INDEX] * (seq // 2) + ids[seq // 2:]))  # source tokens not scored
        out.append(batch_of(rows))
    return out


def t3_windows(tok, records, accum, smax=128, tmax=128):
    """The seed's flags on train.json: alpaca prompt, source/target cut at 128, group_by_length at batch 1
    (mega-batches of 50 records, longest first, as the peer orders them), micro-batch 1 x accumulation 16."""
    ex = []
    for r in records:
        s = tok.encode(ALPACA.format(r["instruction"]), bos=True)[:smax]
        t = (tok.encode(r["output"]) + [tok.eos_id])[:tmax]
        ex.append((s + t, [IGNORE_INDEX] * len(s) + t))
    order = []
    for i in range(0, len(ex), 50):
        order += sorted(range(i, min(i + 50, len(ex))), key=lambda j: -len(ex[j][0]))
    wins = [[batch_of([ex[j]]) for j in order[k:k + accum]] for k in range(0, len(order) - len(order) % accum, accum)]
    return [wins[0]] + wins  # the first again as the warm-up
