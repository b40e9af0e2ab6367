"""training.py: checkpoints that are visible only when complete, fall back when the newest is corrupt, never
run pickled code and say so when the disk is full; the export carries the source folder's other files;
the tiny model is built atomically; the summary's chart."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

import checkpoint
import config
import logs
import model
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def world_of_one():
    rank, world, device, mesh = training.init_distributed()
    yield mesh
    training.end_distributed()


def tiny_policy(path, mesh, lr=0.1):
    policy, tokenizer, _ = training.load_policy(config.ModelConfig(path=path, gradient_checkpointing=False),
                                                torch.device("cpu"), mesh)
    run = config.TrainConfig(lr=lr, steps=10)
    optimizer = training.make_optimizer(policy, run)
    return policy, tokenizer, optimizer


def perturb(policy, optimizer):
    """One optimizer step on a made-up loss, so that parameters and Adam state are not the initial ones."""
    loss = sum((p.float() ** 2).sum() for p in policy.parameters())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def params(policy):
    return {k: v.full_tensor().clone() for k, v in policy.state_dict().items()}


def save(ckpt_dir, step, policy, optimizer):
    extra = {"step": step, "rng": checkpoint.rng_state(), "note": [1, "a"]}
    checkpoint.save_checkpoint(str(ckpt_dir), step, policy, optimizer, extra, 0, keep=3)


def test_checkpoints_complete_only_and_fallback(tiny_model_dir, tmp_path, world_of_one, capsys):
    policy, _, optimizer = tiny_policy(tiny_model_dir("qwen2_vl"), world_of_one)
    ckpt = tmp_path / "checkpoints"
    perturb(policy, optimizer)
    save(ckpt, 1, policy, optimizer)
    at_one = params(policy)
    perturb(policy, optimizer)
    save(ckpt, 2, policy, optimizer)
    at_two = params(policy)
    assert sorted(os.listdir(ckpt)) == ["step-000001", "step-000002"]
    # a crash mid-save leaves a .tmp folder, even one that already holds a meta.json: never picked
    shutil.copytree(ckpt / "step-000002", ckpt / "step-000003.tmp")
    assert checkpoint.latest_checkpoint(str(ckpt)) == str(ckpt / "step-000002")
    run = config.TrainConfig(out_dir=str(tmp_path))
    start, extra, path = checkpoint.resume(run, policy, optimizer, 0)
    assert (start, path) == (2, str(ckpt / "step-000002")) and extra["note"] == [1, "a"]
    assert all(torch.equal(v, at_two[k]) for k, v in params(policy).items())
    # a truncated meta.json (full disk) in the newest: skipped with a warning for the one before
    (ckpt / "step-000002" / "meta.json").write_text('{"step": 2, "wor')
    start, _, path = checkpoint.resume(run, policy, optimizer, 0)
    assert (start, path) == (1, str(ckpt / "step-000001"))
    assert "skipping checkpoint" in capsys.readouterr().err
    assert all(torch.equal(v, at_one[k]) for k, v in params(policy).items())
    # corrupt shards in the newest complete one: a warning, then the one before
    (ckpt / "step-000002" / "meta.json").write_text('{"step": 2, "world": 1}')
    for name in os.listdir(ckpt / "step-000002"):
        if name.endswith(".distcp"):
            (ckpt / "step-000002" / name).write_bytes(b"garbage")
    start, _, path = checkpoint.resume(run, policy, optimizer, 0)
    assert (start, path) == (1, str(ckpt / "step-000001"))
    assert "do not load" in capsys.readouterr().out


def test_the_rate_is_a_function_of_the_step_and_old_checkpoints_resume(tiny_model_dir, tmp_path,
                                                                        world_of_one):
    """set_lr gives, step by step, the rates torch's LambdaLR gives over the same factor; a checkpoint written
    while a LambdaLR set the rate (its state in the rank file) resumes, and the
    rate of its step is set from the step alone."""
    run = config.TrainConfig(out_dir=str(tmp_path), lr=0.1, steps=10, warmup_steps=4, lr_schedule="cosine")
    policy, _, optimizer = tiny_policy(tiny_model_dir("qwen2_vl"), world_of_one, lr=run.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: training.lr_factor(s, run))
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=run.lr)
    for step in range(run.steps):
        assert training.set_lr(probe, run, step) == scheduler.get_last_lr()[0] == probe.param_groups[0]["lr"]
        if step < 2:  # the old loop: a step, then scheduler.step()
            perturb(policy, optimizer)
        scheduler.step()
        if step == 1:
            extra = {"step": 2, "nonfinite_run": 0, "scheduler": scheduler.state_dict(),
                     "rng": checkpoint.rng_state()}
            checkpoint.save_checkpoint(str(tmp_path / "checkpoints"), 2, policy, optimizer, extra, 0, keep=1)
    policy, _, optimizer = tiny_policy(tiny_model_dir("qwen2_vl"), world_of_one, lr=run.lr)
    start, extra, _ = checkpoint.resume(run, policy, optimizer, 0)
    assert start == 2 and extra["scheduler"]  # read, and not needed
    assert training.set_lr(optimizer, run, start) == pytest.approx(0.1 * 3 / 4)  # warmup: (2 + 1) / 4


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_planted_pickle_is_refused(tiny_model_dir, tmp_path, world_of_one, monkeypatch):
    policy, _, optimizer = tiny_policy(tiny_model_dir("qwen2_vl"), world_of_one)
    save(tmp_path / "checkpoints", 1, policy, optimizer)
    rank_file = tmp_path / "checkpoints" / "step-000001" / "rank0.pt"
    torch.save({"step": 1, "scheduler": {}, "evil": Payload()}, rank_file, pickle_module=pickle)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="weights_only=True and never run code"):
        checkpoint.load_checkpoint(str(tmp_path / "checkpoints" / "step-000001"), policy, optimizer, 0)
    assert not (tmp_path / "PWNED").exists()


DISK_FULL = """
import sys, torch, checkpoint, config, training
rank, world, device, mesh = training.init_distributed()
policy, _, _ = training.load_policy(config.ModelConfig(path=sys.argv[1], gradient_checkpointing=False),
                                    device, mesh)
optimizer = training.make_optimizer(policy, config.TrainConfig(steps=1))
try:
    checkpoint.save_checkpoint(sys.argv[2], 1, policy, optimizer, {"step": 1}, 0, keep=2)
except checkpoint.CheckpointError as e:
    print("CAUGHT", e)
"""


def test_a_full_disk_is_named_and_keeps_the_older_checkpoint(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-000000").mkdir(parents=True)
    (ckpt / "step-000000" / "meta.json").write_text('{"step": 0, "world": 1}')
    # ulimit -f: a file may not grow past 64 KiB, so the model shards cannot be written (EFBIG)
    proc = subprocess.run(["bash", "-c", f'ulimit -f 64; exec "{sys.executable}" -c "$0" "$1" "$2"',
                           DISK_FULL, path, str(ckpt)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert "CAUGHT cannot write the checkpoint" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "(disk full or not writable?)" in proc.stdout and "older checkpoints" in proc.stdout
    assert sorted(os.listdir(ckpt)) == ["step-000000"]  # no .tmp left, the older one intact


def test_the_export_carries_the_source_folders_other_files(tiny_model_dir, tmp_path, world_of_one):
    source = tmp_path / "Qwen2-VL-like"
    shutil.copytree(tiny_model_dir("qwen2_vl"), source)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    extra = {"preprocessor_config.json": '{"image_processor_type": "Qwen2VLImageProcessor"}',
             "video_preprocessor_config.json": '{"video_processor_type": "Qwen2VLVideoProcessor"}',
             "chat_template.json": json.dumps({"chat_template": template}), "README.md": "# a model card",
             "pytorch_model.bin": "old weights",
             "model.safetensors.index.json":
                 json.dumps({"weight_map": {"lm_head.weight": "model.safetensors"}})}
    for name, text in extra.items():
        (source / name).write_text(text)
    policy, tokenizer, optimizer = tiny_policy(str(source), world_of_one)
    out = tmp_path / "export"
    checkpoint.export_hf(policy, tokenizer, str(out), torch.float32, 0, source=str(source))
    weights = checkpoint.WEIGHT_FILES
    theirs = {n for n in os.listdir(source) if not n.endswith(weights)}
    ours = {n for n in os.listdir(out) if not n.endswith(weights)}
    assert theirs <= ours, theirs - ours
    assert not (out / "pytorch_model.bin").exists() and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == template
    assert (out / "preprocessor_config.json").read_text() == extra["preprocessor_config.json"]
    assert not os.path.exists(str(out) + ".tmp")
    hf, kind = model.load_model(str(out), config.ModelConfig(), "cpu", train=False)
    assert kind == "qwen2_vl"


def test_the_tiny_model_build_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "tiny")

    def interrupted(folder, kind, seed, *tokenizer_and_shape):
        (tmp_path / "started").write_text(folder)
        raise KeyboardInterrupt
    real = model._write_tiny
    monkeypatch.setattr(model, "_write_tiny", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.build_tiny(path, "qwen2_vl", data_cfg=config.DataConfig())
    assert not os.path.exists(path) and os.listdir(tmp_path) == ["started"]  # nothing that looks like a model
    monkeypatch.setattr(model, "_write_tiny", real)
    # two builds at once: both finish, the first rename wins and the other's files are discarded
    build = f"import config, model; model.build_tiny({path!r}, 'qwen2_vl', data_cfg=config.DataConfig())"
    procs = [subprocess.Popen([sys.executable, "-c", build], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["started", "tiny"]
    model.load_model(path, config.ModelConfig(), "cpu", train=False)


def test_text_chart_and_side_by_side():
    assert logs.text_chart([0, 1, 2, 3]) == "▁▃▆█"
    assert logs.text_chart([1.0] * 3) == "▁▁▁"
    assert len(logs.text_chart(list(range(1000)), width=10)) == 10
    samples = [{"step": 1, "video": "a", "text": "first a", "reward": 0.1},
               {"step": 2, "video": "b", "text": "first b", "reward": 0.2},
               {"step": 9, "video": "a", "text": "last a", "reward": 2.5},
               {"step": 10, "video": "b", "text": "last b", "reward": 0.3}]
    text = logs.side_by_side(samples, "reward")
    assert text.splitlines()[0] == "video a: its first and its last sample"
    assert "step 1, reward 0.100" in text and "step 9, reward 2.500" in text and "first a" in text


def test_dtypes_follow_the_device_that_computes(tiny_model_dir, world_of_one):
    """model.dtype resolves against the device that computes, never the CPU the weights are read on: on GPU
    the policy holds fp32 and computes in bf16, the reference holds and computes in bf16. Checked on CPU
    through the pure function, then with model.dtype=bfloat16 on a real load (mixed precision under FSDP2 on
    gloo)."""
    f32, bf16 = torch.float32, torch.bfloat16
    assert training.precision("auto", "cuda", train=True) == (f32, bf16)
    assert training.precision("auto", "cuda", train=False) == (bf16, bf16)
    assert (training.precision("auto", "cpu", train=True) == training.precision("auto", "cpu", train=False)
            == (f32, f32))
    assert training.precision("float16", "cuda", train=False) == (torch.float16, torch.float16)
    assert training.precision("float32", "cuda", train=False) == (f32, f32)
    import multinode_worker
    path = tiny_model_dir("qwen2_vl")
    cfg = config.load_config(None, [f"model.path={path}", "model.dtype=bfloat16", "data.max_pixels=12544"])
    policy, tokenizer, kind = training.load_policy(cfg.model, torch.device("cpu"), world_of_one)
    ref = training.load_policy(cfg.model, torch.device("cpu"), world_of_one, train=False)[0]
    assert {p.dtype for p in policy.parameters()} == {f32}
    assert policy._get_fsdp_state()._mp_policy.param_dtype == bf16
    assert {p.dtype for p in ref.parameters()} == {bf16}
    assert ref._get_fsdp_state()._mp_policy.param_dtype is None
    for model_ in (policy, ref):
        assert torch.isfinite(multinode_worker.forward_logp(model_, tokenizer, kind, cfg)).all()


def tied_and_split(src, folder, kind):
    """The tiny model of `src` with its lm_head tied to the embedding (stored once, as in Qwen2-VL-2B), saved
    in 100 KB files with an index (as the 7B releases are split), with the tokenizer of `src`."""
    hf, _ = model.load_model(src, config.ModelConfig(), "cpu", train=False)
    hf.config.tie_word_embeddings = True
    torch.manual_seed(1)
    tied = model._model_class(kind)(hf.config)
    tied.save_pretrained(folder, max_shard_size="100KB")
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and not (folder / name).exists():
            shutil.copy(os.path.join(src, name), folder)
    return str(folder)


@pytest.mark.parametrize("kind", model.KINDS)
def test_load_policy_streams_the_weights_as_from_pretrained_reads_them(kind, tiny_model_dir, tmp_path,
                                                                        world_of_one):
    """load_policy (every rank on the meta device, rank 0 streaming the safetensors files tensor by tensor)
    gives the parameters and buffers transformers' from_pretrained gives, for the tiny model as saved (one
    file, the released layout's names) and for a tied, split one (an index over several files, lm_head stored
    once)."""
    for folder in (tiny_model_dir(kind), tied_and_split(tiny_model_dir(kind), tmp_path / "tied", kind)):
        want, _ = model.load_model(folder, config.ModelConfig(), "cpu", train=False, dtype=torch.float32)
        cfg = config.ModelConfig(path=folder, gradient_checkpointing=False)
        policy, tokenizer, got_kind = training.load_policy(cfg, torch.device("cpu"), world_of_one)
        got = {k.removeprefix("hf."): v.full_tensor() for k, v in policy.state_dict().items()}
        assert got_kind == kind and got.keys() == want.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
        buffers = dict(want.named_buffers())
        assert len(buffers) == 4 and all(torch.equal(v, buffers[k.removeprefix("hf.")])
                                         for k, v in policy.named_buffers())
        assert (policy.hf.lm_head.weight is policy.hf.model.language_model.embed_tokens.weight) == \
            want.config.tie_word_embeddings
        assert policy.hf.generation_config.eos_token_id == want.generation_config.eos_token_id


def test_load_policy_holds_one_stored_tensor_at_a_time(tiny_model_dir, world_of_one, monkeypatch):
    """Each tensor read from the files is gone before the next is read: the loading never gathers a whole
    model (bench.py --load measures the memory)."""
    real, alive, reads = model.read_weight, [], []

    def read_weight(stored):
        reads.append(sum(ref() is not None for ref in alive))  # earlier reads still held
        out = real(stored)
        alive.append(weakref.ref(out))
        return out
    monkeypatch.setattr(model, "read_weight", read_weight)
    path = tiny_model_dir("qwen2_vl")
    training.load_policy(config.ModelConfig(path=path, gradient_checkpointing=False), torch.device("cpu"),
                         world_of_one)
    assert len(reads) == len(model.stored_weights(path)) and set(reads) == {0}


def test_load_policy_refuses_weights_that_do_not_fit_the_config(tiny_model_dir, tmp_path, world_of_one):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("qwen2_vl"), folder)
    cfg = config.ModelConfig(path=str(folder), gradient_checkpointing=False)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(model.ModelError, match=r"the checkpoint in .*/m lacks 1 tensors: "
                                               r"model.language_model.norm.weight$"):
        training.load_policy(cfg, torch.device("cpu"), world_of_one)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((folder / "config.json").read_text())
    vocab = settings["text_config"]["vocab_size"]
    settings["text_config"]["vocab_size"] = vocab + 8
    (folder / "config.json").write_text(json.dumps(settings))
    with pytest.raises(model.ModelError, match=r"does not match its config.json: "
                                               r"model.language_model.embed_tokens"
                                               rf".weight \[{vocab}, 64\] where the model has "
                                               rf"\[{vocab + 8}, 64\]"):
        training.load_policy(cfg, torch.device("cpu"), world_of_one)


def test_ranks_are_named_in_spans():
    assert training.ranks_named([3]) == "rank 3"
    assert training.ranks_named([8, 9, 10, 12, 14, 15]) == "ranks 8-10, 12, 14-15"
    assert training.per_rank(["a"]) == "a" and training.per_rank(["", ""]) == ""
    assert training.per_rank(["", "x", "x", "y"]) == "ranks 1-2: x; rank 3: y"


def test_sigterm_and_ctrl_c_wait_for_the_end_of_the_step():
    """In the loop's block a SIGTERM or a first Ctrl-C only note a request: the step ends, end_of_step writes
    its checkpoint and raises Stopped (exit 0 after SIGTERM, 130 after Ctrl-C); a second Ctrl-C a moment later
    stops at once. Outside the block both raise at once (KeyboardInterrupt, Terminated)."""
    run = config.TrainConfig(steps=10, checkpoint_every=0)
    with training.process_group("test", 60) as (rank, world, device, mesh):
        for sig, reason, code in [(signal.SIGTERM, "SIGTERM", 0), (signal.SIGINT, "Ctrl-C", 130)]:
            written = []
            with training.stop_watch() as stop:
                training.end_of_step(1, run, stop, written.append)  # nothing asked: no checkpoint
                os.kill(os.getpid(), sig)
                time.sleep(0.1)  # the step goes on
                with pytest.raises(training.Stopped) as stopped:
                    training.end_of_step(2, run, stop, written.append)
            assert written == [2] and (str(stopped.value), stopped.value.exit_code) == (reason, code)
        with pytest.raises(KeyboardInterrupt):
            with training.stop_watch():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(training.AGAIN_AFTER + 0.2)
                os.kill(os.getpid(), signal.SIGINT)  # again: at once
                time.sleep(1)
        for sig, kind in [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, training.Terminated)]:
            with pytest.raises(kind):
                os.kill(os.getpid(), sig)
                time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


@pytest.mark.parametrize("error, code, line", [
    (KeyboardInterrupt(), 130, "x.py: Ctrl-C: stopped at once; the checkpoints written so far are intact: "
                               "rerun the same command to resume"),
    (training.Terminated(), 0, "x.py: SIGTERM: stopped at once;"),
    (training.Stopped("Ctrl-C", 130), 130, None),
])
def test_interruptions_end_in_one_line(capsys, error, code, line):
    with pytest.raises(SystemExit) as stop:
        with training.one_line_errors("x.py"):
            raise error
    err = capsys.readouterr().err.strip()
    assert stop.value.code == code
    assert (err.startswith(line) and len(err.splitlines()) == 1) if line else err == ""


def test_an_export_is_replaced_whole_and_a_kill_midway_is_undone(tmp_path, monkeypatch):
    """replace_folder: old aside, new in, old removed. Killed between the two renames, `export` is absent
    (never half) and recover_export puts the complete old one back; killed after, the leftover copy goes."""
    export, new = tmp_path / "export", tmp_path / "export.tmp"
    for folder, text in ((export, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
        (folder / "tokenizer.json").write_text(text)
    rename = os.rename

    def killed_at_the_second(src, dst):
        if str(src) == str(new):
            raise KeyboardInterrupt
        rename(src, dst)
    monkeypatch.setattr(os, "rename", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.replace_folder(str(new), str(export))
    monkeypatch.setattr(os, "rename", rename)
    assert not export.exists()
    assert sorted(os.listdir(tmp_path / "export.old")) == ["config.json", "tokenizer.json"]
    with pytest.raises(model.ModelError, match=r"a run stopped while replacing this export; the previous one "
                                               r"is .*export.old: rerun the training command"):
        model.check_folder(str(export), config.ModelConfig())
    checkpoint.recover_export(str(export))
    assert (export / "config.json").read_text() == "old" and not (tmp_path / "export.old").exists()
    checkpoint.replace_folder(str(new), str(export))
    assert (export / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["export"]
    shutil.copytree(export, tmp_path / "export.old")  # killed after the new one was in: a leftover copy
    checkpoint.recover_export(str(export))
    assert (export / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["export"]


def test_resume_puts_back_an_export_a_kill_left_aside(tiny_model_dir, tmp_path, world_of_one):
    policy, _, optimizer = tiny_policy(tiny_model_dir("qwen2_vl"), world_of_one)
    (tmp_path / "export.old").mkdir()
    (tmp_path / "export.old" / "config.json").write_text("{}")
    checkpoint.resume(config.TrainConfig(out_dir=str(tmp_path)), policy, optimizer, 0)
    assert sorted(os.listdir(tmp_path)) == ["export"]
