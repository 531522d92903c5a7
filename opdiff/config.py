"""The one configuration object for an adapter: the CLI, the GUI and config files all fill this dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class AdapterConfig:
    """How to adapt a model. Defaults follow op-lora.txt Sec. 4.1 (SDXL: r=4, attention projections, MLP width 32)."""

    method: str = "lora"
    """Adapter method, one of `opdiff.METHODS` (e.g. `lora`, `op-lora`, `lora-over-mpo`)."""
    rank: int = 4
    """LoRA rank r: A is (r x d_in), B is (d_out x r)."""
    alpha: float = 4.0
    """LoRA alpha; the update is scaled by alpha / rank, as in PEFT (lora-over.txt Eq. 2)."""
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    """Suffixes of the `nn.Linear` module names to adapt (PEFT matching)."""
    op_width: int = 32
    """OP-LoRA/OP-DoRA: hidden width of each layer's MLP (op-lora.txt Sec. 4.1 and Table 8: 32 for SDXL)."""
    op_embed_dim: int = 128
    """OP-LoRA/OP-DoRA: size of the learned input vector z of each MLP (op-lora.txt Appendix C)."""
    mpo_cores: int = 5
    """LoRA-Over MPO: number of local tensors m per matrix (lora-over.txt Eq. 3); `lora-over-svd` always uses 2."""
    mpo_lr: float | None = None
    """Learning rate of the MPO/SVD cores (lora-over.txt Tables 4 and 6, "MPO_LR"); None means the main learning rate."""
    select_top_n: int = 4
    """LoRA-Over MPOP/MPOR: how many matrices per group (module kind x A/B) become MPO (top-N, Alg. 2)."""
    select_split: int = 4
    """LoRA-Over MPOR: split number; each selection round adds ceil(N / split) matrices per group (Alg. 2)."""
    select_every: int = 50
    """LoRA-Over MPOR: steps t between two selection rounds (Alg. 2)."""
    select_warmup_steps: int = 100
    """LoRA-Over MPOP: LoRA warm-up steps before the importance of Eq. 7 is measured."""
    select_batches: int = 4
    """LoRA-Over MPOP: number of fixed batches the Eq. 7 losses are averaged over."""

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one module suffix, e.g. to_q")
        if self.op_width < 1 or self.op_embed_dim < 1:
            raise ValueError(f"op_width and op_embed_dim must be >= 1, got {self.op_width}, {self.op_embed_dim}")
        if self.mpo_cores < 2:
            raise ValueError(f"mpo_cores must be >= 2 (2 is the SVD case), got {self.mpo_cores}")
        # Imported here: the registry imports the method modules, which import this file.
        from opdiff.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")

    def to_dict(self) -> dict:
        """Return the config as a JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter setting(s): {', '.join(unknown)}")
        return cls(**d)
