"""Training data: the JSONL of videos and ground truth, video reading, Qwen-VL model inputs, batching
and the training stream.

    records = load_records("data/train.jsonl")
    prompt = encode(records[0].video, instruction, tokenizer, cfg.data, "qwen2_vl")
    batch = collate([prompt, ...], pad_id)           # left-padded for generation
    rows = repeat_batch(batch, G)                    # row b*G+g is prompt b, with prompt b's pixels
    stream = PromptStream(records, encode_fn, rank, world, seed, per_rank, shuffle, max_bad_fraction)

Making and vetting such a JSONL before a run (subjects and events from the captions, will every record
train?) is prepare.py's: python prepare.py --help.

Shapes: L prompt tokens, P patches of one video (t*h*w), B prompts. A video of T frames resized to
H x W gives a grid t = T/2, h = H/14, w = W/14: P = t*h*w patches of 3*2*14*14 = 1176 values, and
P/4 <|video_pad|> tokens (each 2x2 block of patches is merged into one token).

The paper says nothing about preprocessing; this file follows Qwen's published recipe (qwen-vl-utils
0.0.9 to 0.0.14 reading the video, then the HF Qwen2-VL processor) without torchvision, which both need
and which is not installable on every machine:
- frames sampled evenly at `data.fps`, their count clamped and floored to a multiple of 2 (`frame_count`;
  qwen-vl-utils 0.0.8 rounded instead); sizes multiples of 28 in [min_pixels, max_pixels], max_pixels
  lowered to the per-frame cap `data.video_max_pixels` and to an even share of the clip's budget
  `data.total_pixels` (`frame_size`, `smart_resize`). min_pixels defaults to the checkpoints' 4*28*28 (the HF
  processor's and vLLM's), not qwen-vl-utils' video default of 128*28*28, which raises small frames;
- resize as qwen-vl-utils does through torchvision: bicubic with antialias on float32, clamped to 0..255
  and rounded (`resize_frames`). Torch's uint8 kernel, which the HF processor applies to raw frames,
  rounds and clamps between its two passes and lands up to 12 grey levels away on the shipped clips.
  Then CLIP mean/std and the patch order of HF's `patchify`;
- `mm_token_type_ids` built as HF's processor builds them (see `encode`); without them transformers
  5.24 raises for Qwen2-VL and silently falls back to 1-D RoPE for Qwen2.5-VL.
Beyond it: unreadable videos are skipped, counted and capped by `data.max_bad_fraction`, a record whose
target is over `data.max_target_tokens` is refused with its FILE:LINE (check_targets), and the prompt stream
is sliced per rank, resumable exactly, and resumable on another number of ranks (its position is global).
"""
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rewards
from config import snippet

# OpenAI CLIP statistics, the Qwen-VL processors' image_mean / image_std (transformers.image_utils)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FRAME_FACTOR = 2      # frame counts are multiples of the temporal patch size (qwen-vl-utils FRAME_FACTOR)
MAX_RATIO = 200       # smart_resize refuses longer/shorter side ratios above this (qwen-vl-utils MAX_RATIO)
VIDEO_TYPE = 2        # mm_token_type_ids: 0 text, 1 image, 2 video (transformers get_rope_index)
# The plain caption request: DREAM-1K's and CaReBench's, VDC's detailed section's, and sft.target=caption's
CAPTION_PROMPT = "Describe the video in detail."


class DataError(ValueError):
    """A bad dataset file or setting; the message starts with FILE:LINE where there is one."""


class VideoError(Exception):
    """A video that cannot be used; the message starts with its path."""


# ----------------------------------------------------------------------------- the training set

@dataclass
class Record:
    id: str                      # from the line, else "<file stem>:<line number>"
    video: str                   # absolute path
    caption: str
    subjects: list[dict] | None  # [{"name": str, "attributes": [str], "actions": [str]}]
    events: list[str] | None
    where: str = ""              # FILE:LINE of its line, for messages


FIELDS = ("id", "video", "caption", "subjects", "events")
SUBJECT_FIELDS = ("name", "attributes", "actions")


def refuse_unknown(keys, valid, where):
    """DataError at `where` for the first of `keys` not in `valid`, with the closest valid one."""
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            raise DataError(f"{where}: unknown key {snippet(key)}; {hint}")


def _text(value, what, where):
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {what} must be a non-empty string, got {snippet(value)}")
    return value


def valid_texts(value, what, where):
    """`value` if it is a list of non-empty strings, else DataError at `where` naming `what`."""
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a list of strings, got {snippet(value)}")
    return [_text(v, f"{what}[{i}]", where) for i, v in enumerate(value)]


def valid_subjects(value, where):
    """`value` as a list of {name, attributes, actions}, exactly that schema, else DataError at `where`."""
    if not isinstance(value, list):
        raise DataError(f"{where}: 'subjects' must be a list of {{name, attributes, actions}}, got "
                        f"{snippet(value)}")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, dict):
            raise DataError(f"{where}: subjects[{i}] must be an object, got {snippet(s)}")
        refuse_unknown(s, SUBJECT_FIELDS, f"{where}: subjects[{i}]")
        missing = [k for k in SUBJECT_FIELDS if k not in s]
        if missing:
            raise DataError(f"{where}: subjects[{i}] lacks {', '.join(missing)}")
        out.append({"name": _text(s["name"], f"subjects[{i}].name", where),
                    "attributes": valid_texts(s["attributes"], f"subjects[{i}].attributes", where),
                    "actions": valid_texts(s["actions"], f"subjects[{i}].actions", where)})
    return out


def load_records(path, require=None) -> list[Record]:
    """Read and validate a JSONL training set: one object a line with `video` and `caption`, optional
    `id`, `subjects` and `events` (null = absent). Blank lines are skipped; anything else that is not
    exactly the schema, a repeated id, and a record lacking a field of `require` ({field: the setting
    that needs it}, e.g. rewards.required_fields) stops with FILE:LINE, before any model loads."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; set data.train to the training JSONL")
    root, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    records, first_line = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            refuse_unknown(obj, FIELDS, where)
            for key in ("video", "caption"):
                if key not in obj:
                    raise DataError(f"{where}: missing required field '{key}'")
            rid = _text(obj["id"], "'id'", where) if "id" in obj else f"{stem}:{n}"
            if rid in first_line:
                raise DataError(f"{where}: duplicate id {snippet(rid)} (first on line {first_line[rid]})")
            first_line[rid] = n
            subjects, events = obj.get("subjects"), obj.get("events")
            for key, setting in (require or {}).items():
                if obj.get(key) is None:
                    raise DataError(f"{where}: no '{key}' (absent or null), which {setting} needs: run "
                                    f"python prepare.py to derive it from the caption, or turn that setting "
                                    f"off")
            records.append(Record(
                id=rid,
                video=os.path.normpath(os.path.join(root, _text(obj["video"], "'video'", where))),
                caption=_text(obj["caption"], "'caption'", where),
                subjects=None if subjects is None else valid_subjects(subjects, where),
                events=None if events is None else valid_texts(events, "'events'", where), where=where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_heldout(path, require, world) -> list[Record]:
    """The held-out records of data.val (load_records' checks), at least one per rank."""
    val = load_records(path, require)
    if len(val) < world:
        raise DataError(f"{path}: {len(val)} held-out records for {world} ranks; every rank needs one")
    return val


def target_text(record, target):
    """What the model learns to write for `record` with sft.target=`target`: the think and answer blocks
    (rewards.reference_output), or the caption alone."""
    return rewards.reference_output(record) if target == "think" else record.caption


def target_lengths(records, tokenizer, target, limit):
    """{index: tokens} of the records whose target (target_text, then <|im_end|>) is over `limit` tokens; a
    count that ends in "+" is a lower bound. A byte-level BPE token holds at least one byte, so a target of at
    most `limit` UTF-8 bytes fits and is not tokenised (Qwen's tokenizers are byte-level); a longer one is
    tokenised up to 32 characters a token, enough to tell that a 1 MB caption is over without tokenising all
    of it (a cut changes at most the last word's tokens)."""
    over, cap = {}, 32 * (limit + 2)
    for k, record in enumerate(records):
        text = target_text(record, target) + "<|im_end|>"
        if len(text.encode("utf-8")) <= limit:
            continue
        n = len(tokenizer(text[:cap], add_special_tokens=False)["input_ids"])
        if len(text) > cap and n <= limit + 1:  # a target of long tokens: count all of it
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif len(text) > cap:
            over[k] = f"{n - 1:,}+"
            continue
        if n > limit:
            over[k] = f"{n:,}"
    return over


def check_targets(records, tokenizer, target, limit, path):
    """DataError at FILE:LINE of the first record of `path` whose target is over data.max_target_tokens
    (`limit`), with how many there are: such a record is refused, not cut, because a cut target would teach
    the model to stop mid-caption without closing </answer> or writing its end token, and a caption that long
    (a pasted file, a join gone wrong) is a data error to fix rather than to train on."""
    over = target_lengths(records, tokenizer, target, limit)
    if over:
        k, n = next(iter(over.items()))
        more = f" ({len(over)} records in all: python prepare.py --check {path} lists them)" \
            if len(over) > 1 else ""
        what = "<think>subjects</think><answer>caption</answer>" if target == "think" else "the caption"
        raise DataError(f"{records[k].where or path}: the target ({what}) is {n} tokens, over "
                        f"data.max_target_tokens={limit}{more}; shorten the caption, or raise "
                        "data.max_target_tokens")

# ----------------------------------------------------------------------------- sampling and size rules

def smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28):
    """(height, width) -> the nearest sides that are multiples of `factor` with min_pixels <= area <=
    max_pixels, aspect ratio kept as closely as possible (qwen-vl-utils / HF Qwen2-VL smart_resize)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:      # shrink both sides by beta, rounding down
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:    # grow both sides by beta, rounding up
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_count(total_frames, video_fps, cfg) -> int:
    """Frames to sample from a clip of total_frames at video_fps, as qwen-vl-utils' smart_nframes (0.0.9 to
    0.0.14) counts them: duration * cfg.fps, clamped to [ceil_2(min_frames), floor_2(min(max_frames,
    total_frames))], then floored to a multiple of 2 (3.5 s at 2 fps: 7 -> 6; 0.0.8 rounded, 7 -> 8)."""
    lo = math.ceil(cfg.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(cfg.max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = math.floor(min(max(total_frames / video_fps * cfg.fps, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    if n < FRAME_FACTOR:  # qwen-vl-utils raises here too; only data.min_frames < 1 lets a clip get here
        raise ValueError(f"{n} frames to sample from {total_frames}; set data.min_frames to at least 1")
    return n


def frame_size(height, width, n_frames, cfg, factor=28) -> tuple[int, int]:
    """The size that each of n_frames sampled frames of height x width is resized to, as qwen-vl-utils'
    fetch_video (0.0.9 to 0.0.14) chooses it, cfg.max_pixels being the caller's max_pixels: smart_resize
    within [min_pixels, min(max_pixels, cap)], where the cap is the smaller of video_max_pixels
    (VIDEO_MAX_PIXELS) and an even share of the clip's budget, total_pixels / n_frames * 2, but at least
    int(1.05 * min_pixels)."""
    cap = max(min(cfg.video_max_pixels, cfg.total_pixels / n_frames * FRAME_FACTOR),
              int(cfg.min_pixels * 1.05))
    return smart_resize(height, width, factor, cfg.min_pixels, min(cfg.max_pixels, cap))


def resize_frames(frames, height, width) -> torch.Tensor:
    """uint8 frames (T, 3, H0, W0) -> uint8 (T, 3, height, width), as qwen-vl-utils resizes a video:
    torchvision's resize (BICUBIC, antialias=True) on the uint8 tensor, which
    (transforms/_functional_tensor.py, resize) converts to float32, interpolates (bicubic, antialias,
    align_corners=False), clamps to 0..255 and rounds half to even, and returns frames already at the size
    untouched. One frame in float32 at a time: a 16-frame 4K clip at once would take 1.6 GB."""
    if frames.shape[-2:] == (height, width):
        return frames
    out = torch.empty(*frames.shape[:2], height, width, dtype=torch.uint8, device=frames.device)
    for i, frame in enumerate(frames):
        x = F.interpolate(frame[None].float(), size=(height, width), mode="bicubic", antialias=True,
                          align_corners=False)                  # (1, 3, height, width) float32
        out[i] = x[0].clamp_(0, 255).round_()
    return out


def read_video(path, cfg, factor=28) -> tuple[torch.Tensor, float]:
    """Decode a clip with decord, sample frame_count(...) frames evenly (frame indices linspace(0, total - 1,
    T) rounded, as qwen-vl-utils picks them) and resize them to frame_size(...) with resize_frames. Returns
    frames uint8 (T, 3, H, W) with H, W multiples of `factor` (patch_size * merge_size), and the sampled fps T
    / duration. Any problem with the file raises VideoError("PATH: cause")."""
    import decord
    if not os.path.isfile(path):
        raise VideoError(f"{snippet(path, 1000, bare=True)}: no such file")  # a path from a 4 MB id: cut
    try:  # decord indexes every packet when it opens a file: a cut or corrupt stream fails here
        reader = decord.VideoReader(path)
    except (RuntimeError, decord.DECORDError) as e:
        raise VideoError(f"{path}: not a readable video (truncated, corrupt or not a video): "
                         f"{str(e).splitlines()[0][:200]}") from None
    total, video_fps = len(reader), reader.get_avg_fps()
    if total < 2:
        raise VideoError(f"{path}: has {total} frame(s); a clip needs at least 2")
    if not video_fps > 0:
        raise VideoError(f"{path}: unusable frame rate {video_fps}")
    n = frame_count(total, video_fps, cfg)
    index = torch.linspace(0, total - 1, n).round().long()     # (T,) evenly spread over the clip
    try:
        frames = reader.get_batch(index.tolist()).asnumpy()     # (T, H0, W0, 3) uint8 RGB
    except (RuntimeError, decord.DECORDError) as e:
        raise VideoError(f"{path}: frames cannot be decoded: {str(e).splitlines()[0][:200]}") from None
    if frames.shape[0] != n:
        raise VideoError(f"{path}: claims {total} frames but only {frames.shape[0]} of {n} sampled decode")
    frames = torch.from_numpy(frames).permute(0, 3, 1, 2)       # (T, 3, H0, W0)
    try:
        height, width = frame_size(frames.shape[2], frames.shape[3], n, cfg, factor)
    except ValueError as e:  # an aspect ratio over MAX_RATIO
        raise VideoError(f"{path}: {e}") from None
    return resize_frames(frames, height, width), n / total * video_fps    # (T, 3, H, W) uint8


# ----------------------------------------------------------------------------- model inputs

def video_to_patches(frames, patch_size=14, temporal_patch_size=2, merge_size=2):
    """uint8 frames (T, 3, H, W) -> pixel_values_videos (t*h*w, 3*tp*p*p) float32 and grid_thw (3,),
    in the order of HF's Qwen2-VL `patchify`: grid (t, h/m, w/m, m, m), each patch (C, tp, p, p).
    An odd frame count is padded by repeating the last frame."""
    T, C, H, W = frames.shape
    if H % (patch_size * merge_size) or W % (patch_size * merge_size):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {patch_size * merge_size}; resize first")
    if pad := -T % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    # (x/255 - mean)/std, computed as HF's fused rescale+normalize does: (x - 255 mean) / (255 std)
    mean = torch.tensor(CLIP_MEAN) * 255.0
    std = torch.tensor(CLIP_STD) * 255.0
    x = (frames.float() - mean[:, None, None]) / std[:, None, None]    # (T', C, H, W) float32
    t, h, w = frames.shape[0] // temporal_patch_size, H // patch_size, W // patch_size
    m, p = merge_size, patch_size
    x = x.reshape(t, temporal_patch_size, C, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)            # (t, h/m, w/m, m, m, C, tp, p, p)
    return x.reshape(t * h * w, C * temporal_patch_size * p * p), torch.tensor([t, h, w])


def _token_id(tokenizer, token):
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: load the tokenizer of a Qwen2-VL / "
                         "Qwen2.5-VL model")
    return tid


def vision_layout(vision_cfg) -> tuple[int, int, int]:
    """(patch_size, temporal_patch_size, spatial_merge_size) of a model's vision config; Qwen's (14, 2, 2),
    that of both 7B checkpoints, for None."""
    if vision_cfg is None:
        return 14, 2, 2
    return vision_cfg.patch_size, vision_cfg.temporal_patch_size, vision_cfg.spatial_merge_size


def encode(video_path, instruction, tokenizer, cfg, model_type, vision_cfg=None) -> dict:
    """One prompt: the chat template's user turn (the video, then `instruction`) and the assistant header.
    Returns input_ids, attention_mask, mm_token_type_ids (L,); pixel_values_videos (P, 1176);
    video_grid_thw (1, 3); second_per_grid_ts (1,) (Qwen2.5-VL's temporal spacing; model.py passes it only
    to qwen2_5_vl). vision_cfg is the model's vision config (patch_size, temporal_patch_size,
    spatial_merge_size), Qwen's 14/2/2 when None. model_type is only checked: both kinds take the same
    inputs. Raises VideoError for the video, DataError for a prompt over cfg.max_prompt_tokens."""
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"model_type {model_type!r}: expected qwen2_vl or qwen2_5_vl")
    patch, tps, merge = vision_layout(vision_cfg)
    frames, fps = read_video(video_path, cfg, factor=patch * merge)     # (T, 3, H, W)
    pixels, grid = video_to_patches(frames, patch, tps, merge)         # (P, 1176), (3,)
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: load it from the model folder")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pad, start, end = (_token_id(tokenizer, t)
                       for t in ("<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    where = [i for i, tid in enumerate(ids) if tid == pad]
    if len(where) != 1 or ids[where[0] - 1:where[0] + 2] != [start, pad, end]:
        raise ValueError("the chat template must render one <|vision_start|><|video_pad|><|vision_end|> for "
                         f"the video and the instruction none of these tokens; got {text!r}")
    i, n_tokens = where[0], int(grid.prod()) // merge ** 2
    input_ids = torch.tensor(ids[:i] + [pad] * n_tokens + ids[i + 1:])   # (L,)
    if len(input_ids) > cfg.max_prompt_tokens:
        raise DataError(f"{video_path}: the prompt is {len(input_ids)} tokens ({n_tokens} visual), over "
                        f"data.max_prompt_tokens={cfg.max_prompt_tokens}; lower data.max_pixels or "
                        "data.max_frames, or raise data.max_prompt_tokens")
    # mm_token_type_ids, as HF's processor (ProcessorMixin.create_mm_token_type_ids) builds them:
    # 2 at every <|video_pad|>, 1 at <|image_pad|> (none here), 0 elsewhere, <|vision_start|>/<|vision_end|>
    # and padding included. get_rope_index gives each run of 2s the (t, h, w) positions of the next grid.
    return {"input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == pad).long() * VIDEO_TYPE,
            "pixel_values_videos": pixels,
            "video_grid_thw": grid[None],                                          # (1, 3)
            "second_per_grid_ts": torch.tensor([tps / fps], dtype=torch.float32)}  # (1,) seconds per t step


def tokenizer_texts(records, instruction) -> list[str]:
    """What a tiny model's BPE tokenizer learns from (model.tiny_vocab): the prompt and every record's
    reference output."""
    return [instruction] + [rewards.reference_output(r) for r in records]


def collate(prompts, pad_id) -> dict:
    """B encoded prompts -> a batch: input_ids, attention_mask, mm_token_type_ids (B, L) left-padded (pad_id,
    0, 0) so that every prompt ends where generation starts; pixel_values_videos (sum P, 1176) in row
    order; video_grid_thw (B, 3); second_per_grid_ts (B,)."""
    L = max(len(p["input_ids"]) for p in prompts)

    def left_pad(key, value):
        return torch.stack([F.pad(p[key], (L - len(p[key]), 0), value=value) for p in prompts])   # (B, L)
    return {"input_ids": left_pad("input_ids", pad_id),
            "attention_mask": left_pad("attention_mask", 0),
            "mm_token_type_ids": left_pad("mm_token_type_ids", 0),
            "pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in prompts]),
            "video_grid_thw": torch.cat([p["video_grid_thw"] for p in prompts]),
            "second_per_grid_ts": torch.cat([p["second_per_grid_ts"] for p in prompts])}


def select_rows(batch, rows) -> dict:
    """The batch's rows `rows` (a list or LongTensor of row indices, repeats allowed), each with its own
    video's pixel patches: pixel_values_videos holds the rows' patches back to back, video_grid_thw[b].prod()
    of them for row b, so they are split per video rather than indexed like the row tensors."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)      # (n,)
    per_video = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    out = {k: v[rows] for k, v in batch.items() if k != "pixel_values_videos"}
    out["pixel_values_videos"] = torch.cat([per_video[r] for r in rows.tolist()])
    return out


def repeat_batch(batch, n) -> dict:
    """Each of the B rows repeated n times consecutively: row b*n+k is prompt b, with prompt b's pixels."""
    return select_rows(batch, torch.arange(batch["input_ids"].shape[0]).repeat_interleave(n))


# ----------------------------------------------------------------------------- the training stream

class PromptStream:
    """Encoded prompts for this rank, per_rank a step, epoch after epoch (the caller decides when to stop).

    Epoch e takes the records in the order of a permutation from a generator seeded by (seed, e) (identity
    without shuffle). A step takes the next block of world * per_rank items of that order, rank r its r-th
    per_rank; the epoch ends when the next block no longer fits (the records left over wait for a later
    epoch's order). So the ranks' items are disjoint, every rank runs the same number of steps per epoch, and
    the position is global: `consumed`, the items of the epoch's order all ranks took together, which carries
    over to another number of ranks (regroup). A record whose video raises VideoError is skipped, counted and
    warned about once per file; this rank's item of the next block (wrapping around the order) takes its
    place, so a step always has per_rank prompts. Once at least min(20, len(records)) videos were tried, a
    share of failures above max_bad_fraction stops the run with DataError."""

    def __init__(self, records, encode_fn, rank, world, seed, per_rank, shuffle, max_bad_fraction):
        if not 0 <= rank < world or per_rank < 1:
            raise ValueError(f"rank {rank} of world {world} with {per_rank} prompts per rank is not a valid "
                             "layout")
        self.records, self.encode_fn = records, encode_fn
        self.rank, self.world, self.seed, self.per_rank = rank, world, seed, per_rank
        self.shuffle, self.max_bad_fraction = shuffle, max_bad_fraction
        self.steps_per_epoch()  # fail now, not at the first step
        self.epoch, self.consumed = 0, 0      # consumed: items of this epoch's order all ranks took
        self.bad, self.seen, self.warned = 0, 0, set()
        self._order_epoch, self._order = None, []

    def steps_per_epoch(self) -> int:
        steps = len(self.records) // (self.world * self.per_rank)
        if steps < 1:
            raise DataError(f"{len(self.records)} records cannot fill one step of {self.world} ranks x "
                            f"{self.per_rank} prompts; add data or lower train.prompts_per_rank")
        return steps

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            n = len(self.records)
            if self.shuffle:  # a distinct, reproducible stream per (seed, epoch) for epochs below 1e6
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                perm = torch.randperm(n, generator=generator)
            else:
                perm = torch.arange(n)
            self._order, self._order_epoch = perm.tolist(), self.epoch
        return self._order

    def _try(self, index):
        """encode_fn(record), or None after counting and (once per file) reporting a VideoError."""
        record = self.records[index]
        self.seen += 1
        try:
            return self.encode_fn(record)
        except VideoError as e:
            self.bad += 1
            if record.video not in self.warned:
                self.warned.add(record.video)
                print(f"[rank {self.rank}] skipping video ({self.bad} of {self.seen} failed so far): {e}",
                      file=sys.stderr, flush=True)
            if self.seen >= min(20, len(self.records)) and self.bad / self.seen > self.max_bad_fraction:
                raise DataError(f"{self.bad} of {self.seen} videos tried on rank {self.rank} could not be "
                                f"read, more than data.max_bad_fraction={self.max_bad_fraction}; the "
                                f"last: {e}. Fix or remove the files named in the warnings above") from None
            return None

    def next(self) -> list[tuple[Record, dict]]:
        """The next per_rank (record, prompt) pairs of this rank."""
        block = self.world * self.per_rank
        if self.consumed + block > len(self.records):
            self.epoch, self.consumed = self.epoch + 1, 0
        order = self._epoch_order()
        n = len(order)
        first = self.consumed + self.rank * self.per_rank
        out = []
        for slot in range(first, first + self.per_rank):
            # this slot's item, else this rank's in the blocks after it
            for k in range(n // math.gcd(n, block)):
                index = order[(slot + k * block) % n]
                prompt = self._try(index)
                if prompt is not None:
                    out.append((self.records[index], prompt))
                    break
            else:
                raise DataError(f"no video of rank {self.rank}'s items in epoch {self.epoch} can be "
                                "read; see the warnings above")
        self.consumed += block
        return out

    def state_dict(self) -> dict:
        """The position (global) and this rank's bad-video counts, as plain values."""
        return {"epoch": self.epoch, "consumed": self.consumed, "bad": self.bad, "seen": self.seen,
                "warned": sorted(self.warned), "layout": [len(self.records), self.seed, self.shuffle]}

    def load_state_dict(self, state):
        layout = [len(self.records), self.seed, self.shuffle]
        if state["layout"] != layout:
            raise DataError(f"the saved data position is for (records, seed, shuffle) = {state['layout']}, "
                            f"this run has {layout}; resume with the same data and settings or start a new "
                            "run (train.resume=never)")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self.bad, self.seen, self.warned = state["bad"], state["seen"], set(state["warned"])

    @staticmethod
    def regroup(states, rank, world) -> dict:
        """The state rank `rank` of `world` continues from, given `states`, every rank's state_dict() of a run
        with another number of ranks: the same position, the bad-video counts summed and shared out again (the
        first total % world ranks take one more), and every file any rank warned about."""
        def share(total):
            return total // world + (rank < total % world)
        return {**states[0], "bad": share(sum(s["bad"] for s in states)),
                "seen": share(sum(s["seen"] for s in states)),
                "warned": sorted(set().union(*(s["warned"] for s in states)))}


if __name__ == "__main__":  # the commands that were here (prepare, check) are prepare.py's
    asked = any(a in ("-h", "--help") for a in sys.argv[1:])
    print("data.py has no commands: python prepare.py IN.jsonl OUT.jsonl config.yaml prepares a data set, "
          "python prepare.py --check FILE.jsonl config.yaml checks one (--help for more)",
          file=sys.stdout if asked else sys.stderr)
    sys.exit(0 if asked else 2)
