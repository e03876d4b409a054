"""Fixtures for tests/test_data.py: a tiny SentencePiece BPE tokenizer trained in the test, saved the
way a Llama-2 checkpoint ships it (tokenizer.model + tokenizer_config.json), and the reference
collator written from qlora.py's DataCollatorForCausalLM."""
import json
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from _tiny import LLAMA2_TOKENIZER_CONFIG, SHARED, train_sp_tokenizer  # noqa: F401 (SHARED: for test_data)

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n翻譯成文言文：\n雅裏惱怒地說： 從前在福山田獵時，你誣陷獵官，現在又說這種話。\n答案：",
    "### Input:\nThe quick brown fox jumps over the lazy dog.\n\n### Response: 雅裏怒曰： 昔畋於福山，卿誣獵官，今復有此言。",
    "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。USER: 沒過十天，鮑泉果然被拘捕。 ASSISTANT: 後未旬，果見囚執。",
    "Hello world, this is a tiny tokenizer for tests. It knows a few words and falls back to bytes.",
]


def write_llama_tokenizer(folder: Path, vocab_size: int = 420) -> Path:
    """Train a byte-fallback BPE SentencePiece model (Llama-2's ids: unk 0, bos 1, eos 2) into `folder`."""
    train_sp_tokenizer(folder, CORPUS * 20, vocab_size, from_file=True, character_coverage=0.98)
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG), encoding="utf-8")
    return folder


def copy_llama_tokenizer(model_file: Path, folder: Path) -> Path:
    """A tokenizer folder around an existing tokenizer.model (e.g. /work/shared's Llama-2 one)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG), encoding="utf-8")
    return folder


def hf_tokenizer(folder: Path):
    """transformers' tokenizer for the folder, with qlora.py's added "[PAD]" token (it has none)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    tok.add_special_tokens({"pad_token": "[PAD]"})  # qlora.py: smart_tokenizer_and_embedding_resize
    return tok


def qlora_collate(tok, pairs, source_max_len, target_max_len, train_on_source=False, bos_ids=None):
    """qlora.py's DataCollatorForCausalLM.__call__ for (source, target) string pairs.

    `bos_ids`, when given, replaces the tokenisation of f"{bos_token}{source}" by
    bos_ids + tok(source) truncated to source_max_len (see test_bos_string_vs_id)."""
    sources = [f"{tok.bos_token}{s}" for s, _ in pairs]
    targets = [f"{t}{tok.eos_token}" for _, t in pairs]
    if bos_ids is None:
        src_ids = tok(sources, max_length=source_max_len, truncation=True, add_special_tokens=False)["input_ids"]
    else:
        src_ids = [(bos_ids + tok(s, add_special_tokens=False)["input_ids"])[:source_max_len] for s, _ in pairs]
    tgt_ids = tok(targets, max_length=target_max_len, truncation=True, add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for s, t in zip(src_ids, tgt_ids):
        input_ids.append(torch.tensor(s + t))
        labels.append(torch.tensor(s + t if train_on_source else [-100] * len(s) + t))
    input_ids = pad_sequence(input_ids, batch_first=True, padding_value=tok.pad_token_id)
    labels = pad_sequence(labels, batch_first=True, padding_value=-100)
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(tok.pad_token_id), "labels": labels}
