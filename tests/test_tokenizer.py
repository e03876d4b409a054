"""minqlora.tokenizer against transformers' AutoTokenizer: same ids, same decoded text.

Folders: a SentencePiece model trained here, the committed weights/tiny, tokenizer.json-only
folders (a converted Llama one, a hub-style legacy Llama one, a byte-level BPE like Llama-3), and,
when ../shared is present, the real Llama-2 tokenizer over the course's public_test.json.
Reading a bare tokenizer.model, transformers needs the protobuf package.
"""
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from minqlora.tokenizer import Tokenizer

from _tiny import LLAMA2_TOKENIZER_CONFIG, SHARED, train_sp_tokenizer

REPO = Path(__file__).resolve().parents[1]
COURSE_PROMPT = ("你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
                 "USER: {instruction} ASSISTANT:")
CORPUS = [
    "QLoRA fine-tunes a 4-bit quantized language model with low-rank adapters.",
    "The quick brown fox jumps over the lazy dog, then sleeps for 12 hours.",
    "Training uses paged AdamW, gradient checkpointing and a learning rate of 2e-4.",
    "翻譯成文言文：\n我今天要去京城。\n答案：",
    "吾今日將往京師。", "汝何故不歸？", "將軍聞之，大怒。", "若汝不往，王必大懼。",
    "我們應該回家了。", "這些書是老師的。", "國王問使者：「你要去哪裡？」",
    "def main():\n    print('hello, world')\n    return 0",
]
STRINGS = [
    "", " ", "  ", "Hello world", " Hello", "  two spaces", "end ", "a  b\n\n c", "a   b    c     d",
    "\n", "\nstart", "line one\nline two\n", "\t tab", "1234567890", "pi is 3.14159", "2e-4 and 4-bit",
    "你好，世界", " 你好", "翻譯成文言文：\n於是，廢帝讓他自殺。", "汝何故不歸？\n翻譯成現代文：",
    "中文 English 混合 123", "é café naïve", "emoji 😀 🚀", "x\u00a0y", "▁already", "Ω≈ç√∫",
    "    indented code()", "</s>", "Hello</s>", "<s>x", "x<unk>y </s> z", "<s> <s>  x",
    COURSE_PROMPT.format(instruction="翻譯成文言文：\n我沒有馬。"),
]


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")


def train_sentencepiece(folder, vocab_size=600):
    """A Llama-2-like BPE SentencePiece model (byte fallback, identity normalization) in `folder`."""
    train_sp_tokenizer(folder, CORPUS * 20, vocab_size, in_memory=True, character_coverage=1.0,
                       allow_whitespace_only_pieces=True, hard_vocab_limit=False, num_threads=1,
                       shuffle_input_sentence=False)
    write_json(folder / "tokenizer_config.json", LLAMA2_TOKENIZER_CONFIG)
    return folder


def assert_parity(folder, strings, add_bos=True):
    ours, theirs = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    for text in strings:
        ids = theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == ids, repr(text)
        if add_bos:
            assert ours.encode(text, bos=True) == theirs(text).input_ids, repr(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), repr(text)
        with_specials = ours.encode(text, bos=True, eos=True)
        assert ours.decode(with_specials) == theirs.decode(with_specials, skip_special_tokens=True)
    assert ours.vocab_size == len(theirs)
    return ours, theirs


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_sentencepiece_parity(sp_dir):
    ours, theirs = assert_parity(sp_dir, STRINGS + CORPUS)
    assert (ours.bos_id, ours.eos_id, ours.pad_token_id, ours.pad_id) == (1, 2, None, 0)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    assert ours.encode("Hello", bos=True, eos=True) == [1] + ours.encode("Hello") + [2]


@pytest.mark.parametrize("setting", [{"legacy": True}, {"add_prefix_space": False}])
def test_prefix_settings(sp_dir, tmp_path, setting):
    """legacy: true prefixes "▁" to every chunk between special tokens, add_prefix_space: false to none."""
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {**LLAMA2_TOKENIZER_CONFIG, **setting})
    assert_parity(tmp_path, STRINGS)
    assert Tokenizer.from_dir(tmp_path).encode("x<s>x") != Tokenizer.from_dir(sp_dir).encode("x<s>x")


def test_decode_of_arbitrary_ids(sp_dir):
    """Byte pieces that are not valid UTF-8, specials mid-text, whitespace pieces: both decoders agree."""
    ours, theirs = Tokenizer.from_dir(sp_dir), AutoTokenizer.from_pretrained(sp_dir)
    n = ours.vocab_size
    sequences = [[(7 * i + 13 * j) % n for j in range(i % 9 + 1)] for i in range(300)]
    sequences += [[3 + 0xE4, 3 + 0xBD], [1, 3 + 0x0A, 2], [2, 1, 0], [3 + 0xFF]]  # <0xNN> is id 3 + NN
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip_special=skip) == theirs.decode(ids, skip_special_tokens=skip), ids


def test_committed_tiny_tokenizer():
    folder = REPO / "weights" / "tiny"
    data = json.loads((REPO / "data" / "example" / "test.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] for r in data] + [r["output"] for r in data]
    texts += [COURSE_PROMPT.format(instruction=r["instruction"]) for r in data]
    ours, _ = assert_parity(folder, STRINGS + texts)
    config = json.loads((folder / "config.json").read_text())
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, config["vocab_size"])


def test_tokenizer_json_converted_from_sentencepiece(sp_dir, tmp_path):
    AutoTokenizer.from_pretrained(sp_dir).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").exists()
    assert_parity(tmp_path, STRINGS + CORPUS)


def test_hub_style_legacy_llama_tokenizer_json(sp_dir, tmp_path):
    """Llama-2 hub folders carry a tokenizer.json whose normalizer prepends "▁" itself; transformers 5
    drops it for LlamaTokenizer and uses its own Metaspace rule, and so must we."""
    AutoTokenizer.from_pretrained(sp_dir).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    tk = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    tk.save(str(tmp_path / "tokenizer.json"))
    assert_parity(tmp_path, STRINGS)


def test_byte_level_tokenizer_json(tmp_path):
    """A Llama-3 style folder: byte-level BPE, its own BOS added by the post-processor."""
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tk.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tk.token_to_id(specials[0])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B", special_tokens=[(specials[0], bos)])
    tk.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1]})
    write_json(tmp_path / "config.json", {"model_type": "llama", "bos_token_id": 0, "eos_token_id": [1, 7]})
    ours, _ = assert_parity(tmp_path, [s for s in STRINGS if "<" not in s] + CORPUS)
    assert (ours.bos_id, ours.eos_id, ours.stop_ids, ours.pad_id) == (bos, 1, (1, 7), 0)


def test_special_ids_from_config_files(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {**LLAMA2_TOKENIZER_CONFIG, "pad_token": "<unk>"})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 5]})
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.pad_token_id, tok.pad_id, tok.stop_ids) == (0, 0, (2, 5))
    (tmp_path / "tokenizer_config.json").unlink()  # without tokenizer files: config.json, then the model
    write_json(tmp_path / "config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)


def test_missing_tokenizer_names_the_folder(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_llama2_tokenizer_on_course_data(tmp_path):
    model = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
    data = SHARED / "data" / "adl2023-hw3" / "public_test.json"
    if not (model.exists() and data.exists()):
        pytest.skip("../shared (Llama-2 tokenizer, course data) not present")
    shutil.copy(model, tmp_path)
    write_json(tmp_path / "tokenizer_config.json", LLAMA2_TOKENIZER_CONFIG)
    records = json.loads(data.read_text(encoding="utf-8"))
    texts = [r["instruction"] for r in records] + [r["output"] for r in records]
    texts += [COURSE_PROMPT.format(instruction=r["instruction"]) for r in records]
    # Runs of spaces left out: see the module docstring of minqlora/tokenizer.py.
    ours, theirs = assert_parity(tmp_path, texts + [s for s in STRINGS if "  " not in s])
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (32000, 1, 2, 0)
    assert ours.encode("Hello world", bos=True) == [1, 15043, 3186]
    # There, where transformers ranks merges by id ("▁▁" is id 259), we follow sentencepiece's scores.
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for text in ["a  b", "x   y    z", "def f():\n    return 1"]:
        assert ours.encode(text) == sp.encode(text), repr(text)
