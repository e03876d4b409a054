"""Tiny random Llama models shared by the tests: a transformers model and a minqlora model
holding the same weights, so any difference in outputs is a difference in code. Also the pieces
the tokenizer fixtures share: ../shared, Llama-2's tokenizer_config.json, and a tiny Llama-2-like
SentencePiece tokenizer trained in the test."""
import io
from pathlib import Path

import torch

from minqlora.config import LlamaConfig
from minqlora.model import LlamaForCausalLM

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)

SHARED = Path(__file__).resolve().parents[2] / "shared"

LLAMA2_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
    "clean_up_tokenization_spaces": False, "model_max_length": 4096,
}

# SentencePiece trainer options every tokenizer fixture uses: BPE with byte fallback, Llama-2's ids
# (unk 0, bos 1, eos 2, no pad), identity normalization keeping whitespace, digits split.
SP_LLAMA2_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)


def train_sp_tokenizer(folder, corpus_lines, vocab_size, *, from_file=False, in_memory=False, **overrides) -> Path:
    """Train a Llama-2-like SentencePiece BPE model into folder/tokenizer.model (only that file is left).

    corpus_lines: texts, one sentence per line of each (texts may hold newlines).
    from_file: feed the trainer a corpus file (`input=`) instead of `sentence_iterator=`.
    in_memory: serialize through `model_writer=` instead of `model_prefix=` (the trainer spec saved
    in the model records model_prefix and input, so these choices change the model's bytes).
    overrides: further trainer options (character_coverage, num_threads, ...), over SP_LLAMA2_OPTIONS."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for text in corpus_lines for line in text.split("\n")]
    corpus = folder / "corpus.txt"
    if from_file:
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        source = dict(input=str(corpus))
    else:
        source = dict(sentence_iterator=iter(lines))
    buf = io.BytesIO()
    output = dict(model_writer=buf) if in_memory else dict(model_prefix=str(folder / "tokenizer"))
    spm.SentencePieceTrainer.train(**source, **output, vocab_size=vocab_size, **{**SP_LLAMA2_OPTIONS, **overrides})
    if in_memory:
        (folder / "tokenizer.model").write_bytes(buf.getvalue())
    else:
        (folder / "tokenizer.vocab").unlink()
    if from_file:
        corpus.unlink()
    return folder


def hf_model(seed=0, **overrides):
    import transformers
    kw = {**TINY, **overrides}
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones; random norms make the test stronger
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def mq_from_hf(hf) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_dict(hf.config.to_dict())
    m = LlamaForCausalLM(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    m.load_state_dict(sd, strict=True)
    return m


def pair(seed=0, **overrides):
    hf = hf_model(seed, **overrides)
    return hf, mq_from_hf(hf)
