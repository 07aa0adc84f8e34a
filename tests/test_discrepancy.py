"""Gradient discrepancy: checked against an independent computation, deterministic, sane on identity."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpft_lab import adapters, models, subfm
from fedpft_lab.discrepancy import gradient_discrepancy


def _batches(n_batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1000, 20000, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=g)})
    return out


def _perturbed_state(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in adapters.adapter_state(model).items()}


@pytest.fixture(scope="module")
def pair():
    fm = models.load_fm("tiny-bert", seed=0)
    sub, _ = subfm.build_sub_fm(fm, subfm.SubFMConfig(keep_ratio=0.25, retained_layers=(0, 3)))
    lora = adapters.LoRAConfig()
    fm_p, sub_p = adapters.add_lora(copy.deepcopy(fm), lora), adapters.add_lora(sub, lora)
    return fm_p, sub_p, _perturbed_state(fm_p)


def _reference_grads(model, state, batches):
    """Independent path: .backward() on the summed per-batch mean losses, read .grad."""
    adapters.load_adapter_state(model, state)
    model.eval()
    model.zero_grad()
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        (F.cross_entropy(out.logits, b["labels"]) / len(batches)).backward()
    g = {n: p.grad.detach().double().numpy().ravel() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return g


def test_matches_independent_computation(pair):
    fm_p, sub_p, state = pair
    batches = _batches()
    d = gradient_discrepancy(fm_p, sub_p, batches, state=state)
    g_fm, g_sub = _reference_grads(fm_p, state, batches), _reference_grads(sub_p, state, batches)
    keys = sorted(g_fm)
    a, b = np.concatenate([g_sub[k] for k in keys]), np.concatenate([g_fm[k] for k in keys])
    assert d.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)
    assert d.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-5)
    head = [k for k in keys if "lora_" not in k]
    ha, hb = np.concatenate([g_sub[k] for k in head]), np.concatenate([g_fm[k] for k in head])
    assert d.per_module["head"]["cosine"] == pytest.approx(ha @ hb / np.linalg.norm(ha) / np.linalg.norm(hb), rel=1e-5)
    layer2 = [k for k in keys if ".layer.2." in k]
    la, lb = np.concatenate([g_sub[k] for k in layer2]), np.concatenate([g_fm[k] for k in layer2])
    row = next(x for x in d.per_layer if x["layer"] == 2)
    assert row["rel_l2"] == pytest.approx(np.linalg.norm(la - lb) / np.linalg.norm(lb), rel=1e-5)
    assert 0.0 < d.cosine < 1.0 and d.logit_kl > 0
    assert d.hidden_rel_mse[0] == pytest.approx(0.0, abs=1e-10)  # layer 0 is retained: same output
    assert d.hidden_rel_mse[1] > 0
    assert set(d.per_module) == {"head"} | {f"{m}.lora_{ab}" for m in "qkvo" for ab in "AB"}


def test_deterministic(pair):
    fm_p, sub_p, state = pair
    a = gradient_discrepancy(fm_p, sub_p, _batches(), state=state)
    b = gradient_discrepancy(fm_p, sub_p, _batches(), state=state)
    assert a.to_json() == b.to_json()


def test_layer_drop_proxy_compares_shared_parameters_only():
    fm = models.load_fm("tiny-bert", seed=0)
    kept = [0, 2, 3]
    proxy = subfm.build_layer_drop(fm, kept)
    lora = adapters.LoRAConfig()
    fm_p = adapters.add_lora(copy.deepcopy(fm), lora, layer_ids=[0, 3])
    px_p = adapters.add_lora(proxy, lora, layer_ids=[0, 2])
    d = gradient_discrepancy(fm_p, px_p, _batches(1), state=_perturbed_state(fm_p), proxy_layers=kept)
    assert [x["layer"] for x in d.per_layer] == [0, 3]
    assert all(0.0 < x["cosine"] <= 1.0 + 1e-9 for x in d.per_layer)
    assert d.hidden_rel_mse[1] is None and d.hidden_rel_mse[0] == pytest.approx(0.0, abs=1e-10)
