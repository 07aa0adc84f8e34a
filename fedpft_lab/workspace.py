"""Everything a set of runs shares: the FM, the task data and its client split, the public corpus.

Methods in a comparison must see the same data, the same split and the same probe batches, so they are
prepared once here. The expensive, reusable artefact, the layer-level distilled sub-FM, is cached on disk
keyed by its full configuration (only the trained FFN tensors are stored, everything else is the FM's).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from . import data, models, paths, subfm
from .data import atomic_torch_save as atomic_save  # noqa: F401  (re-exported for federation)
from .errors import check_choice
from .distill import DistillConfig, distill, layer_gaps
from .partition import partition


@dataclass(frozen=True)
class DataConfig:
    """What data a run sees. Kept apart from the training knobs so several methods share one Workspace."""

    fm: str = models.DEFAULT_FM
    task: str = "tweets"
    clients: int = 20
    partition: str = "dirichlet"
    alpha: float = 5.0               # FLGo convention: each client ~ Dir(5 * global label mix), the paper's Dir-5.0
    convention: str = "flgo"
    max_train: int | None = 2000     # 100 examples per client: a workshop-size federation
    max_test: int | None = 300       # evaluation costs as much as training (two models); 300 keeps it < 1/3 of a round
    # Equal examples of every label in train and test? None = the task's default: yes for the tweets (SST-2-like,
    # chance 50% instead of their 70% majority), no elsewhere (balancing wiki-topics would drop 2,000 to 1,144).
    balanced: bool | None = None
    # The server's unlabeled data. "sentences": Wikipedia, one [CLS] sentence [SEP] per row (the default, as in the
    # paper: general text); "blocks": BERT-style packed Wikipedia; "task": held-out unlabeled tweets (in-domain).
    public: str = "sentences"
    public_blocks: int = 4096
    block_size: int = 32
    probe_batches: int = 2
    probe_batch_size: int = 16
    eval_batch_size: int = 32        # bench: same predictions as 128, ~20% faster on a 2-core CPU (less padding)
    seed: int = 0

    @property
    def use_balanced(self) -> bool:
        return self.balanced if self.balanced is not None else self.task == "tweets"


@dataclass
class Workspace:
    cfg: DataConfig
    fm: nn.Module                    # the pretrained FM with a seeded head, no adapter (never modified)
    preprocessor: object
    task: "data.TaskData"
    train: "data.EncodedSplit"
    test: "data.EncodedSplit"
    parts: list[np.ndarray]          # client -> indices into train
    public: torch.Tensor             # public-corpus blocks (server side, unlabeled)
    test_batches: list[dict] = field(default_factory=list)
    probe_batches: list[dict] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        return int(getattr(self.preprocessor, "pad_token_id", 0) or 0)


def _length_sorted_batches(split: "data.EncodedSplit", batch_size: int, pad_id: int) -> list[dict]:
    """Evaluation batches grouped by length: far less padding than a random order, same accuracy."""
    n = len(split)
    order = np.argsort([len(x) for x in split.input_ids], kind="stable") if split.input_ids else np.arange(n)
    return [data.pad_batch(split, order[i:i + batch_size], pad_id) for i in range(0, n, batch_size)]


def prepare(cfg: DataConfig, fm: nn.Module | None = None) -> Workspace:
    """Load FM, task, split and public corpus for ``cfg`` (pass ``fm`` to reuse an already loaded one)."""
    paths.set_offline_env()
    task = data.load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train, max_test=cfg.max_test,
                          balanced=cfg.use_balanced)
    fm = fm if fm is not None else models.load_fm(cfg.fm, num_labels=task.num_labels, seed=cfg.seed)
    pre = models.load_preprocessor(cfg.fm)
    train, test = data.encode_task(task, pre)
    parts = partition(train.labels, cfg.clients, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed,
                      convention=cfg.convention)
    public = public_inputs(cfg, pre, task)
    ws = Workspace(cfg, fm, pre, task, train, test, parts, public)
    ws.test_batches = _length_sorted_batches(test, cfg.eval_batch_size, ws.pad_id)
    rng = np.random.default_rng(cfg.seed + 7)
    probe_idx = rng.permutation(len(test))[: cfg.probe_batches * cfg.probe_batch_size]
    ws.probe_batches = [data.pad_batch(test, probe_idx[i:i + cfg.probe_batch_size], ws.pad_id)
                        for i in range(0, len(probe_idx), cfg.probe_batch_size)]
    return ws


def public_inputs(cfg: DataConfig, preprocessor, task: "data.TaskData") -> torch.Tensor:
    """Server-side unlabeled data. Text: Wikipedia, or with ``public="task"`` held-out task text without labels.
    Images: the images the task set aside from its training pool before the client split (``task.public``),
    without labels; no public image corpus ships offline, and the clients' own images must not be the server's."""
    if task.modality == "image":
        return data.public_task_images(preprocessor, task, max_images=cfg.public_blocks)
    check_choice("public", cfg.public, ("sentences", "blocks", "task"))
    if cfg.public == "task":
        return data.public_task_sentences(preprocessor, task, length=cfg.block_size, max_blocks=cfg.public_blocks,
                                          seed=cfg.seed)
    if cfg.public == "sentences":
        return data.public_corpus_sentences(preprocessor, length=cfg.block_size, max_blocks=cfg.public_blocks,
                                            seed=cfg.seed)
    return data.public_corpus_blocks(preprocessor, block_size=cfg.block_size, max_blocks=cfg.public_blocks,
                                     seed=cfg.seed)


# --------------------------------------------------------------------------- cached distilled sub-FM

def ffn_state(model: nn.Module, layer_ids: list[int]) -> dict[str, torch.Tensor]:
    """The FFN tensors (W1, b1, W2, b2, output LayerNorm) of ``layer_ids``: all that distillation changes."""
    out = {}
    for i in layer_ids:
        for part, mod in zip(("fc1", "fc2", "norm"), models.ffn(model, i)):
            if mod is not None:
                for name, p in mod.named_parameters():
                    out[f"{i}.{part}.{name}"] = p.detach().clone()
    return out


@torch.no_grad()
def load_ffn_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        i, part, name = key.split(".", 2)
        mod = dict(zip(("fc1", "fc2", "norm"), models.ffn(model, int(i))))[part]
        getattr(mod, name).copy_(value)


@dataclass
class SubFM:
    model: nn.Module
    info: subfm.SubFMInfo
    distill_loss: list[float]
    gaps_before: list[float]
    gaps_after: list[float]
    cached: bool = False


def sub_fm(ws: Workspace, sub_cfg: subfm.SubFMConfig, distill_cfg: DistillConfig, progress: bool = True,
           on_step=None, stop=None, use_cache: bool = True) -> SubFM:
    """The sub-FM of ``ws.fm``, layer-level distilled for ``distill_cfg.steps`` steps (0 = raw), cached on disk."""
    info = subfm.plan_sub_fm(ws.fm, sub_cfg)
    model = subfm.apply_plan(ws.fm, info)
    match = info.compressed
    key = paths.config_key({"fm": ws.cfg.fm, "num_labels": ws.task.num_labels, "sub": asdict(sub_cfg),
                            "distill": asdict(distill_cfg), "public": [ws.cfg.public, ws.cfg.public_blocks, ws.cfg.block_size,
                                                                       ws.cfg.seed, ws.task.modality]})
    path = paths.cache_dir() / f"subfm-{key}.pt"
    gap_inputs = ws.public[:64]
    if use_cache and distill_cfg.steps > 0 and path.exists():
        blob = torch.load(path, weights_only=True)
        load_ffn_state(model, blob["ffn"])
        return SubFM(model, info, blob["loss"], blob["gaps_before"], blob["gaps_after"], cached=True)
    before = layer_gaps(ws.fm, model, gap_inputs, match) if match else []
    result = distill(ws.fm, model, ws.public, match, distill_cfg, progress=progress, on_step=on_step, stop=stop)
    after = layer_gaps(ws.fm, model, gap_inputs, match) if match and result.losses else before
    if use_cache and distill_cfg.steps > 0 and not result.stopped:
        atomic_save({"ffn": ffn_state(model, match), "loss": result.losses, "gaps_before": before,
                     "gaps_after": after, "info": json.dumps(info.to_json())}, path)
    return SubFM(model, info, result.losses, before, after)
