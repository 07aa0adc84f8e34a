"""Everything a set of runs shares: the FM, the task data and its client split, the public corpus.

Methods in a comparison must see the same data, the same split and the same probe batches, so they are
prepared once here. The expensive, reusable artefact, the layer-level distilled sub-FM, is cached on disk
keyed by its full configuration (only the trained FFN tensors are stored, everything else is the FM's).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from . import data, io, models, paths, subfm
from .device import model_device, resolve_device, to_device
from .config import PUBLIC_SOURCES, DataConfig  # DataConfig re-exported: it used to live here
from .errors import ConfigError, check_choice
from .version import RESULTS_VERSION
from .distill import DistillConfig, distill, layer_gaps
from .partition import partition


@dataclass
class Workspace:
    cfg: DataConfig
    fm: nn.Module                    # the pretrained FM with a seeded head, no adapter (never modified)
    preprocessor: object
    task: "data.TaskData"
    train: "data.EncodedSplit"
    test: "data.EncodedSplit"
    parts: list[np.ndarray]          # client -> indices into train
    public: torch.Tensor             # public-corpus blocks the server distils and aligns on (unlabeled)
    public_heldout: torch.Tensor     # a few more, never trained on: where the layer gaps are measured
    test_batches: list[dict] = field(default_factory=list)
    probe_batches: list[dict] = field(default_factory=list)

    @property
    def device(self):
        """Where the FM, the test and probe batches live (``cfg.device`` resolved); see fedpft_lab.device."""
        return model_device(self.fm)

    @property
    def pad_id(self) -> int:
        return pad_id(self.preprocessor)


def pad_id(preprocessor: object) -> int:
    """The token id that pads a batch (0 for image processors, which have none)."""
    return int(getattr(preprocessor, "pad_token_id", 0) or 0)


def _length_sorted_batches(split: "data.EncodedSplit", batch_size: int, pad_id: int) -> list[dict]:
    """Evaluation batches grouped by length: far less padding than a random order, same accuracy."""
    n = len(split)
    order = np.argsort([len(x) for x in split.input_ids], kind="stable") if split.input_ids else np.arange(n)
    return [data.pad_batch(split, order[i:i + batch_size], pad_id) for i in range(0, n, batch_size)]


def prepare(cfg: DataConfig, fm: nn.Module | None = None) -> Workspace:
    """Load FM, task, split and public corpus for ``cfg`` (pass ``fm`` to reuse an already loaded one).

    The FM and the evaluation batches go to ``cfg.device``; the public corpus and the training split stay on the
    CPU (they are batched as they are used).
    """
    paths.set_offline_env()
    device = resolve_device(cfg.device)   # a missing GPU fails here, before any loading
    task = _load_task(cfg)
    fm = (fm if fm is not None else models.load_fm(cfg.fm, num_labels=task.num_labels, seed=cfg.seed)).to(device)
    pre = models.load_preprocessor(cfg.fm)
    train, test = data.encode_task(task, pre)
    parts = _partition(cfg, train)
    public, heldout = split_heldout(public_inputs(cfg, pre, task))
    ws = Workspace(cfg, fm, pre, task, train, test, parts, public, heldout)
    ws.test_batches = [to_device(b, device) for b in _length_sorted_batches(test, cfg.eval_batch_size, ws.pad_id)]
    rng = np.random.default_rng(cfg.seed + 7)
    probe_idx = rng.permutation(len(test))[: cfg.probe_batches * cfg.probe_batch_size]
    ws.probe_batches = [to_device(data.pad_batch(test, probe_idx[i:i + cfg.probe_batch_size], ws.pad_id), device)
                        for i in range(0, len(probe_idx), cfg.probe_batch_size)]
    return ws


def _load_task(cfg: DataConfig) -> "data.TaskData":
    return data.load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train, max_test=cfg.max_test,
                          balanced=cfg.use_balanced)


def _partition(cfg: DataConfig, train: "data.EncodedSplit") -> list[np.ndarray]:
    return partition(train.labels, cfg.clients, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed,
                     convention=cfg.convention)


def client_data(cfg: DataConfig, client: int) -> tuple["data.EncodedSplit", int]:
    """(``client``'s training shard, the pad id): what a client process holds, and no FM.

    Every participant derives the same split from the same data configuration, as a Flower partitioner does.
    """
    paths.set_offline_env()
    pre = models.load_preprocessor(cfg.fm)
    train, _ = data.encode_task(_load_task(cfg), pre)
    return train.subset(_partition(cfg, train)[client]), pad_id(pre)


def split_heldout(public: torch.Tensor, max_heldout: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(distillation rows, held-out rows): an eighth of the public rows, at most ``max_heldout``, at least one,
    are kept out of distillation and alignment, so "the gap after distillation" is measured on data the sub-FM
    was not fitted to (on training rows it would flatter the distillation)."""
    n = min(max_heldout, max(1, len(public) // 8))
    if len(public) < 2:
        raise ConfigError(f"public_blocks must be >= 2 (one to distil on, one held out), got {len(public)} rows")
    return public[n:], public[:n]


def public_inputs(cfg: DataConfig, preprocessor, task: "data.TaskData") -> torch.Tensor:
    """Server-side unlabeled data. Text: Wikipedia, or with ``public="task"`` held-out task text without labels.
    Images: the images the task set aside from its training pool before the client split (``task.public``),
    without labels; no public image corpus ships offline, and the clients' own images must not be the server's."""
    if task.modality == "image":
        return data.public_task_images(preprocessor, task, max_images=cfg.public_blocks)
    check_choice("public", cfg.public, PUBLIC_SOURCES)
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
    """The FFN tensors (W1, b1, W2, b2, output LayerNorm) of ``layer_ids``: all that distillation changes (on the
    CPU, where caches and checkpoints keep them)."""
    out = {}
    for i in layer_ids:
        for part, mod in zip(("fc1", "fc2", "norm"), models.ffn(model, i)):
            if mod is not None:
                for name, p in mod.named_parameters():
                    out[f"{i}.{part}.{name}"] = p.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def load_ffn_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        i, part, name = key.split(".", 2)
        mod = dict(zip(("fc1", "fc2", "norm"), models.ffn(model, int(i))))[part]
        getattr(mod, name).copy_(value)


def tensor_digest(t: torch.Tensor) -> str:
    """A content hash of a tensor (dtype, shape and bytes): two different corpora never share a digest."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def subfm_key(ws: Workspace, sub_cfg: subfm.SubFMConfig, distill_cfg: DistillConfig) -> str:
    """Everything the distilled FFNs depend on, and nothing else.

    In: the FM, the compression plan, the distillation budget, the *content* of the public rows it trains on
    (so a changed corpus or tokenizer can never be served a stale sub-FM) and the results version of the code.
    Out: the task's label count and the run's seed (the head is never distilled; the random neuron choice is
    the one place a seed matters, and it is in ``sub_cfg``), so a 5-class CSV reuses the tweets' sub-FM.
    """
    sub = asdict(sub_cfg)
    if sub_cfg.selection == "saliency":
        sub.pop("seed")                      # saliency selection is deterministic
    key = {"fm": ws.cfg.fm, "sub": sub, "distill": asdict(distill_cfg), "public": tensor_digest(ws.public),
           "code": RESULTS_VERSION}
    if ws.device.type != "cpu":              # a GPU sums in another order: its sub-FM is cached apart
        key["device"] = ws.device.type
    return paths.config_key(key)


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
    path = paths.cache_dir() / f"subfm-{subfm_key(ws, sub_cfg, distill_cfg)}.pt"
    gap_inputs = ws.public_heldout
    caching = use_cache and distill_cfg.steps > 0
    with io.cache_lock(path, "the distilled sub-FM", enabled=caching) as lock:  # one process distils, others wait
        blob = io.read_cache(path, io.load_torch, "distilled sub-FM", _fits(model, match)) if caching else None
        if blob is not None:
            lock.reused()
            load_ffn_state(model, blob["ffn"])
            return SubFM(model, info, blob["loss"], blob["gaps_before"], blob["gaps_after"], cached=True)
        before = layer_gaps(ws.fm, model, gap_inputs, match) if match else []
        result = distill(ws.fm, model, ws.public, match, distill_cfg, progress=progress, on_step=on_step, stop=stop)
        after = layer_gaps(ws.fm, model, gap_inputs, match) if match and result.losses else before
        if caching and not result.stopped:
            io.atomic_torch_save({"ffn": ffn_state(model, match), "loss": result.losses, "gaps_before": before,
                                  "gaps_after": after, "info": json.dumps(info.to_json())}, path)
    return SubFM(model, info, result.losses, before, after)


def _fits(model: nn.Module, layer_ids: list[int]):
    """Check for a cached sub-FM blob: all its fields, and FFN tensors of exactly ``model``'s shapes."""
    shapes = {k: v.shape for k, v in ffn_state(model, layer_ids).items()}
    return lambda blob: ({"ffn", "loss", "gaps_before", "gaps_after"} <= blob.keys()
                         and {k: v.shape for k, v in blob["ffn"].items()} == shapes)
