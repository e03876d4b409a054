"""Checkpoints: exact resume (after a stop or a Ctrl-C), rotation that keeps the best, early stopping,
atomic writes, RNG state, output_dir protection, and the learning curves."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minqlora.checkpoint as ckpt
from minqlora.errors import BadInput
from _fixtures_train import fast_args, load_script, needs_tiny, read_log, train_losses, train_main, write_records
from minqlora.curves import RunLog, write_curves
from minqlora.curves import read_log as read_curves_log
from minqlora.optim import cosine
from minqlora.runstate import rng_state, set_rng_state


def _resume_args(tmp_path, out, max_steps, **kw):
    data = write_records(tmp_path / "train.json", 14)  # 7 micro-batches of 2: steps of 2, 2, 2, 1 per epoch
    write_records(tmp_path / "eval.json", 6, seed=1)
    return fast_args(out, data, bits=4, max_steps=max_steps, lora_dropout=0.1, save_steps=3, eval_steps=2,
                     evaluation_strategy="steps", eval_dataset=tmp_path / "eval.json",
                     lr_scheduler_type="constant_with_warmup", warmup_steps=2, **kw)


def _lrs(out):
    return {r["step"]: r["lr"] for r in read_log(out / "log.jsonl") if "loss" in r}


def _assert_same_run(a, b, extra_evals=()):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-5)
    la, lb = train_losses(a / "log.jsonl"), train_losses(b / "log.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert [lb[s] for s in sorted(lb)] == pytest.approx([la[s] for s in sorted(la)], abs=1e-6)
    assert _lrs(b) == pytest.approx(_lrs(a), rel=1e-12, abs=0)  # the same schedule: the same LR at every step
    ea = [(r["step"], r["eval_ppl"]) for r in read_log(a / "log.jsonl") if "eval_ppl" in r]
    eb = [(r["step"], r["eval_ppl"]) for r in read_log(b / "log.jsonl") if "eval_ppl" in r
          and r["step"] not in extra_evals]
    assert [s for s, _ in ea] == [s for s, _ in eb] == [2, 4, 6]
    assert [v for _, v in eb] == pytest.approx([v for _, v in ea], abs=1e-5)


@needs_tiny
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_resume_after_stop_and_after_ctrl_c_equals_a_straight_run(tmp_path, monkeypatch, capsys, device):
    """On a GPU too: there the optimizer's moments are paged (bitsandbytes' unified memory) and packed passes
    are the default."""
    import minqlora.trainer as trainer
    straight = tmp_path / "straight"
    assert train_main(_resume_args(tmp_path, straight, 6, device=device)) == 0
    # N steps, stop; then resume to 2N with a higher --max_steps
    split = tmp_path / "split"
    assert train_main(_resume_args(tmp_path, split, 3, device=device)) == 0
    assert (split / "completed").exists()
    capsys.readouterr()
    assert train_main(_resume_args(tmp_path, split, 6, resume_from_checkpoint="latest", device=device)) == 0
    assert "schedule changed" not in capsys.readouterr().out  # constant_with_warmup ignores --max_steps
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
    assert train_main(_resume_args(tmp_path, killed, 6, device=device)) == 130
    assert "interrupted after step 4" in capsys.readouterr().err
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["pos"]) == (4, 1, 0)
    assert not (killed / "completed").exists()
    monkeypatch.setattr(trainer, "accumulate_gradients", real)
    assert train_main(_resume_args(tmp_path, killed, 6, resume_from_checkpoint=killed / "checkpoint-4",
                                   device=device)) == 0
    _assert_same_run(straight, killed)


def _schedule_args(tmp_path, out, max_steps, **kw):
    data = write_records(tmp_path / "train.json", 16)
    kw = {"lr_scheduler_type": "cosine", "warmup_steps": 1, "learning_rate": 0.003, **kw}
    return fast_args(out, data, max_steps=max_steps, save_steps=2, **kw)


@needs_tiny
def test_resume_with_another_max_steps_follows_the_new_schedule(tmp_path, capsys):
    # The reviewer's case: cosine, 1 warmup step, lr 0.003; 4 steps straight, or 2 steps then resumed to 4.
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(_schedule_args(tmp_path, straight, 4)) == 0
    assert train_main(_schedule_args(tmp_path, split, 2)) == 0
    capsys.readouterr()
    assert train_main(_schedule_args(tmp_path, split, 4, resume_from_checkpoint="latest")) == 0
    new = {k + 1: 0.003 * cosine(k, num_warmup_steps=1, num_training_steps=4) for k in range(4)}
    assert new[3] == pytest.approx(0.00225)
    assert _lrs(straight) == pytest.approx(new, rel=1e-12, abs=0)
    assert _lrs(split) == pytest.approx(new, rel=1e-12, abs=0)  # steps 3, 4 follow the new schedule
    printed = capsys.readouterr().out
    assert "cosine LR schedule changed on resume (total steps 2 -> 4" in printed and "step 3: lr 0.00225" in printed
    # Steps 1 and 2 had the same LR under both schedules (0, then the peak), so the split run is the
    # straight one, weights included.
    ta, tb = load_file(straight / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=1e-5)
    state = json.loads((split / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["schedule"] == {"type": "cosine", "total_steps": 4, "warmup_steps": 1, "step": 4}

    # constant ignores --max_steps (no warning); a new --learning_rate is the new peak from the next step
    const = tmp_path / "const"
    assert train_main(_schedule_args(tmp_path, const, 2, lr_scheduler_type="constant")) == 0
    capsys.readouterr()
    assert train_main(_schedule_args(tmp_path, const, 3, lr_scheduler_type="constant", learning_rate=0.001,
                                     resume_from_checkpoint="latest")) == 0
    printed = capsys.readouterr().out
    assert "schedule changed" not in printed and "--learning_rate was 0.003" in printed
    assert _lrs(const) == {1: 0.003, 2: 0.003, 3: 0.001}


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


def _best_args(tmp_path, out, max_steps, **kw):
    data = write_records(tmp_path / "train.json", 14)
    write_records(tmp_path / "eval.json", 4, seed=1)
    return fast_args(out, data, max_steps=max_steps, eval_steps=1, evaluation_strategy="steps", save_steps=1,
                     eval_dataset=tmp_path / "eval.json", **kw)


@needs_tiny
def test_resume_from_before_the_last_best_makes_best_agree(tmp_path, monkeypatch, capsys):
    import minqlora.trainer as trainer

    def ppl_sequence(*values):
        it = iter(values)
        monkeypatch.setattr(trainer, "mean_perplexity", lambda _: next(it))
    # best at step 2, then a newer best at step 4; resume from checkpoint-3 (whose best is step 2)
    out = tmp_path / "kept"
    ppl_sequence(5.0, 4.0, 4.5, 3.0)
    assert train_main(_best_args(tmp_path, out, 4)) == 0
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 4
    capsys.readouterr()
    assert train_main(_best_args(tmp_path, out, 3, resume_from_checkpoint=out / "checkpoint-3")) == 0
    info = json.loads((out / "best" / "best.json").read_text())
    assert (info["step"], info["eval_ppl"]) == (2, 4.0) and info["eval_loss"] is not None
    assert "restored the best" in capsys.readouterr().out
    a, b = (load_file(out / d / "adapter_model.safetensors") for d in ("best", "checkpoint-2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log if r.get("event") == "best"] == [1, 2]
    assert max(r.get("step", 0) for r in log if r.get("event") != "end") == 3
    assert json.loads((out / "completed").read_text())["best_step"] == 2

    # the same, but rotation removed checkpoint-2: best/ cannot be put back, so it goes and the next
    # evaluation (4.4, worse than the forgotten 4.0) starts a new best
    out = tmp_path / "rotated"
    ppl_sequence(5.0, 4.0, 4.5, 3.0)
    assert train_main(_best_args(tmp_path, out, 4, save_total_limit=2)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    capsys.readouterr()
    ppl_sequence(4.4)
    argv = _best_args(tmp_path, out, 4, save_total_limit=2, resume_from_checkpoint=out / "checkpoint-3")
    assert train_main(argv) == 0
    info = json.loads((out / "best" / "best.json").read_text())
    assert (info["step"], info["eval_ppl"]) == (4, 4.4)
    assert "no longer on disk" in capsys.readouterr().out
    a, b = (load_file(out / d / "adapter_model.safetensors") for d in ("best", "checkpoint-4"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_tiny
def test_resuming_into_another_runs_output_dir_is_refused(tmp_path, capsys):
    data = write_records(tmp_path / "train.json", 12)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train_main(fast_args(a, data, max_steps=2)) == 0
    assert train_main(fast_args(b, data, max_steps=1, save_strategy="no")) == 0
    files_b = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    files_a = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}
    capsys.readouterr()
    resume = dict(max_steps=3, resume_from_checkpoint=a / "checkpoint-2")
    assert train_main(fast_args(b, data, **resume)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds another run" in err and f"({a})" in err
    assert "--overwrite_output_dir" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == files_b  # untouched
    # --overwrite_output_dir with a resume that is refused (another --lora_r): b's run is still untouched
    assert train_main(fast_args(b, data, overwrite_output_dir=True, lora_r=2, **resume)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "--lora_r" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == files_b
    # --overwrite_output_dir: the other run goes, the log holds this run only
    assert train_main(fast_args(b, data, overwrite_output_dir=True, **resume)) == 0
    log = read_log(b / "log.jsonl")
    assert [r["event"] for r in log if r.get("event") in ("start", "end", "audit")] == ["audit", "start", "end"]
    assert [r["step"] for r in log if "loss" in r] == [3]
    assert next(r for r in log if r.get("event") == "start")["resumed_from"] == str(a / "checkpoint-2")
    assert json.loads((b / "run_config.json").read_text())["resume_from_checkpoint"] == str(a / "checkpoint-2")
    # an empty folder is fine, and the checkpoint's own run is left as it was
    assert train_main(fast_args(c, data, **resume)) == 0
    assert train_losses(c / "log.jsonl") == train_losses(b / "log.jsonl")
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == files_a


def test_the_log_is_cut_by_renaming_a_new_file(tmp_path):
    path = _log(tmp_path / "log.jsonl", [{"event": "start", "step": 0}, {"step": 1, "loss": 2.0},
                                          {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}])
    path.write_text(path.read_text() + '{"step": 4, "lo')  # and a line cut short by a kill
    inode = path.stat().st_ino
    with open(path, encoding="utf-8") as reader:  # e.g. scripts/plot.py reading the log meanwhile
        log = RunLog(path, keep_until_step=2)
        log.write(step=3, loss=0.9)
        log.close()
        assert len(reader.read().splitlines()) == 5  # the old file was never truncated in place
    assert path.stat().st_ino != inode
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == [
        {"event": "start", "step": 0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 0.9}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # no temporary file left


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
    kw = dict(lora=lora, optimizer=opt, scheduler=sched, scaler=None, rng=rng_state(), state={"epoch": 0})
    good = ckpt.save_training_checkpoint(tmp_path, 1, model, **kw)

    def die(*a, **k):
        raise KeyboardInterrupt  # a kill while trainer_state.pt is written
    monkeypatch.setattr(ckpt.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_checkpoint(tmp_path, 2, model, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert {p.name for p in good.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                 "trainer_state.pt", "trainer_state.json"}
    with pytest.raises(BadInput, match="not a training checkpoint"):
        ckpt.find_checkpoint(str(tmp_path), tmp_path)
    assert ckpt.find_checkpoint("latest", tmp_path) == good


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    torch.save(state, "/dev/null")  # it must be saveable
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_output_dir_of_another_run_is_refused_or_overwritten(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "log.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="holds another run.*--overwrite_output_dir"):
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
