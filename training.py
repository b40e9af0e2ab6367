"""The training machinery that grpo.py and sft.py share: the command line and the process group, SIGTERM and
Ctrl-C, the run folder's lock (runfolder.py's), FSDP2 wrapping and the streamed loading of the model, AdamW
and its learning rate as a function of the step, and metric logging with the summary's charts. The
checkpoints are checkpoint.py's.

    with process_group("grpo.py", timeout, replicate) as (rank, world, device, mesh):  # FSDP, or HSDP
      with run_folder(cfg.train.out_dir, "train.out_dir", "grpo.py"):   # rank 0 locks it: one live run
        policy, tokenizer, kind = load_policy(cfg.model, device, mesh)    # fp32 master weights, bf16 compute
        optimizer = make_optimizer(policy, cfg.train)                      # cfg.train or cfg.sft: a RunConfig
        with stop_watch() as stop:                                         # SIGTERM, Ctrl-C: after the step
            for step in ...:
                set_lr(optimizer, cfg.train, step)
                ... the program's step, clip_and_step(...), log(metrics, step + 1) ...
                end_of_step(step + 1, cfg.train, stop, save)               # checkpoints; Stopped on request

Choices beyond the paper (which does not describe its training code):
- Plain `python grpo.py` (or sft.py) runs as an FSDP world of one, the same code path as torchrun.
- The policy keeps fp32 master weights and computes in bf16 on GPU (FSDP2 mixed precision): at lr 1e-6 a bf16
  weight cannot hold the update. The frozen reference holds and computes in bf16 (precision()).
- Only rank 0 reads the model folder. Every rank builds the model on the meta device and shards it, and rank 0
  streams the safetensors files into the shards one tensor at a time, so no rank ever holds a whole model at
  start-up, only its shards and one tensor in flight (load_policy).
- `replicate` > 1 (HSDP) keeps one copy of the model per group of world/replicate ranks (a node), so that the
  per-layer all-gathers stay inside the node.
- SIGTERM and a first Ctrl-C during the loop let the step finish and write a checkpoint (exit 0 and 130); a
  second Ctrl-C, or either signal outside the loop, stops at once, in one line (stop_watch, process_group).
"""
import contextlib
import errno
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import config as config_lib
import data
import judge_tasks
import model as model_lib
import runfolder


class RunError(RuntimeError):
    """An error the user can fix, raised with a message that says what to do; the programs end on it in one
    line (checkpoint.CheckpointError is one)."""


class StopRun(RunError):
    """A run that stops on purpose (too many non-finite steps, a judge that went away); the message says
    what to do."""


class Stopped(BaseException):
    """The training loop stopped on request after writing a checkpoint of its step (end_of_step): SIGTERM
    (exit_code 0: a scheduler's preemption, the job is done for now) or Ctrl-C (130, as a shell expects of an
    interrupted command). What happened is printed already. A BaseException, so that nothing which handles
    errors takes it for one."""

    def __init__(self, reason, exit_code):
        super().__init__(reason)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (loading, the export, captioning): raised at once, as Ctrl-C raises
    KeyboardInterrupt, so that the `with` blocks end and the run folder's lock is released. Exit status 0,
    as after a SIGTERM in the loop."""
    what, exit_code = "SIGTERM", 0


# What a user can fix: these end a run with their one-line message, anything else with a traceback
USER_ERRORS = (config_lib.ConfigError, data.DataError, data.VideoError, model_lib.ModelError,
               judge_tasks.JudgeError, RunError, runfolder.LockError)
WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)


def user_error(e):
    """The one-line message for an error a user can fix (USER_ERRORS, a write refused by a full or read-only
    disk, Ctrl-C or SIGTERM outside the loop), or None for a bug, which deserves its traceback."""
    if isinstance(e, USER_ERRORS):
        return str(e)
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        return runfolder.write_error(e, e.filename or "a file")
    if isinstance(e, KeyboardInterrupt):
        return (f"{getattr(e, 'what', 'Ctrl-C')}: stopped at once; the checkpoints written so far are "
                "intact: rerun the same command to resume")
    return None


def command_line(program, argv, doc):
    """A training program's command line, CONFIG.yaml [section.key=value ...] -> its Config; None after
    --help, which prints the usage and `doc`. An unknown option ends in one line (exit 2)."""
    usage = f"python {program} CONFIG.yaml [section.key=value ...]"
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {usage}\n       torchrun --nproc_per_node N {program} CONFIG.yaml "
              f"[section.key=value ...]\n\n{doc}")
        return None
    if bad := [a for a in argv if a.startswith("-")]:
        print(f"{program}: unknown option {bad[0]}; usage: {usage} (--help for more)", file=sys.stderr)
        sys.exit(2)
    path = argv[0] if argv and "=" not in argv[0] else None
    return config_lib.load_config(path, argv[1:] if path else argv)


@contextlib.contextmanager
def one_line_errors(program):
    """A bad setting ends in "config error: ..." and an error a user can fix (user_error) in
    "program: ..." on stderr (exit 1); Ctrl-C in one line (exit 130; SIGTERM outside the loop: 0); a loop
    that stopped on request (Stopped) with its exit status, its message printed already; a bug keeps its
    traceback."""
    try:
        yield
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    except Stopped as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        print(f"\n{program}: {user_error(e)}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 130))
    except Exception as e:  # noqa: BLE001 - a user's error ends in one line, a bug keeps its traceback
        if (message := user_error(e)) is None:
            raise
        sys.exit(f"{program}: {message}")


@contextlib.contextmanager
def process_group(program, timeout, replicate=1):
    """The process group of a program (init_distributed(timeout, replicate)), as (rank, world, device,
    mesh), destroyed at the end. On an error every rank ends, the others at their next
    collective or their timeout, instead of hanging: a USER_ERRORS error prints "program: message" (once per
    rank that raised it), Ctrl-C or SIGTERM one line on rank 0, anything else its traceback; with one process
    the error is raised to the caller. A loop's Stopped, which every rank raises at the same step, ends the
    group as the end of the program does. For the group's life SIGTERM raises Terminated (stop_watch defers
    it, and Ctrl-C, to the end of a training step)."""
    rank, world, device, mesh = init_distributed(timeout, replicate)
    previous = _catch_signals(rank)
    try:
        yield rank, world, device, mesh
    except Stopped:
        raise
    except BaseException as e:
        if world > 1:
            runfolder.release_all()  # os._exit skips the `with` blocks that would
            if isinstance(e, KeyboardInterrupt):
                if rank == 0:
                    print(f"{program}: {user_error(e)}", file=sys.stderr, flush=True)
                os._exit(getattr(e, "exit_code", 130))
            why = f"{program}: {message}" if (message := user_error(e)) else traceback.format_exc()
            print(f"[rank {rank}] {why}", file=sys.stderr, flush=True)
            os._exit(1)
        raise
    finally:
        _restore_signals(previous)
        end_distributed()

# ----------------------------------------------------------------------------- distributed


def init_distributed(timeout=1800.0, replicate=1):
    """Join the process group torchrun describes, or make a world of one -> (rank, world, device, mesh). A
    collective that waits longer than `timeout` seconds for a rank (one that died or hangs) raises on the
    ranks that wait. The mesh (device_mesh) is 1-D over all ranks (FSDP), or with `replicate` > 1 2-D for
    HSDP: each row of world/replicate ranks, a node or several, shards one copy of the model, and only the
    gradients cross between rows."""
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


def end_distributed():
    """Leave the process group, every rank together. Without the barrier a rank can tear down its gloo
    connections while another is still closing its own, and the other then aborts at exit ("terminate called
    without an active exception"; 4 of 70 two-rank runs here, 0 of 70 with the barrier)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_mesh(device_type, replicate=1):
    """The mesh FSDP2 shards over: 1-D over all ranks, or with `replicate` > 1 2-D (replicate, shard), whose
    rows are groups of world/replicate consecutive ranks (torchrun numbers ranks node by node)."""
    world = dist.get_world_size()
    if replicate == 1:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (replicate, world // replicate),
                            mesh_dim_names=("replicate", "shard"))


def reduce(values, op=dist.ReduceOp.SUM):
    """All-reduce a list of floats across ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.tolist()


def global_sums(counts):
    """{name: this rank's number} -> {name: the sum over every rank} (one all-reduce)."""
    return dict(zip(counts, reduce([float(x) for x in counts.values()])))


def global_means(sums):
    """{name: (this rank's total, its count)} -> {name: every rank's total / every rank's count} (one
    all-reduce; a name nobody counted gives total / 1)."""
    flat = reduce([float(x) for total, count in sums.values() for x in (total, count)])
    return {name: flat[2 * k] / max(flat[2 * k + 1], 1) for k, name in enumerate(sums)}


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
    named = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return ("ranks " if len(ranks) > 1 else "rank ") + named


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


# ----------------------------------------------------------------------------- SIGTERM and Ctrl-C

# What a stop was requested by, in rising precedence; the ranks agree on the highest any of them got
STOP_REASONS = ("", "SIGTERM", "Ctrl-C")
EXIT_CODES = {"SIGTERM": 0, "Ctrl-C": 130}
AGAIN_AFTER = 1.0  # seconds: a second Ctrl-C sooner is the same press (torchrun forwards the terminal's)
_signals = {"deferred": False, "requested": "", "at": 0.0, "rank": 0}


def _on_signal(signum, frame):
    """SIGTERM and SIGINT (Ctrl-C): outside a training loop, raise (Terminated, KeyboardInterrupt); inside
    (stop_watch), note the request for end_of_step, except a second Ctrl-C, which stops at once."""
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    state = _signals
    if not state["deferred"]:
        raise KeyboardInterrupt() if name == "Ctrl-C" else Terminated()
    if name == "Ctrl-C" and state["requested"] == "Ctrl-C":
        if time.monotonic() - state["at"] > AGAIN_AFTER:
            raise KeyboardInterrupt()
        return
    if STOP_REASONS.index(name) > STOP_REASONS.index(state["requested"]):
        state.update(requested=name, at=time.monotonic())
    if name == "Ctrl-C" and state["rank"] == 0:  # os.write: print() may be inside a write to stderr now
        os.write(2, b"\nCtrl-C: stopping after this step, with a checkpoint; Ctrl-C again stops at once, "
                    b"without one\n")


def _catch_signals(rank):
    """Install _on_signal for SIGTERM and SIGINT (main thread only) -> the handlers to restore."""
    _signals.update(deferred=False, requested="", at=0.0, rank=rank)
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, _on_signal)
    return previous


def _restore_signals(previous):
    _signals.update(deferred=False, requested="")
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_watch():
    """The training loop's block: SIGTERM and a first Ctrl-C only note a request, which end_of_step acts on
    after the step (a checkpoint, then Stopped); a second Ctrl-C stops at once. Yields stop() -> the request
    ("", "SIGTERM" or "Ctrl-C"), the same on every rank (one all-reduce); it raises RunError on every rank
    when rank 0's lock on the run folder is no longer its own (runfolder.lost)."""
    _signals.update(deferred=True, requested="")

    def stop():
        lost = runfolder.lost() if dist.get_rank() == 0 else ""
        reason, gone = reduce([float(STOP_REASONS.index(_signals["requested"])), float(bool(lost))],
                              dist.ReduceOp.MAX)
        if gone:
            raise RunError(lost or "rank 0 lost the lock on the run folder (its message says why)")
        return STOP_REASONS[int(reason)]
    try:
        yield stop
    finally:
        _signals["deferred"] = False


@contextlib.contextmanager
def run_folder(folder, key, program):
    """Rank 0 holds the lock on the run folder `folder` (runfolder.hold; `key` is the setting that names it)
    for the block, taken before anything is written there; a refusal (another live run, a folder that cannot
    be written into) ends every rank with its message."""
    with contextlib.ExitStack() as stack:
        on_rank0(lambda: stack.enter_context(runfolder.hold(folder, key, program)) and None)
        yield


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision(setting, device_type, train):
    """(dtype the parameters are held in, dtype they compute in) for model.dtype `setting` on the device that
    computes (cuda or cpu; the weights are read on the CPU, which must not decide): the policy keeps fp32
    master weights and computes in the setting's dtype (auto: bf16 on GPU, fp32 on CPU); the frozen reference,
    which no update touches, holds and computes in it."""
    compute = model_lib.resolve_dtype(setting, device_type)
    return (torch.float32 if train else compute), compute


def shard(policy, mesh, device, *, compute_dtype, offload=False):
    """Our FSDP2 wrapping over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP): each vision block, each
    decoder layer, then the root (the Policy, which owns embeddings, the final norm and lm_head). Parameters
    held in another dtype than `compute_dtype` are cast to it for compute, their gradients reduced in fp32
    (mixed precision). A Policy built on the meta device gets uninitialised shards, for load_policy to
    fill."""
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


def ensure_model(model_cfg, data_cfg, seed=0, texts=()):
    """With model.build_tiny, build the tiny random model at model.path when rank 0 sees nothing there (only
    rank 0 reads the model folder, load_policy), its BPE tokenizer (model.tiny_vocab) learned from `texts`,
    its processor configs from data_cfg; the others wait. model.build_tiny writes into a temporary folder
    and renames it when complete."""
    def build():
        if model_cfg.build_tiny and not os.path.exists(model_cfg.path):
            print(f"building a tiny random {model_cfg.build_tiny} model at {model_cfg.path}", flush=True)
            model_lib.build_configured(model_cfg, data_cfg, seed, texts)
    on_rank0(build)


def check_targets(model_cfg, target, limit, *record_sets):
    """data.check_targets for each (records, path) of `record_sets`, on rank 0 with the tokenizer of
    model.path (read on its own, before any weight loads); a record over data.max_target_tokens stops every
    rank."""
    def check():
        model_lib.check_folder(model_cfg.path, model_cfg)
        tokenizer = model_lib.load_tokenizer(model_cfg.path)
        for records, path in record_sets:
            data.check_targets(records, tokenizer, target, limit, path)
    on_rank0(check)


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
    """Fill every parameter and persistent buffer of the sharded `policy` from the checkpoint `stored`
    describes (model.stored_weights; the same on every rank), one tensor at a time: rank 0 reads it in the
    dtype it is stored in (bf16 for Qwen's releases) and broadcasts it; each rank keeps its own shard of it,
    cast to the dtype it is held in. A rank so holds, beyond its shards, one full tensor at most (the largest
    is the embedding: 1.1 GB in bf16 for the 7B models). A checkpoint that lacks a tensor, or has it in
    another shape (a config.json that does not match the weights), is refused on every rank before any is
    read."""
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
    known = {k.removeprefix("hf.") for k in policy.state_dict()}  # tied weights under both names
    unused = sorted(set(stored) - known)
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
                shard_of = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(shard_of.to_local())
                del shard_of  # it may view `full`, which must go before the next tensor is read
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


def set_lr(optimizer, run, step):
    """Set the learning rate of `step` (0-based) on every param group -> that rate. A pure function of the
    step: nothing to checkpoint, and a resume on any step sets the same rate."""
    lr = run.lr * lr_factor(step, run)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def make_optimizer(policy, run):
    """AdamW over the policy's (sharded) parameters, from a RunConfig; set_lr sets its rate each step."""
    return torch.optim.AdamW(policy.parameters(), lr=run.lr, betas=tuple(run.adam_betas),
                             weight_decay=run.weight_decay)


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

def end_of_step(step, run, stop, checkpoint):
    """After `step` (1-based): checkpoint(step) every run.checkpoint_every steps, after the last, and when a
    SIGTERM or Ctrl-C reached any rank (stop(), stop_watch); then, for that request, raises Stopped (exit 0
    after SIGTERM, 130 after Ctrl-C) on every rank."""
    reason = stop()
    if reason or step == run.steps or (run.checkpoint_every and step % run.checkpoint_every == 0):
        checkpoint(step)
    if reason:
        print0(f"{reason}: checkpoint written at step {step}; rerun the same command (resume=auto) to "
               f"continue from {run.out_dir}")
        raise Stopped(reason, EXIT_CODES[reason])
