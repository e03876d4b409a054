"""The peer side of the SmolLM2 experiment: the same QLoRA run through transformers + peft + bitsandbytes,
as qlora.py sets it up, evaluated with the course's perplexity at the same steps as minqlora's run.

    python bench/peer_qlora_cpu.py --out output/smollm2/peer.jsonl  <the train.py flags of the minqlora run>

Takes train.py's own flags, so both runs read one command line. What is shared, and what is the peer's own:
- shared (minqlora code): the records, their tokenization, truncation and label masks, and the order of the
  micro-batches (qlora.py's length-grouped sampler, reproduced and tested in minqlora/data.py), so that both
  runs see the same tokens at the same step; the eval records and the course prompt text.
- the peer's own: AutoModelForCausalLM with BitsAndBytesConfig (NF4, double quantization, float32 compute,
  as qlora.py without --bf16), prepare_model_for_kbit_training, peft's LoraConfig on every Linear4bit
  (qlora.py's find_all_linear_names), bitsandbytes' PagedAdamW32bit, the Trainer's step (loss / accumulation,
  clip_grad_norm_, optimizer step), and the course's ppl.py metric: batch 1, [BOS] + prompt + output + [EOS]
  with the transformers tokenizer, exp of the mean loss over output and EOS, mean over records.
Random streams differ (peft's LoRA init, dropout masks): the curves agree within noise, not bit for bit.
Writes one JSON line per evaluation: {"step", "eval_ppl", "seconds"}.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from minqlora.chat import prompt_for  # noqa: E402
from minqlora.data import DataOrder, collate  # noqa: E402
from minqlora.tokenizer import Tokenizer  # noqa: E402
from minqlora.train_args import parse_args, training_data  # noqa: E402


def load_peer(path, a):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t = a.train
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=t.quant_type,
                           bnb_4bit_use_double_quant=t.double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
                   - {"lm_head"})
    cfg = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, target_modules=names, lora_dropout=t.lora_dropout,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def course_ppl(model, hf_tok, records, prompt):
    """The course's ppl.py: per record, [BOS] + prompt + output + [EOS], loss over output + EOS, batch 1."""
    values = []
    model.eval()
    with torch.no_grad():
        for r in records:
            src = hf_tok(prompt(r), add_special_tokens=False).input_ids
            out = hf_tok(r["output"], add_special_tokens=False).input_ids + [hf_tok.eos_token_id]
            ids = torch.tensor([[hf_tok.bos_token_id] + src + out])
            mask = torch.tensor([0] * (len(src) + 1) + [1] * len(out))
            logits = model(input_ids=ids).logits[0, :-1].float()
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            values.append(math.exp((ce * mask[1:]).sum().item() / mask[1:].sum().item()))
    model.train()
    return sum(values) / len(values)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="JSON Lines file for the eval perplexities")
    own, rest = p.parse_known_args()
    _, a = parse_args(rest, prog="peer_qlora_cpu.py")
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    m, d, t = a.model, a.data, a.train
    torch.manual_seed(t.seed)
    tok = Tokenizer.from_dir(m.model_name_or_path)
    train_ex, _, eval_records, _ = training_data(a, tok, progress=False)  # train.py's data, order and prompt
    order = DataOrder([e.length for e in train_ex], t.per_device_train_batch_size, t.gradient_accumulation_steps,
                      seed=t.data_seed if t.data_seed is not None else t.seed, group_by_length=t.group_by_length)
    hf_tok = AutoTokenizer.from_pretrained(m.model_name_or_path)
    prompt = prompt_for(d.eval_prompt_template or d.prompt_template or d.dataset_format, m.model_name_or_path)

    model = load_peer(m.model_name_or_path, a)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                    eps=t.adam_epsilon, weight_decay=t.weight_decay)
    out = Path(own.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    every = t.eval_steps or t.logging_steps

    def evaluate(step):
        t0 = time.perf_counter()
        ppl = course_ppl(model, hf_tok, eval_records, prompt)
        row = {"step": step, "eval_ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"peer eval step {step} | eval_ppl {ppl:.4f}", flush=True)

    if t.eval_on_start:
        evaluate(0)
    for step in range(1, t.max_steps + 1):
        t0 = time.perf_counter()
        window = order.window()
        order.advance(len(window))
        total = 0.0
        for idx in window:  # Trainer: each micro-batch's mean loss / accumulation steps
            b = collate([train_ex[i] for i in idx], tok.pad_id)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         labels=b["labels"]).loss / len(window)
            loss.backward()
            total += loss.item()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"peer step {step} | loss {total:.4f} | {time.perf_counter() - t0:.0f} s", flush=True)
        if step % every == 0 or step == t.max_steps:
            evaluate(step)


if __name__ == "__main__":
    main()
