"""The training machinery that grpo.py and sft.py share: the process group, FSDP2 wrapping, AdamW and its
schedule, checkpoints with exact resume, the Hugging Face export, metric logging and the summary's charts.

    rank, world, device, mesh = init_distributed(replicate=cfg.train.replicate)   # FSDP, or HSDP across nodes
    policy, tokenizer, kind = load_policy(cfg.model, device, mesh)    # fp32 master weights, bf16 compute on GPU
    optimizer, scheduler = make_optimizer(policy, cfg.train)          # cfg.train or cfg.sft: a RunConfig
    start, extra = resume(cfg.train, policy, optimizer, scheduler, rank)
    ... the program's loop, calling save_checkpoint(...) and log(metrics, step) ...
    export_hf(policy, tokenizer, out_dir, dtype, rank, source=cfg.model.path)

Choices beyond the paper (which does not describe its training code):
- Plain `python grpo.py` (or sft.py) runs as an FSDP world of one, the same code path as torchrun.
- The policy keeps fp32 master weights and computes in bf16 on GPU (FSDP2 mixed precision): at lr 1e-6 a bf16
  weight cannot hold the update. The frozen reference holds and computes in bf16 (precision()).
- Only rank 0 reads the model folder. Every rank builds the model on the meta device and shards it, and rank 0
  streams the safetensors files into the shards one tensor at a time, so no rank ever holds a whole model at
  start-up, only its shards and one tensor in flight (load_policy).
- `replicate` > 1 (HSDP) keeps one copy of the model per group of world/replicate ranks (a node), so that the
  per-layer all-gathers stay inside the node.
- A checkpoint is a folder step-NNNNNN: the sharded model and optimizer (torch.distributed.checkpoint), one
  small file per rank (data position, RNG, schedule: tensors and plain values, read back with
  weights_only=True, so a checkpoint cannot run code) and meta.json. It is written as step-NNNNNN.tmp, every
  file flushed to disk, and renamed only when complete: a crash or a full disk mid-save leaves the previous
  checkpoints as they were, and resume never picks an incomplete folder. A newest checkpoint that does not
  load is skipped, with a warning, for the one before it. A checkpoint resumes on another number of ranks: DCP
  reshards the weights and the optimizer, the data position is global, and each rank's sampling RNG is derived
  anew (load_checkpoint says what is exact). Every rank writes into the checkpoint folder, so it must be on a
  disk every node reaches (check_shared).
"""
import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import textwrap
import time
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import config as config_lib
import data
import model as model_lib
import rewards


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


class StopRun(RuntimeError):
    """A run that stops on purpose (too many non-finite steps, a judge that went away); the message says
    what to do."""


# What a user can fix: these end a run with their one-line message, anything else with a traceback
USER_ERRORS = (config_lib.ConfigError, data.DataError, data.VideoError, model_lib.ModelError, rewards.JudgeError,
               CheckpointError, StopRun)


def launch(program, run_fn, timeout, replicate=1):
    """Start the process group (init_distributed), call run_fn(rank, world, device, mesh) and return what it
    returns. On an error every rank ends, the others at their next collective or their timeout, instead of
    hanging: a USER_ERRORS error prints "program: message" (once per rank that raised it), anything else its
    traceback; with one process the error is raised to the caller."""
    rank, world, device, mesh = init_distributed(timeout, replicate)
    try:
        return run_fn(rank, world, device, mesh)
    except BaseException as e:
        if world > 1:
            why = f"{program}: {message}" if (message := user_error(e)) else traceback.format_exc()
            print(f"[rank {rank}] {why}", file=sys.stderr, flush=True)
            os._exit(1)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)


def user_error(e):
    """The one-line message for an error a user can fix (USER_ERRORS, a write refused by a full or read-only
    disk), or None for a bug, which deserves its traceback."""
    if isinstance(e, USER_ERRORS):
        return str(e)
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        return f"cannot write {e.filename or 'a file'} (disk full or not writable?): {e.strerror}"
    return None


def main(program, argv, doc, check, train):
    """A training program's command line: CONFIG [key=value ...], --help; a bad setting or a USER_ERRORS
    error ends in one line on stderr (exit 1), an unknown option too (exit 2)."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python {program} CONFIG.yaml [section.key=value ...]\n"
              f"       torchrun --nproc_per_node N {program} CONFIG.yaml [section.key=value ...]\n\n{doc}")
        return
    if bad := [a for a in argv if a.startswith("-")]:
        print(f"{program}: unknown option {bad[0]}; usage: python {program} CONFIG.yaml [section.key=value ...]"
              " (--help for more)", file=sys.stderr)
        sys.exit(2)
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = config_lib.load_config(path, argv[1:] if path else argv)
        check(cfg)
        train(cfg)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    except Exception as e:  # noqa: BLE001 - a user's error ends in one line, a bug re-raises with its traceback
        if (message := user_error(e)) is None:
            raise
        sys.exit(f"{program}: {message}")

# ----------------------------------------------------------------------------- distributed


def init_distributed(timeout=1800.0, replicate=1):
    """Join the process group torchrun describes, or make a world of one -> (rank, world, device, mesh). A
    collective that waits longer than `timeout` seconds for a rank (one that died or hangs) raises on the ranks
    that wait. The mesh (device_mesh) is 1-D over all ranks (FSDP), or with `replicate` > 1 2-D for HSDP: each
    row of world/replicate ranks, a node or several, shards one copy of the model, and only the gradients
    cross between rows."""
    kw = {"timeout": timedelta(seconds=timeout)}
    if "RANK" not in os.environ:  # plain `python grpo.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kw.update(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kw)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **kw)
    return dist.get_rank(), dist.get_world_size(), device, device_mesh(device.type, replicate)


def device_mesh(device_type, replicate=1):
    """The mesh FSDP2 shards over: 1-D over all ranks, or with `replicate` > 1 2-D (replicate, shard), whose
    rows are groups of world/replicate consecutive ranks (torchrun numbers ranks node by node)."""
    world = dist.get_world_size()
    if replicate == 1:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def reduce(values, op=dist.ReduceOp.SUM):
    """All-reduce a list of floats across ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.tolist()


def broadcast(obj):
    """Rank 0's `obj` on every rank (rank 0 decides what is on disk; a node may see another disk)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ranks_named(ranks):
    """[8, 9, 10, 12] -> "ranks 8-10, 12"; [3] -> "rank 3"."""
    spans = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def per_rank(messages):
    """gather()'s messages as one: "" when all are empty, else each distinct one once with the ranks that gave
    it ("ranks 8-15: ..."; in a world of one, the message alone)."""
    if len(messages) == 1:
        return messages[0]
    ranks = {}
    for r, message in enumerate(messages):
        if message:
            ranks.setdefault(message, []).append(r)
    return "; ".join(f"{ranks_named(rs)}: {message}" for message, rs in ranks.items())


def on_rank0(fn):
    """fn()'s result on rank 0, sent to every rank; an error that USER_ERRORS lists is raised on every rank
    alike, so that no rank is left waiting for rank 0 in a collective."""
    result = None
    if dist.get_rank() == 0:
        try:
            result = (fn(), None)
        except USER_ERRORS as e:
            result = (None, e)
    value, error = broadcast(result)
    if error is not None:
        raise error
    return value


def print0(*args, **kwargs):
    if dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def sigterm_watch():
    """Install a SIGTERM handler; returns stop() -> True on every rank once any rank got SIGTERM."""
    flag = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: flag.update(requested=True))
    return lambda: reduce([float(flag["requested"])], dist.ReduceOp.MAX)[0] > 0


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision(setting, device_type, train):
    """(dtype the parameters are held in, dtype they compute in) for model.dtype `setting` on the device that
    computes (cuda or cpu; the weights are read on the CPU, which must not decide): the policy keeps fp32 master
    weights and computes in the setting's dtype (auto: bf16 on GPU, fp32 on CPU); the frozen reference, which
    no update touches, holds and computes in it."""
    compute = model_lib.resolve_dtype(setting, device_type)
    return (torch.float32 if train else compute), compute


def shard(policy, mesh, device, *, compute_dtype, offload=False):
    """Our FSDP2 wrapping over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP): each vision block, each decoder
    layer, then the root (the Policy, which owns embeddings, the final norm and lm_head). Parameters held in
    another dtype than `compute_dtype` are cast to it for compute, their gradients reduced in fp32 (mixed
    precision). A Policy built on the meta device gets uninitialised shards, for load_policy to fill."""
    held = next(policy.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != held else MixedPrecisionPolicy()
    kw = {"mesh": mesh, "mp_policy": mp}
    offload = offload and device.type == "cuda"
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    inner = policy.hf.model
    for block in inner.visual.blocks:
        fully_shard(block, **kw)
    for layer in inner.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(policy, **kw)
    home = torch.device("cpu") if offload else device
    if next(policy.parameters()).is_meta:
        policy.to_empty(device=home)
    else:
        policy.to(home)
    if offload:  # FSDP brings the offloaded shards to the GPU for each forward, but not the buffers
        for module in policy.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
    # FSDP2 picks its root at the first forward; generation calls the layers directly,
    # so make the Policy the root before anything runs.
    policy._get_fsdp_state()._lazy_init()
    return policy


def load_policy(model_cfg, device, mesh, *, train=True, offload=False):
    """The model at model_cfg.path as a sharded Policy -> (policy, tokenizer, kind). train=True: the policy,
    fp32 master weights computing in model.dtype; train=False: the frozen reference, held and computed in it
    (precision()). offload: the shards in CPU memory (GPU only).

    Every rank builds the model on the meta device and shards it; only rank 0 reads the model folder (config,
    tokenizer, the safetensors headers), and the other ranks get what it read by broadcast, so other nodes
    need no copy of the folder. Then fill_from_rank0 streams the weights into the shards one tensor at a time:
    no rank ever holds a whole model, only its shards and one tensor in flight."""
    held, compute = precision(model_cfg.dtype, device.type, train)

    def read():
        kind = model_lib.check_folder(model_cfg.path, model_cfg)
        return (model_lib.load_tokenizer(model_cfg.path), *model_lib.read_config(model_cfg.path), kind,
                model_lib.stored_weights(model_cfg.path))
    tokenizer, hf_config, generation_config, kind, stored = on_rank0(read)
    hf = model_lib.empty_model(hf_config, model_cfg, held, train=train)
    hf.generation_config = generation_config  # the source's, for the export
    policy = shard(model_lib.Policy(hf, freeze_vision=train and model_cfg.freeze_vision), mesh, device,
                   compute_dtype=compute, offload=offload)
    model_lib.init_buffers(hf)
    fill_from_rank0(policy, stored, device, model_cfg.path)
    return policy, tokenizer, kind


def fill_from_rank0(policy, stored, device, path):
    """Fill every parameter and persistent buffer of the sharded `policy` from the checkpoint `stored` describes
    (model.stored_weights; the same on every rank), one tensor at a time: rank 0 reads it in the dtype it is
    stored in (bf16 for Qwen's releases) and broadcasts it; each rank keeps its own shard of it, cast to the
    dtype it is held in. A rank so holds, beyond its shards, one full tensor at most (the largest is the
    embedding: 1.1 GB in bf16 for the 7B models). A checkpoint that lacks a tensor, or has it in another shape
    (a config.json that does not match the weights), is refused on every rank before any is read."""
    tensors = dict(policy.named_parameters())  # tied weights once (Qwen2-VL-2B ties lm_head to the embedding)
    for prefix, module in policy.named_modules():
        tensors.update((f"{prefix}.{name}".lstrip("."), b) for name, b in module.named_buffers(recurse=False)
                       if name not in module._non_persistent_buffers_set)
    keys = {name: name.removeprefix("hf.") for name in tensors}
    missing = [k for k in keys.values() if k not in stored]
    wrong = [f"{k} {list(stored[k].shape)} where the model has {list(tensors[n].shape)}"
             for n, k in keys.items() if k in stored and tuple(stored[k].shape) != tuple(tensors[n].shape)]
    if missing or wrong:
        what = f"lacks {len(missing)} tensors: {_first(missing, ', ')}" if missing else \
            f"does not match its config.json: {_first(wrong, '; ')}"
        raise model_lib.ModelError(f"the checkpoint in {path} {what}")
    unused = sorted(set(stored) - {k.removeprefix("hf.") for k in policy.state_dict()})  # tied names are known
    if unused:
        print0(f"warning: {len(unused)} tensors in {path} have no place in the model and are ignored: "
               f"{_first(unused, ', ')}")
    rank = dist.get_rank()
    with torch.no_grad():
        for name, tensor in tensors.items():
            entry = stored[keys[name]]
            full = model_lib.read_weight(entry).to(device) if rank == 0 else \
                torch.empty(entry.shape, dtype=entry.dtype, device=device)
            dist.broadcast(full, src=0)
            if isinstance(tensor, DTensor):
                tensor.to_local().copy_(
                    distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local())
            else:
                tensor.copy_(full)
            del full


def _first(items, sep, n=3):
    return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")


@contextlib.contextmanager
def gathered(policy):
    """Hold every FSDP unit unsharded for a whole rollout: one all-gather per unit
    instead of one per decode step. The root keeps FSDP's default of no reshard."""
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(u is not policy, recurse=False)

# ----------------------------------------------------------------------------- optimizer and schedule


def lr_factor(step, run):
    """Linear warmup from 0, then constant, cosine or linear decay to min_lr_ratio (run: a RunConfig)."""
    if step < run.warmup_steps:
        return (step + 1) / run.warmup_steps
    if run.lr_schedule == "constant":
        return 1.0
    total = max(1, run.steps - run.warmup_steps)
    progress = min(1.0, (step - run.warmup_steps) / total)
    lo = run.min_lr_ratio
    if run.lr_schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    if run.lr_schedule == "linear":
        return lo + (1 - lo) * (1 - progress)
    raise ValueError(f"lr_schedule must be constant, cosine or linear, got {run.lr_schedule!r}")


def make_optimizer(policy, run):
    """AdamW over the policy's (sharded) parameters and its LambdaLR schedule, from a RunConfig whose
    `steps` is already resolved."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=run.lr, betas=tuple(run.adam_betas),
                                  weight_decay=run.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run))


def clip_and_step(policy, optimizer, max_norm, loss_finite=True):
    """Clip the global gradient norm (all ranks) and step, unless the norm or the loss is not finite: then
    the gradients are dropped and no step is taken. Returns (grad_norm, stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not (loss_finite and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.item(), False
    optimizer.step()
    return grad_norm.item(), True

# ----------------------------------------------------------------------------- checkpoints


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
    node mounts at that path. Rank 0 creates it and writes a fresh random token into folder/.shared-check (removed
    once all have looked); the others wait up to `timeout` seconds to read it (a network filesystem may show it a
    moment late)."""
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
        raise CheckpointError(f"{ranks_named(blind)} cannot see {where}, where rank 0 keeps the "
                              "checkpoints: every rank writes its shards there and reads them back on resume, so it "
                              "must be on a disk every node mounts at the same path (README: multi-node). Set the "
                              "run's out_dir to such a folder")


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
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
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
    CheckpointError naming the file when it cannot be read. A checkpoint of as many ranks as this run has gives
    each rank its own extra back: the resume is exact. One of another number of ranks is resharded: DCP loads
    the weights and the optimizer state exactly into this run's shards, and each rank's extra is derived from
    every saved rank's (regroup)."""
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
        raise CheckpointError(f"{path}: the model or optimizer shards do not load ({type(e).__name__})") from None
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
        digest = hashlib.sha256(extra["rng"]["sampling"].numpy().tobytes() + rank.to_bytes(4, "little")).digest()
        rng["sampling_seed"] = int.from_bytes(digest[:8], "little")
    extra["rng"] = rng
    return extra


def resume(run, policy, optimizer, scheduler, rank, settings=None, fixed=()):
    """Load the checkpoint run.resume names (auto: the newest complete one in run.out_dir/checkpoints, falling
    back to older ones when it does not load; never; or a path) -> (start step, extra, path), or
    (0, None, None) for a fresh start. Every rank loads the checkpoint rank 0 chose.

    `settings` ({dotted key: value}, as the checkpoint's meta.json records them) are compared with the
    checkpoint's: a change of a `fixed` key stops the run (the checkpoint's state depends on it); any other
    change is honoured from this step on (the optimizer's lr, betas and weight decay are set from `run`, not
    taken from the checkpoint) and recorded in run.out_dir/changes.jsonl with the step. metrics.jsonl,
    samples.jsonl and changes.jsonl are cut back to the start step, so that steps redone after a crash
    appear once."""
    ckpt_dir = os.path.join(run.out_dir, "checkpoints")
    candidates = on_rank0(lambda: [] if run.resume == "never" else complete_checkpoints(ckpt_dir)
                          if run.resume == "auto" else [run.resume])  # rank 0 lists, and warns, once
    start, extra, path = 0, None, None
    for k, candidate in enumerate(candidates):
        error = ""
        try:
            meta, extra = load_checkpoint(candidate, policy, optimizer, rank)
        except CheckpointError as e:
            error = str(e)
        error = per_rank(gather(error))
        if not error:
            scheduler.load_state_dict(extra["scheduler"])
            start, path = meta["step"], candidate
            _apply_changes(meta.get("settings", {}), settings or {}, fixed, run, optimizer, scheduler, start, rank)
            if meta["world"] != dist.get_world_size():
                print0(f"resume: {candidate} was written by {meta['world']} ranks, this run has "
                       f"{dist.get_world_size()}: the weights and optimizer state are resharded exactly, the data "
                       "continue from the same place in the global order, the sampling RNGs are seeded anew")
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


def _apply_changes(saved, now, fixed, run, optimizer, scheduler, step, rank):
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    refused = [k for k in changed if k in fixed]
    if refused:
        raise CheckpointError("; ".join(f"{k} was {changed[k][0]!r} in the checkpoint at step {step}, now "
                                        f"{changed[k][1]!r}" for k in refused)
                              + f": the checkpoint's state depends on {'it' if len(refused) == 1 else 'them'}. "
                              "Set it back, or start a new run (resume=never or another out_dir)")
    factor = lr_factor(step, run)
    for group in optimizer.param_groups:  # the settings, not the checkpoint's copy of them
        group.update(initial_lr=run.lr, lr=run.lr * factor, betas=tuple(run.adam_betas),
                     weight_decay=run.weight_decay)
    scheduler.base_lrs = [run.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [run.lr * factor] * len(optimizer.param_groups)
    if changed and rank == 0:
        print(f"resume: settings changed since the checkpoint, honoured from step {step} on: "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), flush=True)
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
    complete; an existing out_dir is replaced."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = ""
    if rank == 0:
        tmp = out_dir.rstrip("/") + ".tmp"
        try:
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
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"cannot write the export {out_dir} (disk full or not writable?): {type(e).__name__}: {e}"
    if reduce([float(bool(error))], dist.ReduceOp.MAX)[0] > 0:
        raise CheckpointError(error or "the export failed on rank 0")

# ----------------------------------------------------------------------------- logging


def make_logger(run, config_dict, rank):
    """log(metrics, step): a line of metrics.jsonl on rank 0, plus wandb / TensorBoard when switched on
    (run.wandb, run.tensorboard) and installed."""
    if rank != 0:
        return lambda metrics, step: None
    out_dir = run.out_dir
    sinks = []
    if run.wandb:
        import wandb  # optional
        wb = wandb.init(project=run.wandb_project, config=config_dict, dir=out_dir)
        sinks.append(lambda m, step: wb.log(m, step=step))
    if run.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # optional
        writer = SummaryWriter(os.path.join(out_dir, "tb"))
        sinks.append(lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()])
    path = os.path.join(out_dir, "metrics.jsonl")

    def log(metrics, step):
        append_jsonl(path, {"step": step, **metrics})
        for sink in sinks:
            sink(metrics, step)
    return log


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


BARS = " ▁▂▃▄▅▆▇█"


def text_chart(values, width=48):
    """A one-line chart of a series: at most `width` bars, each the mean of its stretch of steps, scaled
    between the series' min and max. NaN stretches print as a space."""
    if not values:
        return ""
    n = min(width, len(values))
    means = []
    for k in range(n):
        part = [v for v in values[k * len(values) // n:(k + 1) * len(values) // n] if v == v]
        means.append(sum(part) / len(part) if part else None)
    finite = [m for m in means if m is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = hi - lo or 1.0
    return "".join(" " if m is None else BARS[1 + round((m - lo) / span * (len(BARS) - 2))] for m in means)


def append_jsonl(path, obj):
    """One line onto a run's log; a failed write (a full disk) stops the run saying which file, with the
    checkpoints as they were."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as e:
        raise StopRun(f"cannot write {path} (disk full or not writable?): {e.strerror or e}; the checkpoints "
                      "written so far are intact: make room and rerun the same command to resume") from None


def read_jsonl(path):
    """The objects of a JSONL file written by this run ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(lines, keys):
    """Summary rows, one per key: the mean over the first and the last quarter of the logged steps that
    have the key, then its text_chart."""
    rows = []
    for key in keys:
        series = [m[key] for m in lines if key in m and m[key] == m[key]]
        if series:
            k = max(1, len(series) // 4)
            rows.append(f"  {key:<18} {sum(series[:k]) / k:.3f} -> {sum(series[-k:]) / k:.3f}  "
                        f"{text_chart(series)}")
    return rows


def end_of_step(step, run, stop, checkpoint):
    """After `step` (1-based): checkpoint(step) every run.checkpoint_every steps, after the last, and when a
    SIGTERM reached any rank (stop(), sigterm_watch); returns whether the run stops here for that SIGTERM."""
    stopping = stop()
    if stopping or step == run.steps or (run.checkpoint_every and step % run.checkpoint_every == 0):
        checkpoint(step)
    if stopping:
        print0(f"SIGTERM: checkpoint written at step {step}; rerun with resume=auto to continue")
    return stopping


def finish(policy, tokenizer, run, model_cfg, device, rank, summary):
    """The end of a run: the HF export (run.export) and, on rank 0, the printed summary(run.out_dir, run)."""
    if run.export:
        export_hf(policy, tokenizer, os.path.join(run.out_dir, "export"),
                  model_lib.resolve_dtype(model_cfg.dtype, device), rank, source=model_cfg.path)
    if rank == 0:
        print(summary(run.out_dir, run))


def side_by_side(samples, score, width=46):
    """The first and the last sample of one video (the one seen furthest apart) in two columns, each
    headed by its step and `score`; samples: [{"step", "video", "text", score, ...}]."""
    spans = {}
    for s in samples:
        first, _ = spans.get(s.get("video"), (s, s))
        spans[s.get("video")] = (first, s)
    if not spans:
        return ""
    first, last = max(spans.values(), key=lambda fl: fl[1]["step"] - fl[0]["step"])
    left, right = (textwrap.wrap(s["text"][:600].replace("\n", " "), width) or [""] for s in (first, last))
    head = [f"step {s['step']}, {score} {s[score]:.3f}" for s in (first, last)]
    out = [f"video {first.get('video')}: its first and its last sample", f"  {head[0]:<{width}} | {head[1]}"]
    out += [f"  {a:<{width}} | {b}" for a, b in itertools.zip_longest(left, right, fillvalue="")]
    return "\n".join(out)


def check_run(run, section, data_cfg):
    """The problems of a RunConfig (`section`: train or sft) beyond the ranges config.validate checks."""
    problems = []
    if run.lr_schedule not in ("constant", "cosine", "linear"):
        problems.append(f"{section}.lr_schedule must be constant, cosine or linear, got {run.lr_schedule!r}")
    if run.resume not in ("auto", "never") and not os.path.isdir(run.resume):
        problems.append(f"{section}.resume must be auto, never or a checkpoint folder; {run.resume!r} is none")
    if run.eval_every and not data_cfg.val:
        problems.append(f"{section}.eval_every={run.eval_every} needs data.val, a held-out JSONL")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group does not exist yet
    if world % run.replicate:
        problems.append(f"{section}.replicate={run.replicate} must divide the number of ranks, {world}")
    return problems


def ensure_model(model_cfg, seed=0, texts=()):
    """With model.build_tiny, build the tiny random model at model.path when rank 0 sees nothing there (only
    rank 0 reads the model folder, load_policy), its BPE tokenizer (model.tiny_vocab) learned from `texts`; the
    others wait. model.build_tiny writes into a temporary folder and renames it when complete."""
    def build():
        if model_cfg.build_tiny and not os.path.exists(model_cfg.path):
            print(f"building a tiny random {model_cfg.build_tiny} model at {model_cfg.path}", flush=True)
            model_lib.build_configured(model_cfg, seed, texts)
    on_rank0(build)


def load_heldout(path, require, world):
    """The held-out records of data.val (load_records' checks), at least one per rank."""
    val = data.load_records(path, require)
    if len(val) < world:
        raise data.DataError(f"{path}: {len(val)} held-out records for {world} ranks; every rank needs one")
    return val
