"""scripts/train.py end to end on the embedded tiny model: the course's seed command, learning,
gradient accumulation against one big batch, flags, and every bad input once (faults during the run:
test_train_faults.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _fixtures_train import (EXAMPLE, TINY, fast_args, needs_tiny, read_log, seed_dataset, train_losses,
                             train_main, write_records)
from minqlora.data import Prompt, build_examples, collate
from minqlora.loss import causal_lm_loss
from minqlora.tokenizer import Tokenizer
from minqlora.errors import BadInput
from minqlora.train_args import parse_args

pytestmark = needs_tiny

# The command from the course's report, verbatim but for the paths, plus --max_steps 3.
SEED = """--model_name_or_path {model} --output_dir {out}
  --logging_steps 50 --save_strategy steps --data_seed 42 --save_steps 500 --save_total_limit 40
  --evaluation_strategy steps --eval_dataset_size 1024 --max_eval_samples 1000 --max_new_tokens 32
  --dataloader_num_workers 1 --group_by_length --logging_strategy steps --remove_unused_columns False
  --do_train --do_eval --lora_r 64 --lora_alpha 16 --lora_modules all --quant_type nf4 --bits 4
  --warmup_ratio 0.03 --lr_scheduler_type constant --gradient_checkpointing --dataset {data}
  --source_max_len 128 --target_max_len 128 --gradient_accumulation_steps 16 --learning_rate 0.0003
  --adam_beta2 0.999 --max_grad_norm 0.3 --lora_dropout 0.01 --weight_decay 0.0 --seed 42 --dataset_format alpaca
  --max_steps 3"""


def test_seed_command_runs_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "test"
    argv = SEED.format(model=TINY, out=out, data=seed_dataset(tmp_path / "train.json")).split()
    assert train_main(argv) == 0
    printed = capsys.readouterr().out
    # 1,100 records: 1,024 held out for evaluation, of which --max_eval_samples keeps 1,000; 76 train
    assert "data audit (train): 76 records" in printed and "data audit (eval): 1000 records" in printed
    assert "constant" in printed and "no warmup" in printed  # the warmup_ratio note
    assert "max_position_embeddings" not in printed  # 128 + 128 tokens fit the tiny model's 1024
    for name in ("adapter_config.json", "adapter_model.safetensors", "log.jsonl", "curves.png", "curves.csv",
                 "completed", "run_config.json", "best/adapter_model.safetensors", "best/best.json",
                 "checkpoint-3/adapter_model.safetensors", "checkpoint-3/trainer_state.pt",
                 "checkpoint-3/trainer_state.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 64 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.01
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"])
    log = read_log(out / "log.jsonl")
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_ppl" in r]
    assert [r["step"] for r in train] == [3] and train[0]["lr"] == pytest.approx(3e-4)  # constant: no warmup
    assert {"epoch", "grad_norm", "tokens_per_s", "elapsed"} <= set(train[0])
    assert [r["step"] for r in evals] == [3] and 1 < evals[0]["eval_ppl"] < 1e3
    start = next(r for r in log if r.get("event") == "start")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the seed command names none: auto
    assert (start["train_examples"], start["eval_examples"], start["device"]) == (76, 1000, device)
    assert (out / "curves.csv").read_text().splitlines()[0] == "step,epoch,loss,eval_loss,eval_ppl"
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["epoch"] == 0 and state["pos"] == 48  # 3 steps x 16 micro-batches
    # the adapter is peft's format: peft loads it onto transformers' Llama with every LoRA weight filled
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), out)
    ours = load_file(out / "adapter_model.safetensors")
    sd = peft_model.state_dict()
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    assert torch.equal(sd[key.replace("lora_B.weight", "lora_B.default.weight")], ours[key])


def test_tiny_model_overfits_a_few_examples(tmp_path):
    data = write_records(tmp_path / "few.json", 8, shuffle_outputs=True)
    out = tmp_path / "out"
    argv = fast_args(out, data, bits=4, learning_rate=1e-2, lora_r=16, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, max_steps=40, save_strategy="no", max_grad_norm=1.0,
                     gradient_checkpointing=False)
    assert train_main(argv) == 0
    losses = train_losses(out / "log.jsonl")
    assert losses[40] < 0.3 * losses[1], losses


def _lora_model_and_window(normalize_lengths=False):
    from minqlora.loader import load_model
    from minqlora.lora import apply_lora, freeze_base, lora_modules
    torch.manual_seed(0)
    model = load_model(TINY, bits=16, progress=False)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    freeze_base(model, verbose=False)
    model.train()
    tok = Tokenizer.from_dir(TINY)
    records = json.loads((EXAMPLE / "train.json").read_text(encoding="utf-8"))[:4]
    examples = build_examples(records, tok, Prompt("alpaca"), source_max_len=64, target_max_len=32, progress=False)
    assert len({sum(x != -100 for x in e.labels) for e in examples}) > 1  # different target lengths
    return model, examples, tok.pad_id


def _lora_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_gradient_accumulation_matches_reference_losses():
    from minqlora.trainer import accumulate_gradients
    model, examples, pad = _lora_model_and_window()
    micro = [collate([e], pad) for e in examples]  # micro-batch 1 x accumulation 4
    big = collate(examples, pad)  # one batch of 4

    grads = {}
    for mode in ("example", "token"):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, micro, torch.device("cpu"), mode)
        grads[mode] = (loss.item(), _lora_grads(model))

    # example (qlora.py's Trainer): the mean of the per-example mean losses
    model.zero_grad(set_to_none=True)
    ref = causal_lm_loss(model(big["input_ids"]), big["labels"], reduction="per_example").mean()
    ref.backward()
    assert grads["example"][0] == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(grads["example"][1], _lora_grads(model), atol=1e-6, rtol=1e-5)

    # token (transformers >= 4.46): exactly one batch of 4, every target token weighted alike
    model.zero_grad(set_to_none=True)
    ref = causal_lm_loss(model(big["input_ids"]), big["labels"], reduction="mean")
    ref.backward()
    assert grads["token"][0] == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(grads["token"][1], _lora_grads(model), atol=1e-6, rtol=1e-5)
    # and the two normalizations really differ here (unequal target lengths)
    assert (grads["token"][1] - grads["example"][1]).abs().max() > 1e-4


def test_flags_parse_like_hf_argument_parser(capsys):
    _, a = parse_args(["--group_by_length", "--gradient_checkpointing", "False", "--do_eval", "True",
                       "--evaluation_strategy", "steps", "--logging_steps", "7", "--max_train_samples", "None",
                       "--adam8bit"])
    assert a.train.group_by_length is True and a.train.gradient_checkpointing is False
    assert a.train.eval_strategy == "steps" and a.train.do_eval and a.train.eval_steps == 7
    assert a.data.max_train_samples is None and a.train.optim == "paged_adamw_8bit"
    _, a = parse_args([])  # qlora.py's defaults
    t = a.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.bits, t.quant_type, t.double_quant) == \
        (64, 16, 0.0, 4, "nf4", True)
    assert (t.learning_rate, t.max_steps, t.gradient_accumulation_steps, t.max_grad_norm) == (2e-4, 10000, 16, 0.3)
    assert (t.optim, t.lr_scheduler_type, t.warmup_ratio, t.save_steps, t.save_total_limit) == \
        ("paged_adamw_32bit", "constant", 0.03, 250, 40)
    assert (a.data.source_max_len, a.data.target_max_len, a.data.eval_dataset_size) == (1024, 256, 1024)
    assert train_main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for s in ("model arguments:", "data arguments:", "training arguments:", "generation arguments:",
              "--lora_r LORA_R", "(default: 64)", "--dataloader_num_workers", "--loss_normalization"):
        assert s in help_text, s


@pytest.mark.parametrize("argv, message", [
    (["--do_mmlu_eval", "True"], "not implemented"),
    (["--deepspeed", "ds.json"], "not implemented"),
    (["--bits", "8"], "--bits 8 (LLM.int8) is not implemented"),
    (["--full_finetune", "True"], "--full_finetune True is not implemented"),
    (["--trust_remote_code"], "--trust_remote_code True"),
    (["--bf16", "--fp16"], "choose one"),
    (["--source_max_len", "0"], "--source_max_len 0: must be at least 1"),
    (["--target_max_len", "-1"], "--target_max_len -1: must be at least 1"),
    (["--max_train_samples", "-1"], "--max_train_samples -1: must be at least 0"),
])
def test_refused_flags(argv, message):
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def _bad_inputs(tmp_path):
    good = write_records(tmp_path / "good.json", 12)
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n  {"instruction": }]')
    (tmp_path / "nooutput.json").write_text(json.dumps([{"id": "r0", "instruction": "a", "output": "b"},
                                                        {"id": "x7", "instruction": "a"}]))
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((TINY / "config.json").read_text())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return {
        "missing dataset": (dict(dataset=tmp_path / "nope.json"), "nope.json: no such file"),
        "json error": (dict(dataset=tmp_path / "broken.json"), "broken.json: line 2, column"),
        "record without output": (dict(dataset=tmp_path / "nooutput.json"), "record 1 (id 'x7') has no 'output'"),
        "wrong format": (dict(dataset=good, dataset_format="input-output"), "pass --dataset_format alpaca"),
        "empty after filtering": (dict(dataset=good, max_train_samples=0), "no training records left"),
        "eval split too big": (dict(dataset=good, do_eval=True, eval_dataset_size=12), "--eval_dataset_size 12"),
        "model without config": (dict(model_name_or_path=tmp_path / "noconfig"), "no config.json"),
        "model without weights": (dict(model_name_or_path=tmp_path / "noweights"), "no weights"),
        "output_dir of another run": (dict(output_dir=taken), "holds another run"),
        "resume without checkpoint": (dict(resume_from_checkpoint="latest"), "no checkpoint-N folder"),
        "overwrite but bad data": (dict(output_dir=taken, overwrite_output_dir=True, dataset=tmp_path / "nope.json"),
                                   "no such file"),
    }


@pytest.mark.parametrize("case", ["missing dataset", "json error", "record without output", "wrong format",
                                  "empty after filtering", "eval split too big", "model without config",
                                  "model without weights", "output_dir of another run",
                                  "resume without checkpoint", "overwrite but bad data"])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, case):
    overrides, message = _bad_inputs(tmp_path)[case]
    out = overrides.pop("output_dir", tmp_path / "out")
    argv = fast_args(out, tmp_path / "good.json", **overrides)
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    if case in ("output_dir of another run", "overwrite but bad data"):
        assert [p.name for p in out.iterdir()] == ["log.jsonl"]  # untouched
    else:
        assert not (out / "log.jsonl").exists()


def test_unknown_flag_is_an_error(capsys):
    assert train_main(["--lora_rank", "8"]) == 2
    assert "unrecognized arguments: --lora_rank" in capsys.readouterr().err


def test_limits_longer_than_the_context_are_warned_about(tmp_path, capsys):
    data = write_records(tmp_path / "d.json", 8)
    out = tmp_path / "out"
    assert train_main(fast_args(out, data, source_max_len=1000, target_max_len=100, max_steps=1,
                                save_strategy="no")) == 0
    printed = capsys.readouterr().out
    warning = ("WARNING: --source_max_len 1000 + --target_max_len 100 = 1100 tokens is more than the model's "
               "context (max_position_embeddings 1024)")
    assert warning in printed and "(within the context)" in printed
    assert printed.index(warning) < printed.index("trainable params")  # before training
    audit = next(r for r in read_log(out / "log.jsonl") if r.get("event") == "audit")
    assert any(w.startswith(warning) for w in audit["warnings"])
    from minqlora.audit import context_warning
    assert "LONGER than the context" in context_warning(1024, 256, 1024, longest=1100)
    assert context_warning(768, 256, 1024, longest=1024) is None and context_warning(4096, 1, None, 9) is None


def test_zero_max_len_is_refused_before_the_audit(tmp_path, capsys):
    data = write_records(tmp_path / "d.json", 8)
    assert train_main(fast_args(tmp_path / "out", data, target_max_len=0)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --target_max_len 0") and "data audit" not in captured.out
    assert not (tmp_path / "out").exists()


@needs_tiny
@pytest.mark.parametrize("normalization", ["example", "token"])
def test_packed_passes_train_as_the_plain_path(tmp_path, capsys, normalization):
    """--pass_tokens N (the fast path: a step's micro-batches packed into fewer passes) logs the losses and
    writes the adapter of --pass_tokens 0 (one pass per micro-batch), up to float rounding; it says so."""
    data = write_records(tmp_path / "d.json", 40)
    adapters = {}
    for n in (0, 64, 4096):
        out = tmp_path / f"out{n}"
        assert train_main(fast_args(out, data, pass_tokens=n, loss_normalization=normalization, bits=4,
                                    per_device_train_batch_size=3, gradient_accumulation_steps=3,
                                    save_strategy="no")) == 0
        adapters[n] = (train_losses(out / "log.jsonl"), load_file(out / "adapter_model.safetensors"))
    said = capsys.readouterr().out
    assert "one pass per micro-batch (--pass_tokens 0)" in said and "passes of at most 64 tokens" in said
    ref_losses, ref_adapter = adapters[0]
    for n in (64, 4096):
        losses, adapter = adapters[n]
        assert losses.keys() == ref_losses.keys()
        for step in losses:
            assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5)
        for k in ref_adapter:
            # after 4 Adam steps (lr 1e-3): Adam rescales near-zero gradients, so rounding moves such an
            # element by ~1e-5 on some CPUs (seen once on a 32-core machine); a wrong weighting moves ~1e-3
            torch.testing.assert_close(adapter[k], ref_adapter[k], rtol=1e-4, atol=5e-5)


def test_cuda_graphs_flag_needs_cuda_and_one_pass_per_micro_batch(tmp_path):
    from minqlora.errors import BadInput
    from minqlora.accumulate import choose
    from minqlora.train_args import parse_args
    _, a = parse_args(["--cuda_graphs", "True", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(BadInput, match="needs a CUDA device"):
        choose(a.train.pass_tokens, a.train.cuda_graphs, torch.device("cpu"))
    _, a = parse_args(["--cuda_graphs", "True", "--pass_tokens", "512", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(BadInput, match="--pass_tokens 0"):
        choose(a.train.pass_tokens, a.train.cuda_graphs, torch.device("cuda"))
    _, a = parse_args(["--output_dir", str(tmp_path / "o")])
    # the plain path on the CPU, packed passes on a GPU
    assert choose(a.train.pass_tokens, a.train.cuda_graphs, torch.device("cpu"))[:2] == (0, False)
    assert choose(a.train.pass_tokens, a.train.cuda_graphs, torch.device("cuda"))[:2] == (4096, False)
    with pytest.raises(BadInput, match="--pass_tokens -2"):
        parse_args(["--pass_tokens", "-2"])


def test_lora_in_compute_dtype_trains_in_bf16_and_evaluates_in_fp32(tmp_path, capsys, monkeypatch):
    """--lora_in_compute_dtype with --bf16: training passes run the LoRA matmuls in bf16 (a different adapter,
    close to the fp32 path's), evaluation in fp32 as peft scores, and the adapter is written in fp32."""
    import minqlora.trainer as trainer
    from minqlora.lora import lora_modules
    seen = []
    real = trainer.perplexities

    def spy(model, *a, **kw):  # the LoRA layers' setting whenever the trainer scores perplexity
        seen.append({m.compute_dtype for m in lora_modules(model).values()})
        return real(model, *a, **kw)

    monkeypatch.setattr(trainer, "perplexities", spy)
    data = write_records(tmp_path / "d.json", 40)
    adapters = {}
    for flag in (False, True):
        out = tmp_path / f"out{flag}"
        assert train_main(fast_args(out, data, bf16=True, bits=4, lora_in_compute_dtype=flag, lora_dropout=0.0,
                                    eval_strategy="steps", eval_steps=2, eval_dataset_size=4,
                                    save_strategy="no")) == 0
        adapters[flag] = load_file(out / "adapter_model.safetensors")
    assert "LoRA matmuls of training passes in bfloat16" in capsys.readouterr().out
    assert len(seen) >= 4 and all(s == {None} for s in seen)
    assert all(t.dtype == torch.float32 for t in adapters[True].values())
    assert any(not torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[False])
    for k in adapters[False]:  # 4 Adam steps at lr 1e-3 move a weight by at most ~4e-3
        torch.testing.assert_close(adapters[True][k], adapters[False][k], rtol=0, atol=4e-3)
