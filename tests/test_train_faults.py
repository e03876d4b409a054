"""Faults during training (scripts/train.py on the embedded tiny model): a NaN loss, non-finite LoRA weights,
an error or out-of-memory mid-run exit 1 naming the last good checkpoint, which is kept whole; an fp16 step
the gradient scaler skips does not advance the learning-rate schedule."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _fixtures_train import fast_args, needs_tiny, read_log, train_main, write_records

pytestmark = needs_tiny


@pytest.mark.parametrize("fp16", [False, True])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch, fp16):
    import minqlora.trainer as trainer
    real, calls = trainer.accumulate_gradients, []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(trainer, "accumulate_gradients", poisoned)
    out = tmp_path / "out"
    data = write_records(tmp_path / "d.json", 12)
    assert train_main(fast_args(out, data, save_steps=1, max_steps=5, fp16=fp16)) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "checkpoint-2" in err
    lines = err.strip().splitlines()  # one error line, last on screen, no traceback; nothing half-written
    assert "Traceback" not in err and lines[-1].startswith("error: ") and str(out / "checkpoint-2") in lines[-1]
    assert not any(".tmp" in p.name for p in out.iterdir())
    assert ("--bf16 instead of --fp16" in err) == fp16  # that advice only where it applies
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "completed").exists()


def test_non_finite_lora_weights_never_reach_a_checkpoint(tmp_path, capsys, monkeypatch):
    import minqlora.trainer as trainer
    real, calls = trainer.accumulate_gradients, []

    def poison_a_weight(model, *args, **kw):
        calls.append(1)
        loss = real(model, *args, **kw)
        if len(calls) == 3:  # during step 3 a LoRA weight turns NaN; the loss and gradients are finite
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("nan")
        return loss
    monkeypatch.setattr(trainer, "accumulate_gradients", poison_a_weight)
    out = tmp_path / "out"
    data = write_records(tmp_path / "d.json", 12)
    assert train_main(fast_args(out, data, save_steps=1, max_steps=5)) == 1
    err = capsys.readouterr().err
    assert "LoRA weights are not finite after step 3" in err and "checkpoint-3 not written" in err
    assert "Last good checkpoint: " + str(out / "checkpoint-2") in err and "--fp16" not in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "completed").exists() and not (out / "adapter_model.safetensors").exists()


def test_fp16_step_skipped_by_the_scaler_does_not_advance_the_schedule(tmp_path, monkeypatch):
    import minqlora.trainer as trainer
    real, calls = trainer.accumulate_gradients, []

    def inf_gradient_in_step_2(model, *args, **kw):
        calls.append(1)
        loss = real(model, *args, **kw)
        if len(calls) == 2:
            next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
        return loss
    monkeypatch.setattr(trainer, "accumulate_gradients", inf_gradient_in_step_2)
    data = write_records(tmp_path / "d.json", 16)
    out = tmp_path / "out"
    flags = dict(fp16=True, lr_scheduler_type="linear", warmup_steps=4, learning_rate=0.004, max_steps=4,
                 save_steps=1)
    assert train_main(fast_args(out, data, **flags)) == 0
    lrs = {r["step"]: r["lr"] for r in read_log(out / "log.jsonl") if "loss" in r}
    # the scaler skipped step 2's update: step 3 uses the LR step 2 had (transformers' Trainer does the same)
    assert lrs == pytest.approx({1: 0.0, 2: 0.001, 3: 0.001, 4: 0.002})
    a, b = (load_file(out / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 2 changed no weight
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["schedule"]["step"] == 1
    # resumed, the LR goes on from the schedule's own position, not from the step count
    monkeypatch.setattr(trainer, "accumulate_gradients", real)
    assert train_main(fast_args(out, data, **flags, resume_from_checkpoint=out / "checkpoint-2")) == 0
    lrs = {r["step"]: r["lr"] for r in read_log(out / "log.jsonl") if "loss" in r}
    assert lrs == pytest.approx({1: 0.0, 2: 0.001, 3: 0.001, 4: 0.002})


@pytest.mark.parametrize("error", ["ValueError", "OSError"])
def test_an_error_during_training_exits_1_and_keeps_the_checkpoints(tmp_path, capsys, monkeypatch, error):
    import minqlora.trainer as trainer
    real, calls = trainer.accumulate_gradients, []

    def fail_in_step_3(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom") if error == "ValueError" else OSError(28, "No space left on device")
        return real(*args, **kw)
    monkeypatch.setattr(trainer, "accumulate_gradients", fail_in_step_3)
    out = tmp_path / "out"
    data = write_records(tmp_path / "d.json", 12)
    assert train_main(fast_args(out, data, save_steps=1, max_steps=5)) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: training stopped after step 2: ") and "Traceback" not in err
    assert ("ValueError: boom" if error == "ValueError" else "No space left on device") in err
    assert "Last good checkpoint: " + str(out / "checkpoint-2") in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert read_log(out / "log.jsonl")[-1]["event"] == "error"


def test_out_of_memory_names_the_flags_that_help(tmp_path, capsys, monkeypatch):
    import minqlora.trainer as trainer

    def oom(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(trainer, "accumulate_gradients", oom)
    data = write_records(tmp_path / "d.json", 12)
    assert train_main(fast_args(tmp_path / "out", data)) == 1
    err = capsys.readouterr().err
    for flag in ("--per_device_train_batch_size", "--source_max_len", "--target_max_len",
                 "--gradient_checkpointing", "--bits 4", "--lora_r"):
        assert flag in err, flag
