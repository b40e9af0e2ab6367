"""The policy model: loading Qwen2-VL / Qwen2.5-VL (whole, or one stored tensor at a time), a tiny offline
stand-in, the tokens generation needs, M-RoPE positions, group rollout and log-probs.

    model, kind = load_model("models/Qwen2-VL-7B-Instruct", cfg.model, "cuda", train=True)
    tokens = Tokens.of(load_tokenizer("models/Qwen2-VL-7B-Instruct"))
    rollout = generate(model, batch, group_size=8, max_new_tokens=1024, temperature=1.0, top_p=1.0,
                       eos_ids=tokens.eos_ids, pad_id=tokens.pad_id)
    texts = tokens.decode(rollout)
    logp, entropy = Policy(model)(batch, rollout.ids, rollout.lengths, temperature=1.0, group_size=8)

Shapes: B prompts, G samples per prompt, N = B*G rows, L prompt tokens (left-padded), T completion
tokens, H hidden size, V vocabulary.

Beyond the paper (which says nothing about how rollouts are computed):
- Group rollout: the usual GRPO code (HF generate with num_return_sequences=G) repeats each prompt G
  times, so the vision tower and the prefill of thousands of visual tokens run G times per video.
  `generate` runs them once per prompt, copies the KV cache to the G rows (into buffers with room for the
  completion, so that a step writes in place instead of re-concatenating the cache) and decodes the N rows
  together with its own loop; rows that end are dropped from the batch. Greedy outputs equal per-row
  generation token for token (tests). bench.py measures it against HF generate with
  num_return_sequences=G.
- M-RoPE positions are always computed here (`rope_positions`, Qwen's published rule) and passed to the
  model explicitly, in the rollout and in the log-prob pass alike; the model's stateful `rope_deltas` is
  not used. Transformers 5 silently falls back to 1-D RoPE when `mm_token_type_ids` is missing: here it
  is an error.
- Training passes share the prompt too: Policy(...)(batch, ids, lengths, temperature, group_size=G) takes
  the B prompts, not the N rows, and runs each group as one sequence [prompt, c_1, ..., c_G] whose
  attention mask lets each completion see its prompt and itself, with the positions it has in its own
  sequence, so that the vision tower and the prompt run once per group in the reference, old and update
  passes. Log-probs and gradients equal the per-row path's (data.repeat_batch(batch, G), no group_size;
  tests); bench.py measures both.
- Log-probs never hold an (N, T, V) float32 tensor: `selective_log_softmax` runs lm_head in chunks of
  tokens, each under activation checkpointing, on the completion tokens only.
- `build_tiny` writes a random 0.2M-parameter model with a byte-level tokenizer, a chat template, a
  generation config and processor configs, loaded by the same code path as the 7B checkpoints (and by
  transformers' AutoProcessor / AutoModelForImageTextToText), so that everything runs offline on a CPU.
"""
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicLayer

KINDS = ("qwen2_vl", "qwen2_5_vl")
CHECKPOINTS = {"qwen2_vl": "Qwen2-VL-7B-Instruct", "qwen2_5_vl": "Qwen2.5-VL-7B-Instruct"}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL-7B-Instruct's chat template (Qwen2.5-VL's is the same): one <|video_pad|> per video, which
# data.py (encode) expands to the video's t*h*w/4 tokens.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelError(RuntimeError):
    pass


def _model_class(kind):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    return classes[kind]


# ----------------------------------------------------------------------------- tokenizer and tiny model

def build_tokenizer(path, texts=(), vocab_size=0):
    """A byte-level Qwen2Tokenizer plus Qwen's special tokens and chat template, saved to `path`. With
    vocab_size 0: the 256 byte symbols and no merges. Otherwise BPE merges learned offline from `texts`
    (tokenizers' trainer) up to about vocab_size tokens, so that text is several times shorter than in
    bytes."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = {ch: i for i, ch in enumerate(alphabet)}, []
    if vocab_size:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        bpe.train_from_iterator(list(texts), trainer)
        learned = json.loads(bpe.to_str())["model"]
        vocab, merges = learned["vocab"], [tuple(pair) for pair in learned["merges"]]
    vocab.update({s: len(vocab) + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    added = [AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]
    tok.add_tokens(added, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_tiny(path, kind, seed=0, texts=(), vocab_size=0, hidden=64, layers=2, init_std=0.2, *, data_cfg):
    """Write a random tiny `kind` model (hidden 64, 2 layers, vision depth 2 by default, weights of std
    `init_std`), its tokenizer
    (build_tokenizer: bytes, or BPE learned from `texts`), chat template, generation config and processor
    configs (processor_files, with `data_cfg`'s pixel and frame settings) to `path`: a folder that
    AutoProcessor and AutoModelForImageTextToText load like a released checkpoint's.
    They are written into a temporary folder beside `path`, renamed when complete: an interrupted build
    leaves nothing that looks like a model, and of two builds at once the first to finish is kept."""
    if kind not in KINDS:
        raise ModelError(f"build_tiny: unknown kind {kind!r}; expected one of {KINDS}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(path)) + ".tmp-", dir=parent)
    try:
        vision = _write_tiny(tmp, kind, seed, texts, vocab_size, hidden, layers, init_std)
        for name, content in processor_files(kind, vision, data_cfg).items():
            Path(tmp, name).write_text(json.dumps(content, indent=2) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (Path(path) / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_configured(model_cfg, data_cfg, seed=0, texts=()):
    """build_tiny at model.path with model.build_tiny's kind and the model.tiny_* sizes, its BPE tokenizer
    (model.tiny_vocab) learned from `texts` (data.tokenizer_texts) and its processor configs from the data:
    section; what every program builds alike."""
    m = model_cfg
    build_tiny(m.path, m.build_tiny, seed, texts, m.tiny_vocab, m.tiny_hidden, m.tiny_layers,
               m.tiny_init_std, data_cfg=data_cfg)


def processor_files(kind, vision, data_cfg):
    """{file name: JSON} of the processor configs of a `kind` model with vision config `vision`, as the
    released checkpoints ship them (transformers' Qwen2VLImageProcessor and Qwen2VLVideoProcessor), holding
    data_cfg's settings (config.DataConfig): pixels per frame in [data.min_pixels, data.max_pixels] (video
    frames also within data.video_max_pixels and an even share of data.total_pixels, qwen-vl-utils' cap),
    data.fps frames a second, data.min_frames to data.max_frames. transformers samples frame indices with
    its own rule, not qwen-vl-utils' that data.py follows: give it the frames data.read_video picks to get
    data.py's pixels (README, Compatibility)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    d, factor = data_cfg, vision.patch_size * vision.spatial_merge_size
    common = {"processor_class": {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[kind],
              "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
              "merge_size": vision.spatial_merge_size, "image_mean": list(OPENAI_CLIP_MEAN),
              "image_std": list(OPENAI_CLIP_STD), "do_resize": True, "resample": 3, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}
    image = {"image_processor_type": "Qwen2VLImageProcessor", **common, "min_pixels": d.min_pixels,
             "max_pixels": d.max_pixels,
             "size": {"shortest_edge": d.min_pixels, "longest_edge": d.max_pixels}}
    video = {"video_processor_type": "Qwen2VLVideoProcessor", **common,
             "size": {"shortest_edge": d.min_pixels, "longest_edge": min(d.max_pixels, d.video_max_pixels)},
             "do_sample_frames": True, "fps": d.fps, "min_frames": d.min_frames, "max_frames": d.max_frames,
             # the budget is 90% of max_video_tokens tokens' pixels (transformers' rule): data.total_pixels
             "cap_pixels_per_frame": True, "max_video_tokens": round(d.total_pixels / (0.9 * factor ** 2))}
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def _write_tiny(path, kind, seed, texts=(), vocab_size=0, hidden=64, layers=2, init_std=0.2):
    from transformers import AutoConfig, GenerationConfig
    tok = build_tokenizer(path, texts, vocab_size)
    head = hidden // 4
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    end, eot = ids["<|endoftext|>"], ids["<|im_end|>"]
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=32768,
                # the (temporal, height, width) sections cover the head's head/2 rotary frequencies in
                # Qwen2-VL-7B's proportions (16, 24, 24 of 64): [2, 3, 3] at head_dim 16
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head // 8, 3 * head // 16, 3 * head // 16]},
                bos_token_id=end, eos_token_id=eot, pad_token_id=end)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2)
    else:  # window attention in block 0, full attention in block 1, as the 7B alternates them
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      fullatt_block_indexes=[1], tokens_per_second=2)
    # init std 0.2 by default rather than transformers' 0.02: 0.02 gives near-uniform logits and the same
    # greedy text for every video, which would make the tests' comparisons between rows and prompts toothless
    text["initializer_range"] = vision["initializer_range"] = init_std
    config = AutoConfig.for_model(
        kind, text_config=text, vision_config=vision, tie_word_embeddings=False, initializer_range=init_std,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = _model_class(kind)(config)
    model.generation_config = GenerationConfig(bos_token_id=end, eos_token_id=[eot, end],
                                               pad_token_id=end)
    model.save_pretrained(path)
    return config.vision_config


# ----------------------------------------------------------------------------- loading

def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # prompts end where generation starts
    return tok


def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ModelError(f"model.dtype={name!r}: expected auto, {', '.join(dtypes)}")
    return dtypes[name]


def check_folder(path, cfg):
    """The model kind of the Hugging Face folder at `path` (its config.json's model_type), after the checks
    that turn a wrong path, an interrupted download or a missing package into one line naming what to do."""
    folder = Path(path)
    names = " or ".join(CHECKPOINTS.values())
    hint = (f"expected a Hugging Face folder of {names} (config.json + weights), "
            f"or set model.build_tiny=qwen2_vl to build a tiny random model there")
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        if not folder.exists() and Path(str(path).rstrip("/") + ".old").is_dir():  # checkpoint.replace_folder
            hint = (f"a run stopped while replacing this export; the previous one is {path}.old: rerun the "
                    "training command (it puts it back), or rename it")
        raise ModelError(f"model folder {path} {what}: {hint}")
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind not in KINDS:
        raise ModelError(f"{path}/config.json has model_type={kind!r}; expected one of {KINDS}: {hint}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"model folder {path} has a config.json but no weights (*.safetensors): "
                         "an interrupted build or download? Delete the folder (model.build_tiny rebuilds "
                         "the tiny model) or complete the download")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                         "pip install flash-attn, or set model.attn_implementation=sdpa")
    return kind


def load_model(path, cfg, device, *, train, dtype=None):
    """Load the HF model at `path` (kind from its config.json); returns (model, kind).
    train=False gives the frozen reference: eval mode, no gradients. dtype: a torch dtype; by default
    model.dtype resolved for `device`."""
    kind = check_folder(path, cfg)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    model = _model_class(kind).from_pretrained(path, dtype=dtype,
                                               attn_implementation=cfg.attn_implementation).to(device)
    return _set_mode(model, cfg, train), kind


def read_config(path):
    """(config, generation config) of the HF folder at `path`; the generation config is built from the
    config where the folder has no generation_config.json, as from_pretrained does."""
    from transformers import AutoConfig, GenerationConfig
    config = AutoConfig.from_pretrained(path)
    if (Path(path) / "generation_config.json").is_file():
        return config, GenerationConfig.from_pretrained(path)
    return config, GenerationConfig.from_model_config(config)


def empty_model(config, cfg, dtype, *, train):
    """The model `config` (an HF config, as loaded) describes, on the meta device in `dtype`: its
    architecture without weights, for FSDP to shard before the weights are filled in
    (training.load_policy)."""
    with torch.device("meta"):
        model = _model_class(config.model_type)._from_config(config, dtype=dtype,
                                                             attn_implementation=cfg.attn_implementation)
    return _set_mode(model, cfg, train)


def _set_mode(model, cfg, train):
    if train:
        model.train()
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable()
    else:
        model.eval().requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- weights, one tensor at a time

# A .safetensors file: 8 bytes (little-endian u64) giving the header's length, the header (JSON: name ->
# {"dtype", "shape", "data_offsets": [begin, end)} counted from the end of the header, and "__metadata__"),
# then the tensors' bytes, little-endian.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Qwen's released checkpoints name the weights as transformers 4 laid the model out, and transformers 5
# writes those names back when it saves: visual.* and model.{embed_tokens,layers,norm}.*, where the model
# now has model.visual.* and model.language_model.*. The same two renamings as transformers 5's own
# loading (conversion_mapping.py, Qwen2VLForConditionalGeneration); names already in the new layout are
# kept.
RENAMES = ((re.compile(r"^visual\."), "model.visual."),
           (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."))


@dataclass
class StoredTensor:
    file: str
    dtype: torch.dtype
    shape: tuple
    begin: int            # byte offsets in the file
    end: int


def stored_weights(path):
    """{name in the model: StoredTensor} for the safetensors weights of the folder at `path`
    (model.safetensors, or the files model.safetensors.index.json lists), from the files' headers alone:
    nothing is read yet."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ModelError(f"{index} is not a safetensors index (a JSON object with a weight_map): "
                             "download it again") from None
    if not files:
        raise ModelError(f"model folder {path} has no *.safetensors weights (only *.bin?): "
                         "save it again with save_pretrained, which writes safetensors")
    weights = {}
    for name in files:
        file = folder / name
        if index.is_file() and not file.exists():
            raise ModelError(f"{index} lists {name}, which is not in {path}: an interrupted download?")
        weights.update(_safetensors_header(file))
    return {_renamed(k): v for k, v in weights.items()}


def _renamed(name):
    for pattern, new in RENAMES:
        name = pattern.sub(new, name)
    return name


def _safetensors_header(file):
    broken = f"{file} is not a complete safetensors file (an interrupted download?): download it again"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else size
            if length > size - 8:
                raise ModelError(broken)
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(broken) from None
    except OSError as e:
        raise ModelError(f"cannot read {file}: {e.strerror}") from None
    start, tensors = 8 + length, {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ModelError(f"{file}: {name} is stored as {info['dtype']}, "
                                 "which this loader does not read")
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = (start + o for o in info["data_offsets"])
            if end > size or end - begin != math.prod(shape) * dtype.itemsize:
                raise ModelError(broken)
            tensors[name] = StoredTensor(str(file), dtype, shape, begin, end)
    except (AttributeError, KeyError, TypeError, ValueError):  # a header of another shape
        raise ModelError(broken) from None
    return tensors


def read_weight(stored):
    """One stored tensor, read from its file into memory of its own (no memory map held open)."""
    out = torch.empty(stored.shape, dtype=stored.dtype)
    if out.numel():
        with open(stored.file, "rb") as f:
            f.seek(stored.begin)
            read = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            if read != stored.end - stored.begin:
                raise ModelError(f"{stored.file} ended early: download it again")
    return out


def init_buffers(hf_model):
    """Compute the buffers no checkpoint holds (the rotary frequencies), which building on the meta device
    skipped, with transformers' own rule for them (_init_weights)."""
    for module in hf_model.modules():
        if module._non_persistent_buffers_set and not any(True for _ in module.parameters(recurse=False)):
            hf_model._init_weights(module)


# ----------------------------------------------------------------------------- positions

def video_positions(grid_thw, start, merge, second_per_grid=None, tokens_per_second=1):
    """(3, t*h*w/merge^2) positions of one video's tokens: its (t, h, w) grid after the spatial merge,
    offset by `start`. Qwen2-VL (second_per_grid None): grid step i at i. Qwen2.5-VL: at
    int(i * second_per_grid * tokens_per_second), multiplied in float32 and in that order, second_per_grid
    as float32 (as the processor stores it), as Qwen's fine-tuning code (qwen-vl-finetune rope2d.py,
    get_rope_index_25), transformers 4.49-4.51 and vLLM compute it. In float64, 3 * 1.1666666 * 2 =
    6.9999998 truncates to 6 where they get 7. transformers 4.52-4.57 truncate second_per_grid to an
    integer first (1.1666666 -> 1): not followed here."""
    T, H, W = (int(x) for x in grid_thw)
    t = torch.arange(T)                                                             # (T,)
    if second_per_grid is not None:
        t = (t.float() * torch.tensor(second_per_grid, dtype=torch.float32) * tokens_per_second).long()
    grid = torch.meshgrid(t, torch.arange(H // merge), torch.arange(W // merge), indexing="ij")
    return torch.stack(grid).reshape(3, -1) + start


def rope_positions(hf_model, batch, input_ids, attention_mask):
    """(3, N, S) M-RoPE positions (temporal, height, width) of `input_ids` (N, S), whose first L columns are
    the batch's prompts (row n holds video n) and the rest generated text. Qwen's published rule
    (get_rope_index in the Qwen2-VL / Qwen2.5-VL releases): text counts up by one on all three axes; a
    video's tokens take their place in its (t, h, w) grid; the text after a video starts one past the
    largest position the video used on any axis. Padding (attention_mask 0) gets 0.
    Not transformers' get_rope_index: 5.24 resumes text after a video at max(h, w) / merge, ignoring the
    temporal axis, so text can reuse the positions of the last frames (with Qwen2.5-VL's scaled time at
    our defaults, for square-ish frames), unlike what the checkpoints were trained with."""
    if "mm_token_type_ids" not in batch:
        raise ModelError("the batch has no mm_token_type_ids: without them Qwen-VL silently falls back "
                         "to 1-D RoPE; build batches with data.collate")
    config = hf_model.config
    merge = config.vision_config.spatial_merge_size
    prompt_types = batch["mm_token_type_ids"]
    types = F.pad(prompt_types, (0, input_ids.shape[1] - prompt_types.shape[1]))
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)                # (3, N, S)
    for n in range(input_ids.shape[0]):
        keep = attention_mask[n].bool().cpu()
        # runs of text / video
        kinds, counts = torch.unique_consecutive(types[n].cpu()[keep], return_counts=True)
        pieces, start = [], 0
        for kind, count in zip(kinds.tolist(), counts.tolist()):
            if kind == 0:  # text
                pieces.append(torch.arange(count).expand(3, -1) + start)
            else:          # video n (image tokens never occur here)
                timing = ((float(batch["second_per_grid_ts"][n]), config.vision_config.tokens_per_second)
                          if config.model_type == "qwen2_5_vl" else ())
                pieces.append(video_positions(batch["video_grid_thw"][n], start, merge, *timing))
            start = int(pieces[-1].max()) + 1
        positions[:, n, keep] = torch.cat(pieces, dim=1)
    return positions.to(input_ids.device)


# ----------------------------------------------------------------------------- log-probs

def vision_token_ids(config):
    """The placeholder tokens of images and videos. The policy never samples them (their logits are -inf
    in sampling and in log-probs alike): a generated <|video_pad|> would be taken for a video slot by the
    next forward pass, which then finds more slots than video features and fails."""
    return [config.image_token_id, config.video_token_id,
            config.vision_start_token_id, config.vision_end_token_id]


def ban(logits, banned):
    """logits (..., V) with the `banned` token ids (k,) set to -inf."""
    return logits if banned is None else logits.index_fill(-1, banned, float("-inf"))


def _chunk_logp(hidden, weight, targets, temperature, banned):
    # (C, V): the only vocab-sized tensor
    logits = ban(F.linear(hidden, weight).float() / temperature, banned)
    logz = logits.logsumexp(-1)                                   # (C,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    # entropy H = log Z - sum_v p_v * logit_v, a diagnostic (banned tokens have p_v = 0)
    with torch.no_grad():
        entropy = logz - (logits.softmax(-1) * logits.nan_to_num(neginf=0.0)).sum(-1)
    return logp, entropy


def selective_log_softmax(hidden, weight, targets, temperature, chunk_size=1024, banned=None):
    """log softmax(hidden @ weight.T / temperature) at `targets`, and the entropy (detached), per token.
    hidden (..., H), weight (V, H), targets (...) -> two float32 tensors shaped like targets; `banned`
    (k,) token ids are left out of the softmax. Works on chunk_size tokens at a time, each chunk under
    activation checkpointing when gradients are on, so neither the forward nor the backward keeps more
    than one (chunk_size, V) block of logits."""
    if temperature <= 0:
        raise ValueError(f"log-probs need temperature > 0, got {temperature}")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (n, H), (n,)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    for i in range(0, flat_t.numel(), chunk_size):
        args = (flat_h[i:i + chunk_size], weight, flat_t[i:i + chunk_size], temperature, banned)
        logp, entropy = checkpoint(_chunk_logp, *args, use_reentrant=False) if grad else _chunk_logp(*args)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps).view(targets.shape), torch.cat(entropies).view(targets.shape)


@dataclass
class PackedGroups:
    """B groups, one row each: the group's prompt without its padding, then its completions one after
    another, [prompt b, c_b0, c_b1, ...], right-padded to the longest row (S tokens)."""
    input_ids: torch.Tensor   # (B, S); padding is token 0, an ordinary token (never a vision placeholder)
    positions: torch.Tensor   # (3, B, S) M-RoPE positions; padding 0
    segments: torch.Tensor    # (B, S) 0 for the prompt, g + 1 for completion g, -1 for padding
    sources: torch.Tensor     # (tokens,) for each scored completion token, in completion_ids[valid] order,
                              # the index in the flattened (B*S) rows of the state that predicts it


def pack_groups(batch, positions, completion_ids, lengths, counts):
    """Pack the B prompts of a collated batch (left-padded, M-RoPE `positions` (3, B, L) from
    rope_positions) with their completions completion_ids (N, T), lengths (N,): prompt b owns the next
    counts[b] rows. Completion tokens continue one past their prompt's largest position, as in the rollout
    (prefill), so every token has the position it has in the per-row sequence. A completion's last token
    predicts nothing that is scored, so it is not fed; the state that predicts a completion's first token
    is its prompt's last."""
    device, lengths = completion_ids.device, lengths.tolist()
    rows, row_positions, row_segments, sources = [], [], [], []                  # sources: (row, index) pairs
    n = 0
    for b, count in enumerate(counts):
        keep = batch["attention_mask"][b].bool()                        # (L,) drops the left padding
        ids, pos = [batch["input_ids"][b, keep]], [positions[:, b, keep]]        # (L_b,), (3, L_b)
        segments = [torch.zeros(len(ids[0]), dtype=torch.long, device=device)]
        # the next position; the index of the prompt's last token
        start, last = int(pos[0].max()) + 1, len(ids[0]) - 1
        offset = len(ids[0])
        for g in range(count):
            fed = max(lengths[n] - 1, 0)
            ids.append(completion_ids[n, :fed])
            pos.append(torch.arange(start, start + fed, device=device).expand(3, -1))
            segments.append(torch.full((fed,), g + 1, device=device))
            if lengths[n]:
                sources += [(b, last)] + [(b, offset + t) for t in range(fed)]
            offset, n = offset + fed, n + 1
        rows.append(torch.cat(ids))
        row_positions.append(torch.cat(pos, 1))
        row_segments.append(torch.cat(segments))
    # S rounded up to a multiple of 16: CUDA's memory-efficient attention copies (pads) a mask whose rows
    # are not 16-element aligned, in every layer
    S = -(-max(len(r) for r in rows) // 16) * 16

    def pad(x, value):                                                            # (..., n) -> (..., S)
        return F.pad(x, (0, S - x.shape[-1]), value=value)
    return PackedGroups(torch.stack([pad(r, 0) for r in rows]),
                        torch.stack([pad(p, 0) for p in row_positions], 1),
                        torch.stack([pad(s, -1) for s in row_segments]),
                        torch.tensor([b * S + i for b, i in sources], dtype=torch.long, device=device))


def prefix_attention_mask(segments, implementation, dtype):
    """(B, 1, S, S) additive attention mask of packed groups (segments (B, S), PackedGroups), 0 where a
    token may attend and dtype's minimum elsewhere: a token sees the earlier tokens of its own segment and
    of the prompt (segment 0), so each completion sees its prompt and itself only. A float mask rather than
    a bool one because eager attention adds the mask (a bool would count as 0 and 1) and SDPA converts a
    bool mask to float in every layer; one float mask is shared by all layers. flash_attention_2 takes no
    such mask."""
    if implementation not in ("sdpa", "eager"):
        raise ModelError(f"prefix-shared log-probs need model.attn_implementation=sdpa or eager, not "
                         f"{implementation}: flash-attention takes no custom attention mask")
    same_segment = segments[:, :, None] == segments[:, None, :]                   # (B, S q, S k)
    sees = same_segment.logical_or_(segments[:, None, :] == 0)
    sees = sees.tril_()[:, None]                                                  # causal
    # in place: the mask is S^2 numbers (6144^2 * 4 bytes = 150 MB in float32), built without a second copy
    blocked = torch.full(sees.shape, torch.finfo(dtype).min, dtype=dtype, device=sees.device)
    return blocked.masked_fill_(sees, 0.0)


class Policy(nn.Module):
    """Wraps the HF model so that FSDP2's root unit covers the embedding, final norm and lm_head:
    training.shard calls fully_shard on each vision block and decoder layer, then on the Policy. Every pass
    goes through forward (FSDP2's hooks run on a module's forward only). freeze_vision=True takes the vision
    tower out of training: its weights get no gradient and it runs without a graph in every pass."""

    def __init__(self, hf_model, freeze_vision=False):
        super().__init__()
        self.hf = hf_model
        self.freeze_vision = freeze_vision
        if freeze_vision:
            hf_model.model.visual.requires_grad_(False)

    def forward(self, batch, completion_ids, lengths, temperature, group_size=None):
        """Log-probs of completion_ids (N, T) with lengths (N,) under logits / temperature, and the entropy,
        both (N, T) float32, 0 at t >= lengths[n]; the entropy is detached.

        group_size=None (per row): `batch` holds each row's prompt (data.repeat_batch), and row n runs as one
        sequence [prompt, completion n], as the usual GRPO code does: the vision tower and the prompt run N
        times. group_size=G, or a list of B counts (prefix-shared): `batch` holds B prompts, and the
        completion rows come grouped by prompt (row b*G+g from prompt b). The vision tower and each prompt run
        once per group: each group is one sequence [prompt, c_0, ..., c_G-1] (pack_groups) whose attention
        mask lets each completion see its prompt and itself (prefix_attention_mask), so the prompt's states
        receive the sum of the G completions' gradients. Log-probs and gradients equal the per-row path's to
        float rounding (tests).

        Why one packed sequence rather than the prompt's keys/values shared by G completion rows: a shared
        cache takes two forwards through every decoder layer (the prompt, then the completions), which
        transformers' gradient checkpointing breaks (a checkpointed layer is handed cache=None, so the
        completions would not see the prompt) and which runs each FSDP2 unit twice per pass; the packed
        sequence is one ordinary forward. The packed sequence pays for its dense mask: fused attention
        kernels skip no masked block, so the prompt's queries also meet the completions' keys, and each
        completion the others'. bench.py's "training passes" table measures the per-row and packed paths;
        docs/benchmarks.md records them beside a shared cache."""
        N, T = completion_ids.shape
        valid = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]     # (N, T) from lengths
        if group_size is None:
            hidden = self._per_row_states(batch, completion_ids, valid)
        else:
            B = batch["input_ids"].shape[0]
            counts = [group_size] * B if isinstance(group_size, int) else list(group_size)
            if sum(counts) != N:
                raise ValueError(f"group sizes {counts} do not add up to the {N} completion rows")
            hidden = self._prefix_shared_states(batch, completion_ids, lengths, counts)
        banned = torch.tensor(vision_token_ids(self.hf.config), device=completion_ids.device)
        # (tokens,): the completion tokens only
        logp, entropy = selective_log_softmax(hidden, self.hf.lm_head.weight, completion_ids[valid],
                                              temperature, banned=banned)
        zeros = torch.zeros(N, T, device=hidden.device)
        return zeros.masked_scatter(valid, logp), zeros.masked_scatter(valid, entropy)

    def _video_inputs(self, batch):
        """The decoder call's video arguments: the pixels, or with a frozen tower its features, computed
        here without a graph (transformers takes precomputed features as mm_encoder_outputs)."""
        if not self.freeze_vision:
            return {"pixel_values_videos": batch["pixel_values_videos"],
                    "video_grid_thw": batch["video_grid_thw"]}
        with torch.no_grad():
            video = self.hf.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"],
                                                     return_dict=True)
        return {"mm_encoder_outputs": {"video": video}}

    def _per_row_states(self, batch, completion_ids, valid):
        """(tokens, H): the states that predict the completion tokens at `valid` (N, T), one sequence per
        row."""
        L = batch["input_ids"].shape[1]
        Tk = int(valid.sum(1).max())               # columns past the longest completion are all padding
        ids, mask = completion_ids[:, :Tk], valid[:, :Tk]                             # (N, Tk)
        input_ids = torch.cat([batch["input_ids"], ids], 1)                           # (N, L+Tk)
        prompt_mask = batch["attention_mask"]
        attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)
        hidden = self.hf.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=rope_positions(self.hf, batch, input_ids, attention_mask),
                               **self._video_inputs(batch), use_cache=False).last_hidden_state
        return hidden[:, L - 1:L - 1 + Tk][mask]   # (N, Tk, H) -> (tokens, H): the state before each token

    def _prefix_shared_states(self, batch, completion_ids, lengths, counts):
        """(tokens, H): the same states as _per_row_states, from one packed sequence per group."""
        # (3, B, L)
        positions = rope_positions(self.hf, batch, batch["input_ids"], batch["attention_mask"])
        packed = pack_groups(batch, positions, completion_ids, lengths, counts)
        # in the decoder's compute dtype, which SDPA requires of a float mask: the embedding's, bf16 under
        # FSDP2's mixed precision even though the stored weights are float32
        mask = prefix_attention_mask(packed.segments, self.hf.config.text_config._attn_implementation,
                                     self.hf.get_input_embeddings().weight.dtype)     # (B, 1, S, S)
        hidden = self.hf.model(input_ids=packed.input_ids, attention_mask=mask,
                               position_ids=packed.positions, **self._video_inputs(batch),
                               use_cache=False).last_hidden_state                     # (B, S, H)
        return hidden.flatten(0, 1)[packed.sources]


# ----------------------------------------------------------------------------- group rollout


@dataclass
class Rollout:
    ids: torch.Tensor       # (N, T) completion token ids, row b*G+g from prompt b, pad_id after each
                            # row's end
    lengths: torch.Tensor   # (N,) tokens generated, including the end token when the row ended
    ended: torch.Tensor     # (N,) True if the row stopped on an end token, False if cut at max_new_tokens


@dataclass(frozen=True)
class Tokens:
    """What generation and decoding need from a tokenizer: the end tokens (<|im_end|>, then
    <|endoftext|>), the padding token (the tokenizer's, else <|endoftext|>), and turning a Rollout's rows
    into text, each cut at its length, special tokens left out.

        tokens = Tokens.of(tokenizer)
        rollout = generate(..., eos_ids=tokens.eos_ids, pad_id=tokens.pad_id)
        texts = tokens.decode(rollout)
    """
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(cls, tokenizer) -> "Tokens":
        eos_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[1]
        return cls(tokenizer, eos_ids, pad_id)

    def decode(self, roll, rows=None) -> list[str]:
        """The text of each row of `roll` (a Rollout), or of `rows` (indices) of it: its first lengths[n] ids,
        special tokens skipped."""
        ids, lengths = (roll.ids, roll.lengths) if rows is None else (roll.ids[rows], roll.lengths[rows])
        cut = [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
        return self.tokenizer.batch_decode(cut, skip_special_tokens=True)


@dataclass
class DecodeState:
    """What the decode loop carries for the n rows still in the KV cache."""
    cache: object                  # transformers DynamicCache, batch dimension n
    attention_mask: torch.Tensor   # (n, L + t): the prompt's left padding, then ones
    positions: torch.Tensor        # (n,) M-RoPE position of the next token (the same on all three axes)
    rows: torch.Tensor             # (n,) which of the N output rows each cache row is


def sample(logits, temperature, top_p, generator=None):
    """Next token per row from logits (n, V): argmax when temperature is 0, otherwise a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)           # (n, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p   # the mass before the token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(hf_model, batch):
    """Run the vision tower and the prompts once: returns the last-position logits (B, V) and a
    DecodeState."""
    from transformers import DynamicCache
    cache = DynamicCache(config=hf_model.config)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]      # (B, L), left-padded
    positions = rope_positions(hf_model, batch, input_ids, attention_mask)        # (3, B, L)
    hidden = hf_model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            pixel_values_videos=batch["pixel_values_videos"],
                            video_grid_thw=batch["video_grid_thw"],
                            cache=cache, use_cache=True).last_hidden_state
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    # text after the prompt continues one past its largest position on any axis (padding is 0)
    next_positions = positions.amax((0, 2)) + 1
    return hf_model.lm_head(hidden[:, -1]), DecodeState(cache, attention_mask, next_positions, rows)


class GroupLayer(DynamicLayer):
    """One decoder layer's KV cache in the decode loop: each prompt's keys and values copied to its G rows,
    in buffers with room for the completion, so that a step writes its token in place. transformers'
    DynamicLayer concatenates instead, copying the whole cache on every step (what that costs:
    docs/benchmarks.md). `keys` and `values` are views of the filled part, which is what DynamicLayer's
    callers read. (A class because transformers' Cache calls its layers' methods.)"""

    def __init__(self, keys, values, group_size, room):
        super().__init__()
        B, heads, S, hd = keys.shape                                       # (B, heads, L, hd)
        self.buffers = []
        for x in (keys, values):
            buffer = x.new_empty(B * group_size, heads, S + room, hd)      # (B*G, heads, L + room, hd)
            buffer.view(B, group_size, heads, S + room, hd)[..., :S, :] = x[:, None]
            self.buffers.append(buffer)
        self.length, self.device, self.is_initialized = S, keys.device, True
        self._view()

    def _view(self):
        self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        s = key_states.shape[-2]
        if self.length + s > self.buffers[0].shape[2]:
            raise RuntimeError(f"GroupLayer: no room for {s} more tokens after {self.length}")
        for buffer, x in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length:self.length + s] = x
        self.length += s
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.buffers = [b[indices] for b in self.buffers]
        self._view()


def expand(logits, state, group_size, room):
    """Copy each prompt's logits and decode state to its G rows: (B, ...) -> (B*G, ...), row b*G+g from b;
    the cache gets room for `room` more tokens (GroupLayer). Positions need no other change: the model's
    rope deltas are folded into state.positions."""
    state.cache.layers = [GroupLayer(layer.keys, layer.values, group_size, room)
                          for layer in state.cache.layers]
    rows = torch.arange(len(state.rows) * group_size, device=state.rows.device)
    return logits.repeat_interleave(group_size, 0), DecodeState(
        state.cache, state.attention_mask.repeat_interleave(group_size, 0),
        state.positions.repeat_interleave(group_size), rows)


def keep_rows(state, keep):
    """Drop the cache rows whose `keep` (n,) is False, so finished rows stop costing compute. This copies
    the kept rows' cache once; a decode step reads all of it, so it pays as soon as a row ends."""
    index = keep.nonzero().squeeze(-1)
    state.cache.batch_select_indices(index)
    return DecodeState(state.cache, state.attention_mask[index], state.positions[index],
                       state.rows[index])


def decode_one_token(hf_model, tokens, state):
    """Feed tokens (n,) at the state's positions; returns the next logits (n, V) and the advanced state."""
    attention_mask = F.pad(state.attention_mask, (0, 1), value=1)                 # (n, L + t + 1)
    positions = state.positions.view(1, -1, 1).expand(3, -1, 1)                  # (3, n, 1)
    hidden = hf_model.model(input_ids=tokens[:, None], attention_mask=attention_mask,
                            position_ids=positions, cache=state.cache, use_cache=True).last_hidden_state
    advanced = DecodeState(state.cache, attention_mask, state.positions + 1, state.rows)
    return hf_model.lm_head(hidden[:, -1]), advanced


@torch.no_grad()
def generate(hf_model, batch, group_size, max_new_tokens, temperature, top_p, eos_ids, pad_id,
             generator=None, sync=None, on_end=None):
    """Sample G completions for each of the B prompts of a collated, left-padded batch.

    The vision tower and the prefill run once per prompt; the KV cache and positions are then copied to G
    rows and all N = B*G rows decode together. A row that samples one of eos_ids ends (the end token is
    part of its completion) and leaves the batch. sync(local_all_done) -> global_all_done lets ranks under
    torch.distributed stop together: a rank whose rows all ended keeps stepping (on its last rows, whose
    output is thrown away) until every rank is done. temperature 0 is greedy decoding. `generator` must be
    on the model's device. eos_ids and pad_id: Tokens.of(tokenizer) gives Qwen's. on_end(rollout, rows) is
    told each row the step it ends (a list of row indices; the rollout so far holds their final ids), and
    at the end the rows cut at max_new_tokens or stopped by sync, so that their rewards can start while
    the other rows decode."""
    # prefill B prompts (vision tower included) -> copy cache, positions and last logits to B*G rows ->
    # loop: sample a token per row, record it, drop rows that ended, feed the rest one token further
    B = batch["input_ids"].shape[0]
    N, device = B * group_size, batch["input_ids"].device
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    banned = torch.tensor(vision_token_ids(hf_model.config), device=device)
    ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)    # (N, T)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    ended = torch.zeros(N, dtype=torch.bool, device=device)
    logits, state = expand(*prefill(hf_model, batch), group_size, max_new_tokens)     # (N, V)
    for t in range(max_new_tokens):
        tokens = sample(ban(logits, banned), temperature, top_p, generator)          # (n,)
        live = ~ended[state.rows]                        # False only for rows kept after ending (see sync)
        ids[state.rows[live], t] = tokens[live]
        lengths[state.rows[live]] += 1
        ended[state.rows[live]] = torch.isin(tokens[live], eos)
        finished = ended[state.rows]                                                 # (n,)
        if on_end is not None and (rows := state.rows[live & finished].tolist()):
            on_end(Rollout(ids, lengths, ended), rows)
        local_done = bool(finished.all()) or t == max_new_tokens - 1
        if sync(local_done) if sync is not None else local_done:
            break
        if finished.any() and not finished.all():
            state = keep_rows(state, ~finished)
            tokens = tokens[~finished]
        logits, state = decode_one_token(hf_model, tokens, state)
    if on_end is not None and (rows := (~ended).nonzero().flatten().tolist()):
        on_end(Rollout(ids, lengths, ended), rows)
    return Rollout(ids, lengths, ended)
