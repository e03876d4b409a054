"""minqlora.generate against transformers' `generate` (greedy, repetition penalty, with a peft
adapter), against an uncached loop, batched against one at a time; sampling determinism and the
top-k/top-p filters against transformers' logits processors."""
import pytest
import torch

from _fixtures_infer import model_dir
from _tiny import pair
from minqlora.adapter import load_adapter
from minqlora.generate import (PromptTooLongError, encode_prompts, generate, generate_ids,
                               top_k_top_p)
from minqlora.loader import load_model
from minqlora.tokenizer import Tokenizer

EOS = 2
NEW = 12


def prompts(seed=0, lengths=(5, 17, 9, 1, 30)):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models():
    return pair(seed=3)


def hf_greedy(hf, ids, **kw):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def uncached_greedy(model, ids, max_new):
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())  # full forward every step
            ids.append(nxt)
            new.append(nxt)
            if nxt == EOS:
                break
    return new


def test_greedy_matches_transformers(models):
    hf, mq = models
    for ids in prompts():
        got = generate_ids(mq, [ids], eos_ids=[EOS], max_new_tokens=NEW)[0]
        assert got == hf_greedy(hf, ids)
        assert len(got) == NEW or got[-1] == EOS


def test_greedy_with_peft_adapter_matches_transformers(models, tmp_path):
    import peft

    hf, _ = pair(seed=3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"])
    hf = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    hf.eval()
    _, mq = pair(seed=3)
    load_adapter(mq, tmp_path)
    base = [generate_ids(models[1], [ids], eos_ids=[EOS], max_new_tokens=NEW)[0] for ids in prompts()]
    got = [generate_ids(mq, [ids], eos_ids=[EOS], max_new_tokens=NEW)[0] for ids in prompts()]
    assert got == [hf_greedy(hf, ids) for ids in prompts()]
    assert got != base  # the adapter changed something


def test_cached_equals_uncached(models):
    _, mq = models
    for ids in prompts(1):
        assert generate_ids(mq, [ids], eos_ids=[EOS], max_new_tokens=NEW)[0] == uncached_greedy(mq, ids, NEW)


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_batched_equals_one_at_a_time(models, penalty):
    _, mq = models
    ps = prompts(2)
    alone = [generate_ids(mq, [p], eos_ids=[EOS], max_new_tokens=NEW, repetition_penalty=penalty)[0]
             for p in ps]
    batched = generate_ids(mq, ps, eos_ids=[EOS], max_new_tokens=NEW, repetition_penalty=penalty, pad_id=0)
    assert batched == alone
    # A stop token that some rows hit early: those rows stop, the others go on unchanged.
    stop = alone[1][3]
    cut = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    assert generate_ids(mq, ps, eos_ids=[EOS, stop], max_new_tokens=NEW, repetition_penalty=penalty) == cut
    assert any(len(c) < len(a) for c, a in zip(cut, alone)) and any(c == a for c, a in zip(cut, alone))


def test_repetition_penalty_matches_transformers(models):
    hf, mq = models
    for ids in prompts(4, lengths=(3, 20)):
        got = generate_ids(mq, [ids], eos_ids=[EOS], max_new_tokens=NEW, repetition_penalty=1.8)[0]
        assert got == hf_greedy(hf, ids, repetition_penalty=1.8)
        assert got != generate_ids(mq, [ids], eos_ids=[EOS], max_new_tokens=NEW)[0]


def test_sampling_deterministic_and_top_k_1_is_greedy(models):
    _, mq = models
    ps = prompts(5)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(mq, ps, eos_ids=[EOS], max_new_tokens=NEW, do_sample=True, generator=g, **kw)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, temperature=0.7, top_k=10, top_p=0.9) == sample(0, temperature=0.7, top_k=10, top_p=0.9)
    greedy = generate_ids(mq, ps, eos_ids=[EOS], max_new_tokens=NEW)
    assert sample(5, top_k=1) == greedy
    assert sample(6, temperature=1e-4) == greedy


def test_top_k_top_p_match_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k, p in [(0, 0.9), (5, 1.0), (7, 0.5), (0, 0.05)]:
        want = logits.clone()
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1:
            want = TopPLogitsWarper(p)(None, want)
        got = top_k_top_p(logits.clone(), k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.isinf(got).any()
        assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_context_limit(models):
    _, mq = models
    ctx = mq.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=rf"prompt 1 has {ctx} tokens.*{ctx}"):
        generate_ids(mq, [[1, 5], [1] * ctx], eos_ids=[EOS], max_new_tokens=4)
    near = [1] + [7] * (ctx - 4)  # room for 3 new tokens
    out = generate_ids(mq, [near, [1, 5]], eos_ids=[], max_new_tokens=10)
    assert len(out[0]) == 3 and len(out[1]) == 10
    assert out[1] == generate_ids(mq, [[1, 5]], eos_ids=[], max_new_tokens=10)[0]


def test_generate_text_api():
    folder = model_dir()
    model = load_model(folder, bits=16, dtype=torch.float32, progress=False)
    tok = Tokenizer.from_dir(folder)
    texts = ["翻譯成文言文：\n我今天要去京城。", "hi", "將軍聞之，大怒。" * 3]
    ids = encode_prompts(tok, texts)
    assert all(row[0] == tok.bos_id and row[1:] == tok.encode(t) for row, t in zip(ids, texts))
    model.train()
    out = generate(model, tok, texts, max_new_tokens=8, batch_size=2, progress=False)
    assert model.training
    new = [generate_ids(model, [row], eos_ids=[tok.eos_id], max_new_tokens=8)[0] for row in ids]
    assert out == [tok.decode(n) for n in new]
    with pytest.raises(PromptTooLongError, match="prompt 2"):
        generate(model, tok, ["a", "b", "長" * 1000], progress=False)


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_static_cache_decode_equals_plain(models, penalty):
    """The CUDA-graph path's fixed-shape step (every slot, written at a slot tensor), run eagerly here:
    the same logits and tokens as the plain step, batched with left padding and per-row stops."""
    _, mq = models
    ps = prompts(5)
    kw = dict(eos_ids=[EOS], max_new_tokens=NEW, repetition_penalty=penalty, pad_id=0)
    plain = generate_ids(mq, ps, decode="plain", **kw)
    assert generate_ids(mq, ps, decode="static", **kw) == plain
    assert generate_ids(mq, ps, decode="auto", **kw) == plain  # auto is plain on the CPU
    with pytest.raises(ValueError, match="decode="):
        generate_ids(mq, ps, decode="fast", **kw)


def test_static_step_logits_equal_plain(models):
    from minqlora.generate import Decoder
    from minqlora.model import KVCache
    _, mq = models
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 7))
    key_mask = torch.ones(2, 10, dtype=torch.long)
    key_mask[1, :2] = 0  # row 1 is left-padded by two
    lengths = key_mask[:, :7].sum(1)
    positions = (key_mask[:, :7].cumsum(1) - 1).clamp(min=0)
    logits = {}
    with torch.no_grad():
        for mode in ("plain", "static"):
            cache = KVCache(mq.config, 2, 10, torch.float32, "cpu")
            mq(ids, position_ids=positions, attention_mask=key_mask[:, :7], kv_cache=cache)
            cache.static = mode == "static"
            step = Decoder(mq, cache, key_mask, mode)
            step.start(lengths, 7)
            logits[mode] = [step(torch.tensor([5, 9]), t) for t in range(3)]
    for a, b in zip(logits["plain"], logits["static"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class Replayer:
    """A stand-in for a captured CUDA graph on the CPU: replay reruns the function, which reads its fixed
    input buffers then, as a graph does, and writes the same output tensor."""

    def __init__(self, fn):
        self.fn, self.out = fn, fn()

    def replay(self):
        self.out.copy_(self.fn())


def fake_capture(fn):
    g = Replayer(fn)
    return g, g.out


def test_graphed_forward_pads_buckets_and_copies(models, monkeypatch):
    """GraphedForward's shapes logic on the CPU, with a stand-in for CUDA's capture that reruns the
    function on replay: right padding to the bucket leaves every real position's logits unchanged."""
    from minqlora import cudagraph

    monkeypatch.setattr(cudagraph, "capture", fake_capture)
    _, mq = models
    fwd = cudagraph.GraphedForward(mq, pad_id=0, multiple=16, max_graphs=2, max_tokens=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B, T in ((1, 5), (1, 13), (2, 9), (1, 20), (4, 30)):  # the last is over max_tokens: eager
            ids = torch.randint(3, 128, (B, T), generator=g)
            torch.testing.assert_close(fwd(ids), mq(ids), rtol=1e-5, atol=1e-5)
    assert set(fwd.graphs) == {(2, 16), (1, 32)}  # (1, 16) was the oldest when a third shape came


def test_kept_decoders_refresh_their_inputs(models, monkeypatch):
    """DecodeGraphs' logic on the CPU, with a stand-in for CUDA graphs that reruns the captured function on
    replay (reading its fixed input buffers then, as a graph does): batches of one shape share a decoder, its
    cache, mask buffer and prompt graph, and each batch still gets the plain path's tokens."""
    from minqlora import generate as gen

    monkeypatch.setattr(gen, "capture", fake_capture)
    monkeypatch.setattr(gen, "_graphs_on", lambda device: True)
    _, mq = models
    graphs = gen.DecodeGraphs(keep=2)
    # Two shapes (batch 1 and 2), each three times with new tokens and new padding: eager prompt, captured
    # prompt, replayed prompt; the decode step captured once per shape.
    batches = [prompts(1, (7,)), prompts(2, (3, 7)), prompts(3, (7,)), prompts(4, (7, 2)), prompts(5, (7,)),
               prompts(6, (5, 7))]
    for ps in batches:
        kw = dict(eos_ids=[EOS], max_new_tokens=NEW)
        assert generate_ids(mq, ps, decode="graph", graphs=graphs, **kw) == generate_ids(mq, ps, decode="plain",
                                                                                         **kw)
    assert len(graphs.decoders) == 2
    for decoder in graphs.decoders.values():
        assert decoder.graph is not None and list(decoder.prefills) == [8]


def test_decode_graphs_keep_and_drop_the_oldest_first():
    from minqlora.generate import DecodeGraphs
    graphs, held = DecodeGraphs(keep=1), []
    assert graphs.get("a", lambda: "A") == "A" and graphs.get("a", lambda: "other") == "A"
    assert graphs.get("b", lambda: held.append(dict(graphs.decoders)) or "B") == "B"
    assert held == [{}] and graphs.decoders == {"b": "B"}  # "a"'s cache was let go before "b"'s was made


def test_compiled_decode_equals_plain():
    """decode="compile" (torch.compile over the static step; on the CPU without CUDA graphs) on a 4-bit
    model with LoRA adapters (B non-zero): the same tokens as the plain path, batched with left padding,
    and a cache of CACHE_BUCKET slots. One layer: one compilation, 10-25 s on two cores (cold cache)."""
    import torch.nn as nn
    from minqlora.lora import apply_lora, lora_modules
    from minqlora.nf4 import quantize_linear_weight
    _, mq = pair(seed=7, num_hidden_layers=1)
    for name, m in list(mq.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(mq.get_submodule(parent), child, quantize_linear_weight(m.weight.data))
    apply_lora(mq, r=8, alpha=16, verbose=False)
    with torch.no_grad():
        for m in lora_modules(mq).values():
            m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    mq.eval()
    ps = prompts(6, lengths=(5, 17, 9))
    kw = dict(eos_ids=[EOS], max_new_tokens=NEW, pad_id=0)
    plain = generate_ids(mq, ps, decode="plain", **kw)
    assert min(map(len, plain)) < NEW == max(map(len, plain))  # one row stops early, one runs on
    assert generate_ids(mq, ps, decode="compile", **kw) == plain
