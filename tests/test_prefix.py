"""model.Policy's prefix-shared path (group_size) against the per-row path on the tiny models of both kinds:
log-probs, entropies and the gradient of every parameter, with left-padded prompts, several groups per call,
groups of unequal sizes, completions of different lengths (empty ones too), gradient checkpointing on; the
packed layout's M-RoPE ids and attention mask; a frozen vision tower."""
import pytest
import torch
from test_model import make_batch

import data
import model as M
from config import ModelConfig

B, G, T = 3, 3, 7
LENGTHS = torch.tensor([7, 0, 3, 1, 7, 2, 4, 5, 0])     # row b*G+g; empty, one-token and full completions


def load(tiny_model_dir, kind, **overrides):
    path = tiny_model_dir(kind)
    hf, _ = M.load_model(path, ModelConfig(path=path, **overrides), "cpu", train=True)
    return hf, make_batch(M.load_tokenizer(path), kind)                  # 3 prompts, left-padded


def completions(hf, n, seed=0):
    """(n, T) random completion ids with no vision placeholder (the policy never samples one, model.ban)."""
    ids = torch.randint(0, hf.config.text_config.vocab_size, (n, T),
                        generator=torch.Generator().manual_seed(seed))
    ids[torch.isin(ids, torch.tensor(M.vision_token_ids(hf.config)))] = 0
    return ids


def run(policy, batch, ids, lengths, group_size, weights):
    """logp, entropy (n, T) and every parameter's gradient of sum(logp * weights)."""
    policy.zero_grad(set_to_none=True)
    logp, entropy = policy(batch, ids, lengths, 0.7, group_size=group_size)
    (logp * weights).sum().backward()
    return logp.detach(), entropy, {n: p.grad for n, p in policy.hf.named_parameters() if p.grad is not None}


def assert_same(got, want, atol=1e-5, grad_rtol=1e-5):
    (logp, entropy, grads), (logp0, entropy0, grads0) = got, want
    assert torch.allclose(logp, logp0, atol=atol) and torch.allclose(entropy, entropy0, atol=atol)
    assert grads.keys() == grads0.keys()
    for name, grad in grads.items():  # float32 sums in another order: equal to ~1e-6 relative
        assert (grad - grads0[name]).norm() <= grad_rtol * grads0[name].norm() + 1e-8, name


@pytest.mark.parametrize("kind", M.KINDS)
def test_prefix_shared_equals_per_row(tiny_model_dir, kind):
    hf, batch = load(tiny_model_dir, kind)
    assert hf.model.language_model.layers[0].gradient_checkpointing and batch["attention_mask"].min() == 0
    ids, weights = completions(hf, B * G), torch.randn(B * G, T, generator=torch.Generator().manual_seed(1))
    policy = M.Policy(hf)
    shared = run(policy, batch, ids, LENGTHS, G, weights)
    per_row = run(policy, data.repeat_batch(batch, G), ids, LENGTHS, None, weights)
    assert_same(shared, per_row)
    logp, entropy, grads = shared
    assert (logp[LENGTHS[:, None] <= torch.arange(T)] == 0).all()
    assert (logp[0] < 0).all() and entropy[0].min() > 0
    assert grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0    # the vision tower trains
    # the comparison has teeth: another completion for one row changes that row only
    other = ids.clone()
    other[2, 1] = (other[2, 1] + 1) % 256
    moved = run(policy, batch, other, LENGTHS, G, weights)[0]
    assert (moved[2, 2:3] - logp[2, 2:3]).abs().max() > 1e-3 and torch.equal(moved[3:], logp[3:])


def test_float64_paths_agree_to_rounding(tiny_model_dir):
    """In float64 the log-probs agree to 1e-10: what float32 leaves is rounding, not a different computation.
    (The gradients keep float32's rounding: the RMSNorms compute in float32 whatever the model's dtype.)"""
    hf, batch = load(tiny_model_dir, "qwen2_5_vl")
    hf.double()
    batch["pixel_values_videos"] = batch["pixel_values_videos"].double()
    ids, weights = completions(hf, B * G), torch.randn(B * G, T, dtype=torch.float64)
    policy = M.Policy(hf)
    assert_same(run(policy, batch, ids, LENGTHS, G, weights),
                run(policy, data.repeat_batch(batch, G), ids, LENGTHS, None, weights),
                atol=1e-10, grad_rtol=1e-6)


def test_unequal_groups_and_a_group_split_over_two_calls(tiny_model_dir):
    """group_size as counts per prompt; a group's completions split over two calls (grpo.py's micro-batches
    when a group does not fit one pass) accumulate the per-row gradient."""
    hf, batch = load(tiny_model_dir, "qwen2_vl")
    counts, lengths = [1, 3, 2], torch.tensor([4, 7, 0, 2, 5, 1])
    ids, weights = completions(hf, 6, seed=2), torch.randn(6, T, generator=torch.Generator().manual_seed(3))
    policy = M.Policy(hf)
    rows = data.select_rows(batch, [0, 1, 1, 1, 2, 2])
    per_row = run(policy, rows, ids, lengths, None, weights)
    assert_same(run(policy, batch, ids, lengths, counts, weights), per_row)

    policy.zero_grad(set_to_none=True)
    logps = []
    # prompt 1's group split 2 + 1 over the two calls: rows 0 | 1, 2 from prompts 0 | 1, then 3 | 4, 5 from
    # 1 | 2
    for part, prompts in (([0, 1, 2], [0, 1]), ([3, 4, 5], [1, 2])):
        logp, _ = policy(data.select_rows(batch, prompts), ids[part], lengths[part], 0.7, group_size=[1, 2])
        (logp * weights[part]).sum().backward()
        logps.append(logp.detach())
    grads = {n: p.grad for n, p in hf.named_parameters()}
    assert torch.allclose(torch.cat(logps), per_row[0], atol=1e-5)
    for name, grad in per_row[2].items():
        assert (grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-8, name
    with pytest.raises(ValueError, match="do not add up"):
        policy(batch, ids, lengths, 0.7, group_size=[1, 1, 1])


def test_eager_attention_takes_the_additive_mask(tiny_model_dir):
    hf, batch = load(tiny_model_dir, "qwen2_vl", attn_implementation="eager")
    ids, weights = completions(hf, B * G), torch.randn(B * G, T)
    policy = M.Policy(hf)
    assert_same(run(policy, batch, ids, LENGTHS, G, weights),
                run(policy, data.repeat_batch(batch, G), ids, LENGTHS, None, weights))
    hf.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(M.ModelError, match="sdpa or eager"):
        policy(batch, ids, LENGTHS, 0.7, group_size=G)


@pytest.mark.parametrize("kind", M.KINDS)
def test_packed_positions_equal_the_per_row_m_rope_ids(tiny_model_dir, kind):
    """Every fed token carries the (temporal, height, width) ids it has in its per-row sequence: the prompt's
    own, then text one past the prompt's largest id (Qwen2.5-VL's time axis scaled by seconds per grid
    step)."""
    hf, batch = load(tiny_model_dir, kind)
    ids = completions(hf, B * G)
    packed = M.pack_groups(batch, M.rope_positions(hf, batch, batch["input_ids"], batch["attention_mask"]),
                           ids, LENGTHS, [G] * B)
    rows = data.repeat_batch(batch, G)
    valid = (torch.arange(T)[None] < LENGTHS[:, None]).long()
    per_row = M.rope_positions(hf, rows, torch.cat([rows["input_ids"], ids], 1),
                               torch.cat([rows["attention_mask"], valid], 1))          # (3, N, L+T)
    L = batch["input_ids"].shape[1]
    for n in range(B * G):
        b, g = divmod(n, G)
        keep = batch["attention_mask"][b].bool()
        fed = max(int(LENGTHS[n]) - 1, 0)
        mine = packed.segments[b] == g + 1
        assert torch.equal(packed.positions[:, b, packed.segments[b] == 0], per_row[:, n, :L][:, keep])
        assert torch.equal(packed.positions[:, b, mine], per_row[:, n, L:L + fed])
        assert torch.equal(packed.input_ids[b, mine], ids[n, :fed])
    assert packed.input_ids.shape[1] % 16 == 0 and len(packed.sources) == int(LENGTHS.sum())
    # a video's tokens share ids (frames on a grid), so the text after the prompt does not resume at its
    # length
    assert int(packed.positions[0, 0, packed.segments[0] == 1][0]) < int(batch["attention_mask"][0].sum())


def test_prefix_attention_mask():
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])          # prompt of 2, completions of 2 and 1, padding
    sees = M.prefix_attention_mask(segments, "sdpa", torch.float32)[0, 0] == 0
    assert sees.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 1, 0, 0],
                                   [1, 1, 0, 0, 1, 0],
                                   [1, 1, 0, 0, 0, 1]]      # padding sees the prompt: no row is all masked
    mask = M.prefix_attention_mask(segments, "eager", torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and mask.min() == torch.finfo(torch.bfloat16).min


def test_the_vision_tower_and_decoder_run_once_per_call(tiny_model_dir):
    hf, batch = load(tiny_model_dir, "qwen2_vl")
    seen = {"videos": [], "rows": []}
    hooks = [hf.model.visual.register_forward_pre_hook(
                 lambda module, args, kwargs: seen["videos"].append(len(kwargs["grid_thw"])),
                 with_kwargs=True),
             hf.model.language_model.register_forward_pre_hook(
                 lambda module, args, kwargs: seen["rows"].append(kwargs["inputs_embeds"].shape[:2]),
                 with_kwargs=True)]
    M.Policy(hf)(batch, completions(hf, B * G), LENGTHS, 1.0, group_size=G)
    for hook in hooks:
        hook.remove()
    longest = max(int(batch["attention_mask"][b].sum() + (LENGTHS[b * G:(b + 1) * G] - 1).clamp(min=0).sum())
                  for b in range(B))
    assert seen["videos"] == [B] and seen["rows"] == [(B, -(-longest // 16) * 16)]


@pytest.mark.parametrize("group_size", [None, G])
def test_frozen_vision_tower_gets_no_gradient_and_no_graph(tiny_model_dir, group_size):
    hf, batch = load(tiny_model_dir, "qwen2_5_vl")
    ids, weights = completions(hf, B * G), torch.randn(B * G, T)
    prompts = batch if group_size else data.repeat_batch(batch, G)
    trained = run(M.Policy(hf), prompts, ids, LENGTHS, group_size, weights)
    grad_on = []
    hook = hf.model.visual.register_forward_hook(lambda *args: grad_on.append(torch.is_grad_enabled()))
    frozen = run(M.Policy(hf, freeze_vision=True), prompts, ids, LENGTHS, group_size, weights)
    hook.remove()
    assert grad_on == [False]
    assert not any(p.requires_grad for p in hf.model.visual.parameters())
    vision = {n for n, _ in hf.named_parameters() if n.startswith("model.visual.")}
    assert vision and not vision & frozen[2].keys() and frozen[2].keys() == trained[2].keys() - vision
    # the rest of the model learns as before: freezing changes no forward value
    assert_same(frozen, (trained[0], trained[1], {n: g for n, g in trained[2].items() if n not in vision}))
