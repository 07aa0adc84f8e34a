"""Loading FMs: offline default, local folders of all three families, clear errors otherwise."""
import pytest
import torch

from fedpft_lab import models
from fedpft_lab.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-vit"])
def test_local_folder_roundtrip(name, tmp_path):
    model = models.load_fm(name, num_labels=3, seed=0)
    model.save_pretrained(tmp_path)
    again = models.load_fm(str(tmp_path), num_labels=3, seed=0)
    assert models.num_layers(again) == 4 and models.ffn_width(again, 0) == 64
    assert torch.equal(models.ffn(again, 1)[0].weight, models.ffn(model, 1)[0].weight)
    assert models.head(again) is not None


def test_heads_are_seeded():
    a, b, c = (models.load_fm("tiny-bert", seed=s) for s in (0, 0, 1))
    assert torch.equal(models.head(a).weight, models.head(b).weight)
    assert not torch.equal(models.head(a).weight, models.head(c).weight)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="BERT, RoBERTa or ViT"):
        models.load_fm_config(str(tmp_path))


def test_hub_name_offline_says_so_and_suggests_default():
    with pytest.raises(ConfigError, match="offline default fm='minilm'"):
        models.load_fm_config("bert-base-uncased")


def test_default_fm_is_minilm(minilm):
    assert minilm.config.model_type == "bert" and models.num_layers(minilm) == 6
    assert models.ffn_width(minilm, 0) == 1536 and minilm.config.hidden_size == 384
