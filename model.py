"""The policy model: loading Qwen2-VL / Qwen2.5-VL, a tiny offline stand-in, group rollout and log-probs.

    model, kind = load_model("models/Qwen2-VL-7B-Instruct", cfg.model, "cuda", train=True)
    rollout = generate(model, batch, group_size=8, max_new_tokens=1024, temperature=1.0, top_p=1.0,
                       eos_ids=[im_end_id, endoftext_id], pad_id=endoftext_id)
    logp, entropy = Policy(model)(repeat_batch(batch, 8), rollout.ids, rollout.lengths, temperature=1.0)

Shapes: B prompts, G samples per prompt, N = B*G rows, L prompt tokens (left-padded), T completion tokens,
H hidden size, V vocabulary.

Beyond the paper (which says nothing about how rollouts are computed):
- Group rollout: the usual GRPO code (HF generate with num_return_sequences=G) repeats each prompt G times, so
  the vision tower and the prefill of thousands of visual tokens run G times per video. `generate` runs them
  once per prompt, copies the KV cache to the G rows (into buffers with room for the completion, so that a
  step writes in place instead of re-concatenating the cache) and decodes the N rows together with its own
  loop; rows that end are dropped from the batch. Greedy outputs equal per-row generation token for token
  (tests). bench.py measures it against HF generate with num_return_sequences=G.
- M-RoPE positions are always computed here (`rope_positions`, Qwen's published rule) and passed to the
  model explicitly, in the rollout and in the log-prob pass alike; the model's stateful `rope_deltas` is not
  used. Transformers 5 silently falls back to 1-D RoPE when `mm_token_type_ids` is missing: here it is an error.
- Log-probs never hold an (N, T, V) float32 tensor: `selective_log_softmax` runs lm_head in chunks of tokens,
  each under activation checkpointing, on the completion tokens only.
- `build_tiny` writes a random 0.2M-parameter model with a byte-level tokenizer, loaded by the same code path
  as the 7B checkpoints, so that everything runs offline on a CPU.
"""
import importlib.util
import json
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
# Qwen2-VL-7B-Instruct's chat template (Qwen2.5-VL's is the same): one <|video_pad|> per video, which data.py
# expands to the video's t*h*w/4 tokens.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelError(RuntimeError):
    pass


def _model_class(kind):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[kind]


# ----------------------------------------------------------------------------- tokenizer and tiny model

def build_tokenizer(path):
    """A byte-level Qwen2Tokenizer (256 byte symbols, no merges) plus Qwen's special tokens and chat template."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({s: len(vocab) + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_tiny(path, kind, seed=0):
    """Write a random tiny `kind` model (hidden 64, 2 layers, vision depth 2) and its tokenizer to `path`."""
    from transformers import AutoConfig, GenerationConfig
    if kind not in KINDS:
        raise ModelError(f"build_tiny: unknown kind {kind!r}; expected one of {KINDS}")
    tok = build_tokenizer(path)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    end, eot = ids["<|endoftext|>"], ids["<|im_end|>"]
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                # head_dim 16: the (temporal, height, width) sections cover its 8 rotary frequencies
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=end, eos_token_id=eot, pad_token_id=end)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    else:  # window attention in block 0, full attention in block 1, as the 7B alternates them
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], tokens_per_second=2)
    # init std 0.2 rather than 0.02: the default gives near-uniform logits and the same greedy text for every
    # video, which would make the tests' comparisons between rows and prompts toothless
    text["initializer_range"] = vision["initializer_range"] = 0.2
    config = AutoConfig.for_model(
        kind, text_config=text, vision_config=vision, tie_word_embeddings=False, initializer_range=0.2,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = _model_class(kind)(config)
    model.generation_config = GenerationConfig(bos_token_id=end, eos_token_id=[eot, end], pad_token_id=end)
    model.save_pretrained(path)


def build_demo(path, kind, records, instruction, data_cfg, steps, lr, seed=0):
    """A tiny model that can already write the output format: build_tiny, then `steps` of
    supervised training (teacher forcing, all records in one batch) on each record's
    reference output (rewards.reference_output), saved back to `path`. The tiny-scale
    stand-in for the paper's SFT stage before GRPO: a random model never writes <think> or
    <answer>, so every sample would score 0 and GRPO would have no signal."""
    import data
    import rewards
    from config import ModelConfig
    from tqdm import tqdm
    build_tiny(path, kind, seed)
    tok = load_tokenizer(path)
    hf, _ = load_model(path, ModelConfig(path=path, gradient_checkpointing=False), "cpu", train=True)
    batch = data.collate([data.encode(r.video, instruction, tok, data_cfg, kind, hf.config.vision_config)
                          for r in records], tok.pad_token_id)
    targets = [tok(rewards.reference_output(r) + "<|im_end|>")["input_ids"] for r in records]
    lengths = torch.tensor([len(t) for t in targets])                            # (N,)
    ids = torch.full((len(targets), int(lengths.max())), tok.pad_token_id)       # (N, T)
    for i, t in enumerate(targets):
        ids[i, :len(t)] = torch.tensor(t)
    policy, optimizer = Policy(hf), torch.optim.AdamW(hf.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="warm start")
    for _ in bar:
        logp, _ = policy(batch, ids, lengths, 1.0)                                # (N, T)
        loss = -logp.sum() / lengths.sum()           # negative log-likelihood per target token
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")
    hf.save_pretrained(path)


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


def load_model(path, cfg, device, *, train):
    """Load the HF model at `path` (kind from its config.json); returns (model, kind).
    train=False gives the frozen reference: eval mode, no gradients."""
    folder = Path(path)
    hint = (f"expected a Hugging Face folder of {' or '.join(CHECKPOINTS.values())} (config.json + weights), "
            f"or set model.build_tiny=qwen2_vl to build a tiny random model there")
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        raise ModelError(f"model folder {path} {what}: {hint}")
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind not in KINDS:
        raise ModelError(f"{path}/config.json has model_type={kind!r}; expected one of {KINDS}: {hint}")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                         "pip install flash-attn, or set model.attn_implementation=sdpa")
    model = _model_class(kind).from_pretrained(path, dtype=resolve_dtype(cfg.dtype, device),
                                               attn_implementation=cfg.attn_implementation).to(device)
    if train:
        model.train()
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable()
    else:
        model.eval().requires_grad_(False)
    return model, kind


# ----------------------------------------------------------------------------- positions

def video_positions(grid_thw, start, merge, time_step):
    """(3, t*h*w/merge^2) positions of one video's tokens: its (t, h, w) grid after the spatial merge, offset by
    `start`. Frame index t is scaled by time_step (Qwen2.5-VL: tokens_per_second * second_per_grid_ts, floored
    after the multiply; Qwen2-VL: 1)."""
    T, H, W = (int(x) for x in grid_thw)
    t = (torch.arange(T, dtype=torch.float64) * time_step).long()                  # (T,)
    grid = torch.meshgrid(t, torch.arange(H // merge), torch.arange(W // merge), indexing="ij")
    return torch.stack(grid).reshape(3, -1) + start


def rope_positions(hf_model, batch, input_ids, attention_mask):
    """(3, N, S) M-RoPE positions (temporal, height, width) of `input_ids` (N, S), whose first L columns are the
    batch's prompts (row n holds video n) and the rest generated text. Qwen's published rule (get_rope_index
    in the Qwen2-VL / Qwen2.5-VL releases): text counts up by one on all three axes; a video's tokens take
    their place in its (t, h, w) grid; the text after a video starts one past the largest position the video
    used on any axis. Padding (attention_mask 0) gets 0.
    Not transformers' get_rope_index: 5.24 resumes text after a video at max(h, w) / merge, ignoring the
    temporal axis, so text can reuse the positions of the last frames (with Qwen2.5-VL's scaled time at
    our defaults, for square-ish frames), unlike what the checkpoints were trained with."""
    if "mm_token_type_ids" not in batch:
        raise ModelError("the batch has no mm_token_type_ids: without them Qwen-VL silently falls back to 1-D "
                         "RoPE; build batches with data.collate")
    config = hf_model.config
    merge = config.vision_config.spatial_merge_size
    types = F.pad(batch["mm_token_type_ids"], (0, input_ids.shape[1] - batch["mm_token_type_ids"].shape[1]))
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)                # (3, N, S)
    for n in range(input_ids.shape[0]):
        keep = attention_mask[n].bool().cpu()
        kinds, counts = torch.unique_consecutive(types[n].cpu()[keep], return_counts=True)  # runs of text / video
        pieces, start = [], 0
        for kind, count in zip(kinds.tolist(), counts.tolist()):
            if kind == 0:  # text
                pieces.append(torch.arange(count).expand(3, -1) + start)
            else:          # video n (image tokens never occur here)
                step = (config.vision_config.tokens_per_second * float(batch["second_per_grid_ts"][n])
                        if config.model_type == "qwen2_5_vl" else 1.0)
                pieces.append(video_positions(batch["video_grid_thw"][n], start, merge, step))
            start = int(pieces[-1].max()) + 1
        positions[:, n, keep] = torch.cat(pieces, dim=1)
    return positions.to(input_ids.device)


# ----------------------------------------------------------------------------- log-probs

def vision_token_ids(config):
    """The placeholder tokens of images and videos. The policy never samples them (their logits are -inf in
    sampling and in log-probs alike): a generated <|video_pad|> would be taken for a video slot by the next
    forward pass, which then finds more slots than video features and fails."""
    return [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]


def ban(logits, banned):
    """logits (..., V) with the `banned` token ids (k,) set to -inf."""
    return logits if banned is None else logits.index_fill(-1, banned, float("-inf"))


def _chunk_logp(hidden, weight, targets, temperature, banned):
    logits = ban(F.linear(hidden, weight).float() / temperature, banned)   # (C, V): the only vocab-sized tensor
    logz = logits.logsumexp(-1)                                   # (C,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.no_grad():  # entropy H = log Z - sum_v p_v * logit_v, a diagnostic (banned tokens have p_v = 0)
        entropy = logz - (logits.softmax(-1) * logits.nan_to_num(neginf=0.0)).sum(-1)
    return logp, entropy


def selective_log_softmax(hidden, weight, targets, temperature, chunk_size=1024, banned=None):
    """log softmax(hidden @ weight.T / temperature) at `targets`, and the entropy (detached), per token.
    hidden (..., H), weight (V, H), targets (...) -> two float32 tensors shaped like targets; `banned` (k,)
    token ids are left out of the softmax. Works on chunk_size tokens at a time, each chunk under activation
    checkpointing when gradients are on, so neither the forward nor the backward keeps more than one
    (chunk_size, V) block of logits."""
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


class Policy(nn.Module):
    """Wraps the HF model so that FSDP2's root unit covers the embedding, final norm and lm_head:
    grpo.py calls fully_shard on each decoder layer and vision block, then on the Policy."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, batch, completion_ids, lengths, temperature):
        """batch: collated prompts repeated to N rows; completion_ids (N, T), lengths (N,).
        Returns logp (N, T) of each completion token under logits / temperature, and entropy (N, T), detached;
        both 0 at t >= lengths[n]."""
        N, T = completion_ids.shape
        L = batch["input_ids"].shape[1]
        Tk = int(lengths.max())                    # columns past the longest completion are all padding
        valid = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]    # (N, T) from lengths
        ids, mask = completion_ids[:, :Tk], valid[:, :Tk]                             # (N, Tk)
        input_ids = torch.cat([batch["input_ids"], ids], 1)                           # (N, L+Tk)
        attention_mask = torch.cat([batch["attention_mask"], mask.to(batch["attention_mask"].dtype)], 1)
        hidden = self.hf.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=rope_positions(self.hf, batch, input_ids, attention_mask),
                               pixel_values_videos=batch["pixel_values_videos"],
                               video_grid_thw=batch["video_grid_thw"], use_cache=False).last_hidden_state
        hidden = hidden[:, L - 1:L - 1 + Tk]    # (N, Tk, H): the state that predicts completion token t
        banned = torch.tensor(vision_token_ids(self.hf.config), device=ids.device)
        logp, entropy = selective_log_softmax(hidden[mask], self.hf.lm_head.weight, ids[mask],
                                              temperature, banned=banned)             # (tokens,) completion only
        zeros = torch.zeros(N, T, device=hidden.device)
        return zeros.masked_scatter(valid, logp), zeros.masked_scatter(valid, entropy)


# ----------------------------------------------------------------------------- group rollout

@dataclass
class Rollout:
    ids: torch.Tensor       # (N, T) completion token ids, row b*G+g from prompt b, pad_id after each row's end
    lengths: torch.Tensor   # (N,) tokens generated, including the end token when the row ended
    ended: torch.Tensor     # (N,) True if the row stopped on an end token, False if cut at max_new_tokens


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
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p       # mass before the token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(hf_model, batch):
    """Run the vision tower and the prompts once: returns the last-position logits (B, V) and a DecodeState."""
    from transformers import DynamicCache
    cache = DynamicCache(config=hf_model.config)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]      # (B, L), left-padded
    positions = rope_positions(hf_model, batch, input_ids, attention_mask)        # (3, B, L)
    hidden = hf_model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                            cache=cache, use_cache=True).last_hidden_state
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    # text after the prompt continues one past its largest position on any axis (padding is 0)
    return hf_model.lm_head(hidden[:, -1]), DecodeState(cache, attention_mask, positions.amax((0, 2)) + 1, rows)


class GroupLayer(DynamicLayer):
    """One decoder layer's KV cache in the decode loop: each prompt's keys and values copied to its G rows, in
    buffers with room for the completion, so that a step writes its token in place. transformers' DynamicLayer
    concatenates instead, copying the whole cache on every step (half of a CPU decode step at 4K prompt tokens).
    `keys` and `values` are views of the filled part, which is what DynamicLayer's callers read. (A class
    because transformers' Cache calls its layers' methods.)"""

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
    """Copy each prompt's logits and decode state to its G rows: (B, ...) -> (B*G, ...), row b*G+g from b; the
    cache gets room for `room` more tokens (GroupLayer). Positions need no other change: the model's rope
    deltas are folded into state.positions."""
    state.cache.layers = [GroupLayer(layer.keys, layer.values, group_size, room) for layer in state.cache.layers]
    rows = torch.arange(len(state.rows) * group_size, device=state.rows.device)
    return logits.repeat_interleave(group_size, 0), DecodeState(
        state.cache, state.attention_mask.repeat_interleave(group_size, 0),
        state.positions.repeat_interleave(group_size), rows)


def keep_rows(state, keep):
    """Drop the cache rows whose `keep` (n,) is False, so finished rows stop costing compute. This copies the
    kept rows' cache once; a decode step reads all of it, so it pays as soon as a row ends."""
    index = keep.nonzero().squeeze(-1)
    state.cache.batch_select_indices(index)
    return DecodeState(state.cache, state.attention_mask[index], state.positions[index], state.rows[index])


def decode_one_token(hf_model, tokens, state):
    """Feed tokens (n,) at the state's positions; returns the next logits (n, V) and the advanced state."""
    attention_mask = F.pad(state.attention_mask, (0, 1), value=1)                 # (n, L + t + 1)
    positions = state.positions.view(1, -1, 1).expand(3, -1, 1)                  # (3, n, 1)
    hidden = hf_model.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                            cache=state.cache, use_cache=True).last_hidden_state
    return hf_model.lm_head(hidden[:, -1]), DecodeState(state.cache, attention_mask, state.positions + 1, state.rows)


@torch.no_grad()
def generate(hf_model, batch, group_size, max_new_tokens, temperature, top_p, eos_ids, pad_id,
             generator=None, sync=None):
    """Sample G completions for each of the B prompts of a collated, left-padded batch.

    The vision tower and the prefill run once per prompt; the KV cache and positions are then copied to G
    rows and all N = B*G rows decode together. A row that samples one of eos_ids ends (the end token is
    part of its completion) and leaves the batch. sync(local_all_done) -> global_all_done lets ranks under
    torch.distributed stop together: a rank whose rows all ended keeps stepping (on its last rows, whose
    output is thrown away) until every rank is done. temperature 0 is greedy decoding. `generator` must be on
    the model's device."""
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
        local_done = bool(finished.all()) or t == max_new_tokens - 1
        if sync(local_done) if sync is not None else local_done:
            break
        if finished.any() and not finished.all():
            state = keep_rows(state, ~finished)
            tokens = tokens[~finished]
        logits, state = decode_one_token(hf_model, tokens, state)
    return Rollout(ids, lengths, ended)
