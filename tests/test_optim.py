"""optim.py: the paged AdamW steps like torch's AdamW; the LR schedules equal transformers'."""
import math

import pytest
import torch

from minqlora.optim import (BNB_MOMENTS, FlatPagedAdamW, build_optimizer, build_scheduler, describe_schedule,
                            fast_forward, quiet_cpu_paging, schedule_change, warmup_steps_for)

quiet_cpu_paging()


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # one small and one large tensor: bitsandbytes treats tensors under 4096 elements differently
    return [torch.nn.Parameter(torch.randn(16, 8, generator=g)), torch.nn.Parameter(torch.randn(64, 96, generator=g))]


def _run(name, steps=6, **kw):
    params = _params()
    opt = build_optimizer(params, name, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        _step(opt, params, [torch.randn(p.shape, generator=g) for p in params])
    return opt, params


def test_paged_adamw_32bit_steps_equal_torch_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    opt, ours = _run("paged_adamw_32bit", **kw)
    assert isinstance(opt, FlatPagedAdamW)
    ref_opt, ref = _run("adamw_torch", **kw)
    assert type(ref_opt) is torch.optim.AdamW
    start = _params()
    for p, q, p0 in zip(ours, ref, start):
        assert (p - p0).abs().max() > 1e-2  # the steps moved the weights
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


def _step(opt, params, grads):
    """One update of `params` with (copies of) `grads`; None: that tensor has no gradient this step."""
    for p, gr in zip(params, grads):
        p.grad = None if gr is None else gr.clone()
    opt.step()


def _bnb_run(params, grads_per_step, **kw):
    import bitsandbytes as bnb
    opt = bnb.optim.PagedAdamW32bit(params, **kw)
    for grads in grads_per_step:
        _step(opt, params, grads)
    return opt


def test_flat_adamw_equals_bitsandbytes_per_tensor_bit_for_bit():
    """One kernel call over the concatenated tensors = bnb's call per tensor, to the bit, also when a tensor
    has no gradient in some step (then it is skipped, its step count lags, and the flat path steps per tensor)."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    shapes = [p.shape for p in _params()]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    grads[2][0] = None  # the first tensor gets no gradient in step 3
    ref = _params()
    _bnb_run(ref, grads, **kw)
    ours = _params()
    opt = build_optimizer(ours, "paged_adamw_32bit", **kw)
    assert all(p.data_ptr() == opt.flat[sl].data_ptr() for p, sl in zip(ours, opt.slices))  # views of one buffer
    for step in grads:
        _step(opt, ours, step)
    start = _params()
    for p, q, p0 in zip(ours, ref, start):
        assert (p - p0).abs().max() > 1e-2
        assert torch.equal(p.detach(), q.detach())
    assert [opt.state[p]["step"] for p in ours] == [3, 4]


def test_flat_adamw_state_loads_from_and_into_bitsandbytes():
    """Checkpoints written with bnb's per-tensor optimizer resume in the flat one and the other way round."""
    kw = dict(lr=1e-2, weight_decay=0.05)
    g = torch.Generator().manual_seed(5)
    shapes = [p.shape for p in _params()]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    ref = _params()
    ref_opt = _bnb_run(ref, grads[:3], **kw)
    flat = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    flat_opt = build_optimizer(flat, "paged_adamw_32bit", **kw)
    flat_opt.load_state_dict(ref_opt.state_dict())
    back = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for step in grads[3:]:
        _step(ref_opt, ref, step)
        _step(flat_opt, flat, step)
    for p, q in zip(ref, flat):
        assert torch.equal(p, q)
    import bitsandbytes as bnb
    back_opt = bnb.optim.PagedAdamW32bit(back, **kw)
    back_opt.load_state_dict(flat_opt.state_dict())
    assert all(torch.equal(back_opt.state[b]["state2"], flat_opt.state[f]["state2"]) for b, f in zip(back, flat))
    bad = flat_opt.state_dict()
    bad["state"][0][BNB_MOMENTS]["state1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        build_optimizer(_params(), "paged_adamw_32bit", **kw).load_state_dict(bad)


def test_paged_adamw_8bit_is_bitsandbytes_and_minimises():
    import bitsandbytes as bnb
    p = torch.nn.Parameter(torch.full((64, 80), 3.0))
    opt = build_optimizer([p], "paged_adamw_8bit", lr=0.1)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    for _ in range(30):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert p.abs().mean() < 1.0


def test_optimizer_state_round_trip_continues_identically():
    kw = dict(lr=1e-2, weight_decay=0.05)
    opt, params = _run("paged_adamw_32bit", steps=3, **kw)
    saved = opt.state_dict()
    copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = build_optimizer(copy, "paged_adamw_32bit", **kw)
    opt2.load_state_dict(saved)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        _step(opt, params, grads)
        _step(opt2, copy, grads)
    for p, q in zip(params, copy):
        assert torch.equal(p, q)


def test_unknown_optimizer_and_no_trainable_parameters_are_refused():
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        build_optimizer(_params(), "sgd", lr=1e-3)
    frozen = [torch.nn.Parameter(torch.zeros(3), requires_grad=False)]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, "adamw_torch", lr=1e-3)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (30, 1000), (10, 10)])
def test_schedules_equal_transformers(name, warmup, total):
    import transformers
    ref_fn = {"constant": lambda o: transformers.get_constant_schedule(o),
              "constant_with_warmup": lambda o: transformers.get_constant_schedule_with_warmup(o, warmup),
              "linear": lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total),
              "cosine": lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total)}[name]
    lrs = []
    for make in (lambda o: build_scheduler(o, name, warmup, total), ref_fn):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = make(opt)
        seq = []
        for _ in range(total + 2):
            seq.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        lrs.append(seq)
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12, abs=1e-15)
    if name != "constant" and warmup:
        assert lrs[0][0] == 0.0  # warmup starts at 0


def test_warmup_steps_follow_transformers():
    from transformers import TrainingArguments
    for total, ratio in ((1000, 0.03), (7, 0.03), (10000, 0.1)):
        # transformers 5 spells a ratio as a fractional warmup_steps
        ref = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to="none").get_warmup_steps(total)
        assert warmup_steps_for(total, 0, ratio) == ref == math.ceil(total * ratio)
    assert warmup_steps_for(1000, 5, 0.03) == 5  # explicit steps win


def test_constant_schedule_says_it_ignores_warmup():
    assert "ignored" in describe_schedule("constant", 300, 0.03, 0)
    assert "ignored" not in describe_schedule("constant", 0, 0.0, 0)
    assert "300 warmup steps" in describe_schedule("linear", 300, 0.03, 0)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_fast_forward_puts_a_fresh_schedule_where_stepping_would(name):
    def fresh(lr):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return opt, build_scheduler(opt, name, 3, 10)
    opt, sched = fresh(3e-4)
    stepped = []
    for _ in range(7):
        stepped.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    for k in range(7):
        # an optimizer loaded from a checkpoint carries the old run's lr; fast_forward replaces it
        opt2, sched2 = fresh(3e-4)
        opt2.param_groups[0]["lr"] = 123.0
        assert fast_forward(sched2, k) == pytest.approx(stepped[k], rel=1e-12, abs=1e-15)
        assert opt2.param_groups[0]["lr"] == sched2.get_last_lr()[0] == pytest.approx(stepped[k], rel=1e-12, abs=1e-15)
        opt2.step()
        sched2.step()  # and it goes on from there like the stepped one
        assert sched2.get_last_lr()[0] == pytest.approx(stepped[k + 1] if k + 1 < 7 else sched.get_last_lr()[0],
                                                        rel=1e-12, abs=1e-15)
    # the peak is this run's: another --learning_rate scales the same schedule
    opt3, sched3 = fresh(1e-3)
    assert fast_forward(sched3, 5) == pytest.approx(stepped[5] * 1e-3 / 3e-4, rel=1e-12)
    assert opt3.param_groups[0]["initial_lr"] == 1e-3


def test_schedule_change_warns_only_for_what_the_schedule_uses():
    def sched(name, total, warmup):
        return {"type": name, "total_steps": total, "warmup_steps": warmup}
    for name in ("linear", "cosine"):
        assert "total steps 2 -> 4" in schedule_change(name, sched(name, 2, 1), sched(name, 4, 1))
        assert "warmup steps 1 -> 3" in schedule_change(name, sched(name, 2, 1), sched(name, 2, 3))
        assert schedule_change(name, sched(name, 2, 1), sched(name, 2, 1)) is None
    name = "constant_with_warmup"
    assert schedule_change(name, sched(name, 2, 1), sched(name, 4, 1)) is None
    assert "warmup steps 1 -> 3" in schedule_change(name, sched(name, 2, 1), sched(name, 2, 3))
    assert schedule_change("constant", sched("constant", 2, 1), sched("constant", 4, 3)) is None
    assert schedule_change("cosine", None, sched("cosine", 4, 1)) is None  # a checkpoint without the schedule
    assert schedule_change("cosine", sched("linear", 2, 1), sched("cosine", 4, 1)) is None  # type: a flag warning
