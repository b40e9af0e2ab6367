"""Speed and memory of the rollout, the log-prob pass and the training passes against the usual approach,
host memory at start-up, and whether the demo learns: each measured in one process and printed as a table.

    python bench.py            # CPU figures; GPU figures too when CUDA is there
    python bench.py --quick    # small shapes: what tests/test_bench.py runs
    python bench.py --load     # section 5 alone: host memory at start-up under torchrun, 1, 2 and 4 ranks
    python bench.py --demo     # section 6 alone: does the demo learn, on seeds 0-4, and on its held-out test?

(How long each takes, and the figures measured so far: README.md's Performance section and
docs/benchmarks.md.)

1. Rollout. model.generate (vision tower and prefill once per prompt, KV cache copied to the G rows)
   against HF generate with num_return_sequences=G (as Video-R1 and R1-V use it; in transformers 5.24 it
   runs the vision tower once per video but the language-model prefill G times, and concatenates the cache
   on every step), on the same random Qwen2-VL model, inputs and greedy settings, for prompts of about 1K
   and 4K visual tokens, G = 8, 128 new tokens. Both ban the vision placeholder tokens (HF through
   suppress_tokens) and run without an end token, so both generate exactly 128 tokens; the outputs must be
   identical (in float32; in bf16 a near-tie can part them, so the share of equal tokens is printed).
2. Log-probs. model.selective_log_softmax (chunks of tokens) against a plain full-logits log_softmax at
   V = 151,936, T = 2048, N = 8 (no-grad, as in the old and reference passes): peak memory above the inputs
   (on CPU the kernel's resident high-water mark, reset before each) and time; the largest difference.
3. GPU only: decode tokens/s of a group of 8 after a 4K-token video prompt on a random model of
   Qwen2-VL-7B's shape in bf16, with the share of the memory-bandwidth bound (weights and KV cache read per
   step against the card's bandwidth), and the MFU of the policy's forward+backward with gradient
   checkpointing on ~4K tokens.
4. Training passes. The reference log-probs (no grad) and the update's forward+backward (gradient
   checkpointing on) of one group, per row (the prompt repeated G times, as the usual GRPO code runs them)
   against prefix-shared (model.Policy with group_size: vision tower and prompt once per group), at about
   1K and 4K visual tokens, G = 8 completions of 256 tokens: time, peak memory above the weights and
   gradients, and the largest log-prob and gradient differences. On the CPU shape in float32, and on a GPU
   on the 7B shape in bf16 (where the differences are bf16 rounding).
5. Start-up (--load, CPU): torchrun with 1, 2 and 4 ranks loads the policy and the reference (model.dtype
   auto: both float32 on CPU) of a random Qwen2-VL of about 200M parameters, saved in bf16 as Qwen's
   checkpoints are, the old way, every rank reading the whole model before sharding it, and as
   training.load_policy does, every rank building on the meta device and rank 0 streaming the safetensors
   files into the shards one tensor at a time (at 4 ranks also with model.dtype=bfloat16: the reference
   held in bf16, as on a GPU): each rank's resident high-water mark above the idle process (after imports
   and joining the group), in all and beyond the rank's own shards (on a GPU they are in GPU memory, not
   the host's), and the node's total. On a GPU (without --load): the reference's log-prob pass held in bf16
   against float32, as it ran before training.precision.
7. The whole step (--step alone; also at the end of the CPU sections): one GRPO step on one video (rollout
   sampled at temperature 1 with 16 end tokens, so lengths differ; format + Tscore + Escore + CNscore;
   reference pass; update's forward+backward), ours (model.generate sending each completion's judge questions
   as it ends, prefix-shared passes, the rewards awaited after the reference pass) against the usual (HF
   generate with num_return_sequences=G, compute_rewards after it, per-row passes), at the sizes' visual
   tokens, G = 8, completions of at most 256 tokens, with loopback judge servers (tests/judge_server.py)
   answering each request after 1 s, 4 or 16 at once, and with the lexical judge: seconds per phase,
   total, the judge's last reply after the last token and the least any schedule could give it
   (least_last_reply), peak memory.
6. The demo (--demo): `python grpo.py demo.yaml seed=S`, then `python evaluate.py demo.yaml`, from
   nothing (tiny model built, warm start, GRPO, both models scored on the world's held-out test) for
   S = 0..4, each in its own folder: the wall time of each command, the mean reward (0..3) and its parts
   over the first and last quarter of the GRPO steps (from metrics.jsonl, demo_learning), and the held-out
   event F1 and subjects named before and after GRPO (demo_held_out), against the demo's targets: a rise of
   at least 0.3 with Tscore or Escore rising too, under 3 minutes on 2 CPU cores.

The rollout prompts use grids whose frame count is at most their merged side: there transformers' own
M-RoPE positions for the text after the video (which ignore the temporal axis, see model.rope_positions)
coincide with Qwen's rule that model.py follows, so the two generators see the same positions.
"""
import argparse
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import torch

import data
import model as model_lib

# Qwen2-VL's special tokens as offsets from <|endoftext|>, 151643 in its tokenizer; a small vocabulary holds
# them at its end
SPECIAL = dict(endoftext=0, im_start=1, vision_start=9, vision_end=10, image_pad=12, video_pad=13)
# Text: hidden, layers, heads, kv heads, MLP; vision: depth, width, heads; vocab. The CPU shape keeps the
# 7B's proportions where they decide the timing: its lm_head holds 9% of the decoder's weights (7B: 8%), and
# its vision tower costs 0.53x the decoder's prefill per video (7B: 0.44x; 4 patches per token,
# 4 * vision / decoder weights). With Qwen's 151,936 tokens at hidden 512 the lm_head would be 7x the
# decoder and most of a decode step; that shape's 4K row is printed too ("cpu-qwen-vocab").
SHAPES = {
    "cpu": dict(hidden=512, layers=4, heads=8, kv_heads=2, mlp=1376, depth=4, width=128, vision_heads=2,
                vocab=2048),
    "cpu-qwen-vocab": dict(hidden=512, layers=4, heads=8, kv_heads=2, mlp=1376, depth=4, width=128,
                           vision_heads=2, vocab=151936),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, depth=2, width=32, vision_heads=2,
                  vocab=2048),
    # section 5's: about 200M parameters in the 7B's proportions (the lm_head 8% of the whole)
    "load": dict(hidden=1024, layers=12, heads=16, kv_heads=4, mlp=2816, depth=8, width=512, vision_heads=8,
                 vocab=16384),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944, depth=32, width=1280, vision_heads=16,
               vocab=152064),  # Qwen2-VL-7B-Instruct's config.json
}
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s of HBM (SXM cards)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}   # dense bf16 FLOP/s


def special_ids(vocab):
    """{name: id} of the special tokens (SPECIAL) in a vocabulary of `vocab` tokens."""
    base = 151643 if vocab >= 151643 + 16 else vocab - 16
    return {name: base + offset for name, offset in SPECIAL.items()}


def random_model(shape, dtype, device, seed=0, std=None):
    """A random Qwen2VLForConditionalGeneration of `shape` (SHAPES) in eval mode. Init std 0.2 on the small
    shapes unless `std` says otherwise, as model.build_tiny: with the usual 0.02 the logits are near-uniform
    and greedy argmaxes can tie."""
    from transformers import AutoConfig
    s = SHAPES[shape]
    std = std or (0.02 if shape == "7b" else 0.2)
    ids = special_ids(s["vocab"])
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], max_position_embeddings=32768, initializer_range=std,
                bos_token_id=ids["endoftext"], eos_token_id=ids["endoftext"], pad_token_id=ids["endoftext"],
                # Qwen2-VL's sections of the rotary frequencies, scaled to this head size
                # (7B: 16, 24, 24 of 64)
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": _sections(s["hidden"] // s["heads"] // 2)})
    vision = dict(depth=s["depth"], embed_dim=s["width"], hidden_size=s["hidden"],
                  num_heads=s["vision_heads"], mlp_ratio=4, initializer_range=std)
    config = AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision,
                                  tie_word_embeddings=False, initializer_range=std,
                                  image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                                  vision_start_token_id=ids["vision_start"],
                                  vision_end_token_id=ids["vision_end"])
    torch.manual_seed(seed)
    with torch.device(device):
        hf = model_lib._model_class("qwen2_vl")._from_config(config, dtype=dtype)
    return hf.eval().requires_grad_(False)


def _sections(half):
    """Split `half` rotary frequencies over (temporal, height, width) as Qwen2-VL's 16/24/24 of 64 does."""
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def video_prompt(hf, visual_tokens, device, seed=0):
    """A collated batch of one prompt: system-like text, <|vision_start|>, `visual_tokens` video tokens,
    <|vision_end|>, an instruction, with random patches. The grid is t frames of side x side merged tokens,
    side 16 (8 below 256 tokens) and t <= side (see the module docstring)."""
    side = 16 if visual_tokens >= 256 else 8
    t = max(1, visual_tokens // side ** 2)
    merge, patch = hf.config.vision_config.spatial_merge_size, hf.config.vision_config.patch_size
    tps = hf.config.vision_config.temporal_patch_size
    g = torch.Generator().manual_seed(seed)
    special = special_ids(hf.config.text_config.vocab_size)
    def text(n):  # n ordinary tokens
        return torch.randint(0, special["endoftext"], (n,), generator=g)
    n_video = t * side * side
    ids = torch.cat([torch.tensor([special["im_start"]]), text(20), torch.tensor([special["vision_start"]]),
                     torch.full((n_video,), special["video_pad"]), torch.tensor([special["vision_end"]]),
                     text(40)])[None]                                                                # (1, L)
    P = n_video * merge * merge                                                     # patches
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": (2 * (ids == special["video_pad"])).to(device),
            "pixel_values_videos": torch.randn(P, 3 * tps * patch * patch, generator=g).to(device, hf.dtype),
            "video_grid_thw": torch.tensor([[t, side * merge, side * merge]], device=device)}


def timed(fn, device):
    """(seconds, fn()) with the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------- 1. rollout

def ours(hf, batch, G, new_tokens):
    """model.generate, greedy, no end token: (N, new_tokens) ids."""
    rollout = model_lib.generate(hf, batch, G, new_tokens, temperature=0, top_p=1.0, eos_ids=(),
                                 pad_id=hf.config.text_config.pad_token_id)
    return rollout.ids


def usual(hf, batch, G, new_tokens):
    """HF generate with num_return_sequences=G, the same banned tokens, no end token: (N, new_tokens). HF
    refuses greedy decoding with G > 1 returns, so it samples with top_k=1, which keeps only the argmax:
    greedy."""
    from transformers import GenerationConfig
    settings = GenerationConfig(do_sample=True, top_k=1, top_p=1.0, temperature=1.0, num_return_sequences=G,
                                max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                                pad_token_id=hf.config.text_config.pad_token_id,
                                suppress_tokens=model_lib.vision_token_ids(hf.config))
    out = hf.generate(**batch, generation_config=settings)
    return out[:, batch["input_ids"].shape[1]:]


def bench_rollout(hf, visual_tokens, G, new_tokens):
    """Both generators on one prompt: their seconds, generated tokens/s, the ratio, and the share of their
    output tokens that agree (1.0: identical)."""
    device = hf.device
    batch = video_prompt(hf, visual_tokens, device)
    for fn in (ours, usual):  # warm up kernels and allocators on a short run
        fn(hf, video_prompt(hf, 64, device, seed=1), 2, 2)
    t_ours, ids_ours = timed(lambda: ours(hf, batch, G, new_tokens), device)
    t_usual, ids_usual = timed(lambda: usual(hf, batch, G, new_tokens), device)
    tokens = G * new_tokens
    same = (float((ids_ours == ids_usual.to(ids_ours)).float().mean())
            if ids_ours.shape == ids_usual.shape else 0.0)
    return {"visual_tokens": int((batch["mm_token_type_ids"] == 2).sum()),
            "prompt": batch["input_ids"].shape[1], "ours_s": t_ours, "usual_s": t_usual,
            "ours_tok_s": tokens / t_ours, "usual_tok_s": tokens / t_usual, "speedup": t_usual / t_ours,
            "same": same}


# ----------------------------------------------------------------------------- 2. log-probs

def logprob_inputs(V, T, N, H, device, seed=0):
    """hidden (N*T, H), lm_head weight (V, H), targets (N*T,): the completion tokens of N rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N * T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(device)
    return hidden, weight, torch.randint(0, V, (N * T,), generator=g).to(device)


def plain_logp(hidden, weight, targets):
    """What most GRPO code does: the full (N*T, V) float32 logits, log_softmax, gather."""
    return torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)


def chunked_logp(hidden, weight, targets):
    return model_lib.selective_log_softmax(hidden, weight, targets, 1.0)[0]


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measured(fn, device):
    """(seconds, peak bytes allocated while fn ran above what was allocated before, fn()). CUDA: the caching
    allocator's peak. CPU: Linux's resident-set high-water mark (VmHWM), reset just before (clear_refs 5);
    torch's CPU allocator returns large blocks to the system at once, so this is the tensors' peak. Blocks
    below glibc's mmap threshold (which grows to 32 MB once such blocks are freed) stay in its heap when
    freed, and a run that fits in them would raise no high-water mark: malloc_trim hands them back
    first."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds, out = timed(fn, device)
        return seconds, torch.cuda.max_memory_allocated() - base, out
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    seconds, out = timed(fn, device)
    return seconds, (_status_kb("VmHWM") - base) * 1024, out


def bench_logprobs(V, T, N, H, device):
    """Peak memory above the inputs and seconds of both variants, their ratio, and their largest
    difference."""
    hidden, weight, targets = logprob_inputs(V, T, N, H, device)
    runs = {}
    with torch.no_grad():
        for name, fn in (("plain", plain_logp), ("chunked", chunked_logp)):
            runs[name] = measured(lambda: fn(hidden, weight, targets), device)
    (plain_s, plain_b, plain), (chunked_s, chunked_b, chunked) = runs["plain"], runs["chunked"]
    return {"plain_gb": plain_b / 2**30, "chunked_gb": chunked_b / 2**30,
            "memory_ratio": chunked_b / plain_b, "plain_s": plain_s, "chunked_s": chunked_s,
            "max_diff": float((plain - chunked).abs().max())}


# ----------------------------------------------------------------------------- 3. GPU: decode and MFU

def text_weight_bytes(hf):
    """Bytes of the decoder read on every decode step: its layers, final norm and lm_head (the embedding is
    a lookup of n rows, the vision tower does not run)."""
    skip = {id(p) for p in hf.model.language_model.embed_tokens.parameters()}
    skip |= {id(p) for p in hf.model.visual.parameters()}
    return sum(p.numel() * p.element_size() for p in hf.parameters() if id(p) not in skip)


def bench_decode(hf, visual_tokens, G, new_tokens, bandwidth):
    """Decode tokens/s of G rows after one video prompt, and the share of the bandwidth bound: the decode
    time is a run of 1 + new_tokens tokens minus a run of 1 (the prefill); a step reads the decoder's
    weights and the G rows' KV cache (at the mean length over the decode)."""
    device = hf.device
    batch = video_prompt(hf, visual_tokens, device)
    ours(hf, batch, G, 2)
    t_prefill, _ = timed(lambda: ours(hf, batch, G, 1), device)
    t_all, _ = timed(lambda: ours(hf, batch, G, 1 + new_tokens), device)
    step = (t_all - t_prefill) / new_tokens
    c = hf.config.text_config
    head_dim = c.hidden_size // c.num_attention_heads
    length = batch["input_ids"].shape[1] + new_tokens / 2
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * length * G * hf.dtype.itemsize
    bound = (text_weight_bytes(hf) + kv_bytes) / bandwidth if bandwidth else float("nan")
    return {"visual_tokens": visual_tokens, "prefill_s": t_prefill, "step_ms": step * 1e3,
            "tok_s": G / step, "bandwidth_share": bound / step}


def bench_mfu(hf, visual_tokens, completion, peak_flops):
    """Forward+backward of model.Policy with gradient checkpointing on one prompt of `visual_tokens` video
    tokens and a `completion`-token answer: seconds and MFU against 6 * params * tokens plus causal attention
    (the usual model-FLOPs count, lm_head on the answer tokens only as Policy runs it; checkpointing's
    recomputation is not counted as useful work)."""
    device = hf.device
    batch = video_prompt(hf, visual_tokens, device)
    hf.train().requires_grad_(True)
    hf.activation_checkpointing_enable()
    policy = model_lib.Policy(hf)
    ordinary = hf.config.text_config.pad_token_id  # the ids below it are ordinary tokens
    ids = torch.randint(0, ordinary, (1, completion), device=device)
    lengths = torch.tensor([completion], device=device)

    def step():
        logp, _ = policy(batch, ids, lengths, 1.0)
        logp.sum().backward()
        hf.zero_grad(set_to_none=True)
    step()
    seconds, _ = timed(step, device)
    c = hf.config.text_config
    tokens = batch["input_ids"].shape[1] + completion
    layer_params = sum(p.numel() for p in hf.model.language_model.layers.parameters())
    vision_params = sum(p.numel() for p in hf.model.visual.parameters())
    patches = int(batch["video_grid_thw"].prod())
    decoder = layer_params * tokens + c.num_hidden_layers * c.hidden_size * tokens ** 2     # causal
    lm_head = hf.lm_head.weight.numel() * completion                                      # on the answer
    flops = 6 * (decoder + lm_head + vision_params * patches)
    hf.activation_checkpointing_disable()
    hf.eval().requires_grad_(False)
    return {"tokens": tokens, "seconds": seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak_flops if peak_flops else float("nan")}


def card(table):
    """The table's figure for this GPU by name (H200, H100, A100), or None."""
    name = torch.cuda.get_device_name()
    return next((v for k, v in table.items() if k in name), None)


# ----------------------------------------------------------------------------- 4. training passes

def training_inputs(hf, visual_tokens, G, completion, seed=0):
    """One video prompt (video_prompt), G completions of `completion` ordinary tokens and an advantage per
    completion: (batch, ids (G, T), lengths (G,), adv (G,))."""
    device = hf.device
    g = torch.Generator().manual_seed(seed)
    ordinary = special_ids(hf.config.text_config.vocab_size)["endoftext"]  # the ids below it
    ids = torch.randint(0, ordinary, (G, completion), generator=g)
    adv = torch.randn(G, generator=g)
    return (video_prompt(hf, visual_tokens, device, seed), ids.to(device),
            torch.full((G,), completion, device=device), adv.to(device))


def training_pass(policy, inputs, shared, update):
    """Log-probs (G, T) of one group: per row (the prompt repeated G times, data.repeat_batch) or
    prefix-shared (model.Policy with group_size); update=True also runs the backward of a token-mean loss
    -sum_it A_i * logp_it / tokens, the shape of GRPO's (at ratio 1)."""
    batch, ids, lengths, adv = inputs
    G = ids.shape[0]
    if shared:
        logp, _ = policy(batch, ids, lengths, 1.0, group_size=G)
    else:
        logp, _ = policy(data.repeat_batch(batch, G), ids, lengths, 1.0)
    if update:
        (-(adv[:, None] * logp).sum() / lengths.sum()).backward()
    return logp.detach()


def largest_relative_difference(grads, reference):
    """The largest |g - g_ref| over every gradient entry, over the largest |g_ref|: the difference on the
    gradient's own scale. (Relative to itself, a vision LayerNorm bias's gradient, a sum over every patch
    with much cancellation, shows float32 rounding an order of magnitude larger, in both paths against
    float64.)"""
    largest = max(float(r.abs().max()) for r in reference)
    return max(float((g - r).abs().max()) for g, r in zip(grads, reference)) / largest


def bench_training(hf, visual_tokens, G, completion):
    """The reference log-probs (eval mode, no grad) and the update's forward+backward (train mode, gradient
    checkpointing on, as grpo.py runs them) of one group, per row against prefix-shared: seconds, peak
    memory above what was allocated before (the weights and, in the update, their gradients: the
    activations), the largest log-prob difference and the largest relative gradient difference. The
    prefix-shared path runs first, so that memory the allocator keeps from one run can only flatter the
    per-row figure."""
    policy = model_lib.Policy(hf)
    inputs = training_inputs(hf, visual_tokens, G, completion)
    L = inputs[0]["input_ids"].shape[1]
    out = {"visual_tokens": visual_tokens, "per_row_tokens": G * (L + completion),
           # a completion's last token is not fed (model.pack_groups)
           "shared_tokens": L + G * (completion - 1)}
    for name, update in (("reference", False), ("update", True)):
        hf.train(update).requires_grad_(update)
        if update:
            hf.activation_checkpointing_enable()
        with torch.set_grad_enabled(update):
            runs = {shared: measured_pass(hf, policy, inputs, shared, update) for shared in (True, False)}
        out[name] = pass_figures(runs[False], runs[True], update)
    hf.activation_checkpointing_disable()
    hf.zero_grad(set_to_none=True)
    hf.eval().requires_grad_(False)
    return out


def measured_pass(hf, policy, inputs, shared, update):
    """One training_pass after a warm-up on a small group: (seconds, peak bytes, log-probs, the gradients
    when update)."""
    training_pass(policy, training_inputs(hf, 64, 2, 4, seed=1), shared, update)   # warm-up; grads
    hf.zero_grad(set_to_none=False)                           # stay allocated: not counted as peak
    seconds, peak, logp = measured(lambda: training_pass(policy, inputs, shared, update), hf.device)
    grads = [p.grad.clone() for p in hf.parameters()] if update else None
    return seconds, peak, logp, grads


def pass_figures(per_row, shared, update):
    """bench_training's figures of one pass from the two measured_pass results."""
    (row_s, row_b, row_logp, row_grads), (shared_s, shared_b, shared_logp, shared_grads) = per_row, shared
    return {"per_row_s": row_s, "shared_s": shared_s, "per_row_gb": row_b / 2**30,
            "shared_gb": shared_b / 2**30,
            # below a MiB the resident-set measure (CPU) sees nothing: no ratio
            "memory_ratio": row_b / shared_b if shared_b >= 2**20 else math.nan,
            "logp_diff": float((shared_logp - row_logp).abs().max()),
            "grad_diff": largest_relative_difference(shared_grads, row_grads) if update else math.nan}


# ------------------------------------------------------------------ 5. start-up memory, the reference's dtype

def load_every_rank(model_cfg, device, mesh, train):
    """The loading training.load_policy replaced: every rank reads the whole model in the held dtype, then
    shards it."""
    import training
    held, compute = training.precision(model_cfg.dtype, device.type, train)
    hf, _ = model_lib.load_model(model_cfg.path, model_cfg, "cpu", train=train, dtype=held)
    return training.shard(model_lib.Policy(hf), mesh, device, compute_dtype=compute)


def load_worker(folder, way, out):
    """Under torchrun: load the policy and the reference at `folder` `way` ("every-rank"; "rank0" for
    training.load_policy; "rank0-bf16" for it with model.dtype=bfloat16, the reference held in bf16 as on
    a GPU); rank 0 writes every rank's resident high-water mark above its idle size and the bytes of its
    shards to `out`."""
    import config
    import training
    rank, world, device, mesh = training.init_distributed()
    cfg = config.ModelConfig(path=folder, gradient_checkpointing=False,
                             dtype="bfloat16" if way == "rank0-bf16" else "auto")
    # transformers' model code imported: the idle process is ready to load
    model_lib._model_class("qwen2_vl")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    idle = _status_kb("VmRSS")
    if way.startswith("rank0"):
        models = [training.load_policy(cfg, device, mesh, train=train)[0]
                  for train in (True, False)]
    else:
        models = [load_every_rank(cfg, device, mesh, train) for train in (True, False)]
    shards = sum(p.to_local().numel() * p.element_size()
                 for m in models for p in m.parameters())
    peaks = training.gather([(_status_kb("VmHWM") - idle) * 1024, shards])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(peaks, f)


def bench_load(ranks=(1, 2, 4)):
    """Per-rank and node-total peaks of both ways of loading, for each number of ranks (section 5)."""
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        hf = random_model("load", torch.bfloat16, torch.device("cpu"), std=0.02)
        hf.save_pretrained(folder)
        model_lib.build_tokenizer(folder)
        size = sum(p.numel() for p in hf.parameters()) * 4  # in float32
        del hf
        for n in ranks:
            for way in ("every-rank", "rank0") + (("rank0-bf16",) if n == max(ranks) else ()):
                peaks, shards = load_peaks(folder, n, way)
                other = max(range(1, n), key=lambda r: peaks[r], default=None)
                rows.append({"ranks": n, "way": way, "rank0": peaks[0], "rank0_shards": shards[0],
                             "others": peaks[other] if other else 0,
                             "others_shards": shards[other] if other else 0,
                             "total": sum(peaks), "total_shards": sum(shards), "fp32_model": size})
    return rows


def load_peaks(folder, n, way):
    """load_worker on `n` ranks under torchrun: (each rank's peak bytes, each rank's shard bytes)."""
    out = f"{folder}/peaks.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={n}", __file__, "--load-worker", folder, way, out],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{way} on {n} ranks failed:\n{run.stderr[-3000:]}")
    with open(out) as f:
        peaks, shards = zip(*json.load(f))
    return peaks, shards


def print_load(rows):
    size = rows[0]["fp32_model"]
    print(f"\nStart-up host memory, CPU: policy + reference (float32) of a random Qwen2-VL of "
          f"{size / 4e6:.0f}M parameters ({size / 2**30:.2f} GiB in float32, stored in bf16); peak resident "
          "memory above the idle process in GiB and x the float32 model, in all and beyond the rank's own "
          "shards (which a GPU holds in its own memory, not the host's)")
    print(f"{'ranks':>5} {'loading':>24} {'rank 0':>13} {'beyond shards':>13} {'others (max)':>13} "
          f"{'beyond shards':>13} {'node total':>13} {'beyond shards':>13}")
    names = {"every-rank": "every rank reads (old)", "rank0": "rank 0 streams (now)",
             "rank0-bf16": "now, reference in bf16"}
    for r in rows:
        cells = []
        for peak, shards in ((r["rank0"], r["rank0_shards"]), (r["others"], r["others_shards"]),
                             (r["total"], r["total_shards"])):
            cells += [f"{v / 2**30:4.2f} ({v / size:4.2f}x)" for v in (peak, peak - shards)]
        if r["ranks"] == 1:
            cells[2:4] = ["-", "-"]
        print(f"{r['ranks']:>5} {names[r['way']]:>24} " + " ".join(f"{c:>13}" for c in cells))


def bench_reference_dtype(hf, visual_tokens, completion):
    """Seconds of the reference's log-prob pass (model.Policy, no grad) on one video prompt of
    `visual_tokens` and a `completion`-token answer, with the model held in bf16 and in float32."""
    device = hf.device
    policy = model_lib.Policy(hf)
    ordinary = hf.config.text_config.pad_token_id  # the ids below it are ordinary tokens
    ids = torch.randint(0, ordinary, (1, completion), device=device)
    lengths = torch.tensor([completion], device=device)
    seconds = {}
    for dtype in (torch.bfloat16, torch.float32):
        hf.to(dtype)
        batch = video_prompt(hf, visual_tokens, device)
        with torch.no_grad():
            policy(batch, ids, lengths, 1.0)
            seconds[dtype], _ = timed(lambda: policy(batch, ids, lengths, 1.0), device)
    hf.to(torch.bfloat16)
    return {"bf16_s": seconds[torch.bfloat16], "fp32_s": seconds[torch.float32],
            "speedup": seconds[torch.float32] / seconds[torch.bfloat16]}


# ----------------------------------------------------------------------------- 7. the whole step

CAPTION = "A man walks a dog in the park. The dog runs to a red ball. The man throws the ball."
WORDS = ("man", "dog", "walks", "runs", "red", "ball", "park", "throws", "the", "a", "jumps", "car")


def step_texts(ids, lengths):
    """Judgeable outputs for completion rows (the random model has no tokenizer): a well-formed output whose
    answer has a word per token, so the judge sees answers as long and as varied as the completions."""
    return ['<think>{"subjects": []}</think><answer>' + " ".join(WORDS[t % len(WORDS)] for t in row[:n])
            + "</answer>" for row, n in zip(ids.tolist(), lengths.tolist())]


def step_lengths(ids, eos):
    """(N,) completion lengths of generated rows: up to and with the first end token, else all of them."""
    hit = torch.isin(ids, eos)
    return torch.where(hit.any(1), hit.int().argmax(1) + 1, ids.shape[1])


def whole_step(hf, batch, G, new_tokens, judge, ours_way):
    """One GRPO step on one video: rollout (sampled, ending on any of 16 end tokens, so lengths differ), the
    rewards (format + Tscore + Escore + CNscore through `judge`), the reference pass, the update's
    forward+backward. Ours: model.generate with each completion's judge questions sent as it ends, then the
    prefix-shared passes, the rewards awaited only before the advantage. The usual: HF generate with
    num_return_sequences=G, compute_rewards after it, per-row passes (the video copied G times).
    -> seconds per phase, the judge's time after the last token, the mean completion length."""
    import grpo
    import rewards
    from config import RewardConfig
    from types import SimpleNamespace
    record = SimpleNamespace(caption=CAPTION, events=None, subjects=[])
    cfg = RewardConfig(cn_weight=1.0)
    ordinary = special_ids(hf.config.text_config.vocab_size)["endoftext"]
    eos = torch.arange(ordinary - 16, ordinary, device=hf.device)
    policy, times, ends = model_lib.Policy(hf), {}, {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if ours_way:
        pending = rewards.start_rewards([record] * G, cfg, judge)

        def on_end(roll, rows):
            for i, text in zip(rows, step_texts(roll.ids[rows], roll.lengths[rows])):
                rewards.row_ended(pending, i, text)
                answer = pending.parsed[i].answer
                if answer and answer not in ends:  # an answer met before asks nothing new
                    ends[answer] = time.perf_counter() - t0
        roll = model_lib.generate(hf, batch, G, new_tokens, 1.0, 1.0, eos.tolist(),
                                  hf.config.text_config.pad_token_id, on_end=on_end)
        ids, lengths = roll.ids, roll.lengths
    else:
        ids = usual_sampled(hf, batch, G, new_tokens, eos)
        lengths = step_lengths(ids, eos)
    end = time.perf_counter()
    times["rollout"] = end - t0
    if not ours_way:
        reward = rewards.compute_rewards(step_texts(ids, lengths), [record] * G, cfg, judge)[0]
        times["judge_wait"] = time.perf_counter() - end
        after_last = times["judge_wait"]
    T = int(lengths.max())
    inputs = (batch, ids[:, :T], lengths, None)
    with torch.no_grad():
        t0 = time.perf_counter()
        training_pass(policy, inputs, ours_way, update=False)
        times["reference"] = time.perf_counter() - t0
    if ours_way:
        t0 = time.perf_counter()
        reward, _, stats = rewards.collect_rewards(pending)
        times["judge_wait"] = time.perf_counter() - t0  # what the step waits, after the reference pass
        after_last = max(0.0, (stats["last_reply"] or end) - end)
    adv = grpo.group_advantages(torch.nan_to_num(reward)[None]).flatten().to(hf.device)
    hf.train().requires_grad_(True)
    hf.activation_checkpointing_enable()
    t0 = time.perf_counter()
    training_pass(policy, (batch, ids[:, :T], lengths, adv), ours_way, update=True)
    times["update"] = time.perf_counter() - t0
    hf.activation_checkpointing_disable()
    hf.zero_grad(set_to_none=True)
    hf.eval().requires_grad_(False)
    return {**times, "total": sum(times.values()), "after_last": after_last,
            "length": float(lengths.float().mean()), "answer_ends": sorted(ends.values())}


def least_last_reply(ends, latency, capacity):
    """The earliest the judge can give whole_step's last reply, by any schedule, in seconds from the step's
    start: the reference's extraction may be asked at 0, each distinct answer's CN rating when its row ends
    (`ends`) and its entailment then too, but not before the extraction's reply. The judge answers each
    request `latency` s after it takes it, `capacity` at a time. With every request taking the same time,
    taking them in the order they may be asked, each as soon as a slot is free, gives the least makespan."""
    releases = sorted([0.0, *ends, *(max(e, latency) for e in ends)])
    free = [0.0] * capacity                            # when each of the judge's slots is next free
    for r in releases:
        k = free.index(min(free))
        free[k] = max(r, free[k]) + latency
    return max(free)


def usual_sampled(hf, batch, G, new_tokens, eos):
    """HF generate with num_return_sequences=G, sampling at temperature 1, vision tokens banned: (G, T)."""
    from transformers import GenerationConfig
    settings = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, num_return_sequences=G,
                                max_new_tokens=new_tokens, eos_token_id=eos.tolist(),
                                pad_token_id=hf.config.text_config.pad_token_id,
                                suppress_tokens=model_lib.vision_token_ids(hf.config))
    return hf.generate(**batch, generation_config=settings)[:, batch["input_ids"].shape[1]:]


def bench_whole_step(hf, visual, G, new_tokens, latency, capacities=(4, 16)):
    """whole_step both ways, with loopback judge servers answering each request after `latency` s, each of
    `capacities` requests at once (4: fewer than a step asks; 16: a step's questions at once), and with
    the lexical judge: rows of figures, peak memory included."""
    import judge as judge_lib
    from config import JudgeConfig
    from tests.judge_server import JudgeServer
    servers = {c: JudgeServer(latency=latency, capacity=c).start() for c in capacities}
    judges = {f"HTTP, {latency:g} s, {c} at once": (judge_lib.HTTPJudge(JudgeConfig(
                  url=server.url, model=server.model, timeout=600, concurrency=64, cache_dir="",
                  health_check=False)), c) for c, server in servers.items()}
    judges["lexical"] = (judge_lib.LexicalJudge(), None)
    rows = []
    try:
        for visual_tokens in visual:
            batch = video_prompt(hf, visual_tokens, hf.device)
            for name, (judge, capacity) in judges.items():
                for ours_way in (True, False):
                    _, peak, r = measured(lambda: whole_step(hf, batch, G, new_tokens, judge, ours_way),
                                          hf.device)
                    least = None  # the least "after last" any schedule can give ours' completions
                    if ours_way and capacity:
                        least = max(0.0, least_last_reply(r["answer_ends"], latency, capacity) - r["rollout"])
                    rows.append({"visual_tokens": visual_tokens, "judge": name,
                                 "way": "ours" if ours_way else "usual", "peak_gb": peak / 2**30,
                                 "least_after_last": least, **r})
    finally:
        for server in servers.values():
            server.stop()
    return rows


def print_whole_step(rows, G, new_tokens, label):
    print(f"\nWhole GRPO step, {label}: one video, G = {G} sampled completions of at most {new_tokens} "
          "tokens; judge wait: what the step waits for rewards (ours: after the reference pass); after "
          "last: the judge's last reply after the rollout's last token; least: the least \"after last\" that "
          "any schedule of the same questions could give, with the same completions' end times and the "
          "judge's latency and capacity (bench.least_last_reply); peak memory above the start")
    print(f"{'visual tokens':>13} {'judge':>24} {'way':>5} {'rollout':>8} {'judge wait':>10} "
          f"{'reference':>9} {'update':>8} {'total':>8} {'after last':>10} {'least':>6} {'mean len':>8} "
          f"{'GiB':>6} {'speed-up':>8}")
    for r in rows:
        usual = next(u for u in rows if u["way"] == "usual" and u["judge"] == r["judge"]
                     and u["visual_tokens"] == r["visual_tokens"])
        least = "-" if r["least_after_last"] is None else f"{r['least_after_last']:.2f}"
        print(f"{r['visual_tokens']:>13} {r['judge']:>24} {r['way']:>5} {r['rollout']:>8.2f} "
              f"{r['judge_wait']:>10.2f} {r['reference']:>9.2f} {r['update']:>8.2f} {r['total']:>8.2f} "
              f"{r['after_last']:>10.2f} {least:>6} "
              f"{r['length']:>8.1f} {r['peak_gb']:>6.2f} {usual['total'] / r['total']:>7.2f}x")


# ----------------------------------------------------------------------------- report

def print_rollout(rows, G, new_tokens, label):
    print(f"\nRollout, {label}: G = {G}, {new_tokens} new tokens each, greedy")
    print(f"{'visual tokens':>13} {'prompt':>7} {'ours s':>8} {'HF gen. s':>10} {'ours tok/s':>11} "
          f"{'HF tok/s':>9} {'speed-up':>9}  outputs")
    for r in rows:
        print(f"{r['visual_tokens']:>13} {r['prompt']:>7} {r['ours_s']:>8.2f} {r['usual_s']:>10.2f} "
              f"{r['ours_tok_s']:>11.1f} {r['usual_tok_s']:>9.1f} {r['speedup']:>8.2f}x  "
              + ("identical" if r["same"] == 1.0 else f"{r['same']:.1%} of tokens equal"))


def print_logprobs(r, V, T, N, H, label):
    print(f"\nLog-probs, {label}: V = {V}, T = {T}, N = {N}, H = {H}, no grad; peak memory above the inputs")
    print(f"  plain full-logits log_softmax  {r['plain_gb']:7.2f} GiB  {r['plain_s']:6.2f} s")
    print(f"  chunked (model.py)             {r['chunked_gb']:7.2f} GiB  {r['chunked_s']:6.2f} s")
    print(f"  memory ratio {r['memory_ratio']:.3f}, largest difference {r['max_diff']:.2e}")


def print_training(rows, G, completion, label):
    print(f"\nTraining passes, {label}: one video, G = {G} completions of {completion} tokens; peak memory "
          f"above the weights and gradients; log-prob difference absolute, gradient difference over the "
          f"largest gradient")
    print(f"{'visual tokens':>13} {'pass':>9} {'tokens fed':>16} {'per-row s':>10} {'shared s':>9} "
          f"{'speed-up':>9} {'per-row GiB':>12} {'shared GiB':>11} {'less memory':>12} {'logp diff':>10} "
          f"{'grad diff':>10}")
    for r in rows:
        for name in ("reference", "update"):
            p = r[name]
            grad_diff = f"{p['grad_diff']:>10.1e}" if name == "update" else f"{'-':>10}"
            print(f"{r['visual_tokens']:>13} {name:>9} {r['per_row_tokens']:>7} / {r['shared_tokens']:<6} "
                  f"{p['per_row_s']:>10.2f} {p['shared_s']:>9.2f} {p['per_row_s'] / p['shared_s']:>8.2f}x "
                  f"{p['per_row_gb']:>12.3f} {p['shared_gb']:>11.3f} {p['memory_ratio']:>11.2f}x "
                  f"{p['logp_diff']:>10.1e} " + grad_diff)


DEMO_PARTS = {"reward": "reward", "format": "reward_format", "think": "reward_think", "event": "reward_event"}


def demo_learning(metrics_path):
    """The demo's learning figures from a run's metrics.jsonl: the mean of the reward (0..3) and of its
    parts (format, Tscore, Escore) over the first and the last quarter of the logged steps, and the rise
    of the reward between them."""
    with open(metrics_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    k = max(1, len(lines) // 4)

    def mean(key, part):
        return sum(m[key] for m in part) / len(part)
    figures = {"steps": len(lines)}
    for name, key in DEMO_PARTS.items():
        if key in lines[0]:
            figures[f"{name}_first"], figures[f"{name}_last"] = mean(key, lines[:k]), mean(key, lines[-k:])
    return {**figures, "rise": figures["reward_last"] - figures["reward_first"]}


def demo_held_out(eval_dir):
    """Event F1 and the share of subjects named (colour and shape), before (eval_dir/baseline, the warm
    start) and after GRPO (eval_dir), from the results.json files `python evaluate.py demo.yaml` writes."""
    figures = {}
    for when, folder in (("before", os.path.join(eval_dir, "baseline")), ("after", eval_dir)):
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        figures[f"f1_{when}"] = results["metrics"]["events"]["overall"]["f1"]
        figures[f"named_{when}"] = results["structure"]["named"]
    return figures


def bench_demo(seeds=(0, 1, 2, 3, 4), root="runs/bench-demo"):
    """Section 6: the demo's two commands from nothing on each seed -> rows of the wall time of each, the
    demo_learning figures and the demo_held_out ones."""
    rows = []
    for seed in seeds:
        out = os.path.join(root, f"seed{seed}")
        shutil.rmtree(out, ignore_errors=True)
        paths = [f"seed={seed}", f"train.out_dir={out}", f"sft.out_dir={out}/sft", f"model.path={out}/tiny",
                 f"eval.model={out}/export", f"eval.baseline={out}/sft/export", f"eval.out_dir={out}/eval"]
        row = {"seed": seed}
        for program in ("grpo", "evaluate"):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, f"{program}.py", "demo.yaml", *paths],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{program}.py demo.yaml failed on seed {seed}:\n{proc.stderr[-3000:]}")
            row[f"{program}_s"] = time.perf_counter() - start
        rows.append({**row, **demo_learning(os.path.join(out, "metrics.jsonl")),
                     **demo_held_out(os.path.join(out, "eval"))})
    return rows


def print_demo(rows):
    print("\nThe demo, `python grpo.py demo.yaml seed=S && python evaluate.py demo.yaml` from nothing "
          "(build, warm start, GRPO, both models on the held-out test); reward 0..3 and its parts, means "
          "over the first and last quarter of the GRPO steps; held-out: event F1 and subjects named, warm "
          "start -> GRPO. Targets: a rise of at least 0.3 with Tscore or Escore rising, under 180 s in all")
    print(f"{'seed':>4} {'grpo s':>7} {'eval s':>7} {'reward':>13} {'rise':>6} {'format':>11} "
          f"{'Tscore':>11} {'Escore':>11} {'held-out F1 %':>14} {'named %':>12}")

    def pair(r, name):
        return f"{r[name + '_first']:.2f}->{r[name + '_last']:.2f}"

    def held(r, name):
        return f"{100 * r[name + '_before']:.1f}->{100 * r[name + '_after']:.1f}"
    for r in rows:
        ok = (r["rise"] >= 0.3 and (r["think_last"] > r["think_first"] or r["event_last"] > r["event_first"])
              and r["grpo_s"] + r["evaluate_s"] < 180)
        print(f"{r['seed']:>4} {r['grpo_s']:>7.0f} {r['evaluate_s']:>7.0f} {pair(r, 'reward'):>13} "
              f"{r['rise']:>+6.3f} {pair(r, 'format'):>11} {pair(r, 'think'):>11} {pair(r, 'event'):>11} "
              f"{held(r, 'f1'):>14} {held(r, 'named'):>12}  {'met' if ok else 'MISSED'}")


class Sizes(NamedTuple):
    """The sizes of a run of the CPU and GPU sections."""
    shape: str          # SHAPES name of the CPU model
    visual: tuple       # visual tokens of the prompts, in the rollout and the training passes
    new_tokens: int     # rollout tokens per row
    logprobs: tuple     # (V, T, N, H) of the log-prob section
    answer: int         # completion tokens in the training passes
    G: int = 8          # completions per prompt


QUICK = Sizes("quick", (64, 256), 16, (16384, 1024, 8, 64), 16)
FULL = Sizes("cpu", (1024, 4096), 128, (151936, 2048, 8, 512), 256)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (the test's run)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU sections even when CUDA is there")
    ap.add_argument("--load", action="store_true",
                    help="section 5 alone: start-up host memory under torchrun")
    ap.add_argument("--load-worker", nargs=3, help=argparse.SUPPRESS)  # FOLDER WAY OUT, one rank of --load
    ap.add_argument("--step", action="store_true", help="section 7 alone: the whole GRPO step")
    ap.add_argument("--demo", action="store_true",
                    help="section 6 alone: the demo's learning on seeds 0-4")
    args = ap.parse_args(argv)
    if args.demo:
        return print_demo(bench_demo())
    if args.load_worker:
        return load_worker(*args.load_worker)
    if args.load:
        return print_load(bench_load())
    torch.manual_seed(0)
    sizes = QUICK if args.quick else FULL
    if args.step:
        return step_section(sizes, args.quick)
    print(f"bench.py on {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    cpu_sections(sizes, args.quick)
    if args.no_gpu or not torch.cuda.is_available():
        print("\nGPU sections skipped: " + ("--no-gpu" if args.no_gpu else "no CUDA device"))
        return
    gpu_sections(sizes, args.quick)


def cpu_sections(sizes, quick):
    """Sections 1, 2 and 4 on the CPU, in float32."""
    cpu = torch.device("cpu")
    G, visual, new_tokens, (V, T, N, H) = sizes.G, sizes.visual, sizes.new_tokens, sizes.logprobs
    runs = [(sizes.shape, visual)] + ([] if quick else [("cpu-qwen-vocab", visual[-1:])])
    for name, visual_tokens in runs:
        s = SHAPES[name]
        hf = random_model(name, torch.float32, cpu)
        rows = [bench_rollout(hf, n, G, new_tokens) for n in visual_tokens]
        print_rollout(rows, G, new_tokens, f"CPU, random Qwen2-VL of hidden {s['hidden']}, "
                      f"{s['layers']} layers, vocabulary {s['vocab']}, float32")
    print_logprobs(bench_logprobs(V, T, N, H, cpu), V, T, N, H, "CPU, float32")
    # init std 0.02, the checkpoints' scale: at the rollout's 0.2 the logits lie tens apart and float32
    # rounding alone moves the gradients measurably (docs/benchmarks.md: the per-row pass with eager
    # against sdpa attention)
    hf = random_model(sizes.shape, torch.float32, cpu, std=0.02)
    s = SHAPES[sizes.shape]
    print_training([bench_training(hf, n, G, sizes.answer) for n in visual], G, sizes.answer,
                   f"CPU, random Qwen2-VL of hidden {s['hidden']}, {s['layers']} layers, float32")
    step_section(sizes, quick)


def step_section(sizes, quick):
    """Section 7 on the CPU: the whole step at the sizes' visual tokens, completions of up to sizes.answer
    tokens, the HTTP judge answering after 1 s (0.05 s with --quick)."""
    s = SHAPES[sizes.shape]
    hf = random_model(sizes.shape, torch.float32, torch.device("cpu"), std=0.02)
    rows = bench_whole_step(hf, sizes.visual, sizes.G, sizes.answer, latency=0.05 if quick else 1.0)
    print_whole_step(rows, sizes.G, sizes.answer,
                     f"CPU, random Qwen2-VL of hidden {s['hidden']}, {s['layers']} layers, float32")


def gpu_sections(sizes, quick):
    """Sections 2 and 1 on the GPU, then 3, the reference's dtype (5) and 4, on the 7B shape in bf16
    (the quick shape with --quick)."""
    gpu = torch.device("cuda")
    G, visual, new_tokens, (V, T, N, _) = sizes.G, sizes.visual, sizes.new_tokens, sizes.logprobs
    torch.backends.cuda.matmul.allow_tf32 = False  # the log-prob comparison is in true float32
    print(f"\nGPU: {torch.cuda.get_device_name()}")
    print_logprobs(bench_logprobs(V, T, N, 3584, gpu), V, T, N, 3584, "GPU, float32, H of the 7B")
    gpu_shape = "quick" if quick else "7b"
    hf = random_model(gpu_shape, torch.bfloat16, gpu)
    rows = [bench_rollout(hf, n, G, new_tokens) for n in visual]
    print_rollout(rows, G, new_tokens, f"GPU, random Qwen2-VL of the {gpu_shape} shape, bf16")
    d = bench_decode(hf, visual[-1], G, new_tokens, card(BANDWIDTH))
    print(f"\nDecode, G = {G} after {d['visual_tokens']} visual tokens: prefill {d['prefill_s']:.2f} s, "
          f"{d['step_ms']:.1f} ms/step, {d['tok_s']:.0f} tokens/s, {d['bandwidth_share']:.0%} of the "
          f"memory-bandwidth bound (weights + KV cache per step / "
          f"{card(BANDWIDTH) or float('nan'):.3g} B/s)")
    completion = 32 if quick else 512                  # with the video, about 4K tokens in all
    m = bench_mfu(hf, visual[-1] - completion, completion, card(BF16_PEAK))
    print(f"Training, policy forward+backward with gradient checkpointing, {m['tokens']} tokens: "
          f"{m['seconds']:.2f} s, {m['tflops']:.0f} TFLOP/s, MFU {m['mfu']:.0%} of "
          f"{card(BF16_PEAK) or float('nan'):.3g} FLOP/s")
    r = bench_reference_dtype(hf, visual[-1] - completion, completion)
    print(f"Reference log-probs, no grad, {visual[-1]} tokens: held in bf16 {r['bf16_s']:.3f} s, "
          f"in float32 {r['fp32_s']:.3f} s ({r['speedup']:.1f}x)")
    print_training([bench_training(hf, n, G, sizes.answer) for n in visual], G, sizes.answer,
                   f"GPU, random Qwen2-VL of the {gpu_shape} shape, bf16")


if __name__ == "__main__":
    main()
