"""Checkpoints: save, resume (also on another number of ranks) and the Hugging Face export, for grpo.py
and sft.py.

    start, extra, path = resume(cfg.train, policy, optimizer, rank, settings, fixed)   # (0, None, None):
    fresh
    ... save_checkpoint(out_dir/checkpoints, step, policy, optimizer, extra, rank, keep) every N steps ...
    export(policy, tokenizer, cfg.train, cfg.model, device, rank)                        # out_dir/export

- A checkpoint is a folder step-NNNNNN: the sharded model and optimizer (torch.distributed.checkpoint), one
  small file per rank (data position, RNG: tensors and plain values, read back with weights_only=True, so a
  checkpoint cannot run code) and meta.json. It is written as step-NNNNNN.tmp, every file flushed to disk, and
  renamed only when complete: a crash or a full disk mid-save leaves the previous checkpoints as they were,
  and resume never picks an incomplete folder. A newest checkpoint that does not load is skipped, with a
  warning, for the one before it.
- A checkpoint resumes on another number of ranks: DCP reshards the weights and the optimizer, the data
  position is global, and each rank's sampling RNG is derived anew (load_checkpoint says what is exact).
  Every rank writes into the checkpoint folder, so it must be on a disk every node reaches (check_shared).
- The learning rate is a function of the step (training.set_lr): a checkpoint holds no schedule state, and
  one written with a schedule state (before the schedule was a function) resumes the same way.
- Resuming cuts metrics.jsonl, samples.jsonl and changes.jsonl back to the checkpoint's step, so that steps
  redone after a crash appear once.
- The export is written into export.tmp and replaced whole (replace_folder: the old one renamed aside, the new
  one in, the old one removed); what a kill in between leaves, recover_export puts back at the next start.
"""
import hashlib
import json
import os
import random
import secrets
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import data
import model as model_lib
from config import snippet
from training import RunError, gather, on_rank0, per_rank, print0, ranks_named, reduce


class CheckpointError(RunError):
    """A checkpoint that cannot be written or read; the message names the path."""


def _fsync_write(path, write):
    """write(f) into path.tmp, flush it to disk, rename it over path: path is old or new, never torn."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_shared(folder, timeout=5.0):
    """Stop on every rank, naming the ranks, unless every rank sees `folder` as rank 0 does: each rank writes
    its shards of a checkpoint there and reads them back on resume, so the folder must be on a disk that every
    node mounts at that path. Rank 0 creates it and writes a fresh random token into folder/.shared-check
    (removed once all have looked); the others wait up to `timeout` seconds to read it (a network filesystem
    may show it a moment late)."""
    check = os.path.join(folder, ".shared-check")

    def write():
        token = secrets.token_hex(8)
        try:
            os.makedirs(folder, exist_ok=True)
            _fsync_write(check, lambda f: f.write(token.encode()))
        except OSError as e:
            raise CheckpointError(f"cannot write into {folder}: {type(e).__name__}: {e}") from None
        return token, os.path.abspath(folder)
    token, where = on_rank0(write)  # the folder as rank 0 names it
    deadline = time.monotonic() + timeout
    while not (seen := _read_text(check) == token) and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = [r for r, ok in enumerate(gather(seen)) if not ok]
    if dist.get_rank() == 0:
        os.remove(check)
    if blind:
        raise CheckpointError(
            f"{ranks_named(blind)} cannot see {where}, where rank 0 keeps the checkpoints: every rank "
            "writes its shards there and reads them back on resume, so it must be on a disk every node "
            "mounts at the same path (README: multi-node). Set the run's out_dir to such a folder")


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def complete_checkpoints(ckpt_dir):
    """Checkpoint folders step-NNNNNN (never the .tmp of an interrupted save) with a readable meta.json,
    newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in sorted(os.listdir(ckpt_dir), reverse=True):
        path = os.path.join(ckpt_dir, name)
        if not (name.startswith("step-") and name[5:].isdigit()):
            continue
        try:
            with open(os.path.join(path, "meta.json")) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            print(f"warning: skipping checkpoint {path}: meta.json unreadable ({type(e).__name__})",
                  file=sys.stderr)
            continue
        found.append(path)
    return found


def latest_checkpoint(ckpt_dir):
    """Newest complete checkpoint folder, or None."""
    found = complete_checkpoints(ckpt_dir)
    return found[0] if found else None


def rng_state(generator=None):
    """Every RNG the loop draws from (the global ones and the sampling generator), as tensors and plain
    values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if generator is not None:
        state["sampling"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator=None):
    """Restore rng_state()'s states; one that regroup() derived holds a seed for the sampling generator."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if generator is not None and "sampling" in state:
        generator.set_state(state["sampling"])
    elif generator is not None:
        generator.manual_seed(state["sampling_seed"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_dir, step, policy, optimizer, extra, rank, keep, meta=None):
    """Write step-NNNNNN.tmp (sharded model + optimizer through DCP, rank<r>.pt with `extra` from each rank,
    then meta.json), flush everything to disk, rename it to step-NNNNNN and keep the newest `keep`. A write
    that fails on any rank (a full disk) removes the .tmp and raises CheckpointError on every rank, leaving
    the older checkpoints intact."""
    final = os.path.join(ckpt_dir, f"step-{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    error = ""
    try:
        model_sd, optim_sd = get_state_dict(policy, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        _fsync_write(os.path.join(tmp, f"rank{rank}.pt"), lambda f: torch.save(extra, f))
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
    failed = reduce([float(bool(error))], dist.ReduceOp.MAX)[0] > 0
    if not failed and rank == 0:
        try:
            for name in os.listdir(tmp):  # DCP's own files, flushed before the folder becomes visible
                if os.path.isfile(os.path.join(tmp, name)):
                    with open(os.path.join(tmp, name), "rb") as f:
                        os.fsync(f.fileno())
            body = json.dumps({"step": step, "world": dist.get_world_size(), **(meta or {})}).encode()
            _fsync_write(os.path.join(tmp, "meta.json"), lambda f: f.write(body))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(ckpt_dir)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    failed = reduce([float(bool(error))], dist.ReduceOp.MAX)[0] > 0
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(f"cannot write the checkpoint {final} (disk full or not writable?): "
                              f"{error or 'failed on another rank'}; the older checkpoints in {ckpt_dir} "
                              "are intact")
    if rank == 0:
        old = [p for p in complete_checkpoints(ckpt_dir)][keep:] if keep > 0 else []
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def load_checkpoint(path, policy, optimizer, rank):
    """Load a checkpoint folder into the policy and optimizer -> (meta, this rank's extra). Raises
    CheckpointError naming the file when it cannot be read. A checkpoint of as many ranks as this run has
    gives each rank its own extra back: the resume is exact. One of another number of ranks is resharded: DCP
    loads the weights and the optimizer state exactly into this run's shards, and each rank's extra is derived
    from every saved rank's (regroup)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json: unreadable ({type(e).__name__})") from None
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=path)
    except (OSError, RuntimeError, ValueError, dcp.api.CheckpointException) as e:
        raise CheckpointError(f"{path}: the model or optimizer shards do not load "
                              f"({type(e).__name__})") from None
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    world = dist.get_world_size()
    if meta["world"] == world:
        return meta, _read_extra(path, rank)
    return meta, regroup([_read_extra(path, r) for r in range(meta["world"])], rank, world)


def _read_extra(path, rank):
    extra_path = os.path.join(path, f"rank{rank}.pt")
    try:
        return torch.load(extra_path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds; a refused pickle is UnpicklingError
        raise CheckpointError(f"{extra_path}: unreadable or not a plain state file ({type(e).__name__}); "
                              "checkpoints are loaded with weights_only=True and never run code") from None


def regroup(saved, rank, world):
    """The extra of rank `rank` of `world` after a change in the number of ranks, from `saved`, the extra of
    every saved rank: rank 0's values for what all ranks hold alike (the step, the schedule, the global RNGs,
    which every rank seeds alike); the data position, which is global, with the bad-video counts shared out
    anew (data.PromptStream.regroup); and for the sampling generator a seed derived from rank 0's saved
    generator and this rank: a stream of its own per rank, the same whenever this checkpoint is resumed on
    this many ranks, but not the one the saved ranks would have drawn."""
    extra = dict(saved[0])
    if "data" in extra:
        extra["data"] = data.PromptStream.regroup([e["data"] for e in saved], rank, world)
    rng = {k: v for k, v in extra["rng"].items() if k != "sampling"}
    if "sampling" in extra["rng"]:
        saved_state = extra["rng"]["sampling"].numpy().tobytes()
        digest = hashlib.sha256(saved_state + rank.to_bytes(4, "little")).digest()
        rng["sampling_seed"] = int.from_bytes(digest[:8], "little")
    extra["rng"] = rng
    return extra


def resume(run, policy, optimizer, rank, settings=None, fixed=()):
    """Load the checkpoint run.resume names (auto: the newest complete one in run.out_dir/checkpoints, falling
    back to older ones when it does not load; never; or a path) -> (start step, extra, path), or
    (0, None, None) for a fresh start. Every rank loads the checkpoint rank 0 chose.

    `settings` ({dotted key: value}, as the checkpoint's meta.json records them) are compared with the
    checkpoint's: a change of a `fixed` key stops the run (the checkpoint's state depends on it); any other
    change is honoured from this step on (the optimizer's lr, betas and weight decay are set from `run`, not
    taken from the checkpoint; the learning rate is training.set_lr's, from the step) and recorded in
    run.out_dir/changes.jsonl with the step. metrics.jsonl,
    samples.jsonl and changes.jsonl are cut back to the start step, so that steps redone after a crash
    appear once."""
    ckpt_dir = os.path.join(run.out_dir, "checkpoints")

    def candidates():  # rank 0 lists, and warns, once
        recover_export(os.path.join(run.out_dir, "export"))  # a kill mid-replacement: the old export back
        return [] if run.resume == "never" else complete_checkpoints(ckpt_dir) if run.resume == "auto" \
            else [run.resume]
    candidates = on_rank0(candidates)
    start, extra, path = 0, None, None
    for k, candidate in enumerate(candidates):
        error = ""
        try:
            meta, extra = load_checkpoint(candidate, policy, optimizer, rank)
        except CheckpointError as e:
            error = str(e)
        error = per_rank(gather(error))
        if not error:
            start, path = meta["step"], candidate
            _apply_changes(meta.get("settings", {}), settings or {}, fixed, run, optimizer, start, rank)
            if meta["world"] != dist.get_world_size():
                print0(f"resume: {candidate} was written by {meta['world']} ranks, this run has "
                       f"{dist.get_world_size()}: the weights and optimizer state are resharded exactly, the "
                       "data continue from the same place in the global order, the sampling RNGs are seeded "
                       "anew")
            break
        if run.resume != "auto":
            raise CheckpointError(error)
        print0(f"warning: {error}; trying the checkpoint before it" if k + 1 < len(candidates)
               else f"warning: {error}; no older checkpoint, starting fresh")
        extra = None
    if rank == 0:
        for name in ("metrics.jsonl", "samples.jsonl", "changes.jsonl"):
            cut_jsonl(os.path.join(run.out_dir, name), start)
    return start, extra, path


def _apply_changes(saved, now, fixed, run, optimizer, step, rank):
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    refused = [k for k in changed if k in fixed]
    if refused:
        raise CheckpointError("; ".join(f"{k} was {snippet(changed[k][0])} in the checkpoint at step {step}, "
                                        f"now {snippet(changed[k][1])}" for k in refused)
                              + f": the checkpoint's state depends on {'it' if len(refused) == 1 else 'them'}"
                              ". "
                              "Set it back, or start a new run (resume=never or another out_dir)")
    for group in optimizer.param_groups:  # the settings, not the checkpoint's copy of them
        group.update(betas=tuple(run.adam_betas), weight_decay=run.weight_decay)
    if changed and rank == 0:
        print(f"resume: settings changed since the checkpoint, honoured from step {step} on: "
              + ", ".join(f"{k} {snippet(a)} -> {snippet(b)}" for k, (a, b) in changed.items()), flush=True)
        with open(os.path.join(run.out_dir, "changes.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": step, "key": k, "old": a, "new": b}) + "\n"
                         for k, (a, b) in changed.items())


def cut_jsonl(path, step):
    """Keep the lines of a run's JSONL log whose "step" is at most `step`; a line torn by a crash goes too.
    Written beside and renamed: the log is old or new, never half."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    _fsync_write(path, lambda f: f.write("".join(keep).encode()))


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def export_hf(policy, tokenizer, out_dir, dtype, rank, source):
    """An HF model folder at out_dir: the full weights gathered on rank 0, cast to the compute dtype (not
    the fp32 master copy), written with save_pretrained, the tokenizer, and every other file of the
    `source` model folder that these do not write (preprocessor_config.json, video_preprocessor_config.json,
    chat_template.json, generation_config.json, ...; never its weights), so that AutoProcessor and
    `vllm serve` load the result as they load the source. Written into out_dir.tmp and renamed when
    complete; an existing out_dir is replaced (replace_folder): at no moment is out_dir half written."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = ""
    if rank == 0:
        tmp = out_dir.rstrip("/") + ".tmp"
        try:
            recover_export(out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            with torch.device("meta"):
                fresh = type(policy.hf)._from_config(policy.hf.config, dtype=dtype)
            fresh.load_state_dict({k.removeprefix("hf."): v.to(dtype) for k, v in sd.items()}, assign=True)
            fresh.generation_config = policy.hf.generation_config  # the source's, as loaded
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name in sorted(os.listdir(source)):
                src = os.path.join(source, name)
                if os.path.isfile(src) and not name.endswith(WEIGHT_FILES) and \
                        not os.path.exists(os.path.join(tmp, name)):
                    shutil.copy2(src, os.path.join(tmp, name))
            replace_folder(tmp, out_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"cannot write the export {out_dir} (disk full or not writable?): {type(e).__name__}: {e}"
    if reduce([float(bool(error))], dist.ReduceOp.MAX)[0] > 0:
        raise CheckpointError(error or "the export failed on rank 0")


def replace_folder(new, folder):
    """Put the complete folder `new` in place of `folder`: the old one is renamed aside to folder.old, `new`
    renamed in, then the old one removed. A kill at any moment leaves `folder` complete (old or new) or,
    between the two renames, absent with the complete old one at folder.old, which recover_export puts back;
    never half a folder for `vllm serve` or evaluate.py to load."""
    folder = folder.rstrip("/")
    aside = folder + ".old"
    shutil.rmtree(aside, ignore_errors=True)  # recover_export ran first: a leftover here is a stale copy
    if os.path.exists(folder):
        os.rename(folder, aside)
    os.rename(new, folder)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))
    shutil.rmtree(aside, ignore_errors=True)


def recover_export(folder):
    """Undo what a kill inside replace_folder left: with `folder` gone and folder.old there, the old one is
    renamed back (it is complete: it was renamed aside whole); with both there, folder.old is a leftover copy
    and goes. Run by rank 0 before each export, at each resume, and by the warm start before it looks for its
    export."""
    folder = folder.rstrip("/")
    aside = folder + ".old"
    if not os.path.isdir(aside):
        return
    if os.path.exists(folder):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(aside, folder)
        print(f"{folder}: put back the previous export, which a run stopped while replacing it", flush=True)


def export(policy, tokenizer, run, model_cfg, device, rank):
    """The end of a run: its HF export into run.out_dir/export (when run.export), in the compute dtype."""
    if run.export:
        export_hf(policy, tokenizer, os.path.join(run.out_dir, "export"),
                  model_lib.resolve_dtype(model_cfg.dtype, device), rank, source=model_cfg.path)
