"""LoRA-Over with selection (lora-over.txt Sec. 4.3, Alg. 2): only the most important LoRA layers get MPO cores.

Groups. Sec. 4.3: matrices "originating from distinct modules inherently vary in size and functionality,
rendering direct performance comparisons invalid", so they are ranked within "module-specific categories". A
group here is one module kind (`to_q`, `to_out.0`, ...) x self- or cross-attention (`attn1` / `attn2` in the
layer's path) x the layer's shape. Within each group the top N = ceil(select_fraction x group size) layers are
chosen (the paper's tables: 9 of 12 on T5, 28 or 30 of 32 on Llama); `select_top_n` fixes N instead.

One score per layer. For plain LoRA, Eq. 7 and Eq. 8 give a layer's A and B the same value: zeroing either zeroes
B A, and <dL/dA, A> = <dL/dB, B> = s <dL/dY, B A X>. The paper's separate A and B groups therefore rank
identically; a chosen layer gets cores on both, and each layer is scored once.

- MPOP (predefined, Alg. 2 lines 3-8): score a trained LoRA by
      I_W = |L_W - L_{W=0}|                                                       (Eq. 7)
  on fixed batches, give the top N per group cores, then train that fixed structure from the base again (a fresh
  adapter, fresh optimizer state). The trained LoRA is a file (`select_from`, scored before the first step) or an
  in-run LoRA phase of `select_warmup_steps` steps. `select_restart = false` keeps training the scored LoRA in
  place instead (opdiff's first MPOP).
- MPOR (runtime, lines 9-17): every step adds the first-order estimate of Eq. 7,
      I_W ~= |<dL/dW, W>|                                                         (Eq. 8)
  to each layer's score, accumulated over the whole run ("throughout the fine-tuning process"); every
  `select_every` steps the top ceil(N / split) not yet chosen per group get cores, until N per group have them.
  B = 0 at step 0 makes every score 0, so the first round happens only after one interval of training.

A conversion replaces a matrix by an exact MPO decomposition of its current value (output unchanged), adds the
cores to the optimizer's `mpo` group and drops the old tensor's optimizer state.

Runs saved before the above (no `select_groups` / `select_accumulate` / `select_restart` in their config) resume
with what they were trained with: groups of module kind x A/B with each matrix scored alone, MPOR scores reset
after every round, MPOP converted in place (the settings' `absent` values).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from opdiff.methods.base import ProbeLoss, register
from opdiff.methods.lora_over import (
    MPO_CORES,
    MPO_GAUGE,
    MPO_LR,
    MPO_LR_CAP,
    MPO_LR_POWER,
    LoRAOver,
    mpo_cores,
    to_mpo,
)
from opdiff.settings import Setting

if TYPE_CHECKING:
    from opdiff.config import AdapterConfig
    from opdiff.inject import AdaptedLayer

MATRICES = ("A", "B")
ATTENTION = {"attn1": "self-attention", "attn2": "cross-attention"}  # diffusers' names in a transformer block
BY_MODULE, BY_SUFFIX = "module", "suffix-and-matrix"


@dataclass(frozen=True)
class Unit:
    """What one score ranks: a layer's A and B together, or (the earlier grouping) one of them alone."""

    layer: str
    """The layer's module path."""
    matrices: tuple[str, ...]
    """("A", "B"), or ("A",) / ("B",)."""
    group: str
    """The group it is ranked in, e.g. `to_q/self-attention/640x640`."""

    @property
    def label(self) -> str:
        return " and ".join(self.matrices)


def layer_group(layer: AdaptedLayer) -> str:
    """A layer's group: module kind / self- or cross-attention / out x in (lora-over.txt Sec. 4.3)."""
    role = next((ATTENTION[p] for p in layer.name.split(".") if p in ATTENTION), "other")
    base = layer.layer.get_base_layer()
    return f"{layer.kind}/{role}/{base.out_features}x{base.in_features}"


def make_units(layers: list[AdaptedLayer], scheme: str) -> list[Unit]:
    """The ranked units of `layers` under `select_groups` = `scheme`, in module order."""
    if scheme == BY_MODULE:
        return [Unit(a.name, MATRICES, layer_group(a)) for a in layers]
    return [Unit(a.name, (m,), f"{a.kind}/{m}") for a in layers for m in MATRICES]


class Selector(nn.Module):
    """Scores and selection state of one model; lives at `model.opdiff["select"]` so checkpoints carry it.

    Buffers, one entry per unit: `scores` (accumulated importance), `chosen_step` (-1, or the step at which the
    unit got cores; 0: before the first step) and `chosen_score` (its score then). An MPOP run that restarts from
    the base also keeps `restart_seed`, drawn at injection, for the fresh adapter it restarts with.
    """

    def __init__(self, layers: list[AdaptedLayer], strategy: str, config: AdapterConfig) -> None:
        super().__init__()
        self.strategy, self.config = strategy, config
        self.units = make_units(layers, config.select_groups)
        self.groups = [u.group for u in self.units]
        self.layer_names = [a.name for a in layers]
        n = len(self.units)
        self.register_buffer("scores", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("chosen_step", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("chosen_score", torch.zeros(n, dtype=torch.float64))
        if self.restarts:
            self.register_buffer("restart_seed", torch.randint(0, 2**62, ()))  # the run's seed decides it

    @property
    def restarts(self) -> bool:
        """MPOP that trains the chosen structure from the base again (the paper) rather than in place."""
        return self.strategy == "predefined" and self.config.select_restart

    def linears(self, model: nn.Module, k: int) -> list[nn.Linear]:
        """The `nn.Linear`s (PEFT's lora_A / lora_B) holding unit k's matrices."""
        layer = model.get_submodule(self.units[k].layer)
        return [(layer.lora_A if m == "A" else layer.lora_B)["default"] for m in self.units[k].matrices]

    def members(self, group: str) -> list[int]:
        return [k for k, g in enumerate(self.groups) if g == group]

    def quota(self, group: str) -> int:
        """N of a group: `select_top_n`, or ceil(select_fraction x its size); at most its size."""
        size = len(self.members(group))
        n = self.config.select_top_n
        if n is None:
            n = math.ceil(self.config.select_fraction * size - 1e-9)  # 0.75 x 12 is 9, not 10 by rounding
        return min(max(n, 1), size)

    def _chosen(self, group: str) -> list[int]:
        return [k for k in self.members(group) if self.chosen_step[k] >= 0]

    def done(self) -> bool:
        """True once every group has its N units."""
        return all(len(self._chosen(g)) >= self.quota(g) for g in set(self.groups))

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """MPOR: add this step's Eq. 8 score |<dL/dW, W>| of every unit not chosen yet (call after backward).

        A unit's first matrix stands for it: both of a layer's give the same value (module docstring).
        """
        if self.strategy != "runtime" or self.done():
            return
        for k in range(len(self.units)):
            if self.chosen_step[k] < 0:
                w = self.linears(model, k)[0].weight
                if w.grad is not None:
                    self.scores[k] += (w.grad.double() * w.double()).sum().abs()

    def begin(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, probe_loss: ProbeLoss) -> list[dict]:
        """MPOP with `select_from`: score that trained LoRA by Eq. 7 now, before the first step, and give the top N
        per group cores; the adapter keeps its fresh initial values. Nothing otherwise."""
        source = self.config.select_from
        if self.strategy != "predefined" or source is None or self.done():
            return []
        trained = read_trained_lora(Path(source), self.layer_names, model, self.config)
        fresh = {}
        with torch.no_grad():
            for name, (a, b) in trained.items():
                layer = model.get_submodule(name)
                la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                fresh[name] = (la.detach().clone(), lb.detach().clone())
                la.copy_(a)
                lb.copy_(b)
            self.scores.copy_(self._loss_scores(model, probe_loss))
            for name, (a, b) in fresh.items():
                layer = model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
        return self._choose(model, 0, optimizer, per_round=None)

    def step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None,
             probe_loss: ProbeLoss | None = None) -> list[dict]:
        """Run the selection due after optimizer step `step` (1-based); return what was chosen (may be empty).

        MPOP needs `probe_loss(n)`: the loss on n fixed scoring batches under the current weights (no grad).
        """
        cfg = self.config
        if self.done():
            return []
        if self.strategy == "predefined":
            if step != cfg.select_warmup_steps or cfg.select_from is not None:
                return []
            if probe_loss is None:
                raise ValueError("lora-over-mpop needs probe_loss to score layers by Eq. 7")
            self.scores.copy_(self._loss_scores(model, probe_loss))
            chosen = self._choose(model, step, optimizer, per_round=None, restart=self.restarts)
            return chosen
        if step % cfg.select_every != 0:
            return []
        chosen = self._choose(model, step, optimizer, per_round=cfg.select_split)
        if cfg.select_accumulate == "round":
            self.scores.zero_()  # the earlier scheme: each round scores from scratch
        return chosen

    def _choose(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None, per_round: int | None,
                restart: bool = False) -> list[dict]:
        """Give the top units per group by `scores` cores: all of N (per_round None) or ceil(N / per_round) more."""
        picked: list[int] = []
        for group in sorted(set(self.groups)):
            quota = self.quota(group)
            room = quota - len(self._chosen(group))
            take = room if per_round is None else min(math.ceil(quota / per_round), room)
            free = [k for k in self.members(group) if self.chosen_step[k] < 0]
            free.sort(key=lambda k: (-float(self.scores[k]), k))  # ties broken by module order: deterministic
            picked += free[:take]
        if restart:
            self._restart(model, optimizer)
        events = []
        for k in picked:
            self.convert(model, k, optimizer)
            self.chosen_step[k], self.chosen_score[k] = step, self.scores[k]
            events.append({"step": step, "group": self.groups[k], "layer": self.units[k].layer,
                           "matrix": self.units[k].label, "score": float(self.scores[k])})
        return events

    @torch.no_grad()
    def _restart(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Start the adapter from the base again: B = 0, a fresh A as PEFT draws it (kaiming-uniform with a = sqrt 5,
        i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), and no optimizer state (Alg. 2 line 8 trains anew)."""
        seed = int(self.restart_seed)
        for i, name in enumerate(self.layer_names):
            layer = model.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            bound = 1 / math.sqrt(a.shape[1])
            generator = torch.Generator().manual_seed(seed + i)
            a.copy_(torch.empty(a.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator))
            b.zero_()
        if optimizer is not None:
            optimizer.state.clear()

    @torch.no_grad()
    def _loss_scores(self, model: nn.Module, probe_loss: ProbeLoss) -> torch.Tensor:
        """Eq. 7 by definition: zero each unit's matrices in turn and measure the change of the loss."""
        n = self.config.select_batches
        base = probe_loss(n)
        scores = torch.zeros(len(self.units), dtype=torch.float64)
        for k in range(len(self.units)):
            weights = [linear.weight for linear in self.linears(model, k)]
            saved = [w.detach().clone() for w in weights]
            for w in weights:
                w.zero_()
            scores[k] = abs(base - probe_loss(n))
            for w, s in zip(weights, saved, strict=True):
                w.copy_(s)
        return scores

    def convert(self, model: nn.Module, k: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Give unit k's matrices MPO cores now (values unchanged) and hand the cores to the optimizer's `mpo`
        group."""
        for linear in self.linears(model, k):
            old = linear.weight
            to_mpo(linear, self.config.mpo_cores, model.opdiff, self.config.mpo_gauge)
            if optimizer is not None:
                sync_optimizer(model, optimizer, old)

    def restore(self, model: nn.Module) -> None:
        """Re-create the MPO structure of the chosen units (before loading a checkpoint's cores)."""
        for k in range(len(self.units)):
            if self.chosen_step[k] >= 0:
                for linear in self.linears(model, k):
                    if not hasattr(linear, "parametrizations"):
                        to_mpo(linear, self.config.mpo_cores, model.opdiff, self.config.mpo_gauge)


def read_trained_lora(path: Path, layer_names: list[str], model: nn.Module, config: AdapterConfig
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return {layer: (A, B)} of the trained LoRA at `path`, B scaled so that this adapter's s B A equals the file's.

    `path`: a LoRA `.safetensors` in diffusers or PEFT keys (`[unet.]<module>.lora_A.weight`), e.g. an opdiff run's
    `lora.safetensors`, or a folder holding one. Its alpha is read from the header (opdiff's or diffusers' adapter
    metadata); without one, its scale is 1, as diffusers loads such a file. Raises ValueError naming the file and
    the first layer that is missing or of another shape (the scoring LoRA must have this run's targets and rank).
    """
    file = path / "lora.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"select_from: {file} does not exist; give a finished LoRA run's folder or its "
                         "lora.safetensors")
    try:
        with safe_open(str(file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"select_from: cannot read {file} as a safetensors LoRA ({e})") from None
    by_name = {}
    for key, value in tensors.items():
        for prefix in ("unet.", "base_model.model."):
            key = key.removeprefix(prefix)
        by_name[key] = value
    if any("magnitude" in k for k in by_name):
        raise ValueError(f"select_from: {file} is a DoRA; Eq. 7 scores a plain LoRA (train one with --method lora)")
    file_alpha = _file_alpha(metadata)
    out = {}
    for name in layer_names:
        layer = model.get_submodule(name)
        scale = layer.scaling["default"]
        pair = []
        for m, linear in (("A", layer.lora_A["default"]), ("B", layer.lora_B["default"])):
            key = f"{name}.lora_{m}.weight"
            if key not in by_name:
                raise ValueError(f"select_from: {file} has no {key}: the scoring LoRA must adapt this run's layers "
                                 f"(targets {', '.join(config.target_modules)})")
            value = by_name[key]
            if tuple(value.shape) != tuple(linear.weight.shape):
                raise ValueError(f"select_from: {file} has {key} of shape {tuple(value.shape)}, this run's is "
                                 f"{tuple(linear.weight.shape)}: train the scoring LoRA with --rank {config.rank}")
            pair.append(value.to(linear.weight.dtype))
        a, b = pair
        s_file = 1.0 if file_alpha is None else file_alpha / a.shape[0]  # alpha / r, as diffusers loads the file
        out[name] = (a, b * (s_file / scale))
    return out


def _file_alpha(metadata: dict[str, str]) -> float | None:
    """The LoRA alpha a file's header gives (opdiff's `opdiff_adapter`, else diffusers' `lora_adapter_metadata`);
    None when neither says."""
    for key, alpha_key in (("opdiff_adapter", "alpha"), ("lora_adapter_metadata", "unet.lora_alpha")):
        try:
            meta = json.loads(metadata.get(key, "{}"))
        except json.JSONDecodeError:
            continue
        if isinstance(meta, dict) and meta.get(alpha_key) is not None:
            return float(meta[alpha_key])
    return None


def sync_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, dropped: torch.Tensor) -> None:
    """Take `dropped` (a matrix just given cores) and its state out of the optimizer; give the `mpo` group the
    model's cores in module order.

    Module order (not conversion order) keeps a saved optimizer state loadable into a model rebuilt on resume.
    Every other group keeps its parameters: a parameter is never in two groups.
    """
    optimizer.state.pop(dropped, None)
    groups = {g.get("name"): g for g in optimizer.param_groups}
    if "mpo" not in groups:
        raise ValueError("optimizer has no 'mpo' param group: build it with opdiff.param_groups(model, lr)")
    for group in optimizer.param_groups:
        if group is groups["mpo"]:
            group["params"] = mpo_cores(model)
        else:
            group["params"] = [p for p in group["params"] if p is not dropped]


def _selector(model: nn.Module) -> Selector:
    return model.opdiff["select"]


PAPER_FRACTION = 0.75  # lora-over.txt Table 4: top-N 9 of T5-base's 12 layers; Table 6: 28-30 of 32 (0.875-0.94)

SELECT_FRACTION = Setting(
    "select_fraction", float, PAPER_FRACTION, "Which share of each group of layers gets MPO cores (the most "
    "important ones, at least one per group).",
    ref="lora-over.txt Alg. 2, top-N; Table 4: 9 of 12 layers, Table 6: 28-30 of 32", label="share of layers",
    above=0, maximum=1, reason="a share of the group")
SELECT_TOP_N = Setting(
    "select_top_n", int | None, None, "How many layers per group get MPO cores, instead of a share of each group.",
    optional=True, none_means="the share of each group set by select_fraction",
    ref="lora-over.txt Alg. 2, top-N", label="layers per group", minimum=1)
SELECT_GROUPS = Setting(
    "select_groups", str, BY_MODULE, "How layers are grouped for ranking: importance is only compared within a "
    "group.", choices=(BY_MODULE, BY_SUFFIX),
    choice_help=("by kind, self/cross attention and shape; a layer's A and B together (the paper)",
                 "by kind and matrix: each A or B alone (opdiff's first selection)"),
    ref="lora-over.txt Sec. 4.3: module-specific groups", label="groups", absent=BY_SUFFIX)
SELECT_SPLIT = Setting(
    "select_split", int, 8, "In how many rounds the runtime selection picks its layers: each round adds "
    "N / split of them per group.", ref="lora-over.txt Alg. 2, split number; Tables 4 and 6: 5 to 8",
    label="selection rounds", minimum=1)
SELECT_EVERY = Setting(
    "select_every", int, 50, "Training steps between two runtime selection rounds.",
    ref="lora-over.txt Alg. 2, t; Table 6: 50", label="steps between rounds", minimum=1)
SELECT_ACCUMULATE = Setting(
    "select_accumulate", str, "run", "Over which steps the runtime selection adds up each layer's importance.",
    choices=("run", "round"),
    choice_help=("every step since the start (the paper)",
                 "the steps since the last round (opdiff's first selection)"),
    ref="lora-over.txt Sec. 4.3: accumulated throughout the fine-tuning process", label="importance over",
    absent="round")
SELECT_WARMUP_STEPS = Setting(
    "select_warmup_steps", int, 100, "Steps of plain LoRA training whose result is scored to choose the layers "
    "(when no trained LoRA is given).", ref="lora-over.txt Alg. 2 line 4, Eq. 7", label="LoRA phase steps",
    minimum=1)
SELECT_FROM = Setting(
    "select_from", Path | None, None, "A trained LoRA (a finished lora run's folder or its lora.safetensors, same "
    "layers and rank) whose layers are scored to choose the structure before the first step.", optional=True,
    none_means="score a plain LoRA trained for the first select_warmup_steps steps of this run",
    ref="lora-over.txt Alg. 2 lines 4-5: LoRA trained to convergence, then Eq. 7", label="scoring LoRA", picks="run")
SELECT_RESTART = Setting(
    "select_restart", bool, True, "After scoring, train the chosen structure from the base model again with a "
    "fresh adapter (the paper). Off: keep training the scored LoRA, its chosen layers given cores in place.",
    ref="lora-over.txt Alg. 2 line 8", label="restart from the base", off_flag="--select-in-place",
    absent=False)
SELECT_BATCHES = Setting(
    "select_batches", int, 4, "How many fixed batches each layer's importance is measured on: more is steadier and "
    "slower.",
    ref="lora-over.txt Eq. 7", label="scoring batches", minimum=1)


class Selecting(LoRAOver):
    """LoRA-Over MPOP/MPOR: plain LoRA whose most important layers get MPO cores (Alg. 2)."""

    events_title = "Layers given MPO cores"

    def __init__(self, name: str, summary: str, strategy: str, **kw: Any) -> None:
        super().__init__(name, summary, n_cores=lambda config: config.mpo_cores, **kw)
        self.strategy = strategy  # "predefined" (MPOP, Eq. 7) or "runtime" (MPOR, Eq. 8)

    def attach(self, model: nn.Module, layers: list[AdaptedLayer], config: AdapterConfig) -> None:
        """Plain LoRA layers and the selection state; nothing has cores yet."""
        model.opdiff["select"] = Selector(layers, self.strategy, config)

    def param_groups(self, model: nn.Module, lr: float, relative: bool = False) -> list[dict]:
        """An "adapter" group at `lr` (kept, perhaps empty, once every layer has cores, so a saved optimizer state
        always has both groups) and an "mpo" group of the cores so far."""
        groups = super().param_groups(model, lr, relative)
        if groups[0]["name"] != "adapter":
            groups.insert(0, {"params": [], "lr": lr, "name": "adapter"})
        return groups

    def schedule_warning(self, config: AdapterConfig, total_steps: int) -> str | None:
        """Say when the selection would not finish within the run, or leave the restarted adapter no steps."""
        if self.strategy == "runtime":
            last = config.select_every * config.select_split  # the most rounds any group needs
            if last > total_steps:
                return (f"{self.name}: the selection may need {config.select_split} rounds of {config.select_every} "
                        f"steps ({last}) but the run has {total_steps}; lower --select-every or --select-split")
            return None
        if config.select_from is not None:
            return None
        last = config.select_warmup_steps
        if last >= total_steps:
            return (f"{self.name}: the LoRA phase that chooses the layers ends at step {last} but the run has "
                    f"{total_steps} steps; lower --select-warmup-steps or give --select-from")
        return None

    def before_training(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        probe_loss: ProbeLoss) -> list[dict]:
        """MPOP with a trained LoRA to score: choose the structure before the first step."""
        return _selector(model).begin(model, optimizer, probe_loss)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """MPOR: accumulate this step's Eq. 8 scores."""
        _selector(model).observe(model)

    def after_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer,
                   probe_loss: ProbeLoss) -> list[dict]:
        """Run the selection round due now, if any; return the layers given cores."""
        return _selector(model).step(model, step, optimizer, probe_loss)

    def at_largest(self, model: nn.Module) -> None:
        """Every group's N layers given cores (the first N in module order: which ones does not change the size)."""
        sel = _selector(model)
        for group in sorted(set(sel.groups)):
            for k in sel.members(group)[: sel.quota(group)]:
                sel.convert(model, k, None)

    def before_load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load the selection buffers, then give the units chosen so far their cores back."""
        sel = _selector(model)
        for name, buf in sel.named_buffers():
            key = f"opdiff.select.{name}"
            if key not in state:
                raise ValueError(f"checkpoint lacks the selection state {key!r}")
            buf.copy_(state[key])
        sel.restore(model)


SELECTION_SETTINGS = (MPO_CORES, MPO_GAUGE, MPO_LR, MPO_LR_POWER, MPO_LR_CAP, SELECT_FRACTION, SELECT_TOP_N,
                      SELECT_GROUPS)
register(Selecting(
    "lora-over-mpop", "LoRA-Over-MPOP: score a trained LoRA by Eq. 7, then train its top layers per group as MPO "
    "from the base.",
    strategy="predefined",
    settings=(*SELECTION_SETTINGS, SELECT_FROM, SELECT_WARMUP_STEPS, SELECT_RESTART, SELECT_BATCHES),
    about="LoRA-Over with a predefined selection: a plain LoRA (a finished run you give, or a short LoRA phase at "
          "the start of this run) is scored layer by layer by how much removing it changes the loss; the most "
          "important layers of each group then train as MPO cores, starting again from the base model. Close to "
          "LoRA's cost, plus one scoring pass per layer. Ships as a plain LoRA.",
    ref="lora-over.txt Sec. 4.3, Eq. 7, Alg. 2",
))
register(Selecting(
    "lora-over-mpor", "LoRA-Over-MPOR: every t steps the top layers per group by Eq. 8 get MPO cores, until N.",
    strategy="runtime", settings=(*SELECTION_SETTINGS, SELECT_SPLIT, SELECT_EVERY, SELECT_ACCUMULATE),
    about="LoRA-Over with a runtime selection: every few steps the layers with the largest accumulated "
          "gradient-times-weight get MPO cores, until the chosen share of each group has them. Close to LoRA's "
          "cost per step. Ships as a plain LoRA.",
    ref="lora-over.txt Sec. 4.3, Eq. 8, Alg. 2",
))
