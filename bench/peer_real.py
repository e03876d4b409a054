"""The peer's real-workload lines, in the order this benchmark needs: the card's ceilings, then E2 (the
course metric over public_test.json) with a fresh adapter, then T3 (training on train.json with the seed's
flags). Runs the functions of the shared `hf_real_workload.py` unchanged; its own main() runs T3 before E2,
so E2 would score an adapter trained by T3, which minqlora's E2 (fresh adapter) cannot be compared with.

    python bench/peer_real.py --peer_dir SHARED/bench --shared SHARED --ckpt /tmp/llama2-7b-random
"""
import argparse
import json
import os
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer_dir", required=True, help="the folder holding hf_real_workload.py")
    ap.add_argument("--shared", required=True, help="the folder holding data/ and tokenizers/")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--t3_records", type=int, default=128)
    args = ap.parse_args()
    sys.path.insert(0, args.peer_dir)
    import sentencepiece as spm
    from hf_real_workload import ceilings, e2, load_qlora, log, t3

    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.shared, "tokenizers/llama2/tokenizer.model"))
    data = os.path.join(args.shared, "data/adl2023-hw3")
    train = json.load(open(os.path.join(data, "train.json"), encoding="utf-8"))
    test = json.load(open(os.path.join(data, "public_test.json"), encoding="utf-8"))
    log(event="env", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    ceilings()
    model = load_qlora(args.ckpt)
    e2(model, sp, test)
    t3(model, sp, train, args.t3_records, accum=16, smax=128, tmax=128)


if __name__ == "__main__":
    main()
