"""Neuron-level alignment: activity statistics, which neurons update, what stays frozen, the W_fro package."""
import copy

import pytest
import torch

from fedpft_lab import adapters, align, models, subfm
from fedpft_lab.distill import DistillConfig
from fedpft_lab.errors import ConfigError


def test_recorder_counts_only_non_padded_tokens():
    fm = models.load_fm("tiny-bert")
    ids = torch.randint(1000, 5000, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    captured = {}
    act_module = models.layers(fm)[1].get_submodule(models.arch(fm).act)
    handle = act_module.register_forward_hook(lambda m, i, o: captured.setdefault("act", o.detach()))
    with align.ActivationRecorder(fm, [1, 2]) as rec:
        rec.set_mask(mask)
        fm(input_ids=ids, attention_mask=mask)
    handle.remove()
    act = captured["act"][mask.bool()]
    s = rec.stats[1]
    assert s["tokens"].item() == 8 and set(rec.stats) == {1, 2}
    torch.testing.assert_close(s["abs_sum"], act.abs().sum(0).double())
    torch.testing.assert_close(s["zeros"], (act == 0).sum(0).double())
    assert not act_module._forward_hooks, "hooks must be removed on exit"


def test_choose_updated_picks_the_least_active():
    stats = {3: {"abs_sum": torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0], dtype=torch.float64),
                 "zeros": torch.zeros(6, dtype=torch.float64), "tokens": torch.tensor(1.0, dtype=torch.float64)}}
    assert align.choose_updated(stats, 0.5, "mean-abs")[3].tolist() == [1, 3, 5]
    assert align.choose_updated(stats, 1.0, "mean-abs")[3].tolist() == list(range(6))
    # APoZ: all-zero counts are ties, broken by a seeded shuffle
    a = align.choose_updated(stats, 0.5, "apoz", seed=1)[3]
    assert a.tolist() == align.choose_updated(stats, 0.5, "apoz", seed=1)[3].tolist() and len(a) == 3
    stats[3]["zeros"] = torch.tensor([0, 9, 0, 0, 8, 0], dtype=torch.float64)  # neurons 1 and 4 are mostly zero
    assert set(align.choose_updated(stats, 2 / 6, "apoz")[3].tolist()) == {1, 4}
    with pytest.raises(ConfigError, match=r"align_proportion must be in \(0, 1\]"):
        align.choose_updated(stats, 0.0)


def test_merge_stats_sums_clients():
    one = {1: {"abs_sum": torch.ones(3, dtype=torch.float64), "zeros": torch.zeros(3, dtype=torch.float64),
               "tokens": torch.tensor(2.0, dtype=torch.float64)}}
    merged = align.merge_stats([one, one])
    assert merged[1]["abs_sum"].tolist() == [2, 2, 2] and merged[1]["tokens"].item() == 4


def test_alignment_updates_only_chosen_neurons_and_package_reproduces_them():
    fm = models.load_fm("tiny-bert", seed=0)
    sub, info = subfm.build_sub_fm(fm, subfm.SubFMConfig(keep_ratio=0.5))
    lora = adapters.LoRAConfig()
    teacher = adapters.add_lora(copy.deepcopy(fm), lora, seed=0)
    student = adapters.add_lora(sub, lora, seed=0)
    device = copy.deepcopy(student)  # a client's copy of the proxy
    updated = {l: torch.arange(0, 32, 2) for l in info.compressed}
    before = {l: [t.detach().clone() for t in (*models.ffn(student, l)[0].parameters(),
                                                 *models.ffn(student, l)[1].parameters())] for l in info.compressed}
    lora_before = adapters.adapter_state(student)
    public = torch.randint(1000, 5000, (16, 16), generator=torch.Generator().manual_seed(0))
    res = align.align_neurons(teacher, student, public, updated, DistillConfig(steps=5, batch_size=4, lr=1e-2))
    assert len(res.losses) == 5
    frozen = torch.ones(32, dtype=torch.bool)
    frozen[updated[1]] = False
    for l in info.compressed:
        w1, w2, _ = models.ffn(student, l)
        w1_0, b1_0, w2_0, b2_0 = before[l]
        assert torch.equal(w1.weight[frozen], w1_0[frozen]) and torch.equal(b1_0[frozen], w1.bias[frozen])
        assert torch.equal(w2.weight[:, frozen], w2_0[:, frozen])
        assert not torch.equal(w1.weight[~frozen], w1_0[~frozen]) and not torch.equal(w2.bias, b2_0)
    assert all(torch.equal(v, adapters.adapter_state(student)[k]) for k, v in lora_before.items()), "LoRA is frozen"
    pkg = align.weight_package(models.unwrap(student), updated)
    align.apply_weight_package(models.unwrap(device), pkg)
    for (n, p), (_, q) in zip(student.named_parameters(), device.named_parameters()):
        assert torch.equal(p, q), n
    per_layer = 16 * 32 + 16 + 32 * 16 + 32 + 2 * 32  # W1 rows, b1, W2 cols, b2, LayerNorm
    assert adapters.nbytes(pkg) == len(info.compressed) * (per_layer * 4 + 16 * 4)
