"""Sub-FM construction: saliency, selection, weight copying, parameter accounting, FedOT emulator."""
import copy

import numpy as np
import pytest
import torch

from fedpft_lab import adapters, models, subfm
from fedpft_lab.discrepancy import gradient_discrepancy
from fedpft_lab.errors import ConfigError


def _batch(n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (n, t), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[0, t // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0][:n])}


def test_saliency_matches_independent_loop():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(24, 8, generator=g), torch.randn(8, 24, generator=g)
    a, b = w1.numpy(), w2.numpy()
    expected = [np.sqrt(sum(a[i, j] ** 2 for j in range(8)) + sum(b[j, i] ** 2 for j in range(8))) for i in range(24)]
    np.testing.assert_allclose(subfm.neuron_saliency(w1, w2).numpy(), expected, rtol=1e-5)


def test_selection_is_topk_in_original_order(minilm):
    info = subfm.plan_sub_fm(minilm, subfm.SubFMConfig(keep_ratio=0.25))
    assert info.compressed == [1, 2, 3, 4]
    for i, kept in info.kept.items():
        w1, w2, _ = models.ffn(minilm, i)
        sal = np.sqrt((w1.weight.detach().numpy() ** 2).sum(1) + (w2.weight.detach().numpy() ** 2).sum(0))
        top = sorted(np.argsort(-sal, kind="stable")[:384].tolist())
        assert kept == top and kept == sorted(kept) and len(kept) == round(0.25 * 1536)


def test_weights_are_copied_not_shared(minilm):
    sub, info = subfm.build_sub_fm(minilm, subfm.SubFMConfig(keep_ratio=0.5))
    keep = torch.tensor(info.kept[2])
    f1, f2, fn = models.ffn(minilm, 2)
    s1, s2, sn = models.ffn(sub, 2)
    assert torch.equal(s1.weight, f1.weight[keep]) and torch.equal(s1.bias, f1.bias[keep])
    assert torch.equal(s2.weight, f2.weight[:, keep]) and torch.equal(s2.bias, f2.bias)
    assert torch.equal(sn.weight, fn.weight)
    before = f1.weight.clone()
    with torch.no_grad():
        s1.weight.add_(1.0)
    assert torch.equal(f1.weight, before), "editing the sub-FM must not touch the FM"
    # retained layers and attention are untouched copies
    assert torch.equal(models.ffn(sub, 0)[0].weight, models.ffn(minilm, 0)[0].weight)


def test_parameter_counts_minilm(minilm):
    sub, _ = subfm.build_sub_fm(minilm, subfm.SubFMConfig(keep_ratio=0.25, retained_layers=(0, 5)))
    assert models.transformer_params(minilm) == 10_646_784
    assert models.transformer_params(sub) == 7_103_232
    assert "7.10M" in models.format_params(7_103_232) and "6.77Mi" in models.format_params(7_103_232)


def test_keep_ratio_one_reproduces_fm_and_zero_discrepancy(minilm):
    sub, info = subfm.build_sub_fm(minilm, subfm.SubFMConfig(keep_ratio=1.0))
    assert all(len(k) == 1536 for k in info.kept.values())
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(sub(**inputs).logits, minilm(**inputs).logits, atol=1e-5, rtol=0)
    lora = adapters.LoRAConfig()
    fm_p = adapters.add_lora(copy.deepcopy(minilm), lora, seed=3)
    sub_p = adapters.add_lora(sub, lora, seed=3)
    # a non-trivial adapter: LoRA B is zero at init, so perturb everything
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapters.adapter_state(fm_p).items()}
    d = gradient_discrepancy(fm_p, sub_p, [batch], state=state)
    assert d.cosine == pytest.approx(1.0, abs=1e-6) and d.rel_l2 == pytest.approx(0.0, abs=1e-5)
    assert max(d.hidden_rel_mse) < 1e-10 and d.logit_kl == pytest.approx(0.0, abs=1e-9)


def test_random_selection_is_seeded_and_differs(minilm):
    a = subfm.plan_sub_fm(minilm, subfm.SubFMConfig(selection="random", seed=1))
    b = subfm.plan_sub_fm(minilm, subfm.SubFMConfig(selection="random", seed=1))
    s = subfm.plan_sub_fm(minilm, subfm.SubFMConfig(selection="saliency"))
    assert a.kept == b.kept and a.kept != s.kept
    assert all(k == sorted(k) and len(set(k)) == len(k) for k in a.kept.values())


def test_sub_fm_is_an_ordinary_model_with_fm_adapter_names(minilm):
    sub, _ = subfm.build_sub_fm(minilm, subfm.SubFMConfig())
    assert type(sub) is type(minilm)
    lora = adapters.LoRAConfig()
    fm_names = set(adapters.adapter_state(adapters.add_lora(copy.deepcopy(minilm), lora)))
    sub_names = set(adapters.adapter_state(adapters.add_lora(sub, lora)))
    assert fm_names == sub_names and len(fm_names) == 6 * 4 * 2 + 2


@pytest.mark.parametrize("cfg, match", [
    (dict(keep_ratio=0.0), r"keep_ratio must be in \(0, 1\]"),
    (dict(keep_ratio=1.5), r"keep_ratio must be in \(0, 1\]"),
    (dict(selection="magnitude"), "selection must be one of"),
])
def test_bad_sub_fm_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        subfm.SubFMConfig(**cfg)


def test_retained_layer_out_of_range(minilm):
    with pytest.raises(ConfigError, match=r"retained_layers entries must be in \[0, 5\].*got 6"):
        subfm.build_sub_fm(minilm, subfm.SubFMConfig(retained_layers=(0, 6)))


def test_layer_drop_emulator_matches_sub_fm_size(minilm):
    sub, _ = subfm.build_sub_fm(minilm, subfm.SubFMConfig())
    kept = subfm.emulator_layers(minilm, target_params=models.transformer_params(sub))
    assert kept == [0, 1, 4, 5]
    proxy = subfm.build_layer_drop(minilm, kept)
    assert models.num_layers(proxy) == 4 and models.num_layers(minilm) == 6
    assert models.transformer_params(proxy) == 4 * 1_774_464
    for j, i in enumerate(kept):
        assert torch.equal(models.ffn(proxy, j)[0].weight, models.ffn(minilm, i)[0].weight)


def test_uniform_layers_spreads_ends_included():
    assert subfm.uniform_layers(list(range(1, 11)), 5) == [1, 3, 5, 8, 10]  # the spec's BERT-base FedOT
    assert subfm.uniform_layers([1, 2, 3], 0) == [] and subfm.uniform_layers([1, 2, 3], 5) == [1, 2, 3]
