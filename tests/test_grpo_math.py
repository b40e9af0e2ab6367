"""grpo.py's equations against slow, obviously correct loops."""
import math

import pytest
import torch

from config import LOSS_AGGS, Config
from grpo import group_advantages, kl_k3, length_mask, policy_loss
from training import lr_factor


def slow_policy_loss(logp, old_logp, ref_logp, adv, lengths, eps_low, eps_high, beta, agg, max_len):
    """One token at a time, straight from the paper's formula."""
    per_seq, all_terms = [], []
    for i in range(len(logp)):
        terms = []
        for t in range(int(lengths[i])):
            rho = math.exp(logp[i][t] - old_logp[i][t])
            a = float(adv[i])
            surrogate = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            x = ref_logp[i][t] - logp[i][t]
            kl = math.exp(x) - x - 1
            terms.append(-surrogate + beta * kl)
        all_terms += terms
        if agg == "seq-mean-token-mean":
            per_seq.append(sum(terms) / max(len(terms), 1))
        elif agg == "seq-mean-token-sum-norm":
            per_seq.append(sum(terms) / max_len)
    if agg == "token-mean":
        return sum(all_terms) / len(all_terms)
    return sum(per_seq) / len(per_seq)


def random_case(seed, N=6, T=7, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * spread
    ref = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    return logp, old, ref, adv, lengths


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("spread", [0.0, 0.1, 1.5])  # no clipping, a little, a lot
def test_policy_loss_matches_slow_loop(agg, spread):
    logp, old, ref, adv, lengths = random_case(1, spread=spread)
    mask = length_mask(lengths, logp.shape[1])
    # padded positions hold garbage that must not matter
    logp = torch.where(mask, logp, torch.full_like(logp, 30.0))
    loss, stats = policy_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.04, agg, max_len=10)
    expected = slow_policy_loss(logp.tolist(), old.tolist(), ref.tolist(), adv, lengths,
                                0.2, 0.28, 0.04, agg, 10)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    if spread == 0.0:
        assert stats["clip_frac"] == 0.0 and stats["ratio_min"] == stats["ratio_max"] == 1.0
    if spread == 1.5:
        assert stats["clip_frac"] > 0.1


def test_global_norm_makes_micro_batches_add_up():
    logp, old, ref, adv, lengths = random_case(2)
    mask = length_mask(lengths, logp.shape[1])
    for agg in LOSS_AGGS:
        whole, _ = policy_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.04, agg, max_len=7)
        norm = mask.sum().item() if agg == "token-mean" else logp.shape[0]
        parts = sum(policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], 0.2, 0.2, 0.04, agg,
                                norm=norm, max_len=7)[0] for s in (slice(0, 2), slice(2, 6)))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_advantages_zero_mean_unit_std_per_group():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 3.0, 1.0]])
    a = group_advantages(r, "group", eps=0.0)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-7)
    assert torch.allclose(a.std(1), torch.ones(2), atol=1e-6)  # unbiased std, as torch.std
    assert a[0, 0].item() == pytest.approx(0.5 / r[0].std().item())
    assert torch.equal(group_advantages(r, "none"), r - r.mean(1, keepdim=True))
    assert torch.allclose(group_advantages(r, "batch", 0.0), (r - r.mean(1, keepdim=True)) / r.std())
    tie = group_advantages(torch.ones(1, 4), "group")
    assert torch.equal(tie, torch.zeros(1, 4))  # eps keeps a tied group finite (and zero)


def test_kl_k3_exact_and_safe():
    logp = torch.tensor([-1.0, -2.0, -50.0])
    ref = torch.tensor([-1.0, -1.5, -1.0])
    kl = kl_k3(logp, ref)
    assert kl[0].item() == 0.0
    x = 0.5
    assert kl[1].item() == pytest.approx(math.exp(x) - x - 1)
    assert torch.isfinite(kl).all() and kl[2].item() == pytest.approx(math.exp(20) - 21)  # clamped
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_ratio_is_one_on_policy_and_gradient_is_reinforce():
    """With old = logp.detach(), beta = 0 and no clipping, the gradient of the
    seq-mean-token-mean loss is REINFORCE with the group-mean baseline:
    -1/N sum_i A_i/|o_i| sum_t grad logp_it."""
    theta = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, dim=1)
    lengths = torch.tensor([5, 3, 2, 4])
    mask = length_mask(lengths, 5)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    adv = group_advantages(rewards, "none").flatten()
    loss, stats = policy_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.2, 0.0, "seq-mean-token-mean")
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0
    (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
    reinforce = -((logp * mask).sum(1) * adv / lengths).sum() / 4
    (g_ref,) = torch.autograd.grad(reinforce, theta)
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_masked_tokens_get_no_gradient_and_end_token_does():
    logp = (-torch.rand(2, 6, dtype=torch.float64)).requires_grad_()
    lengths = torch.tensor([3, 6])  # row 0: 2 content tokens + the end token at position 2
    mask = length_mask(lengths, 6)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = policy_loss(logp, logp.detach(), logp.detach() - 0.1, adv, mask, 0.2, 0.2, 0.04, "token-mean")
    loss.backward()
    assert (logp.grad[0, 3:] == 0).all()
    assert (logp.grad[0, :3] != 0).all()  # the end token (position 2) is trained


def test_length_mask_comes_from_lengths_not_token_ids():
    m = length_mask(torch.tensor([0, 2, 4]), 4)
    assert m.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]


def test_lr_schedule():
    cfg = Config()
    cfg.train.steps, cfg.train.warmup_steps = 10, 2
    assert [lr_factor(s, cfg.train) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    cfg.train.lr_schedule = "cosine"
    assert lr_factor(2, cfg.train) == pytest.approx(1.0) and lr_factor(10, cfg.train) == pytest.approx(0.1)
    cfg.train.lr_schedule = "linear"
    assert lr_factor(6, cfg.train) == pytest.approx(0.55)


ADV_RANKS = """
import sys, torch, torch.distributed as dist, grpo, training
rank, world, device, mesh = training.init_distributed()
g = torch.Generator().manual_seed(0)
rewards = torch.rand(6, 4, generator=g, dtype=torch.float64) * 3       # the global batch: 6 groups of G = 4
# a failed judge call: group 1 is dropped
rewards[1, 2] = float("nan")
mine = rewards[rank::world]                                            # rank r takes groups r, r + world, ...
judged = torch.isfinite(mine).all(dim=1)
adv = grpo.group_advantages(torch.nan_to_num(mine), "batch", 1e-4, grpo.batch_std(mine, judged))
torch.save({"rank": rank, "adv": adv, "judged": judged}, sys.argv[1] + f".{rank}")
training.end_distributed()
"""


def test_batch_scale_is_the_global_batchs_std_on_any_number_of_ranks(tmp_path):
    """adv_scale: batch with 2 gloo ranks equals one process on the concatenated batch, written out here:
    (r - group mean) / (unbiased std of every reward of the groups without a failed judge call + eps)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "adv.py"
    script.write_text(ADV_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tmp_path / "adv")],
                          capture_output=True, text=True, timeout=120,
                          cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 4, generator=g, dtype=torch.float64) * 3
    kept = torch.cat([rewards[0], rewards[2:].flatten()])                  # 20 valid rewards
    mean = kept.sum() / len(kept)
    std = math.sqrt(sum((x - mean) ** 2 for x in kept.tolist()) / (len(kept) - 1))
    for rank in (0, 1):
        out = torch.load(tmp_path / f"adv.{rank}")
        for k, b in enumerate(range(rank, 6, 2)):
            if b == 1:
                assert not out["judged"][k]
                continue
            expected = (rewards[b] - rewards[b].mean()) / (std + 1e-4)
            assert torch.allclose(out["adv"][k], expected, atol=1e-12), (rank, b)
