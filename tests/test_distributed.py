"""Several processes (issue 10), on the CPU with 2 gloo processes started by torchrun: the adapter after K
steps on 2 processes equals the adapter after K steps on 1 with twice the accumulation (the same global
batch); checkpoint and resume under 2 processes continue exactly; a process that fails makes the whole
run exit non-zero; ppl.py and predict.py give the one-process numbers and outputs, in record order."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _fixtures_train import ROOT, TINY, fast_args, needs_tiny, train_main, write_records

pytestmark = [needs_tiny, pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]


def torchrun(script, argv, n=2, timeout=240):
    """`torchrun --standalone --nproc_per_node n script argv` on the CPU; (exit status, stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(script), *map(str, argv)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@contextlib.contextmanager
def one_thread():
    """An in-process run with one thread, as each torchrun process (OMP_NUM_THREADS=1): the same kernels' sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol=1e-6):
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=atol, msg=k)


ARGS = dict(lora_dropout=0.0, per_device_train_batch_size=2, max_steps=4, save_steps=2, logging_steps=1,
            group_by_length=True, eval_dataset_size=4, do_eval=True, evaluation_strategy="steps", eval_steps=2)


@pytest.mark.parametrize("normalization,pass_tokens,compile_layers", [("example", 0, False), ("token", 64, False),
                                                                      ("example", 64, True)])
def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path, normalization, pass_tokens, compile_layers):
    """pass_tokens 64: the packed fast path on both sides (rows packed per process, so the float sums
    group differently: a looser tolerance after 4 Adam steps); with --torch_compile, each process compiles
    its own layers."""
    data = write_records(tmp_path / "d.json", 20)
    one, two = tmp_path / "one", tmp_path / "two"
    flags = dict(ARGS, loss_normalization=normalization, pass_tokens=pass_tokens, torch_compile=compile_layers)
    with one_thread():
        assert train_main(fast_args(one, data, gradient_accumulation_steps=2, **flags)) == 0
    rc, out = torchrun(ROOT / "scripts/train.py", fast_args(two, data, gradient_accumulation_steps=1, **flags))
    assert rc == 0, out
    assert ("passes of at most 64 tokens" in out) == (pass_tokens == 64)
    assert ("decoder layers compiled with torch.compile" in out) == compile_layers
    assert_same_adapter(one, two, atol=5e-5 if pass_tokens else 1e-6)
    log1, log2 = ([json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (one, two))
    losses = [[(r["step"], r["loss"]) for r in log if "loss" in r] for log in (log1, log2)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [1, 2, 3, 4]
    for (_, l1), (_, l2) in zip(*losses):
        assert l1 == pytest.approx(l2, rel=1e-5)
    evals = [[(r["eval_loss"], r["eval_ppl"]) for r in log if "eval_ppl" in r] for log in (log1, log2)]
    assert len(evals[0]) == len(evals[1]) == 2
    for e1, e2 in zip(*evals):  # evaluation sharded over 2 processes and gathered: the one-process number
        assert e1 == pytest.approx(e2, rel=1e-5)
    start = next(r for r in log2 if r.get("event") == "start")
    assert start["processes"] == 2 and "2 processes, 1 micro-batches each: 2 a step" in out
    for said_once in ("data audit (train)", "trainable params:", "training passes:"):  # process 0 speaks for all
        assert out.count(said_once) == 1, said_once
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2",
                                                                                       "checkpoint-4"]


def test_resume_under_two_processes_continues_exactly(tmp_path):
    data = write_records(tmp_path / "d.json", 20)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rc, out = torchrun(ROOT / "scripts/train.py", fast_args(straight, data, gradient_accumulation_steps=1, **ARGS))
    assert rc == 0, out
    rc, out = torchrun(ROOT / "scripts/train.py", [
        *fast_args(resumed, data, gradient_accumulation_steps=1, **ARGS),
        "--resume_from_checkpoint", straight / "checkpoint-2"])
    assert rc == 0, out
    assert "resumed from" in out
    assert_same_adapter(straight, resumed, atol=0)


def test_one_process_resumes_two_with_the_same_micro_batches_a_step(tmp_path, capsys):
    """2 processes x accumulation 1 continued by 1 x 2: the same step, the same data order, so the adapter of
    the uninterrupted 2-process run (as in the first test, to 1e-6); 1 x 1 is warned about."""
    data = write_records(tmp_path / "d.json", 20)
    straight, one, fewer = tmp_path / "straight", tmp_path / "one", tmp_path / "fewer"
    rc, out = torchrun(ROOT / "scripts/train.py", fast_args(straight, data, gradient_accumulation_steps=1, **ARGS))
    assert rc == 0, out
    with one_thread():
        for folder, accum in ((one, 2), (fewer, 1)):
            assert train_main([*fast_args(folder, data, gradient_accumulation_steps=accum, **ARGS),
                               "--resume_from_checkpoint", straight / "checkpoint-2"]) == 0
            said = capsys.readouterr().out
            if accum == 2:
                assert "2 process(es) x accumulation 1, this run has 1 x 2: the same micro-batches a step" in said
                assert "warning" not in said, said
            else:
                assert "warning: " in said and "1 micro-batches a step instead of 2" in said, said
    assert_same_adapter(straight, one, atol=1e-6)


def test_a_failing_process_stops_the_run_non_zero(tmp_path):
    data = write_records(tmp_path / "d.json", 20)
    out_dir = tmp_path / "out"
    rc, out = torchrun(ROOT / "tests" / "_fail_on_rank1.py",
                       fast_args(out_dir, data, gradient_accumulation_steps=1, **ARGS), timeout=180)
    assert rc != 0, out
    assert "the disk failed on process 1" in out
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out_dir / "completed").exists()
    assert not list(out_dir.glob(".*tmp*"))


def test_ppl_and_predict_shard_and_keep_record_order(tmp_path):
    records = json.loads((ROOT / "data/example/test.json").read_text(encoding="utf-8"))[:7]
    test = tmp_path / "t.json"
    test.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    common = ["--base_model_path", TINY, "--device", "cpu", "--test_data_path", test, "--progress", "False"]
    outs = {}
    for n in (1, 2):
        rc, out = torchrun(ROOT / "scripts/ppl.py", [*common, "--batch_size", 2,
                                                     "--per_example_out", tmp_path / f"ppl{n}.json"], n=n)
        assert rc == 0, out
        assert out.count("Mean perplexity:") == 1  # process 0 prints
        outs[n] = out
        rc, out = torchrun(ROOT / "scripts/predict.py", [*common, "--max_new_tokens", 4,
                                                         "--output_path", tmp_path / f"pred{n}.json"], n=n)
        assert rc == 0, out
    p1, p2 = (json.loads((tmp_path / f"ppl{n}.json").read_text()) for n in (1, 2))
    assert [r["id"] for r in p1] == [r["id"] for r in p2] == [r["id"] for r in records]
    for a, b in zip(p1, p2):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    d1, d2 = (json.loads((tmp_path / f"pred{n}.json").read_text()) for n in (1, 2))
    assert d1 == d2 and [r["id"] for r in d1] == [r["id"] for r in records]


def test_ctrl_c_stops_every_process_and_process_0_saves(tmp_path):
    """Ctrl-C reaches every process (the terminal signals the whole group): process 0 saves where the run
    is, the others stop quietly, and the run resumes from that checkpoint under 2 processes."""
    data, out = write_records(tmp_path / "d.json", 40), tmp_path / "out"
    argv = fast_args(out, data, max_steps=400, save_steps=5, lora_dropout=0.0, gradient_accumulation_steps=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "scripts/train.py", *map(str, argv)]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not (out / "checkpoint-5").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    assert p.returncode != 0, text
    saved = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("event") == "interrupted"]
    assert len(saved) == 1 and saved[0]["checkpoint"] is not None, text  # process 0 logged and saved once
    step = saved[0]["step"]
    assert f"interrupted after step {step}; checkpoint {out / f'checkpoint-{step}'}" in text
    assert "nothing saved" not in text  # process 1 says nothing
    rc, text = torchrun(ROOT / "scripts/train.py", [*fast_args(out, data, max_steps=step + 2, save_steps=5,
                                                                 lora_dropout=0.0, gradient_accumulation_steps=1),
                                                      "--resume_from_checkpoint", "latest"])
    assert rc == 0 and f"resumed from {out / f'checkpoint-{step}'}" in text, text


def test_sigterm_under_torchrun_leaves_no_temporary(tmp_path):
    """torchrun stops the other processes with SIGTERM when one fails: a checkpoint being written then goes
    (it never reaches its final name either way) instead of staying as a temporary folder."""
    from minqlora.atomic import atomic_dir
    from minqlora.distributed import stopped_by_torchrun
    previous = signal.signal(signal.SIGTERM, stopped_by_torchrun)
    try:
        with pytest.raises(SystemExit) as stop:
            with atomic_dir(tmp_path / "checkpoint-2") as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at the next bytecode
        assert stop.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []



def test_deal_partitions_a_window_and_balances_its_tokens():
    """Every micro-batch to exactly one process, in window order; the loads within the longest micro-batch
    of each other (round-robin on a window sorted by length, as group_by_length gives, is not)."""
    from minqlora.distributed import World, deal
    lengths = [250, 240, 230, 200, 180, 160, 90, 60, 40, 30]
    window = [{"attention_mask": torch.ones(1, n, dtype=torch.long), "i": i} for i, n in enumerate(lengths)]
    shares = [deal(window, World(rank=r, size=2)) for r in range(2)]
    got = sorted(b["i"] for s in shares for b in s)
    assert got == list(range(len(lengths)))
    assert all([b["i"] for b in s] == sorted(b["i"] for b in s) for s in shares)
    loads = [sum(int(b["attention_mask"].sum()) for b in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    assert abs(loads[0] - loads[1]) < abs(sum(lengths[0::2]) - sum(lengths[1::2]))  # 20 against round-robin's 100
    equal = [{"attention_mask": torch.ones(1, 8, dtype=torch.long), "i": i} for i in range(5)]
    assert [b["i"] for b in deal(equal, World(rank=1, size=2))] == [1, 3]  # equal sizes: as shard deals them
    assert deal(window, World(rank=0, size=1)) == window


def test_deal_packed_cuts_the_window_where_the_padding_is_least():
    """With packed passes (pass_tokens > 0) a pass costs rows x its longest row: every micro-batch to exactly one
    process, each share longest first, and the most padded tokens a process computes is the least any cut of
    the length-sorted window into 2 runs gives (brute force), below dealing by token count's."""
    from minqlora.accumulate import add_row, padded_tokens
    from minqlora.distributed import World, deal

    def cost(share):
        state = (0, 0, 0)
        for b in share:
            for n in b["attention_mask"].sum(1).tolist():
                state = add_row(state, n, 4096)
        return padded_tokens(state)

    # a group_by_length window: two mega-batches' tails, each longest first; micro-batches of 1 and 2 rows
    lengths = [250, 240, 230, 200, 180, 160, 130, 120, 100, 90, 70, 60, 255, 140, 110, 40]
    window = [{"attention_mask": torch.ones(1, n, dtype=torch.long), "i": i} for i, n in enumerate(lengths)]
    window.append({"attention_mask": torch.tensor([[1] * 100 + [0] * 20, [1] * 120]), "i": len(window)})
    shares = [deal(window, World(rank=r, size=2), pass_tokens=4096) for r in range(2)]
    assert sorted(b["i"] for s in shares for b in s) == list(range(len(window)))
    for s in shares:
        longest = [int(b["attention_mask"].sum(1).max()) for b in s]
        assert longest == sorted(longest, reverse=True)
    by_length = sorted(window, key=lambda b: -int(b["attention_mask"].sum(1).max()))
    best = min(max(cost(by_length[:k]), cost(by_length[k:])) for k in range(len(by_length) + 1))
    assert max(map(cost, shares)) == best
    by_tokens = [deal(window, World(rank=r, size=2)) for r in range(2)]
    assert best < max(map(cost, by_tokens))
    assert deal(window, World(rank=0, size=1), pass_tokens=4096) == window
    few = window[:3]  # fewer micro-batches than processes: one each, the last process none
    assert [[b["i"] for b in deal(few, World(rank=r, size=4), 4096)] for r in range(4)] == [[0], [1], [2], []]


def test_overlapped_reduce_sums_as_reduce_gradients():
    """The trainer's all-reduce started during the last backward pass (distributed.OverlappedReduce, many
    buckets) gives reduce_gradients' sums exactly, also when one process has no backward pass in the step."""
    rc, out = torchrun(ROOT / "tests" / "_overlapped_reduce.py", [])
    assert rc == 0, out
    assert out.count("equal over") == 2, out
