"""The QLoRA training loop, top to bottom: `setup`, `train_step`, `evaluate`, `save`, and `train`'s loop.

What qlora.py delegates to transformers' Trainer, written out (QLoRA §3-4): the base model is loaded
in 4 bits (loader.py, nf4.py), LoRA goes on every linear layer (lora.py), only the adapters train,
with a paged AdamW (optim.py), gradient accumulation, gradient clipping at --max_grad_norm, and the
LR schedule. One optimizer step = `gradient_accumulation_steps` micro-batches of
`per_device_train_batch_size` examples. The loss of a step (--loss_normalization):
    example  sum_k mean_tokens(micro-batch k) / K   what qlora.py's Trainer (transformers 4.3x) did
    token    sum over every target token of the K micro-batches / their count   (transformers >= 4.46;
             equals one batch of K * B examples; the tokens are counted before the backward passes)
K is the number of micro-batches in the step: gradient_accumulation_steps, except at the end of an
epoch where fewer may remain. bf16/fp16 training sets the model's dtype (no autocast); the LoRA
weights (and their matmuls, unless --lora_in_compute_dtype) and the optimizer state stay fp32, and fp16
adds a gradient scaler; a step the scaler skips (inf/NaN gradients) does not advance the LR schedule, as in
transformers' Trainer. No checkpoint holds non-finite LoRA weights. Checked in tests/test_train.py (gradients
against transformers + peft), test_checkpoint.py (exact resume) and test_train_faults.py (faults, skipped steps)."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from . import accumulate, compiled, distributed
from . import checkpoint as ckpt
from .atomic import atomic_file
from .chat import prompt_for
from .curves import RunLog, redraw_curves
from .data import DataOrder, collate
from .errors import MEMORY_HINT, Interrupted, TrainingError
from .loader import load_model, resolve_device_dtype, skeleton
from .lora import apply_lora, computing_in, set_compute_dtype
from .loss import causal_lm_loss
from .optim import build_optimizer, build_scheduler, describe_schedule, quiet_cpu_paging, warmup_steps_for
from .perplexity import eval_nll, mean_perplexity, perplexities
from .runstate import NoLog, Run, RunState, rng_state, seed_everything
from .tokenizer import Tokenizer
from .train_args import RunArgs, dtype_name, lora_targets, training_data

def say(msg):
    if distributed.is_main():  # under torchrun, process 0 speaks for all
        tqdm.write(msg)


def setup(a: RunArgs, progress: bool, world: distributed.World) -> Run:
    """Model, data, optimizer and resume: every input is checked before the model loads, and a previous
    run's files go (--overwrite_output_dir) only once it and any checkpoint to resume have loaded."""
    m, d, t = a.model, a.data, a.train
    started, out = time.perf_counter(), Path(t.output_dir)
    device, dtype = resolve_device_dtype(m.device, dtype_name(a))
    # The model folder (config, weight files) and --lora_modules against its module names, before the data.
    frame, _ = skeleton(m.model_name_or_path)
    targets, context = lora_targets(t.lora_modules, frame), frame.config.max_position_embeddings
    resume = ckpt.find_checkpoint(t.resume_from_checkpoint, out) if t.resume_from_checkpoint else None
    ckpt.check_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None, resume_from=resume)
    seed_everything(t.seed)
    pass_tokens, use_graphs, fast = accumulate.choose(t.pass_tokens, t.cuda_graphs, device)
    use_compile, compile_words = compiled.choose(t.torch_compile, t.cuda_graphs, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as qlora.py
        if dtype == torch.float32 and torch.cuda.is_bf16_supported():
            say("hint: this GPU supports bfloat16: --bf16 trains faster and in less memory "
                "(without it, as in qlora.py, the compute dtype is float32)")

    # Data: tokenised once, audited, split; the order of the examples (resumable).
    tok = Tokenizer.from_dir(m.model_name_or_path)
    data_seed = t.data_seed if t.data_seed is not None else t.seed
    with distributed.quiet(world):  # the audit is printed once, by process 0
        train_ex, eval_ex, eval_records, audits = training_data(a, tok, context=context, progress=progress)
    # A step is K micro-batches on each of the W processes: the order of one process accumulating K x W.
    order = DataOrder([e.length for e in train_ex], t.per_device_train_batch_size,
                      t.gradient_accumulation_steps * world.size, seed=data_seed, group_by_length=t.group_by_length)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * order.steps_per_epoch)
    metric_prompt = prompt_for(d.eval_prompt_template or d.prompt_template or d.dataset_format, m.model_name_or_path)

    # Model: 4-bit base, LoRA on the targets, everything else frozen (process 0 prints the counts).
    model = load_model(m.model_name_or_path, bits=t.bits, quant_type=t.quant_type, double_quant=t.double_quant,
                       dtype=dtype, device=device, progress=progress)
    apply_lora(model, r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=targets, verbose=world.main)
    if t.lora_in_compute_dtype and dtype != torch.float32:  # the low-rank matmuls in bf16/fp16, weights fp32
        set_compute_dtype(model, dtype)
        say(f"LoRA matmuls of training passes in {str(dtype)[6:]}; weights, optimizer and evaluation in float32")
    model.model.gradient_checkpointing = t.gradient_checkpointing
    if use_compile:  # in place: names and state dict unchanged; evaluate() runs eagerly
        compiled.compile_layers(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    # Optimizer, schedule, and (fp16 only) the gradient scaler.
    quiet_cpu_paging()
    hyper = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    opt = build_optimizer(params, t.optim, lr=t.learning_rate, **hyper)
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    sched = build_scheduler(opt, t.lr_scheduler_type, warmup, total_steps)
    say(describe_schedule(t.lr_scheduler_type, warmup, t.warmup_ratio, t.warmup_steps))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    lora = dict(r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=targets,
                base_model_name_or_path=m.model_name_or_path, prompt_template=d.prompt_template or d.dataset_format)
    schedule = {"type": t.lr_scheduler_type, "total_steps": total_steps, "warmup_steps": warmup}
    run = Run(args=a, out=out, device=device, model=model, tok=tok, params=params, lora=lora, opt=opt, sched=sched,
              scaler=scaler, schedule=schedule, order=order, train_ex=train_ex, eval_ex=eval_ex,
              eval_records=eval_records, metric_prompt=metric_prompt, total_steps=total_steps, state=RunState(),
              started=started, world=world)
    run.pass_tokens, run.graphs = pass_tokens, accumulate.GraphedLoss(tok.pad_id) if use_graphs else None
    run.reducer = distributed.OverlappedReduce(params, world)
    say(f"training passes: {fast}" + (f"; {compile_words}" if use_compile else ""))
    if resume is not None:  # loads and checks the checkpoint; refuses before any file is touched
        ckpt.resume_run(run, resume, hyper, say)
    distributed.barrier(world)  # every process has checked the folder and the checkpoint before one changes
    if world.main:  # process 0 writes the files; the others wait for its decisions
        removed = ckpt.prepare_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None,
                                          resume_from=resume)
        if removed:
            say(f"--overwrite_output_dir: deleted the previous run's {', '.join(removed)} in {out}")
        if resume is not None:
            ckpt.restore_best(run, resume, say)
            (out / "completed").unlink(missing_ok=True)  # written again when this run completes
    best = (run.state.best_step, run.state.best_ppl, run.state.best_loss, run.state.bad_evals)
    (run.state.best_step, run.state.best_ppl, run.state.best_loss, run.state.bad_evals) = \
        distributed.from_main(best, world)  # restore_best may have forgotten a best no longer on disk

    fresh = distributed.from_main(resume is None or not (out / "log.jsonl").exists(), world)  # new run or folder
    run.log = RunLog(out / "log.jsonl", keep_until_step=None if fresh else run.state.step) if world.main else NoLog()
    if fresh and world.main:
        with atomic_file(out / "run_config.json") as f:
            json.dump(a.to_dict(), f, indent=2)
        for au in audits:
            run.log.write(event="audit", **au)
    run.log.write(event="start", step=run.state.step, total_steps=total_steps,
                  resumed_from=str(resume) if resume else None, train_examples=len(train_ex),
                  eval_examples=len(eval_ex or []), device=str(device), dtype=str(dtype).removeprefix("torch."),
                  steps_per_epoch=order.steps_per_epoch, processes=world.size)
    if world.size > 1:
        say(f"{world.size} processes, {t.gradient_accumulation_steps} micro-batches each: {order.accum} a step")
    return run


def accumulate_gradients(model, window, device, normalization="example", scaler=None, *, pad_id=0,
                         pass_tokens=0, graphs=None, totals=None, last_backward=None) -> torch.Tensor:
    """Forward and backward each micro-batch of one optimizer step; return the step's loss (detached).

    example: each micro-batch's mean over its own target tokens, / K;  token: the sum over all target
    tokens of the K micro-batches / their count, counted before the first backward. `totals` (K, N): the
    whole step's, when `window` is one process's share of it (default: the window's own). The fast paths
    of accumulate.py compute the same gradient: packed passes (pass_tokens > 0) or CUDA graphs (graphs).
    `last_backward()`, just before the last backward pass: distributed.OverlappedReduce.arm."""
    if not window:  # this process's share of a step's short last window can be empty
        return torch.zeros((), device=device)
    if pass_tokens > 0:
        return accumulate.packed(model, window, device, normalization, scaler, pad_id=pad_id,
                                 pass_tokens=pass_tokens, totals=totals, last_backward=last_backward)
    if graphs is not None:
        return accumulate.graphed(model, window, device, normalization, scaler, graphs=graphs, totals=totals,
                                  last_backward=last_backward)
    K, N = totals or accumulate.step_totals(window)
    step_loss = torch.zeros((), device=device)
    for i, b in enumerate(window):
        logits, labels = model(b["input_ids"].to(device)), b["labels"].to(device)  # (B, T, V), (B, T)
        loss = (causal_lm_loss(logits, labels, reduction="sum")[0] / max(N, 1) if normalization == "token"
                else causal_lm_loss(logits, labels, reduction="mean") / K)
        if last_backward and i == len(window) - 1:
            last_backward()
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss


def train_step(run: Run) -> tuple[float, float, float, int]:
    """One optimizer step: the window's micro-batches forward and backward, clipping, the update, the
    schedule. Returns (loss, gradient norm, lr, tokens); the state advances only if the step completes."""
    t, st, scaler, t0 = run.args.train, run.state, run.scaler, time.perf_counter()
    window = [collate([run.train_ex[i] for i in idx], run.tok.pad_id) for idx in run.order.window()]
    if not window:  # resume_run refuses a position past the data; reaching this is a bug
        raise RuntimeError(f"empty step at epoch {run.order.epoch}, micro-batch {run.order.pos}")
    # This process's micro-batches, weighed by the whole step's counts; the sum over processes starts in the last.
    step_loss = accumulate_gradients(run.model, distributed.deal(window, run.world, run.pass_tokens), run.device,
                                     t.loss_normalization, scaler, pad_id=run.tok.pad_id,
                                     pass_tokens=run.pass_tokens, graphs=run.graphs,
                                     totals=accumulate.step_totals(window), last_backward=run.reducer.arm)
    run.reducer.finish()  # waits for those sums; and their losses:
    if run.world.size > 1:
        step_loss = torch.tensor(distributed.sum_all([step_loss.item()], run.world, run.device)[0])
    if scaler:
        scaler.unscale_(run.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
    # one sync per step: the loss for the bar and the log, and the NaN/inf check
    loss, norm, lr = step_loss.item(), grad_norm.item(), run.sched.get_last_lr()[0]
    if not math.isfinite(loss) or (scaler is None and not math.isfinite(norm)):
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        raise TrainingError(f"the {what} is {value} at step {st.step + 1}: training stopped, nothing was saved "
                            f"for this step. Last good checkpoint: {ckpt.last_good(run.out)}. {run.advice()}")
    with ckpt.defer_sigint():  # the update and its bookkeeping happen entirely or not at all
        stepped = True
        if scaler:  # it skips the update on inf/NaN gradients and lowers its scale
            scale = scaler.get_scale()
            scaler.step(run.opt)
            scaler.update()
            stepped = scaler.get_scale() >= scale
        else:
            run.opt.step()
        if stepped:  # a skipped update leaves the LR schedule where it was (transformers does too)
            run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        run.order.advance(len(window))
        tokens = sum(int(b["attention_mask"].sum()) for b in window)
        st.step, st.acc_loss, st.acc_steps = st.step + 1, st.acc_loss + loss, st.acc_steps + 1
        st.acc_tokens, st.acc_time = st.acc_tokens + tokens, st.acc_time + time.perf_counter() - t0
        run.step_rng = rng_state()
    return loss, norm, lr, tokens


def evaluate(run: Run):
    """Eval loss and the course metric (mean perplexity); a new best goes to OUTPUT_DIR/best."""
    t, st, t0, world = run.args.train, run.state, time.perf_counter(), run.world
    # Each process scores its share of the examples (distributed.shard); the sums and lists are gathered.
    # Eagerly (each eval shape would compile) and with fp32 LoRA matmuls: the numbers peft's layers compute.
    with compiled.eager(), computing_in(run.model, None):
        total, count = distributed.sum_all(eval_nll(run.model, distributed.shard(run.eval_ex, world),
                                                    t.per_device_eval_batch_size, run.tok.pad_id, run.device),
                                           world, run.device)
        ppl = mean_perplexity(distributed.gather(perplexities(  # the course cuts at 2048; never past the context
            run.model, run.tok, distributed.shard(run.eval_records, world), run.metric_prompt,
            batch_size=t.per_device_eval_batch_size, max_length=min(2048, run.model.config.max_position_embeddings),
            progress=False), world))
    loss = total / max(count, 1)
    better = math.isfinite(ppl) and (st.best_ppl is None or ppl < st.best_ppl)
    if better:
        st.best_step, st.best_ppl, st.best_loss, st.bad_evals = st.step, ppl, loss, 0
        path = ckpt.save_best(run.out, run.model, lora=run.lora, info={
            "step": st.step, "eval_ppl": ppl, "eval_loss": loss}) if world.main else run.out / ckpt.BEST
        run.log.write(event="best", step=st.step, path=str(path))
    else:
        st.bad_evals += 1
    st.last_eval_step = st.step
    run.log.write(step=st.step, epoch=run.order.epoch_float(), eval_loss=loss, eval_ppl=ppl, best=better,
                  seconds=round(time.perf_counter() - t0, 2))
    say(f"eval  step {st.step} | eval_loss {loss:.4f} | eval_ppl {ppl:.4f}"
        + (f" | new best -> {path}" if better else f" | best {st.best_ppl or math.nan:.4f} at step {st.best_step}"))
    if world.main:
        redraw_curves(run.out, say)


def save(run: Run) -> Path:
    """OUTPUT_DIR/checkpoint-N (adapter, optimizer, schedule, RNG, RunState), then the oldest rotated away."""
    st = run.state
    check_finite(run, f"{ckpt.PREFIX}{st.step}")
    if not run.world.main:  # the processes hold the same weights and state: process 0 writes them
        return run.out / f"{ckpt.PREFIX}{st.step}"
    state = {**asdict(st), "epoch": run.order.epoch, "pos": run.order.pos, "elapsed": run.elapsed(),
             "train_examples": len(run.train_ex), "processes": run.world.size,
             "args": run.args.to_dict(), "schedule": {**run.schedule, "step": run.sched.last_epoch}}
    path = ckpt.save_training_checkpoint(run.out, st.step, run.model, lora=run.lora, optimizer=run.opt,
                                         scheduler=run.sched, scaler=run.scaler, rng=run.step_rng, state=state)
    removed = ckpt.rotate(run.out, run.args.train.save_total_limit, keep={st.best_step, st.step})
    run.log.write(event="checkpoint", step=st.step, path=str(path), removed=[p.name for p in removed])
    return path


def check_finite(run, what):
    if not bool(torch.stack([p.detach().isfinite().all() for p in run.params]).all()):
        raise TrainingError(f"the LoRA weights are not finite after step {run.state.step}: training stopped, "
                            f"{what} not written. Last good checkpoint: {ckpt.last_good(run.out)}. {run.advice()}")


def due(strategy, every, step, order):
    return (strategy == "steps" and step % every == 0) or (strategy == "epoch" and order.pos == 0)


def train(a: RunArgs, *, progress: bool = True, world: distributed.World = distributed.World()) -> dict:
    progress = progress and world.main
    try:
        run = setup(a, progress, world)
    except torch.OutOfMemoryError:
        raise TrainingError(MEMORY_HINT) from None
    t, st, out = a.train, run.state, run.out
    # the RNG a checkpoint of this step restores; why the loop ends unless something stops it earlier
    run.step_rng, stop = rng_state(), "max_steps" if t.max_steps > 0 else "num_train_epochs"
    bar = tqdm(total=run.total_steps, initial=st.step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        # The base model's numbers first, if asked (a resumed run has them already).
        if run.eval_ex and t.eval_on_start and st.step == 0:
            evaluate(run)
        while st.step < run.total_steps:
            # One optimizer step over the next window of micro-batches.
            t0 = time.perf_counter()
            loss, norm, lr, tokens = train_step(run)
            step = st.step
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            # Log the mean train loss since the last log line (and always the last step's).
            if due(t.logging_strategy, t.logging_steps, step, run.order) or step == run.total_steps:
                rec = dict(step=step, epoch=run.order.epoch_float(), loss=st.acc_loss / st.acc_steps, lr=lr,
                           grad_norm=norm, tokens_per_s=round(st.acc_tokens / st.acc_time, 1), elapsed=run.elapsed())
                run.log.write(**rec)
                say(f"step {step} | epoch {rec['epoch']:.2f} | loss {rec['loss']:.4f} | lr {lr:.3g} | "
                    f"grad_norm {norm:.3f} | {rec['tokens_per_s']:.0f} tok/s")
                st.acc_loss, st.acc_steps, st.acc_tokens, st.acc_time = 0.0, 0, 0, 0.0
            # Evaluate: eval loss, the course metric, the best adapter; stop when it no longer improves.
            if run.eval_ex and due(t.eval_strategy, t.eval_steps, step, run.order):
                evaluate(run)
                if t.early_stopping_patience and st.bad_evals >= t.early_stopping_patience:
                    stop = "early_stopping"
                    say(f"early stopping: {st.bad_evals} evaluations without a better eval perplexity "
                        f"(best {st.best_ppl:.4f} at step {st.best_step})")
            # Checkpoint, to resume from exactly.
            if t.save_strategy != "no" and due(t.save_strategy, t.save_steps, step, run.order):
                save(run)
            if stop == "early_stopping":
                break
        # The end: a last evaluation and checkpoint, the final adapter in OUTPUT_DIR, then `completed`.
        bar.close()
        if run.eval_ex and st.last_eval_step != st.step:
            evaluate(run)
        if t.save_strategy != "no" and not (out / f"{ckpt.PREFIX}{st.step}").exists():
            save(run)
        check_finite(run, "the final adapter")
        summary = dict(step=st.step, stop=stop, best_step=st.best_step, best_eval_ppl=st.best_ppl,
                       elapsed=run.elapsed())
        run.log.write(event="end", **summary)
        if world.main:
            redraw_curves(run.out, say)
            ckpt.save_final(out, run.model, lora=run.lora, summary=summary)
    except KeyboardInterrupt:
        # Ctrl-C: save where the run is (unless saved already), so that it resumes from there.
        bar.close()
        path = out / f"{ckpt.PREFIX}{st.step}"
        if st.step > 0 and not path.exists() and world.main:
            path = save(run)
        run.log.write(event="interrupted", step=st.step, checkpoint=str(path) if path.exists() else None)
        raise Interrupted(st.step, path if path.exists() else None, quiet=not world.main) from None
    except torch.OutOfMemoryError:
        run.log.write(event="out_of_memory", step=st.step)
        raise TrainingError(f"at step {st.step + 1}: {MEMORY_HINT}") from None
    except (ValueError, OSError) as e:  # once training has started, no error is "bad input, nothing written"
        with contextlib.suppress(OSError, ValueError):
            run.log.write(event="error", step=st.step, error=f"{type(e).__name__}: {e}")
        raise TrainingError(f"training stopped after step {st.step}: {type(e).__name__}: {e}. "
                            f"Last good checkpoint: {ckpt.last_good(run.out)}") from e
    finally:
        bar.close()
        run.log.close()
    return {**summary, "output_dir": str(out), "best_dir": str(out / ckpt.BEST) if st.best_step is not None else None,
            "session": round(time.perf_counter() - run.started, 2), "resumed": t.resume_from_checkpoint is not None}
