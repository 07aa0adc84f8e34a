"""Layer-level distillation: the loss, what trains, and that it closes the gap on the real MiniLM."""
import numpy as np
import pytest
import torch

from fedpft_lab import data, models, subfm
from fedpft_lab.distill import (DistillConfig, distill, ffn_parameters, layer_gaps, linear_warmup,
                                relative_mse, weight_product_loss)
from fedpft_lab.errors import ConfigError


def test_relative_mse_matches_numpy():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    tn, sn = t.numpy(), s.numpy()
    assert relative_mse(t, s).item() == pytest.approx(((tn - sn) ** 2).mean() / (tn ** 2).mean(), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    m = mask.numpy().astype(bool)
    expected = ((tn - sn) ** 2)[m].sum() / (tn ** 2)[m].sum()
    assert relative_mse(t, s, mask).item() == pytest.approx(expected, rel=1e-5)


def test_linear_warmup_schedule():
    vals = [linear_warmup(s, 10, 0.2) for s in range(10)]
    assert vals[:2] == [0.5, 1.0] and vals[-1] == pytest.approx(1 / 8) and all(v > 0 for v in vals)


def test_weight_term_is_differentiable_only_on_request():
    fm = models.load_fm("tiny-bert")
    sub, _ = subfm.build_sub_fm(fm, subfm.SubFMConfig(keep_ratio=0.5))
    off = weight_product_loss(fm, sub, 1, differentiable=False)
    on = weight_product_loss(fm, sub, 1, differentiable=True)
    assert off.item() == pytest.approx(on.item()) and off.item() > 0
    assert not off.requires_grad
    on.backward()
    assert models.ffn(sub, 1)[0].weight.grad.abs().sum() > 0


def test_bad_distill_config():
    with pytest.raises(ConfigError, match="distill_steps must be in"):
        DistillConfig(steps=-1)


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return data.public_corpus_blocks(tokenizer, block_size=64, max_blocks=96, seed=0)


@pytest.mark.slow
def test_distillation_closes_the_gap_on_real_minilm(minilm, blocks):
    sub, info = subfm.build_sub_fm(minilm, subfm.SubFMConfig(keep_ratio=0.25))
    match = info.compressed
    held_out, train = blocks[:32], blocks[32:]
    frozen = {n: p.detach().clone() for n, p in sub.named_parameters()}
    teacher = {n: p.detach().clone() for n, p in minilm.named_parameters()}
    trainable = {id(p) for p in ffn_parameters(sub, match)}
    before = layer_gaps(minilm, sub, held_out, match)
    result = distill(minilm, sub, train, match, DistillConfig(steps=12, batch_size=8, lr=1e-3), progress=False)
    after = layer_gaps(minilm, sub, held_out, match)
    assert len(result.losses) == 12 and np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert np.mean(after) < 0.9 * np.mean(before), (before, after)
    changed = {n for n, p in sub.named_parameters() if not torch.equal(p, frozen[n])}
    allowed = {n for n, p in sub.named_parameters() if id(p) in trainable}
    assert changed and changed <= allowed, changed - allowed
    assert not any("attention" in n or ".layer.0." in n or ".layer.5." in n for n in changed)
    assert all(torch.equal(p, teacher[n]) for n, p in minilm.named_parameters()), "the teacher must not change"


def test_distillation_is_deterministic():
    fm = models.load_fm("tiny-bert")
    blocks = torch.randint(1000, 5000, (16, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        sub, info = subfm.build_sub_fm(fm, subfm.SubFMConfig(keep_ratio=0.5))
        losses.append(distill(fm, sub, blocks, info.compressed, DistillConfig(steps=4, batch_size=4),
                              progress=False).losses)
    assert losses[0] == losses[1]
