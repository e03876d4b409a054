"""The QLoRA training loop, top to bottom: data, model, optimizer, steps, evaluation, checkpoints.

What qlora.py delegates to transformers' Trainer, written out: the base model is loaded in 4 bits
(QLoRA §3, loader.py), LoRA goes on every linear layer (lora.py), only the adapters train, with a
paged AdamW (optim.py), gradient accumulation, gradient clipping at --max_grad_norm, and the LR schedule.
One optimizer step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`
examples. The loss of a step (--loss_normalization):
    example  sum_k mean_tokens(micro-batch k) / K   what qlora.py's Trainer (transformers 4.3x) did
    token    sum over every target token of the K micro-batches / their count   (transformers >= 4.46;
             equals one batch of K * B examples; the tokens are counted before the backward passes)
K is the number of micro-batches in the step: gradient_accumulation_steps, except at the end of an
epoch where fewer may remain. bf16/fp16 training sets the model's dtype (no autocast); the LoRA
weights and the optimizer state stay fp32, and fp16 adds a gradient scaler; a step the scaler skips
(inf/NaN gradients) does not advance the LR schedule, as in transformers' Trainer. A checkpoint is
never written with non-finite LoRA weights.
Checked against transformers + peft gradients and exact resume in tests/test_train.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .atomic import atomic_file
from .chat import prompt_for
from .config import LlamaConfig
from .curves import RunLog, write_curves
from .data import LengthGroupedSampler, RandomSampler, collate
from .generate import eval_mode
from .loader import load_model, weight_files
from .lora import apply_lora
from .loss import IGNORE_INDEX, causal_lm_loss
from .optim import (build_optimizer, build_scheduler, describe_schedule, fast_forward, quiet_cpu_paging,
                    schedule_change, warmup_steps_for)
from .perplexity import mean_perplexity, perplexities
from .tokenizer import Tokenizer
from .train_data import DataOrder, prepare_data
from .cli import resolve_device
from .train_args import RunArgs, lora_targets, resolve_dtype

MEMORY_HINT = ("out of GPU memory. Flags that lower memory: --per_device_train_batch_size 1 (raise "
               "--gradient_accumulation_steps to keep the effective batch), --source_max_len / --target_max_len "
               "(see the data audit above for what they cut), --gradient_checkpointing True, --bits 4, a smaller "
               "--lora_r, --bf16, and --per_device_eval_batch_size for evaluation")


class TrainingError(RuntimeError):
    """Training could not go on (loss or weights NaN/inf, out of memory, an error mid-run); earlier
    checkpoints are kept."""


class Interrupted(Exception):
    def __init__(self, step, path):
        super().__init__(f"interrupted after step {step}")
        self.step, self.path = step, path


def say(msg):
    tqdm.write(msg)


@torch.inference_mode()
def eval_loss(model, examples, batch_size, pad_id, device) -> float:
    """Mean NLL over every target token of the eval set (training's truncation and prompt)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size], pad_id)
            s, n = causal_lm_loss(model(b["input_ids"].to(device)), b["labels"].to(device), reduction="sum")
            total, count = total + s.item(), count + n.item()
    return total / max(count, 1)


def accumulate_gradients(model, window, device, normalization="example", scaler=None) -> torch.Tensor:
    """Forward and backward each micro-batch of one optimizer step; return the step's loss (detached).

    example: each micro-batch's mean over its own target tokens, / K;  token: the sum over all target
    tokens of the K micro-batches / their count, counted before the first backward."""
    n_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    step_loss = torch.zeros((), device=device)
    for b in window:
        logits = model(b["input_ids"].to(device))  # (B, T, V)
        labels = b["labels"].to(device)
        if normalization == "token":
            loss = causal_lm_loss(logits, labels, reduction="sum")[0] / max(n_target, 1)
        else:
            loss = causal_lm_loss(logits, labels, reduction="mean") / len(window)
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss


def train(a: RunArgs, *, progress: bool = True) -> dict:
    m, d, t = a.model, a.data, a.train
    start_time = time.perf_counter()
    out = Path(t.output_dir)
    device, dtype = resolve_device(m.device), resolve_dtype(a)
    targets = lora_targets(t.lora_modules)

    # 1. Where the run goes, and where it resumes from.
    resume = ckpt.find_checkpoint(t.resume_from_checkpoint, out) if t.resume_from_checkpoint else None
    context = LlamaConfig.from_json(m.model_name_or_path).max_position_embeddings  # cheap checks of the
    weight_files(Path(m.model_name_or_path))  # model folder before the data work
    ckpt.check_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None, resume_from=resume)
    ckpt.seed_everything(t.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as qlora.py
        if dtype == torch.float32 and torch.cuda.is_bf16_supported():
            say("hint: this GPU supports bfloat16: --bf16 trains faster and in less memory "
                "(without it, as in qlora.py, the compute dtype is float32)")

    # 2. Data: tokenised once, audited, split.
    tok = Tokenizer.from_dir(m.model_name_or_path)
    train_ex, eval_ex, eval_records, audits = prepare_data(a, tok, progress, context=context)
    metric_prompt = prompt_for(d.eval_prompt_template or d.prompt_template or d.dataset_format, m.model_name_or_path)
    sampler_cls = LengthGroupedSampler if t.group_by_length else RandomSampler
    group = t.per_device_train_batch_size * t.gradient_accumulation_steps
    sampler = sampler_cls([e.length for e in train_ex], group, t.data_seed if t.data_seed is not None else t.seed)
    order = DataOrder(sampler, t.per_device_train_batch_size, t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * order.steps_per_epoch)

    # 3. Model: 4-bit base, LoRA on the targets, everything else frozen.
    model = load_model(m.model_name_or_path, bits=t.bits, quant_type=t.quant_type, double_quant=t.double_quant,
                       dtype=dtype, device=device, progress=progress)
    apply_lora(model, r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=targets)  # + freeze_base
    model.model.gradient_checkpointing = t.gradient_checkpointing
    model.train()
    lora_kw = dict(r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=targets,
                   base_model_name_or_path=m.model_name_or_path)
    params = [p for p in model.parameters() if p.requires_grad]
    # Inputs checked and the model loaded: only now may a previous run's files go (--overwrite_output_dir).
    removed = ckpt.prepare_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None,
                                      resume_from=resume)
    if removed:
        say(f"--overwrite_output_dir: deleted the previous run's {', '.join(removed)} in {out}")

    # 4. Optimizer, schedule, and (fp16 only) the gradient scaler.
    quiet_cpu_paging()
    hyper = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    opt = build_optimizer(params, t.optim, lr=t.learning_rate, **hyper)
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    schedule = {"type": t.lr_scheduler_type, "total_steps": total_steps, "warmup_steps": warmup}
    sched = build_scheduler(opt, t.lr_scheduler_type, warmup, total_steps)
    say(describe_schedule(t.lr_scheduler_type, warmup, t.warmup_ratio, t.warmup_steps))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    # 5. Resume: adapter, optimizer moments, RNG, data position, best-so-far, log accumulators. The
    # optimizer's hyperparameters and the LR come from this run's flags and schedule, at the saved position.
    st = dict(step=0, epoch=0, pos=0, best_step=None, best_ppl=None, best_loss=None, bad_evals=0,
              last_eval_step=None, acc_loss=0.0, acc_steps=0, acc_tokens=0, acc_time=0.0, elapsed=0.0)
    if resume is not None:
        saved, rng = ckpt.load_training_checkpoint(resume, model, optimizer=opt, scaler=scaler)
        for warning in ckpt.flag_changes(saved.get("args", {}), a.to_dict(), resume):
            say(warning)
        st.update({k: saved[k] for k in st if k in saved})
        for group in opt.param_groups:
            group.update(hyper)
        lr_now = fast_forward(sched, saved.get("schedule", {}).get("step", st["step"]))
        warning = schedule_change(t.lr_scheduler_type, saved.get("schedule"), schedule)
        if warning:
            say(f"{warning} (step {st['step'] + 1}: lr {lr_now:.3g})")
        ckpt.set_rng_state(rng)
        order.epoch, order.pos = st["epoch"], st["pos"]
        note, kept = ckpt.reconcile_best(out, resume, st)
        if note:
            say(note)
        if not kept:
            st.update(best_step=None, best_ppl=None, best_loss=None, bad_evals=0)
        say(f"resumed from {resume} at step {st['step']} (epoch {order.epoch_float()})")
    fresh = resume is None or not (out / "log.jsonl").exists()  # a new run, or resumed into a new folder
    log = RunLog(out / "log.jsonl", keep_until_step=None if fresh else st["step"])
    if fresh:
        with atomic_file(out / "run_config.json") as f:
            json.dump(a.to_dict(), f, indent=2)
        for au in audits:
            log.write(event="audit", **au)
    log.write(event="start", step=st["step"], total_steps=total_steps, resumed_from=str(resume) if resume else None,
              train_examples=len(train_ex), eval_examples=len(eval_ex or []), device=str(device),
              dtype=str(dtype).removeprefix("torch."), steps_per_epoch=order.steps_per_epoch)
    earlier = st["elapsed"]  # seconds spent by the runs this one continues

    def elapsed():
        return round(earlier + time.perf_counter() - start_time, 2)

    def state_json():
        return {**st, "epoch": order.epoch, "pos": order.pos, "elapsed": elapsed(), "args": a.to_dict(),
                "schedule": {**schedule, "step": sched.last_epoch}}

    def last_good():
        found = ckpt.list_checkpoints(out)
        return str(found[-1][1]) if found else "none"

    def hint():
        return (f"Try a lower --learning_rate (now {t.learning_rate:g}), a --max_grad_norm (now {t.max_grad_norm:g})"
                + (", or --bf16 instead of --fp16" if t.fp16 else ""))

    def check_finite(what):
        if not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            raise TrainingError(f"the LoRA weights are not finite after step {st['step']}: training stopped, "
                                f"{what} not written. Last good checkpoint: {last_good()}. {hint()}")

    def draw_curves():  # a plot that cannot be drawn never stops training
        try:
            write_curves(out / "log.jsonl", out / "curves.png", out / "curves.csv", title=str(out))
        except (ValueError, OSError) as e:
            say(f"warning: curves not redrawn ({e}); the numbers are in {out / 'log.jsonl'}")

    def save(step_rng):
        check_finite(f"{ckpt.PREFIX}{st['step']}")
        path = ckpt.save_training_checkpoint(out, st["step"], model, lora=lora_kw, optimizer=opt, scheduler=sched,
                                             scaler=scaler, rng=step_rng, state=state_json())
        removed = ckpt.rotate(out, t.save_total_limit, keep={st["best_step"], st["step"]})
        log.write(event="checkpoint", step=st["step"], path=str(path), removed=[p.name for p in removed])
        return path

    def evaluate():
        t0 = time.perf_counter()
        loss = eval_loss(model, eval_ex, t.per_device_eval_batch_size, tok.pad_id, device)
        ppl = mean_perplexity(perplexities(  # the course cuts at 2048 tokens; never past the context
            model, tok, eval_records, metric_prompt, batch_size=t.per_device_eval_batch_size,
            max_length=min(2048, model.config.max_position_embeddings), progress=False))
        better = math.isfinite(ppl) and (st["best_ppl"] is None or ppl < st["best_ppl"])
        if better:
            st.update(best_step=st["step"], best_ppl=ppl, best_loss=loss, bad_evals=0)
            info = {"step": st["step"], "eval_ppl": ppl, "eval_loss": loss}
            path = ckpt.save_best(out, model, lora=lora_kw, info=info)
            log.write(event="best", step=st["step"], path=str(path))
        else:
            st["bad_evals"] += 1
        st["last_eval_step"] = st["step"]
        log.write(step=st["step"], epoch=order.epoch_float(), eval_loss=loss, eval_ppl=ppl, best=better,
                  seconds=round(time.perf_counter() - t0, 2))
        say(f"eval  step {st['step']} | eval_loss {loss:.4f} | eval_ppl {ppl:.4f}"
            + (f" | new best -> {path}" if better else
               f" | best {st['best_ppl'] or math.nan:.4f} at step {st['best_step']}"))
        draw_curves()

    def due(strategy, every, step):
        return (strategy == "steps" and step % every == 0) or (strategy == "epoch" and order.pos == 0)

    # 6. The loop. One iteration = one optimizer step over a window of micro-batches.
    step_rng, stop_reason = ckpt.rng_state(), "max_steps"
    bar = tqdm(total=total_steps, initial=st["step"], desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        if eval_ex and t.eval_on_start and st["step"] == 0:
            evaluate()
        while st["step"] < total_steps:
            t0 = time.perf_counter()
            window = [collate([train_ex[i] for i in idx], tok.pad_id) for idx in order.window()]
            step_loss = accumulate_gradients(model, window, device, t.loss_normalization, scaler)
            if scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            # one sync per step: the loss for the bar and the log, and the NaN/inf check
            loss_v, norm_v, lr = step_loss.item(), grad_norm.item(), sched.get_last_lr()[0]
            if not math.isfinite(loss_v) or (scaler is None and not math.isfinite(norm_v)):
                raise TrainingError(
                    f"the {'loss' if not math.isfinite(loss_v) else 'gradient norm'} is "
                    f"{loss_v if not math.isfinite(loss_v) else norm_v} at step {st['step'] + 1}: training stopped, "
                    f"nothing was saved for this step. Last good checkpoint: {last_good()}. {hint()}")
            with ckpt.defer_sigint():  # the update and its bookkeeping happen entirely or not at all
                stepped = True
                if scaler:  # it skips the update on inf/NaN gradients and lowers its scale
                    scale = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    stepped = scaler.get_scale() >= scale
                else:
                    opt.step()
                if stepped:  # a skipped update leaves the LR schedule where it was (transformers does too)
                    sched.step()
                opt.zero_grad(set_to_none=True)
                order.advance(len(window))
                tokens = sum(int(b["attention_mask"].sum()) for b in window)
                dt = time.perf_counter() - t0
                st.update(step=st["step"] + 1, acc_loss=st["acc_loss"] + loss_v, acc_steps=st["acc_steps"] + 1,
                          acc_tokens=st["acc_tokens"] + tokens, acc_time=st["acc_time"] + dt)
                step_rng = ckpt.rng_state()
            step = st["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
            if due(t.logging_strategy, t.logging_steps, step) or step == total_steps:
                rec = dict(step=step, epoch=order.epoch_float(), loss=st["acc_loss"] / st["acc_steps"], lr=lr,
                           grad_norm=norm_v, tokens_per_s=round(st["acc_tokens"] / st["acc_time"], 1),
                           elapsed=elapsed())
                log.write(**rec)
                say(f"step {step} | epoch {rec['epoch']:.2f} | loss {rec['loss']:.4f} | lr {lr:.3g} | "
                    f"grad_norm {norm_v:.3f} | {rec['tokens_per_s']:.0f} tok/s")
                st.update(acc_loss=0.0, acc_steps=0, acc_tokens=0, acc_time=0.0)
            if eval_ex and due(t.eval_strategy, t.eval_steps, step):
                evaluate()
                if t.early_stopping_patience and st["bad_evals"] >= t.early_stopping_patience:
                    stop_reason = "early_stopping"
                    say(f"early stopping: {st['bad_evals']} evaluations without a better eval perplexity "
                        f"(best {st['best_ppl']:.4f} at step {st['best_step']})")
            if t.save_strategy != "no" and due(t.save_strategy, t.save_steps, step):
                save(step_rng)
            if stop_reason != "max_steps":
                break
        # 7. The end: a last evaluation and checkpoint, the final adapter in OUTPUT_DIR, then `completed`.
        bar.close()
        if eval_ex and st["last_eval_step"] != st["step"]:
            evaluate()
        if t.save_strategy != "no" and not (out / f"{ckpt.PREFIX}{st['step']}").exists():
            save(step_rng)
        check_finite("the final adapter")
        summary = dict(step=st["step"], stop=stop_reason, best_step=st["best_step"], best_eval_ppl=st["best_ppl"],
                       elapsed=elapsed())
        log.write(event="end", **summary)
        draw_curves()
        ckpt.save_final(out, model, lora=lora_kw, summary=summary)
    except KeyboardInterrupt:
        bar.close()
        path = out / f"{ckpt.PREFIX}{st['step']}"
        if st["step"] > 0 and not path.exists():
            path = save(step_rng)
        log.write(event="interrupted", step=st["step"], checkpoint=str(path) if path.exists() else None)
        log.close()
        raise Interrupted(st["step"], path if path.exists() else None) from None
    except torch.OutOfMemoryError:
        log.write(event="out_of_memory", step=st["step"])
        raise TrainingError(f"at step {st['step'] + 1}: {MEMORY_HINT}") from None
    except (ValueError, OSError) as e:  # once training has started, no error is "bad input, nothing written"
        with contextlib.suppress(OSError, ValueError):
            log.write(event="error", step=st["step"], error=f"{type(e).__name__}: {e}")
        raise TrainingError(f"training stopped after step {st['step']}: {type(e).__name__}: {e}. "
                            f"Last good checkpoint: {last_good()}") from e
    finally:
        bar.close()
        log.close()
    best_dir = str(out / ckpt.BEST) if st["best_step"] is not None else None
    return {**summary, "output_dir": str(out), "best_dir": best_dir}
