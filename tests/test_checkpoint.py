"""Checkpoints: exact resume (after a stop or a Ctrl-C), rotation that keeps the best, early stopping,
atomic writes, RNG state, output_dir protection, and the learning curves."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minqlora.checkpoint as ckpt
from _fixtures_train import fast_args, load_script, needs_tiny, read_log, train_losses, train_main, write_records
from minqlora.curves import read_log as read_curves_log
from minqlora.curves import write_curves


def _resume_args(tmp_path, out, max_steps, **kw):
    data = write_records(tmp_path / "train.json", 14)  # 7 micro-batches of 2: steps of 2, 2, 2, 1 per epoch
    write_records(tmp_path / "eval.json", 6, seed=1)
    return fast_args(out, data, bits=4, max_steps=max_steps, lora_dropout=0.1, save_steps=3, eval_steps=2,
                     evaluation_strategy="steps", eval_dataset=tmp_path / "eval.json",
                     lr_scheduler_type="constant_with_warmup", warmup_steps=2, **kw)


def _assert_same_run(a, b, extra_evals=()):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-5)
    la, lb = train_losses(a / "log.jsonl"), train_losses(b / "log.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(la)], abs=1e-6)
    ea = [(r["step"], r["eval_ppl"]) for r in read_log(a / "log.jsonl") if "eval_ppl" in r]
    eb = [(r["step"], r["eval_ppl"]) for r in read_log(b / "log.jsonl") if "eval_ppl" in r
          and r["step"] not in extra_evals]
    assert [s for s, _ in ea] == [s for s, _ in eb] == [2, 4, 6]
    assert [v for _, v in eb] == pytest.approx([v for _, v in ea], abs=1e-5)


@needs_tiny
def test_resume_after_stop_and_after_ctrl_c_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    import minqlora.trainer as trainer
    straight = tmp_path / "straight"
    assert train_main(_resume_args(tmp_path, straight, 6)) == 0
    # N steps, stop; then resume to 2N with a higher --max_steps
    split = tmp_path / "split"
    assert train_main(_resume_args(tmp_path, split, 3)) == 0
    assert (split / "completed").exists()
    assert train_main(_resume_args(tmp_path, split, 6, resume_from_checkpoint="latest")) == 0
    _assert_same_run(straight, split, extra_evals=(3,))  # the first part ended with an evaluation
    # Ctrl-C during step 5 (epoch 2 has started): a checkpoint of step 4 is written, exit 130
    real, calls = trainer.accumulate_gradients, []

    def interrupt_at_step_5(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(trainer, "accumulate_gradients", interrupt_at_step_5)
    killed = tmp_path / "killed"
    assert train_main(_resume_args(tmp_path, killed, 6)) == 130
    assert "interrupted after step 4" in capsys.readouterr().err
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["pos"]) == (4, 1, 0)
    assert not (killed / "completed").exists()
    monkeypatch.setattr(trainer, "accumulate_gradients", real)
    assert train_main(_resume_args(tmp_path, killed, 6, resume_from_checkpoint=killed / "checkpoint-4")) == 0
    _assert_same_run(straight, killed)


@needs_tiny
def test_early_stopping_keeps_the_best_checkpoint_through_rotation(tmp_path, monkeypatch):
    import minqlora.trainer as trainer
    ppl = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9])
    monkeypatch.setattr(trainer, "mean_perplexity", lambda values: next(ppl))
    data = write_records(tmp_path / "train.json", 14)
    write_records(tmp_path / "eval.json", 4, seed=1)
    out = tmp_path / "out"
    argv = fast_args(out, data, max_steps=10, eval_steps=1, evaluation_strategy="steps", save_steps=1,
                     save_total_limit=1, early_stopping_patience=2, eval_dataset=tmp_path / "eval.json")
    assert train_main(argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["eval_ppl"] == 4.0
    assert json.loads((out / "completed").read_text())["stop"] == "early_stopping"
    a = load_file(out / "best" / "adapter_model.safetensors")
    b = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = load_file(out / "adapter_model.safetensors")  # the final adapter is the last step's
    assert any(not torch.equal(a[k], final[k]) for k in a)
    assert [r["best"] for r in read_log(out / "log.jsonl") if "eval_ppl" in r] == [True, True, False, False]


def test_rotate_removes_oldest_but_never_best_or_newest(tmp_path):
    for s in (1, 2, 3, 4, 5, 6):
        (tmp_path / f"checkpoint-{s}").mkdir()
    (tmp_path / ".checkpoint-7.tmp-abc").mkdir()  # a write in progress is not a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3, 4, 5, 6]
    removed = ckpt.rotate(tmp_path, 3, keep={2, 6})
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 5, 6]
    ckpt.rotate(tmp_path, 1, keep={2, 6})  # limit 1 still keeps best and newest
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 6]
    assert ckpt.rotate(tmp_path, None) == []


def test_a_failed_checkpoint_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from minqlora.lora import apply_lora, freeze_base
    from minqlora.model import LlamaForCausalLM
    from _tiny import TINY
    from minqlora.config import LlamaConfig
    model = LlamaForCausalLM(LlamaConfig.from_dict(TINY))
    apply_lora(model, r=2, alpha=4)
    freeze_base(model, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lora = dict(r=2, alpha=4, dropout=0.0, targets="all", base_model_name_or_path="x")
    kw = dict(lora=lora, optimizer=opt, scheduler=sched, scaler=None, rng=ckpt.rng_state(), state={"epoch": 0})
    good = ckpt.save_training_checkpoint(tmp_path, 1, model, **kw)

    def die(*a, **k):
        raise KeyboardInterrupt  # a kill while trainer_state.pt is written
    monkeypatch.setattr(ckpt.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_checkpoint(tmp_path, 2, model, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert {p.name for p in good.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                 "trainer_state.pt", "trainer_state.json"}
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        ckpt.find_checkpoint(str(tmp_path), tmp_path)
    assert ckpt.find_checkpoint("latest", tmp_path) == good


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    torch.save(state, "/dev/null")  # it must be saveable
    ckpt.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_output_dir_of_another_run_is_refused_or_overwritten(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "log.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="holds another run.*--overwrite_output_dir"):
        ckpt.prepare_output_dir(tmp_path, overwrite=False, resuming=False)
    assert ckpt.prepare_output_dir(tmp_path, overwrite=False, resuming=True) == []
    assert (tmp_path / "checkpoint-5").exists()
    assert ckpt.prepare_output_dir(tmp_path, overwrite=True, resuming=False) == ["checkpoint-5", "log.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_from_logs_and_plot_script(tmp_path, capsys):
    a = _log(tmp_path / "run_a" / "log.jsonl", [
        {"event": "start", "step": 0}, {"step": 1, "epoch": 0.1, "loss": 2.0}, {"step": 2, "epoch": 0.2, "loss": 1.5},
        {"step": 2, "epoch": 0.2, "eval_loss": 1.8, "eval_ppl": 6.0}, {"step": 4, "epoch": 0.4, "loss": 1.0},
        {"step": 4, "epoch": 0.4, "eval_loss": 1.9, "eval_ppl": 6.5}])
    log = write_curves(a, tmp_path / "c.png", tmp_path / "c.csv")
    assert log["train"] == [(1, 2.0), (2, 1.5), (4, 1.0)] and log["eval_ppl"] == [(2, 6.0), (4, 6.5)]
    assert (tmp_path / "c.csv").read_text().splitlines() == [
        "step,epoch,loss,eval_loss,eval_ppl", "1,0.1,2.0,,", "2,0.2,1.5,1.8,6.0", "4,0.4,1.0,1.9,6.5"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    b = _log(tmp_path / "run_b" / "log.jsonl", [{"step": 1, "loss": 3.0},
                                                {"step": 1, "eval_loss": 2.5, "eval_ppl": 9.0}])
    plot = load_script("plot")
    assert plot.main([str(a), str(b), "-o", str(tmp_path / "both.png"), "--labels", "A", "B"]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000
    assert plot.main([str(a), "--labels", "A", "B"]) == 2
    (tmp_path / "cut.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    assert read_curves_log(tmp_path / "cut.jsonl")["train"] == [(1, 2.0)]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    assert plot.main([str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl: line 2" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        read_curves_log(tmp_path / "none.jsonl")
