"""Fixtures for the inference tests: a tiny model folder (random transformers Llama + a SentencePiece
tokenizer trained here), peft adapters for it, test records of mixed lengths, and the reference
perplexity written from the course's ppl.py (NTU ADL 2023 HW3) on transformers' model."""
import functools
import json
import tempfile
from pathlib import Path

import torch

from _tiny import LLAMA2_TOKENIZER_CONFIG, SHARED, hf_model, train_sp_tokenizer  # noqa: F401 (SHARED: for test_perplexity)

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
    "USER: 翻譯成文言文：\n我今天要去京城。\n答案： ASSISTANT: 吾今日將往京師。",
    "汝何故不歸？\n翻譯成現代文：你為什麼不回家？", "將軍聞之，大怒。", "若汝不往，王必大懼。",
    "文言文翻譯：\n吾等無書信。我們沒有信。", "這句話在古代怎麼說：國王問使者：「你要去哪裡？」",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
]
CONTEXT = 384  # max_position_embeddings of the fixture model


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")


def train_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    train_sp_tokenizer(folder, CORPUS * 20, vocab_size, character_coverage=1.0, hard_vocab_limit=False, num_threads=1)
    write_json(folder / "tokenizer_config.json", LLAMA2_TOKENIZER_CONFIG)
    return folder


@functools.lru_cache(maxsize=None)
def model_dir(seed: int = 0) -> Path:
    """A checkpoint folder (safetensors + config + tokenizer), made once per test process."""
    folder = Path(tempfile.mkdtemp(prefix="minqlora-infer-"))
    train_tokenizer(folder)
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    hf_model(seed, vocab_size=vocab, max_position_embeddings=CONTEXT).save_pretrained(folder)
    return folder


def hf_pair(folder: Path, adapter: Path | None = None):
    """transformers' model (peft-wrapped when `adapter`) and tokenizer for the folder, fp32, eval."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    if adapter is not None:
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def make_peft_adapter(folder: Path, out: Path, seed: int = 1, r: int = 4, dropout: float = 0.0,
                      targets=("q_proj", "v_proj", "o_proj", "down_proj")) -> Path:
    """A peft LoRA adapter for the model in `folder`, with random nonzero B (so it changes outputs)."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets),
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return out


def records(n_long_output: int = 1):
    """Test records of mixed lengths (one with a long output, for truncation tests)."""
    recs = [
        {"id": "a1", "instruction": "翻譯成文言文：\n我今天要去京城。\n答案：", "output": "吾今日將往京師。"},
        {"id": "a2", "instruction": "汝何故不歸？\n翻譯成現代文：", "output": "你為什麼不回家？"},
        {"id": "a3", "instruction": "將軍聞之，大怒。\n文言文翻譯：", "output": "將軍聽到這件事，非常生氣。"},
        {"id": "a4", "instruction": "這句話在古代怎麼說：國王問使者：「你要去哪裡？」", "output": "王問使者曰：「汝將安往？」"},
        {"id": "a5", "instruction": "若汝不往，王必大懼。翻譯成白話文：", "output": "如果你不去，國王一定很害怕。"},
        {"id": "a6", "instruction": "hello", "output": "world"},
        {"id": "a7", "instruction": "翻譯成古文：\n我們沒有信。", "output": "吾等無書信。"},
    ]
    for k in range(n_long_output):
        recs.append({"id": f"long{k}", "instruction": "文言文翻譯：\n吾等無書信。",
                     "output": "我們沒有信，" * 30 + "。"})
    return recs


def course_reference_ppl(model, tokenizer, data, get_prompt, max_length=2048):
    """The course's ppl.py `perplexity()`, one example at a time, on a transformers model."""
    instructions = [get_prompt(x) for x in data]
    outputs = [x["output"] for x in data]
    tok_instr = tokenizer(instructions, add_special_tokens=False)["input_ids"]
    tok_out = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    ppls = []
    for i in range(len(data)):
        instruction_ids = [tokenizer.bos_token_id] + tok_instr[i]
        output_ids = tok_out[i] + [tokenizer.eos_token_id]
        input_ids = torch.tensor((instruction_ids + output_ids)[:max_length])[None]
        attn_mask = torch.ones_like(input_ids)
        output_mask = torch.tensor(([0] * len(instruction_ids) + [1] * len(output_ids))[:max_length])[None]
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attn_mask).logits
        shift_logits = logits[..., :-1, :].contiguous()
        shift_label = input_ids[..., 1:].contiguous()
        shift_mask = output_mask[..., 1:].contiguous()
        # CrossEntropyLoss wants the classes second: (1, V, T-1) against labels (1, T-1)
        ppl = torch.exp((loss_fct(shift_logits.transpose(1, 2), shift_label) * shift_mask).sum(1)
                        / shift_mask.sum(1))
        ppls += ppl.tolist()
    return ppls
