"""Writes weights/tiny/: a small Llama checkpoint in the Hugging Face layout, made here from scratch.

1. A SentencePiece BPE tokenizer with Llama-2's settings (byte fallback, <unk>/<s>/</s> = 0/1/2,
   identity normalization, dummy prefix, split digits), trained on data/example/ in both prompt
   formats plus an English paragraph; tokenizer_config.json and special_tokens_map.json as Llama-2's.
2. A Llama-2-shaped config (4 layers, hidden 128, grouped-query attention 4/2 heads), initialised
   like transformers (normal(0, 0.02), norms 1), then pretrained briefly on data/example/train.json
   (plain next-token loss on BOS + prompt + output + EOS, course and alpaca prompts) with minqlora's
   own model, so that the default commands produce sentences rather than noise.
3. bf16 safetensors in two shards with their index, through minqlora.loader.save_checkpoint.

Deterministic (fixed seeds, one CPU thread): re-running rewrites the same files. Checked by
tests/test_tokenizer.py (ids equal transformers') and the loader/model tests that read it.

    python scripts/make_weights.py          # ~1 minute on a CPU
"""
import argparse
import io
import json
import math
import random
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minqlora.config import LlamaConfig  # noqa: E402
from minqlora.loader import save_checkpoint  # noqa: E402
from minqlora.loss import IGNORE_INDEX, causal_lm_loss  # noqa: E402
from minqlora.model import LlamaForCausalLM  # noqa: E402
from minqlora.data import Prompt  # noqa: E402
from minqlora.tokenizer import Tokenizer  # noqa: E402

ENGLISH = """\
minqlora fine-tunes Llama models with QLoRA in plain, readable PyTorch.
The base model is stored in 4-bit NormalFloat, and only small low-rank adapters are trained.
Each linear layer keeps its frozen weight W and learns two thin matrices A and B.
The adapter output is added to the frozen output, scaled by alpha over the rank r.
Gradient checkpointing recomputes activations in the backward pass to save memory.
Paged AdamW moves optimizer state to the CPU when the GPU runs out of memory.
The data are instruction and output pairs: translate Classical Chinese into Modern Chinese, or back.
Perplexity measures how surprised the model is by the reference answer; lower is better.
A tokenizer turns text into ids, and a model turns ids into the probability of the next token.
This tiny model has 4 layers, 4 attention heads, 2 key/value heads and a hidden size of 128.
It was trained for a few hundred steps on 400 examples, so it knows little, but it runs in seconds.
Real checkpoints such as Taiwan-LLM-7B-v2.0-chat have 32 layers and 7 billion parameters.
Numbers like 2023, 3.14, 1e-5 and 4096 are split into single digits by the tokenizer.
"""

TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
    "legacy": False, "model_max_length": 1024, "padding_side": "right", "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}
SPECIAL_TOKENS_MAP = {
    name: {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
}
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
    "pretraining_tp": 1, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2}


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def train_tokenizer(lines, vocab_size, out):
    """Llama-2's SentencePiece settings; one thread and no sampling or shuffling, so reproducible."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=4192, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, seed_sentencepiece_size=1000000, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    write_json(out / "generation_config.json", GENERATION_CONFIG)


def init_like_hf(model, seed):
    """transformers' LlamaPreTrainedModel._init_weights: linear and embedding weights N(0, 0.02)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, CONFIG["initializer_range"])


def pretrain(model, examples, pad_id, steps, batch_size, lr, seed):
    """AdamW, linear warmup then cosine decay; every non-padding token is scored."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = rng.sample(examples, batch_size)
        T = max(map(len, batch))
        input_ids = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids in batch])
        labels = torch.tensor([ids + [IGNORE_INDEX] * (T - len(ids)) for ids in batch])
        loss = causal_lm_loss(model(input_ids), labels)  # right padding: no attention mask needed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/example", help="folder of the example dataset")
    ap.add_argument("--out", default="weights/tiny")
    ap.add_argument("--vocab_size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=400, help="pretraining steps (0: random weights)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # same thread count, same float sums: reproducible bytes

    data = Path(args.data)
    records = {split: json.loads((data / f"{split}.json").read_text(encoding="utf-8"))
               for split in ("train", "eval", "test", "predict")}
    prompts = [Prompt("course"), Prompt("alpaca")]
    texts = [p(r) + r.get("output", "") for rs in records.values() for r in rs for p in prompts]
    texts += ENGLISH.splitlines() * 5
    lines = [line for text in texts for line in text.split("\n") if line]  # "\n" stays a byte piece

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(lines, args.vocab_size, tmp)
        tok = Tokenizer.from_dir(tmp)
        cfg = LlamaConfig.from_dict({**CONFIG, "vocab_size": tok.vocab_size})
        model = LlamaForCausalLM(cfg)
        init_like_hf(model, args.seed)
        if args.steps:
            examples = [tok.encode(p(r), bos=True) + tok.encode(r["output"]) + [tok.eos_id]
                        for r in records["train"] for p in prompts]
            pretrain(model, examples, tok.pad_id, args.steps, args.batch_size, args.lr, args.seed)

        state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        total = sum(t.numel() * t.element_size() for t in state.values())
        largest = max(t.numel() * t.element_size() for t in state.values())
        # Two shards, as save_pretrained writes for bigger models: the first fills past half.
        save_checkpoint(state, cfg, args.out, max_shard_bytes=total // 2 + largest, copy_from=tmp)
    for f in sorted(Path(args.out).iterdir()):
        print(f"{f}  {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
