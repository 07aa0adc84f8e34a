"""What a run sees (:class:`DataConfig`) and does (:class:`FedConfig`), as plain data.

This module imports no heavy library (no torch, transformers, datasets, scipy or plotly): the CLI builds its
parser, with these defaults, and answers ``--help`` in a fraction of a second. The modules that do the work
import the classes from here (``federation.FedConfig`` and ``workspace.DataConfig`` are the same classes).
Building a :class:`FedConfig` validates its sub-configurations, which live next to the code that uses them, so
that step imports torch; reading defaults with :func:`field_defaults` does not.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .errors import check_choice, check_range

if TYPE_CHECKING:
    from .adapters import LoRAConfig
    from .distill import DistillConfig
    from .subfm import SubFMConfig

DEFAULT_FM = "minilm"
DEVICES = ("auto", "cpu", "cuda", "mps")   # auto: CUDA if available, then Apple's MPS, then the CPU
METHODS = ("fedpft", "fedpetuning", "fedot", "fedot-all", "fedpft-n", "fedpft-b", "fedpft-d")
METHOD_NAMES = {"fedpft": "FedPFT", "fedpetuning": "FedPETuning", "fedot": "FedOT", "fedot-all": "FedOT-all",
                "fedpft-n": "FedPFT-N", "fedpft-b": "FedPFT-B", "fedpft-d": "FedPFT-D"}
LR_SCHEDULES = ("linear", "exp", "constant")
ALIGN_RULES = ("mean-abs", "apoz")
# The allowed values of the other string settings. They live here, not with the code that checks them (data,
# partition, subfm, workspace import them), so the CLI offers exactly these choices without importing torch.
TASKS: tuple[str, ...] = ("tweets", "wiki-topics", "wiki-pairs", "sst2", "qnli", "mnli", "qqp", "cifar10")
PUBLIC_SOURCES = ("sentences", "blocks", "task")
PARTITION_SCHEMES = ("iid", "dirichlet")
PARTITION_CONVENTIONS = ("flgo", "per-class")
SELECTIONS = ("saliency", "random")
# Where a run's clients live (fedpft_lab/engines): threads of this process, Ray actors, or Flower SuperNodes.
ENGINES = ("inprocess", "flower-sim", "flower")
# What ``fedpft-lab bench --only`` measures on its own (both bench parsers offer these, with this help).
BENCH_ONLY: dict[str, str] = {
    "clients-scaling": "peak memory and time per round of 2-round runs with 20, 200 and 2000 clients (same clients "
                       "per round), each in its own process",
    "default-speed": "the warm default run as the --baseline code ran it, and with this code's random and "
                     "length-grouped (the default) client batches, side by side, and its FLOP efficiency",
    "precision": "one client epoch and one test pass of the sub-FM and the FM in fp32 and under CPU bf16 autocast, "
                 "one thread: times and how often the two predict alike (why the lab computes in fp32)",
    "engines": "the default run in-process, on Flower's simulation engine and on a local Flower deployment, wall "
               "time as a ratio to in-process (each run's logs kept in OUT/engines/)",
}
BENCH_ONLY_HELP = "; ".join(f"{name}: {what}" for name, what in BENCH_ONLY.items())
# The parameters ``fedpft-lab sweep`` can vary, and the type of their values.
SWEEP_PARAM_TYPES: dict[str, type] = {"align_interval": int, "align_proportion": float, "keep_ratio": float,
                                      "alpha": float, "distill_steps": int}


@dataclass(frozen=True)
class DataConfig:
    """What data a run sees. Kept apart from the training knobs so several methods share one Workspace."""

    fm: str = DEFAULT_FM
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
    # Where the models and batches live (see fedpft_lab.device). On the CPU every number is the same whichever
    # name picked it; a GPU computes in another order, so its runs are cached apart (see result_config).
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)

    @property
    def use_balanced(self) -> bool:
        return self.balanced if self.balanced is not None else self.task == "tweets"


@dataclass(frozen=True)
class FedConfig:
    """One federated run. Defaults are the "workshop" size: under 90 s on a 2-core laptop CPU (cached sub-FM).

    6 of the 20 clients per round: an even number, so on 2 cores no core idles while a last client trains alone.
    """

    method: str = "fedpft"
    data: DataConfig = field(default_factory=DataConfig)
    sample_fraction: float = 0.3
    rounds: int = 6
    local_epochs: int = 1
    batch_size: int = 4                  # the paper's per-device batch; twice the steps of 8 for ~10% more time
    lr: float = 2e-3
    lr_schedule: str = "linear"
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1            # used only when ``dropout`` is on
    dropout: bool = False                # train clients with dropout (LoRA's + the FM's own), as the official code
    keep_ratio: float = 0.25
    retained_layers: tuple[int, ...] | None = None
    selection: str = "saliency"
    distill_steps: int = 300
    distill_batch_size: int = 32
    distill_lr: float = 6e-4
    align_interval: int = 2
    align_proportion: float = 0.5
    align_steps: int = 20
    align_batch_size: int = 16
    align_lr: float = 6e-4
    align_rule: str = "mean-abs"
    # Also measure the update disparity each round (labs/METHOD.md#measurements): the first sampled client's round
    # trained once more through the FM, from the same adapter and data order, against its proxy update. A
    # measurement only (the run's trajectory is unchanged); it costs one FM client job per round, so the workshop
    # run skips it.
    measure_update: bool = False
    # Client batches of similar length (fedpft_lab.data.length_grouped_batches): a random order pads 27% of the
    # workshop's training tokens, this almost none, for the same examples per epoch. It changes which tweets share
    # a batch, hence the numbers: off here, so stored configurations (which lack the field) replay as they were
    # made; on in the presets (fedpft_lab.presets), where a 3-seed x 4-method check showed no accuracy loss.
    group_by_length: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_range("sample_fraction", self.sample_fraction, 0.0, 1.0, lo_open=True)
        check_range("rounds", self.rounds, 1, None)
        check_range("local_epochs", self.local_epochs, 1, None)
        check_range("batch_size", self.batch_size, 1, None)
        check_range("lr", self.lr, 0.0, None, lo_open=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("align_interval", self.align_interval, 1, None)
        check_range("align_steps", self.align_steps, 0, None)
        check_choice("align_rule", self.align_rule, ALIGN_RULES)
        check_range("align_proportion", self.align_proportion, 0.0, 1.0, lo_open=True)
        self.sub_config()  # validates keep_ratio / selection / retained layers
        self.lora_config()
        self.distill_config()

    # -- what each method does -----------------------------------------------------------------------
    @property
    def proxy_kind(self) -> str:
        return {"fedpetuning": "fm", "fedot": "layer-drop", "fedot-all": "layer-drop"}.get(self.method, "sub-fm")

    @property
    def distil_before(self) -> bool:
        return self.method in ("fedpft", "fedpft-b")

    @property
    def align_during(self) -> bool:
        return self.method in ("fedpft", "fedpft-d")

    def aligns_in(self, rnd: int) -> bool:
        """Alignment every ``align_interval`` rounds, never after the last round (it would be wasted)."""
        return self.align_during and self.align_steps > 0 and rnd % self.align_interval == 0 and rnd < self.rounds

    # The sub-configurations live with the code that uses them (and imports torch), hence the local imports.
    def sub_config(self) -> SubFMConfig:
        from .subfm import SubFMConfig

        return SubFMConfig(self.keep_ratio, self.retained_layers, self.selection, self.seed)

    def lora_config(self) -> LoRAConfig:
        from .adapters import LoRAConfig

        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout)

    def distill_config(self) -> DistillConfig:
        from .distill import DistillConfig

        return DistillConfig(steps=self.distill_steps, batch_size=self.distill_batch_size, lr=self.distill_lr,
                             seed=self.seed)

    def align_config(self, rnd: int) -> DistillConfig:
        from .distill import DistillConfig

        return DistillConfig(steps=self.align_steps, batch_size=self.align_batch_size, lr=self.align_lr,
                             weight_decay=0.0, seed=self.seed * 1000 + rnd)

    def clients_per_round(self) -> int:
        return max(1, round(self.sample_fraction * self.data.clients))

    def lr_at(self, rnd: int) -> float:
        """Global learning-rate schedule; ``linear`` is the official type 2 without its off-by-one."""
        if self.lr_schedule == "linear":
            return self.lr * (self.rounds - rnd + 1) / self.rounds
        if self.lr_schedule == "exp":
            return self.lr * 0.95 ** (rnd - 1)
        return self.lr

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FedConfig":
        d = dict(d)
        d["data"] = DataConfig(**d["data"])
        if d.get("retained_layers") is not None:
            d["retained_layers"] = tuple(d["retained_layers"])
        return cls(**d)


def field_defaults(cls: type) -> dict[str, Any]:
    """Every field of the dataclass ``cls`` with its default, without building (and validating) an instance."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out
