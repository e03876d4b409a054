"""accumulate.py: the packed fast path computes the plain path's loss and gradient (trainer.accumulate_gradients:
each micro-batch's mean / K, or every token / their count)."""
import pytest
import torch

from _tiny import pair
from minqlora import accumulate
from minqlora.data import Example, collate
from minqlora.loss import IGNORE_INDEX, causal_lm_loss
from minqlora.lora import apply_lora, lora_modules
from minqlora.trainer import accumulate_gradients

PAD = 0


def window(seed=0, micro=3, K=4):
    """K micro-batches of `micro` rows of various lengths, with prompt tokens unscored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(K):
        rows = []
        for _ in range(micro):
            n = int(torch.randint(4, 30, (1,), generator=g))
            ids = torch.randint(3, 128, (n,), generator=g).tolist()
            src = int(torch.randint(1, n - 1, (1,), generator=g))
            rows.append(Example(ids, [IGNORE_INDEX] * src + ids[src:], length=n))
        out.append(collate(rows, PAD))
    return out


@pytest.fixture(scope="module")
def model():
    _, mq = pair(seed=5)
    apply_lora(mq, r=4, alpha=8, dropout=0.0, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(mq).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    mq.train()
    return mq


def run(model, fn):
    for p in model.parameters():
        p.grad = None
    loss = fn()
    return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def reference(model, win, normalization):
    """What trainer.py computed before the fast path existed, micro-batch by micro-batch."""
    n_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in win)
    total = torch.zeros(())
    for b in win:
        logits = model(b["input_ids"])
        if normalization == "token":
            loss = causal_lm_loss(logits, b["labels"], reduction="sum")[0] / n_target
        else:
            loss = causal_lm_loss(logits, b["labels"], reduction="mean") / len(win)
        loss.backward()
        total += loss.detach()
    return total


@pytest.mark.parametrize("normalization", ["example", "token"])
@pytest.mark.parametrize("pass_tokens", [1, 100, 10_000])  # a pass a row, a few rows, one pass
def test_packed_equals_plain_equals_reference(model, normalization, pass_tokens):
    win = window()
    ref_loss, ref_grad = run(model, lambda: reference(model, win, normalization))
    loss, grad = run(model, lambda: accumulate_gradients(model, win, "cpu", normalization))
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)  # the trainer's plain path
    loss, grad = run(model, lambda: accumulate_gradients(model, win, "cpu", normalization, pad_id=PAD,
                                                         pass_tokens=pass_tokens))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


def test_scored_loss_equals_weighted_loss(model):
    win = window(seed=3)
    for ids, labels, w in accumulate.pack(win, accumulate.token_weights(win, "token"), PAD, 10_000):
        a, ga = run(model, lambda: accumulate.weighted_loss(model, ids, labels, w).backward() or
                    accumulate.weighted_loss(model, ids, labels, w).detach())
        b, gb = run(model, lambda: accumulate.scored_loss(model, ids, labels, w).backward() or
                    accumulate.scored_loss(model, ids, labels, w).detach())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_pack_respects_the_token_cap_and_keeps_every_scored_token():
    win = window(seed=2)
    weights = accumulate.token_weights(win, "example")
    for cap in (1, 50, 120, 10_000):
        passes = accumulate.pack(win, weights, PAD, cap)
        assert sum(ids.shape[0] for ids, _, _ in passes) == 12  # every row, once
        for ids, labels, w in passes:
            assert ids.shape[0] == 1 or ids.numel() <= cap
            assert ids.shape[1] % 64 == 0
            assert torch.equal(w > 0, labels[:, 1:] != IGNORE_INDEX)
        total = sum(float(w.sum()) for _, _, w in passes)
        assert total == pytest.approx(1.0)  # example weights: K micro-batch means / K
    assert len(accumulate.pack(win, weights, PAD, 10_000)) == 1
    assert accumulate.pack(win, weights, PAD, 10_000, multiple=1)[0][0].shape[1] == max(
        int(b["attention_mask"].sum(1).max()) for b in win)
    with pytest.raises(ValueError, match="normalization"):
        accumulate.token_weights(win, "batch")
