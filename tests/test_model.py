"""model.py on the tiny random models (both kinds): loading, the group rollout against per-row HF generate,
and the chunked log-probs against a plain full log_softmax."""
import json
import os
import shutil
import struct

import pytest
import torch

import data
import model as M
from config import DataConfig, ModelConfig

KINDS = M.KINDS
HERE = os.path.dirname(os.path.abspath(__file__))
CLIPS = ["blue_circle_grows.mp4", "cyan_circle_bounces.mp4", "green_triangle_falls.mp4"]
TEXTS = ["Describe.", "Describe the video in detail, please.", "What happens?"]   # unequal: left padding
# 1 fps gives the clips 1.25, 1.5 and 1.0 seconds per grid step: Qwen2.5-VL positions that differ from the
# default spacing; frames upscaled to 112x112 give each video 32 tokens on a 4x4 grid
DATA = DataConfig(fps=1.0, min_pixels=112 * 112)


def make_batch(tok, kind, n=3):
    """The first n shipped clips, each with its own instruction, through data.encode and data.collate."""
    prompts = [data.encode(os.path.join(HERE, "data", clip), text, tok, DATA, kind)
               for clip, text in zip(CLIPS[:n], TEXTS)]
    return data.collate(prompts, tok.pad_token_id)


def row_inputs(batch, b, kind):
    """Prompt b alone, unpadded, as HF generate's keyword arguments."""
    one = data.select_rows(batch, [b])
    keep = one["attention_mask"][0].bool()
    for key in ["input_ids", "attention_mask", "mm_token_type_ids"]:
        one[key] = one[key][:, keep]
    if kind == "qwen2_vl":
        del one["second_per_grid_ts"]
    return one


@pytest.fixture(scope="module")
def frozen(tiny_model_dir):
    """frozen(kind) -> (model, tokenizer, batch of 3 prompts of different lengths): a frozen tiny model."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tiny_model_dir(kind)
            tok = M.load_tokenizer(path)
            model, _ = M.load_model(path, ModelConfig(path=path), "cpu", train=False)
            cache[kind] = model, tok, make_batch(tok, kind)
        return cache[kind]
    return get


# ----------------------------------------------------------------------------- building and loading

@pytest.mark.parametrize("kind", KINDS)
def test_tiny_config_takes_ids_from_tokenizer(tiny_model_dir, kind):
    path = tiny_model_dir(kind)
    tok = M.load_tokenizer(path)
    config = json.load(open(f"{path}/config.json"))
    assert config["model_type"] == kind and tok.padding_side == "left"
    assert config["text_config"]["vocab_size"] == len(tok) == 256 + len(M.SPECIAL_TOKENS)
    for key, token in [("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"),
                       ("vision_end_token_id", "<|vision_end|>")]:
        assert config[key] == tok.convert_tokens_to_ids(token)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "héllo <|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text
    content = [{"type": "video"}, {"type": "text", "text": "x"}]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|video_pad|><|vision_end|>x<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_and_checkpointing(tiny_model_dir, kind):
    path = tiny_model_dir(kind)
    model, got = M.load_model(path, ModelConfig(path=path), "cpu", train=True)
    assert got == kind and model.training and model.dtype == torch.float32
    assert model.model.language_model.layers[0].gradient_checkpointing
    batch = make_batch(M.load_tokenizer(path), kind, n=2)
    ids, lengths = torch.randint(0, 256, (2, 5)), torch.tensor([5, 3])
    logp, entropy = M.Policy(model)(batch, ids, lengths, 1.0)
    logp.sum().backward()
    assert torch.isfinite(logp).all() and (logp[1, 3:] == 0).all() and not entropy.requires_grad
    for name in ["model.visual.blocks.0.attn.qkv.weight", "model.language_model.layers.1.mlp.up_proj.weight",
                 "lm_head.weight", "model.language_model.embed_tokens.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_reference_is_frozen(frozen):
    model, _, _ = frozen("qwen2_vl")
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_dropping_mm_token_type_ids_is_not_silent(frozen, kind):
    model, _, batch = frozen(kind)
    inputs = {k: v for k, v in batch.items() if kind == "qwen2_5_vl" or k != "second_per_grid_ts"}
    with torch.no_grad():
        logits = model(**inputs).logits
        without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        try:  # transformers refuses for Qwen2-VL but silently uses 1-D RoPE for Qwen2.5-VL
            assert not torch.allclose(model(**without).logits, logits, atol=1e-3)
        except ValueError:
            assert kind == "qwen2_vl"
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with pytest.raises(M.ModelError, match="mm_token_type_ids"):
        M.generate(model, without, 2, 3, 0.0, 1.0, [0], 0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(frozen, kind, tmp_path):
    model, tok, _ = frozen(kind)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, got = M.load_model(str(tmp_path), ModelConfig(), "cpu", train=False)
    tok2 = M.load_tokenizer(str(tmp_path))
    assert got == kind and tok2.get_vocab() == tok.get_vocab() and tok2.chat_template == tok.chat_template
    assert [tok2.convert_tokens_to_ids(s) for s in M.SPECIAL_TOKENS] == [tok.convert_tokens_to_ids(s)
                                                                          for s in M.SPECIAL_TOKENS]
    state, state2 = model.state_dict(), again.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(M.ModelError, match="does not exist.*Qwen2-VL-7B-Instruct.*build_tiny"):
        M.load_model(str(tmp_path / "nope"), ModelConfig(), "cpu", train=False)
    with pytest.raises(M.ModelError, match="has no config.json"):
        M.load_model(str(tmp_path), ModelConfig(), "cpu", train=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(M.ModelError, match="model_type='llama'.*qwen2_vl"):
        M.load_model(str(tmp_path), ModelConfig(), "cpu", train=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))  # an interrupted download
    with pytest.raises(M.ModelError, match="has a config.json but no weights"):
        M.load_model(str(tmp_path), ModelConfig(), "cpu", train=False)
    path = tiny_model_dir("qwen2_vl")
    with pytest.raises(M.ModelError, match="model.dtype='fp8'"):
        M.load_model(path, ModelConfig(dtype="fp8"), "cpu", train=False)
    with pytest.raises(M.ModelError, match="flash-attn is not installed"):
        M.load_model(path, ModelConfig(attn_implementation="flash_attention_2"), "cpu", train=False)
    with pytest.raises(M.ModelError, match="unknown kind"):
        M.build_tiny(str(tmp_path / "x"), "llava", data_cfg=None)


# ----------------------------------------------------------------------------- weights, one tensor at a time

def write_safetensors(path, entries):
    """A .safetensors file laid out by hand from the published format: u64 little-endian header length, JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_read_from_the_published_layout(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {
        "visual.blocks.0.norm1.weight": ("BF16", [3], bytes.fromhex("803f00c0003f")),       # 1.0, -2.0, 0.5
        "model.layers.0.mlp.up_proj.weight": ("F32", [2, 2], struct.pack("<4f", 1.5, -3.0, 0.25, 8.0)),
        "model.embed_tokens.weight": ("I64", [2], struct.pack("<2q", -7, 2 ** 40)),
        "lm_head.weight": ("BOOL", [2], b"\x01\x00"),
        "model.language_model.norm.weight": ("F16", [0], b"")})
    stored = M.stored_weights(str(tmp_path))
    # Qwen's released names, renamed as transformers 5 renames them; the new layout's kept
    assert sorted(stored) == ["lm_head.weight", "model.language_model.embed_tokens.weight",
                              "model.language_model.layers.0.mlp.up_proj.weight",
                              "model.language_model.norm.weight",
                              "model.visual.blocks.0.norm1.weight"]
    read = {k: M.read_weight(v) for k, v in stored.items()}
    assert read["model.visual.blocks.0.norm1.weight"].dtype == torch.bfloat16
    assert read["model.visual.blocks.0.norm1.weight"].tolist() == [1.0, -2.0, 0.5]
    assert read["model.language_model.layers.0.mlp.up_proj.weight"].tolist() == [[1.5, -3.0], [0.25, 8.0]]
    assert read["model.language_model.embed_tokens.weight"].tolist() == [-7, 2 ** 40]
    assert read["lm_head.weight"].tolist() == [True, False]
    assert read["model.language_model.norm.weight"].shape == (0,)


def test_safetensors_read_what_the_safetensors_package_writes(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 7, generator=g).bfloat16(), "b": torch.randn(3, generator=g),
               "c": torch.randint(-9, 9, (2, 3, 4), generator=g), "d": torch.randn(4, 4, generator=g).half()}
    save_file(tensors, tmp_path / "model.safetensors")
    stored = M.stored_weights(str(tmp_path))
    assert stored.keys() == tensors.keys()
    for k, v in tensors.items():
        got = M.read_weight(stored[k])
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_safetensors_errors_name_the_file(tmp_path, tiny_model_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("qwen2_vl"), folder)
    whole = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[:-100])                     # an interrupted download
    with pytest.raises(M.ModelError, match=r"model.safetensors is not a complete safetensors file"):
        M.stored_weights(str(folder))
    (folder / "model.safetensors").write_bytes(whole[:5])
    with pytest.raises(M.ModelError, match="not a complete safetensors file"):
        M.stored_weights(str(folder))
    write_safetensors(folder / "model.safetensors", {"x": ("F32", [1], b"\0\0\0\0")})
    # a header of another shape
    odd = (folder / "model.safetensors").read_bytes().replace(b'"shape"', b'"shope"')
    (folder / "model.safetensors").write_bytes(odd)
    with pytest.raises(M.ModelError, match="not a complete safetensors file"):
        M.stored_weights(str(folder))

    (folder / "model.safetensors").unlink()
    index = {"weight_map": {"x": "model-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(M.ModelError, match="lists model-00001.safetensors, which is not in"):
        M.stored_weights(str(folder))
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(M.ModelError, match="index.json is not a safetensors index"):
        M.stored_weights(str(folder))
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(M.ModelError, match=r"no \*.safetensors weights \(only \*.bin\?\)"):
        M.stored_weights(str(folder))
    (folder / "model.safetensors").mkdir()                                          # unreadable as a file
    with pytest.raises(M.ModelError, match=r"cannot read .*model.safetensors: Is a directory"):
        M.stored_weights(str(folder))


# ----------------------------------------------------------------------------- group rollout

def hf_greedy(model, batch, kind, b, max_new_tokens, eos):
    """Prompt b alone through HF generate: its greedy completion, stopping after the first of eos."""
    one = row_inputs(batch, b, kind)
    out = model.generate(**one, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    return out[0, one["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_group_rollout_equals_per_row_generation(frozen, kind):
    model, _, batch = frozen(kind)
    B, G, T = 3, 2, 12
    free = [hf_greedy(model, batch, kind, b, T, []) for b in range(B)]
    # an end token that prompt 0 emits early and prompt 1 never does: prompt 0's rows end and leave the
    # batch mid-way, so the compaction is exercised
    eos = [next(t for t in free[0][1:6] if t not in free[1])]
    expected = [hf_greedy(model, batch, kind, b, T, eos) for b in range(B)]
    rows_fed = []  # the batch size of each forward: ended rows must leave it
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_fed.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    rollout = M.generate(model, batch, G, T, 0.0, 1.0, eos, pad_id=257)
    hook.remove()
    assert rows_fed[0] == B and rows_fed[1] == B * G                     # the prefill ran once per prompt
    # the last step fed only rows still going
    assert rows_fed[-1] == int((rollout.lengths == T).sum()) < B * G
    assert rollout.ids.shape == (B * G, T)
    for n in range(B * G):
        want = expected[n // G]
        assert rollout.ids[n, :len(want)].tolist() == want and rollout.lengths[n] == len(want)
        assert (rollout.ids[n, len(want):] == 257).all()
        assert rollout.ended[n] == (want[-1] in eos)
    assert rollout.ended[0] and not rollout.ended[2] and rollout.lengths[0] < T


@pytest.mark.parametrize("kind", KINDS)
def test_expanded_cache_gives_fresh_prefill_logits(frozen, kind):
    model, _, batch = frozen(kind)
    G = 2
    with torch.no_grad():
        logits, state = M.expand(*M.prefill(model, batch), G, room=1)
        tokens = torch.arange(len(state.rows)) + 40                       # a different next token per row
        next_logits, _ = M.decode_one_token(model, tokens, state)
        for n in range(len(state.rows)):
            one = row_inputs(batch, n // G, kind)
            fresh = model(**one).logits[0, -1]
            assert torch.allclose(logits[n], fresh, atol=1e-5)
            one["input_ids"] = torch.cat([one["input_ids"], tokens[n].view(1, 1)], 1)
            one["attention_mask"] = torch.ones_like(one["input_ids"])
            one["mm_token_type_ids"] = torch.nn.functional.pad(one["mm_token_type_ids"], (0, 1))
            assert torch.allclose(next_logits[n], model(**one).logits[0, -1], atol=1e-5)


def test_sampled_rollout_lengths_flags_padding_and_seeds(frozen):
    model, _, batch = frozen("qwen2_5_vl")
    B, G, T, pad = 3, 4, 16, 0
    eos = list(range(100, 115))                          # ~6% of the vocabulary: rows end at varied steps

    def run(seed):
        return M.generate(model, batch, G, T, 1.0, 0.95, eos, pad,
                          generator=torch.Generator().manual_seed(seed))
    rollout = run(1)
    assert rollout.ids.shape == (B * G, T) and rollout.ended.any() and not rollout.ended.all()
    is_eos = torch.isin(rollout.ids, torch.tensor(eos))
    for n in range(B * G):
        length = int(rollout.lengths[n])
        assert 1 <= length <= T and (rollout.ids[n, length:] == pad).all()
        assert not is_eos[n, :length - 1].any()         # nothing stops a row before its end
        assert bool(is_eos[n, length - 1]) == bool(rollout.ended[n])
        assert rollout.ended[n] or length == T
    again, other = run(1), run(2)
    assert torch.equal(again.ids, rollout.ids) and torch.equal(again.lengths, rollout.lengths)
    assert not torch.equal(other.ids, rollout.ids)
    assert len({tuple(r) for r in rollout.ids[:G].tolist()}) > 1   # a group's samples differ


def test_sample_top_p_and_greedy():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(M.sample(logits, 1.0, 0.5, g).tolist()) == {0, 1}         # 0.4 < 0.5 <= 0.4 + 0.3
    assert set(M.sample(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}
    assert (M.sample(logits, 1.0, 1e-6, g) == 0).all() and (M.sample(logits, 0.0, 1.0) == 0).all()


def test_sync_keeps_a_finished_rank_stepping(frozen):
    model, _, batch = frozen("qwen2_vl")
    free = M.generate(model, batch, 2, 8, 0.0, 1.0, [], pad_id=0)
    eos = free.ids[:, 2].unique().tolist()                # every row ends by its 3rd token
    alone = M.generate(model, batch, 2, 8, 0.0, 1.0, eos, pad_id=0)
    calls = []

    def sync(local_done):  # another rank that finishes 2 steps later
        calls.append(local_done)
        return sum(calls) >= 3
    synced = M.generate(model, batch, 2, 8, 0.0, 1.0, eos, pad_id=0, sync=sync)
    assert alone.ended.all() and calls == [False] * (len(calls) - 3) + [True] * 3
    assert torch.equal(synced.ids, alone.ids) and torch.equal(synced.lengths, alone.lengths)


def test_tokens_ids_come_from_the_tokenizer_and_decode_cuts_rows_at_their_length(tiny_tokenizer):
    tok = tiny_tokenizer
    tokens = M.Tokens.of(tok)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tokens.eos_ids == (im_end, endoftext) and tokens.pad_id == tok.pad_token_id == endoftext
    hello, world = tok("hello")["input_ids"], tok("world!")["input_ids"]
    T = 12
    rows = [hello + [im_end] + tok("junk")["input_ids"], world]                  # junk after the end token
    ids = torch.tensor([r + [tokens.pad_id] * (T - len(r)) for r in rows])
    rollout = M.Rollout(ids, torch.tensor([len(hello) + 1, 3]), torch.tensor([True, False]))
    assert tokens.decode(rollout) == ["hello", "wor"]                 # byte-level: 3 tokens, 3 letters
    assert tokens.decode(M.Rollout(ids[:, :0], torch.zeros(2, dtype=torch.long), rollout.ended)) == ["", ""]


def test_tokens_pad_falls_back_to_endoftext():
    class NoPad:  # a tokenizer without a padding token
        pad_token_id = None

        def convert_tokens_to_ids(self, token):
            return {"<|im_end|>": 7, "<|endoftext|>": 5}[token]
    assert M.Tokens.of(NoPad()).eos_ids == (7, 5) and M.Tokens.of(NoPad()).pad_id == 5


# ----------------------------------------------------------------------------- log-probs

def plain_logp(hf, batch, ids, lengths, temperature, kind):
    """The obvious way: full logits over prompt + completion, log_softmax, gather."""
    L, T = batch["input_ids"].shape[1], ids.shape[1]
    mask = torch.arange(T)[None] < lengths[:, None]
    inputs = {k: v for k, v in batch.items() if kind == "qwen2_5_vl" or k != "second_per_grid_ts"}
    inputs.update(input_ids=torch.cat([batch["input_ids"], ids], 1),
                  attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1),
                  mm_token_type_ids=torch.nn.functional.pad(batch["mm_token_type_ids"], (0, T)))
    logits = hf(**inputs).logits[:, L - 1:-1] / temperature                      # (N, T, V)
    logits[..., M.vision_token_ids(hf.config)] = float("-inf")    # not in the policy's action space
    logprobs = logits.log_softmax(-1)
    logp = logprobs.gather(-1, ids[..., None]).squeeze(-1) * mask
    entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1) * mask
    return logp, entropy


@pytest.mark.parametrize("kind", KINDS)
def test_policy_logp_and_grads_equal_plain_log_softmax(tiny_model_dir, kind):
    path = tiny_model_dir(kind)
    hf, _ = M.load_model(path, ModelConfig(path=path), "cpu", train=True)
    batch = data.repeat_batch(make_batch(M.load_tokenizer(path), kind), 2)     # N = 6
    N, T, temperature = 6, 7, 0.7
    ids = torch.randint(0, 263, (N, T), generator=torch.Generator().manual_seed(0))
    ids[torch.isin(ids, torch.tensor(M.vision_token_ids(hf.config)))] = 0   # never sampled (model.ban)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])
    weights = torch.randn(N, T)
    results = []
    for fn in [lambda: M.Policy(hf)(batch, ids, lengths, temperature),
               lambda: plain_logp(hf, batch, ids, lengths, temperature, kind)]:
        hf.zero_grad()
        logp, entropy = fn()
        (logp * weights).sum().backward()
        param_grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
        results.append((logp.detach(), entropy.detach(), param_grads))
    (logp, entropy, grads), (logp0, entropy0, grads0) = results
    assert logp.dtype == torch.float32 and (logp[1, 1:] == 0).all()
    assert torch.allclose(logp, logp0, atol=1e-5) and torch.allclose(entropy, entropy0, atol=1e-5)
    for name, grad in grads.items():  # float32 sums in another order: equal to ~1e-6 relative
        assert (grad - grads0[name]).norm() <= 1e-5 * grads0[name].norm() + 1e-8, name


def test_selective_log_softmax_equals_plain_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[1, 3:] = 0                                                # padding: a row that ended early
    upstream = torch.randn(3, 5, generator=g)
    # 4 chunks, last partial
    logp, entropy = M.selective_log_softmax(hidden, weight, targets, 0.8, chunk_size=4)
    (logp * upstream).sum().backward()
    chunked = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logprobs = (hidden @ weight.T / 0.8).log_softmax(-1)
    plain = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    (plain * upstream).sum().backward()
    assert torch.allclose(logp, plain, atol=1e-5) and not entropy.requires_grad
    assert torch.allclose(entropy, -(logprobs.exp() * logprobs).sum(-1), atol=1e-5)
    assert torch.allclose(chunked[0], hidden.grad, atol=1e-5)
    assert torch.allclose(chunked[1], weight.grad, atol=1e-5)
    with torch.no_grad():
        two_chunks = M.selective_log_softmax(hidden, weight, targets, 0.8, chunk_size=2)[0]
        assert torch.allclose(two_chunks, plain, atol=1e-5)
    with pytest.raises(ValueError, match="temperature > 0"):
        M.selective_log_softmax(hidden, weight, targets, 0.0)


def _rope_batch(T, H, W, second_per_grid_ts):
    """3 text tokens, one video of grid (T, H, W) (merge 2: T*H*W/4 tokens), 2 text tokens."""
    n_video = T * H * W // 4
    types = torch.tensor([[0] * 3 + [2] * n_video + [0] * 2])
    return {"input_ids": torch.zeros_like(types), "attention_mask": torch.ones_like(types),
            "mm_token_type_ids": types, "video_grid_thw": torch.tensor([[T, H, W]]),
            "second_per_grid_ts": torch.tensor([second_per_grid_ts])}


@pytest.mark.parametrize("kind, T, step, after", [
    # Qwen2-VL, grid (4, 4, 4): frames at t = 3..6, rows and columns 3..4 -> text resumes at 7
    ("qwen2_vl", 4, 1.0, [7, 8]),
    # Qwen2.5-VL, tokens_per_second 2, 1.5 s per grid step: t = 3 + floor(0, 3, 6) = 3, 6, 9 -> text at 10
    ("qwen2_5_vl", 3, 1.5, [10, 11]),
])
def test_rope_positions_follow_qwens_published_rule(tiny_model_dir, kind, T, step, after):
    """Text after a video starts one past the largest position the video used on any axis (Qwen's release
    code). transformers 5.24's get_rope_index resumes at max(h, w) / merge instead, which here would put the
    text on the video's last frames: we do not follow it."""
    hf, _ = M.load_model(tiny_model_dir(kind), ModelConfig(path=tiny_model_dir(kind)), "cpu", train=False)
    assert hf.config.vision_config.spatial_merge_size == 2
    if kind == "qwen2_5_vl":
        assert hf.config.vision_config.tokens_per_second == 2
    batch = _rope_batch(T, 4, 4, step)
    pos = M.rope_positions(hf, batch, batch["input_ids"], batch["attention_mask"])[:, 0]   # (3, S)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    video = pos[:, 3:-2]
    frames = sorted(set(video[0].tolist()))
    assert frames == sorted({3 + int(i * step * (2 if kind == "qwen2_5_vl" else 1)) for i in range(T)})
    assert sorted(set(video[1].tolist())) == sorted(set(video[2].tolist())) == [3, 4]
    assert pos[:, -2:].tolist() == [after] * 3
    extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if kind == "qwen2_5_vl" else {}
    hf_pos, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        attention_mask=batch["attention_mask"], **extra)
    assert torch.equal(hf_pos[:, 0, :-2], pos[:, :-2])       # the same up to the text after the video
    assert hf_pos[0, 0, -2].item() == 3 + 2                   # transformers: 3 + max(h, w) / merge


@pytest.mark.parametrize("total, T, expected_t, after", [
    # 9.33 s at 24 fps (224 frames) at 2 fps: 18.7 frames, capped at 16 (grid t = 8). Float32, as Qwen's
    # get_rope_index_25 and vLLM compute it: 3 * 1.1666666 = 3.4999999 rounds to 3.5 (a tie, to even),
    # * 2 = 7; likewise 6 * 1.1666666 -> 7.0, * 2 = 14. Float64 gives 6.9999998 -> 6 and 13.9999995 -> 13.
    (224, 16, [0, 2, 4, 7, 9, 11, 14, 16], 20),
    # 4.67 s (112 frames): 9.3 -> 8 frames (grid t = 4), the same 1.714 fps: the last frames are at 3 + 7, so
    # the text after the video starts at 11 (float64: 3 + 6 + 1 = 10)
    (112, 8, [0, 2, 4, 7], 11),
])
def test_qwen2_5_vl_time_is_float32(tiny_model_dir, total, T, expected_t, after):
    assert data.frame_count(total, 24.0, DataConfig()) == T
    # as data.encode and HF's processor
    spg = torch.tensor(2 / (T / total * 24.0), dtype=torch.float32).item()
    assert f"{spg:.9f}" == "1.166666627"
    # the rule as Qwen's fine-tuning code (qwen-vl-finetune rope2d.py) and vLLM write it: an int64 grid index
    # times a Python float times tokens_per_second (2), which torch computes in float32, then truncated
    reference = (torch.arange(T // 2).view(-1, 1) * spg * 2).long().flatten().tolist()
    assert reference == expected_t
    assert [int(i * spg * 2) for i in range(T // 2)] != expected_t              # float64 is off by one
    hf, _ = M.load_model(tiny_model_dir("qwen2_5_vl"), ModelConfig(path=tiny_model_dir("qwen2_5_vl")), "cpu",
                         train=False)
    assert hf.config.vision_config.tokens_per_second == 2
    # 3 text tokens, the video (4x4 patches: 2x2 tokens), 2 text
    batch = _rope_batch(T // 2, 4, 4, spg)
    pos = M.rope_positions(hf, batch, batch["input_ids"], batch["attention_mask"])[:, 0]   # (3, S)
    assert pos[0, 3:-2].tolist() == [3 + t for t in expected_t for _ in range(4)]
    assert pos[:, -2:].tolist() == [[after, after + 1]] * 3
    # transformers 5.24 computes t * (2 * 1.1666666) in float32: the same for a power-of-2 tokens_per_second
    hf_pos, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        attention_mask=batch["attention_mask"],
                                        second_per_grid_ts=batch["second_per_grid_ts"])
    assert torch.equal(hf_pos[:, 0, :-2], pos[:, :-2])


def test_qwen2_5_vl_positions_of_the_shipped_clips(frozen):
    """make_batch's clips at 1 fps: 4 frames each (grid t = 2) of 20, 24 and 16 frames at 8 fps, so 1.6, 1.333
    and 2 fps sampled and 1.25, 1.5 and 1.0 s per grid step: the second step at int(1 * 1.25 * 2) = 2, 3 and
    2."""
    hf, _, batch = frozen("qwen2_5_vl")
    assert batch["second_per_grid_ts"].tolist() == [1.25, 1.5, 1.0]
    pos = M.rope_positions(hf, batch, batch["input_ids"], batch["attention_mask"])          # (3, N, L)
    for n, second in enumerate([2, 3, 2]):
        video = batch["mm_token_type_ids"][n] == data.VIDEO_TYPE
        start = int(pos[0, n, video][0])
        # 4x4 tokens per grid step
        assert pos[0, n, video].tolist() == [start] * 16 + [start + second] * 16
