"""Bad input and faults (issue 11): every failure ends in one `error:` line naming the cause; bad input
(flags, paths, a checkpoint that cannot be continued) is refused with exit 2 before the model loads and
changes no file; a fault during the work (full disk, NaN) exits 1 naming the last good checkpoint and
leaves no half-written file; progress bars are closed before the message."""
import builtins
import errno
import json
import os

import pytest
import torch
from tqdm import tqdm

from _fixtures_train import TINY, fast_args, load_script, needs_tiny, train_main, write_records
from minqlora.errors import BadInput, run_main

ppl_main, predict_main = load_script("ppl").main, load_script("predict").main
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def one_error_line(err, *parts):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    for part in parts:
        assert part in lines[-1], (part, err)


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: refusals must come first."""
    import minqlora.loader
    import minqlora.trainer

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(minqlora.trainer, "load_model", boom)
    monkeypatch.setattr(minqlora.loader, "load_model", boom)


# 1. Flags and output paths, refused by name before the model loads.
@pytest.mark.parametrize("flag,value,message", [
    ("lora_alpha", "0", "--lora_alpha 0.0: must be a finite number > 0"),
    ("learning_rate", "nan", "--learning_rate nan"), ("learning_rate", "inf", "--learning_rate inf"),
    ("adam_beta2", "1.5", "--adam_beta2 1.5: must be a finite number >= 0 and < 1"),
    ("weight_decay", "-1", "--weight_decay -1.0"), ("adam_epsilon", "0", "--adam_epsilon 0.0"),
    ("warmup_ratio", "2", "--warmup_ratio 2.0: must be a finite number >= 0 and <= 1"),
    ("max_grad_norm", "nan", "--max_grad_norm nan"), ("output_dir", "", '--output_dir "": empty'),
    ("seed", "-1", "--seed -1: must be a whole number from 0 to 4294967295"),
    ("lora_modules", "q_proj,qproj", "--lora_modules q_proj,qproj: LoRA target 'qproj' matches no module"),
    ("data_seed", str(2**64), f"--data_seed {2**64}: must be a whole number"),
])
def test_train_refuses_numbers_and_paths_by_name(tmp_path, capsys, no_model_load, flag, value, message):
    argv = fast_args(tmp_path / "out", write_records(tmp_path / "d.json", 8), **{flag: value})
    assert train_main(argv) == 2
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


def test_max_steps_zero_means_epochs_and_says_so(tmp_path, capsys):
    """Decision: --max_steps <= 0 keeps transformers' meaning (train --num_train_epochs), reported as such."""
    argv = fast_args(tmp_path / "out", write_records(tmp_path / "d.json", 8), max_steps=-1, num_train_epochs=1)
    assert train_main([*argv, "--save_strategy", "no"]) == 0
    assert "done: 2 steps (num_train_epochs)" in capsys.readouterr().out
    argv = fast_args(tmp_path / "o2", tmp_path / "d.json", max_steps=0, num_train_epochs="nan")
    assert train_main(argv) == 2
    one_error_line(capsys.readouterr().err, "--num_train_epochs nan")


@pytest.mark.parametrize("where", ["under a file", "not writable"])
def test_every_script_checks_its_output_before_loading(tmp_path, capsys, no_model_load, where):
    if where == "not writable":
        if AS_ROOT:
            pytest.skip("root may write anywhere")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target, message = locked / "x", "permission denied"
    else:
        (tmp_path / "file").write_text("x")
        target, message = tmp_path / "file" / "x", "is a file, not a folder"
    data = write_records(tmp_path / "d.json", 8)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"id": 1, "instruction": "a"}]))
    runs = [lambda: train_main(fast_args(target, data)),
            lambda: ppl_main(["--test_data_path", str(data), "--per_example_out", str(target / "p.csv")]),
            lambda: predict_main(["--test_data_path", str(preds), "--output_path", str(target / "p.json")]),
            lambda: load_script("merge").main(["--peft_path", str(tmp_path), "--output_dir", str(target)])]
    try:
        for run in runs:
            assert run() == 2
            one_error_line(capsys.readouterr().err, str(target.parent), message)
    finally:
        (tmp_path / "locked").exists() and (tmp_path / "locked").chmod(0o700)


@needs_tiny
def test_an_output_that_is_an_input_is_refused(tmp_path, capsys, no_model_load):
    """predict.py and ppl.py wrote over their own test data, or into the model folder, before."""
    data = write_records(tmp_path / "d.json", 8)
    before = data.read_bytes()
    runs = [(lambda: predict_main(["--test_data_path", str(data), "--output_path", str(data)]),
             f"--output_path {data}: is --test_data_path {data}"),
            (lambda: ppl_main(["--test_data_path", str(data), "--per_example_out", str(data)]),
             f"--per_example_out {data}: is --test_data_path"),
            (lambda: ppl_main(["--test_data_path", str(data), "--per_example_out", str(TINY / "config.json")]),
             "is the config.json of --base_model_path weights/tiny, which this command reads")]
    for run, message in runs:
        assert run() == 2
        one_error_line(capsys.readouterr().err, message)
    assert data.read_bytes() == before
    # a new file beside what is read, e.g. predict.py's default output/predictions.json in train.py's default
    # --output_dir ./output (the adapter's folder), is no input: accepted
    from minqlora.outputs import check_output_file_path
    for name in ("predictions.json", "ppl.csv"):
        check_output_file_path(tmp_path / name, "--output_path", inputs={"--peft_path": tmp_path, "--data": data})


@pytest.mark.parametrize("flag,value", [("temperature", "nan"), ("top_p", "0"), ("repetition_penalty", "-1"),
                                        ("seed", str(10**20))])
def test_predict_names_the_sampling_flag(tmp_path, capsys, no_model_load, flag, value):
    assert predict_main([f"--{flag}", value, "--output_path", str(tmp_path / "p.json")]) == 2
    one_error_line(capsys.readouterr().err, f"--{flag} ")


@needs_tiny
def test_smaller_messages(tmp_path, capsys, no_model_load):
    data = write_records(tmp_path / "d.json", 8)
    assert train_main(fast_args(tmp_path / "out", tmp_path)) == 2
    one_error_line(capsys.readouterr().err, "is a folder; give a data file")
    assert train_main(fast_args(tmp_path / "out", data, model_name_or_path=TINY / "tokenizer.model")) == 2
    one_error_line(capsys.readouterr().err, "is a file, not a model folder")
    assert ppl_main(["--base_model_path", str(tmp_path / "nowhere"), "--test_data_path", str(data)]) == 2
    one_error_line(capsys.readouterr().err, "nowhere: no such model folder")  # (it named the tokenizer files)
    cfg = json.loads((TINY / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert train_main(fast_args(tmp_path / "out", data, model_name_or_path=tmp_path / "m")) == 2
    one_error_line(capsys.readouterr().err, "no 'hidden_size'")


@needs_tiny
def test_a_bad_adapter_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": "16", "target_modules": ["q_proj"]}')
    data = write_records(tmp_path / "d.json", 8)
    flags = ["--peft_path", str(tmp_path / "ad"), "--prompt_template", "alpaca"]
    assert ppl_main(["--test_data_path", str(data), *flags]) == 2
    one_error_line(capsys.readouterr().err, "adapter_config.json: lora_alpha='16'; must be a number")
    assert predict_main(["--test_data_path", str(data), "--output_path", str(tmp_path / "p.json"), *flags]) == 2
    one_error_line(capsys.readouterr().err, "lora_alpha='16'")
    (tmp_path / "ad" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}')
    assert load_script("merge").main(["--peft_path", str(tmp_path / "ad"), "--output_dir", str(tmp_path / "m")]) == 2
    one_error_line(capsys.readouterr().err, "no adapter_model.safetensors or adapter_model.bin")
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "m").exists()


# 2. The error is the last thing on screen.
def test_progress_bars_are_closed_before_the_error(capsys):
    def program():
        bar = tqdm(total=10, desc="loading")
        bar.update(3)
        raise BadInput("x.safetensors: cannot read")
    assert run_main(program) == 2
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1] == "error: x.safetensors: cannot read"
    assert not list(getattr(tqdm, "_instances", []))


def test_an_os_error_during_work_is_one_line_exit_1(capsys):
    def program():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/p.json")
    assert run_main(program) == 1
    one_error_line(capsys.readouterr().err, "out/p.json: No space left on device")



def test_out_of_memory_outside_training_is_one_line_exit_1_and_other_errors_stay_bugs(capsys):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert run_main(oom) == 1
    one_error_line(capsys.readouterr().err, "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")

    def bug():
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):  # a genuine bug keeps its traceback
        run_main(bug)


# 3. Resume refuses what it cannot continue, naming the file, and changes nothing.
@needs_tiny
def test_a_refused_resume_leaves_the_finished_run_as_it_was(tmp_path, capsys):
    data, out = write_records(tmp_path / "d.json", 16), tmp_path / "out"
    assert train_main(fast_args(out, data)) == 0
    assert (out / "completed").exists()
    for folder in (out, out / "checkpoint-2"):  # the prompt template it was trained with, beside the adapter
        assert json.loads((folder / "minqlora.json").read_text()) == {"prompt_template": "alpaca"}
    before = snapshot(out)
    small = write_records(tmp_path / "small.json", 4)
    cases = [({"lora_r": 4}, "checkpoint-2/trainer_state.json: the run was trained with --lora_r 8"),
             ({"lora_modules": "q_proj"}, "--lora_modules all"),
             ({"optim": "adamw_torch"}, "--optim paged_adamw_32bit, this command has --optim adamw_torch"),
             ({"max_steps": 1}, "checkpoint-2: the run is at step 2, past the 1 steps this command trains"),
             ({"dataset": small}, "the dataset no longer matches the saved position"),
             ({}, "checkpoint-2/trainer_state.pt: cannot read")]
    for overrides, message in cases:
        if not overrides:  # last: a damaged state file
            (out / "checkpoint-2" / "trainer_state.pt").write_bytes(b"not a pickle" * 10)
            before = snapshot(out)
        argv = fast_args(out, overrides.pop("dataset", data), **{"max_steps": 6, **overrides})
        assert train_main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 2
        err = capsys.readouterr().err
        one_error_line(err, message)
        assert "weights_only" not in err
        assert snapshot(out) == before


@needs_tiny
def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_again(tmp_path, capsys, monkeypatch):
    """It said "continue with --resume_from_checkpoint latest", which then found no checkpoint."""
    import minqlora.trainer as trainer
    real = trainer.accumulate_gradients

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "accumulate_gradients", ctrl_c)
    data, out = write_records(tmp_path / "d.json", 8), tmp_path / "out"
    assert train_main(fast_args(out, data)) == 130
    assert "nothing saved. Start again with the same flags plus --overwrite_output_dir" in capsys.readouterr().err
    monkeypatch.setattr(trainer, "accumulate_gradients", real)
    assert train_main(fast_args(out, data)) == 2
    one_error_line(capsys.readouterr().err, "It saved no checkpoint to continue from")
    assert train_main([*fast_args(out, data), "--overwrite_output_dir"]) == 0


# 4. Faults during work: exit 1, the last good checkpoint named, no half-written file.
@needs_tiny
def test_a_full_disk_mid_run_names_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "w" in mode and "checkpoint-4" in str(file) else f
    monkeypatch.setattr(builtins, "open", fake_open)
    out = tmp_path / "out"
    assert train_main(fast_args(out, write_records(tmp_path / "d.json", 16))) == 1
    one_error_line(capsys.readouterr().err, "No space left on device", f"Last good checkpoint: {out / 'checkpoint-2'}")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "completed").exists()


@needs_tiny
def test_a_full_disk_while_safetensors_writes_is_a_fault_too(tmp_path, capsys, monkeypatch):
    """safetensors' writer reports a full disk as a SafetensorError (not an OSError): it gave a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError
    real = safetensors.torch.save_file

    def fake_save(tensors, path, metadata=None):
        if "checkpoint-4" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", fake_save)
    out = tmp_path / "out"
    assert train_main(fast_args(out, write_records(tmp_path / "d.json", 16))) == 1
    one_error_line(capsys.readouterr().err, "No space left on device", f"Last good checkpoint: {out / 'checkpoint-2'}")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


@needs_tiny
def test_a_full_disk_in_ppl_predict_merge_keeps_the_old_output(tmp_path, capsys, monkeypatch):
    """Each script's real writer hits ENOSPC while writing its result: exit 1, one error line, the previous
    result unchanged, no temporary file left beside it."""
    import safetensors.torch
    from safetensors import SafetensorError
    real_open = builtins.open

    def full(name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if "w" in mode and ".tmp-" in str(file):
            f.write = lambda data: full(file)
        return f

    def fake_save(tensors, path, metadata=None):  # as safetensors' writer fails: a SafetensorError
        real_open(path, "wb").write(b"half")  # a partial shard, then the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    data, out, adapter = write_records(tmp_path / "d.json", 3), tmp_path / "out", tmp_path / "adapter"
    assert train_main(fast_args(adapter, data, max_steps=1, save_strategy="no")) == 0  # on a healthy disk
    out.mkdir()
    for name in ("p.csv", "p.json", "merged/config.json"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("old")
    common = ["--base_model_path", str(TINY), "--device", "cpu", "--bits", "16"]
    runs = {"p.csv": lambda: ppl_main([*common, "--test_data_path", str(data), "--per_example_out",
                                       str(out / "p.csv")]),
            "p.json": lambda: predict_main([*common, "--test_data_path", str(data), "--output_path",
                                            str(out / "p.json"), "--max_new_tokens", "2"]),
            "merged": lambda: load_script("merge").main([*common[:4], "--peft_path", str(adapter), "--output_dir",
                                                         str(out / "merged"), "--overwrite_output_dir"])}
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(safetensors.torch, "save_file", fake_save)
    before = snapshot(out)
    for name, run in runs.items():
        capsys.readouterr()
        assert run() == 1, name
        one_error_line(capsys.readouterr().err, "No space left on device", name)
        assert snapshot(out) == before, name  # nothing half-written, nothing lost


# 5. The adapter records its prompt template; ppl.py and predict.py warn on another, `adapter` uses it.
def test_prompt_template_recorded_and_chosen(tmp_path):
    from minqlora.adapter import choose_prompt, trained_prompt
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "minqlora.json").write_text('{"prompt_template": "alpaca"}')
    assert trained_prompt(tmp_path / "a") == "alpaca"
    for bad in ('{"prompt_template": 5}', "[1]", "{oops"):  # said "has no minqlora.json", or a TypeError, before
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / "minqlora.json").write_text(bad)
        with pytest.raises(BadInput, match="b/minqlora.json: "):
            choose_prompt("adapter", tmp_path / "b")
        assert choose_prompt("course", tmp_path / "b") == ("course", None)  # a named template needs no record
    assert choose_prompt("adapter", tmp_path / "a") == ("alpaca", None)
    template, warning = choose_prompt("course", tmp_path / "a")
    assert template == "course" and "was trained with the alpaca prompt" in warning
    assert choose_prompt("course", None) == ("course", None)
    with pytest.raises(BadInput, match="--prompt_template adapter: no --peft_path"):
        choose_prompt("adapter", None)


def test_the_prompt_warning_is_printed_by_process_0_alone(tmp_path, capsys, monkeypatch):
    """ppl.py and predict.py choose the prompt before joining torchrun's group: RANK says who warns."""
    from minqlora.cli import ModelArgs, inference_prompt
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "minqlora.json").write_text('{"prompt_template": "alpaca"}')
    m = ModelArgs(base_model_path=str(TINY), peft_path=str(tmp_path / "a"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, warned in ((None, True), ("0", True), ("1", False)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        assert inference_prompt("course", m).name == "course"
        assert ("was trained with the alpaca prompt" in capsys.readouterr().err) == warned, rank
    monkeypatch.setenv("WORLD_SIZE", "1")  # RANK without a group of several processes: the only one speaks
    inference_prompt("course", m)
    assert "was trained with the alpaca prompt" in capsys.readouterr().err
