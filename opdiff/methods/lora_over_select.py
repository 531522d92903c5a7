"""LoRA-Over with selection (lora-over.txt Sec. 4.3, Alg. 2): only the most important LoRA matrices become MPO.

Matrices are grouped by module kind x matrix (`to_q`/A, `to_q`/B, ...); top-N per group are over-parameterized.
- MPOP (predefined): train plain LoRA for `select_warmup_steps`, then score every matrix by
      I_W = |L_W - L_{W=0}|                                                       (Eq. 7)
  on fixed batches, and convert the top-N per group at once.
- MPOR (runtime): accumulate the first-order estimate of Eq. 7 over `select_every` steps,
      I_W ~= |dL/dW . W|  (the inner product of gradient and matrix; Eq. 8)
  then convert the top ceil(N / split) not yet chosen per group; repeat until N per group are chosen.
  B = 0 at step 0 makes every B score 0, so the first round happens only after one interval of training.

A conversion replaces the matrix by an exact MPO decomposition of its current value (output unchanged), adds the
cores to the optimizer's `mpo` group and drops the old tensor's optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opdiff.methods.base import ProbeLoss, register
from opdiff.methods.lora_over import MPO_CORES, MPO_LR, MPO_LR_POWER, LoRAOver, mpo_cores, to_mpo
from opdiff.settings import Setting

if TYPE_CHECKING:
    from opdiff.config import AdapterConfig
    from opdiff.inject import AdaptedLayer

MATRICES = ("A", "B")


class Selector(nn.Module):
    """Scores and selection state of one model; lives at `model.opdiff["select"]` so checkpoints carry it.

    Matrix k is `(layer_names[k // 2], "A" | "B")`. Buffers: `scores` (accumulated importance of the current
    interval), `chosen_step` (-1 or the step at which the matrix became MPO), `chosen_score` (its score then).
    """

    def __init__(self, layers: list[AdaptedLayer], strategy: str, config: AdapterConfig) -> None:
        super().__init__()
        self.strategy, self.config = strategy, config
        self.layer_names = [a.name for a in layers]
        self.groups = [f"{a.kind}/{m}" for a in layers for m in MATRICES]
        n = len(self.groups)
        self.register_buffer("scores", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("chosen_step", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("chosen_score", torch.zeros(n, dtype=torch.float64))

    def matrix(self, model: nn.Module, k: int) -> nn.Linear:
        """Return the `nn.Linear` (PEFT's lora_A/lora_B) holding matrix k."""
        layer = model.get_submodule(self.layer_names[k // 2])
        return (layer.lora_A if MATRICES[k % 2] == "A" else layer.lora_B)["default"]

    def done(self) -> bool:
        """True once every group has its N matrices (or all it has)."""
        return all(len(self._chosen(g)) >= min(self.config.select_top_n, len(self._members(g)))
                   for g in set(self.groups))

    def _members(self, group: str) -> list[int]:
        return [k for k, g in enumerate(self.groups) if g == group]

    def _chosen(self, group: str) -> list[int]:
        return [k for k in self._members(group) if self.chosen_step[k] >= 0]

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """MPOR: add this step's Eq. 8 score |<dL/dW, W>| of every not-yet-chosen matrix (call after backward)."""
        if self.strategy != "runtime" or self.done():
            return
        for k in range(len(self.groups)):
            if self.chosen_step[k] < 0:
                w = self.matrix(model, k).weight
                if w.grad is not None:
                    self.scores[k] += (w.grad.double() * w.double()).sum().abs()

    def step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None,
             eval_loss: Callable[[], float] | None = None) -> list[dict]:
        """Run the selection due after optimizer step `step` (1-based); return what was chosen (may be empty).

        MPOP needs `eval_loss`: the loss on the fixed scoring batches under the current weights (no grad).
        """
        cfg = self.config
        if self.done():
            return []
        if self.strategy == "predefined":
            if step != cfg.select_warmup_steps:
                return []
            if eval_loss is None:
                raise ValueError("lora-over-mpop needs eval_loss to score matrices by Eq. 7")
            self.scores.copy_(self._loss_scores(model, eval_loss))
            per_round = cfg.select_top_n
        else:
            if step % cfg.select_every != 0:
                return []
            per_round = math.ceil(cfg.select_top_n / cfg.select_split)
        chosen = []
        for group in sorted(set(self.groups)):
            room = min(cfg.select_top_n, len(self._members(group))) - len(self._chosen(group))
            free = [k for k in self._members(group) if self.chosen_step[k] < 0]
            free.sort(key=lambda k: (-float(self.scores[k]), k))  # ties broken by module order: deterministic
            for k in free[: min(per_round, room)]:
                self.convert(model, k, optimizer)
                self.chosen_step[k], self.chosen_score[k] = step, self.scores[k]
                chosen.append({"step": step, "group": group, "layer": self.layer_names[k // 2],
                               "matrix": MATRICES[k % 2], "score": float(self.scores[k])})
        self.scores.zero_()  # the next MPOR interval scores from scratch
        return chosen

    @torch.no_grad()
    def _loss_scores(self, model: nn.Module, eval_loss: Callable[[], float]) -> torch.Tensor:
        """Eq. 7 by definition: zero each matrix in turn and measure the change of the loss."""
        base = eval_loss()
        scores = torch.zeros(len(self.groups), dtype=torch.float64)
        for k in range(len(self.groups)):
            w = self.matrix(model, k).weight
            saved = w.detach().clone()
            w.zero_()
            scores[k] = abs(base - eval_loss())
            w.copy_(saved)
        return scores

    def convert(self, model: nn.Module, k: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Turn matrix k into MPO cores now (value unchanged) and hand its cores to the optimizer's `mpo` group."""
        linear = self.matrix(model, k)
        old = linear.weight
        to_mpo(linear, self.config.mpo_cores, model.opdiff)
        if optimizer is not None:
            sync_optimizer(model, optimizer, old)

    def restore(self, model: nn.Module) -> None:
        """Re-create the MPO structure of the chosen matrices (before loading a checkpoint's cores)."""
        for k in range(len(self.groups)):
            if self.chosen_step[k] >= 0 and not hasattr(self.matrix(model, k), "parametrizations"):
                to_mpo(self.matrix(model, k), self.config.mpo_cores, model.opdiff)


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


SELECT_TOP_N = Setting(
    "select_top_n", int, 4, "How many matrices per group get MPO cores (the most important ones).",
    ref="lora-over.txt Alg. 2, top-N; groups are module kind x A/B", label="matrices per group", minimum=1)
SELECT_SPLIT = Setting(
    "select_split", int, 4, "In how many rounds the runtime selection picks its matrices: each round adds "
    "N / split of them per group.", ref="lora-over.txt Alg. 2, split number", label="selection rounds", minimum=1)
SELECT_EVERY = Setting(
    "select_every", int, 50, "Training steps between two runtime selection rounds.",
    ref="lora-over.txt Alg. 2, t", label="steps between rounds", minimum=1)
SELECT_WARMUP_STEPS = Setting(
    "select_warmup_steps", int, 100, "Plain LoRA training steps before the importance of each matrix is measured "
    "and the chosen ones get MPO cores.", ref="lora-over.txt Sec. 4.3, Eq. 7", label="LoRA warm-up steps",
    minimum=1)
SELECT_BATCHES = Setting(
    "select_batches", int, 4, "How many fixed batches each matrix's importance is measured on: more is steadier and "
    "slower.",
    ref="lora-over.txt Eq. 7", label="scoring batches", minimum=1)


class Selecting(LoRAOver):
    """LoRA-Over MPOP/MPOR: plain LoRA whose most important matrices get MPO cores while training (Alg. 2)."""

    events_title = "Matrices given MPO cores"

    def __init__(self, name: str, summary: str, strategy: str, **kw: Any) -> None:
        super().__init__(name, summary, n_cores=lambda config: config.mpo_cores, **kw)
        self.strategy = strategy  # "predefined" (MPOP, Eq. 7) or "runtime" (MPOR, Eq. 8)

    def attach(self, model: nn.Module, layers: list[AdaptedLayer], config: AdapterConfig) -> None:
        """Plain LoRA layers and the selection state; nothing has cores yet."""
        model.opdiff["select"] = Selector(layers, self.strategy, config)

    def schedule_warning(self, config: AdapterConfig, total_steps: int) -> str | None:
        """Say when the selection would not choose all N per group within the run."""
        if self.strategy == "runtime":
            rounds = math.ceil(config.select_top_n / math.ceil(config.select_top_n / config.select_split))
            last, flag = config.select_every * rounds, "--select-every"
        else:
            last, flag = config.select_warmup_steps, "--select-warmup-steps"
        if last > total_steps:
            return (f"{self.name}: the selection schedule ends at step {last} but the run has {total_steps} steps; "
                    f"lower {flag}")
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """MPOR: accumulate this step's Eq. 8 scores."""
        _selector(model).observe(model)

    def after_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer,
                   probe_loss: ProbeLoss) -> list[dict]:
        """Run the selection round due now, if any; return the matrices given cores."""
        config = model.opdiff_config
        return _selector(model).step(model, step, optimizer, lambda: probe_loss(config.select_batches))

    def before_load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load the selection buffers, then give the matrices chosen so far their cores back."""
        sel = _selector(model)
        for name, buf in sel.named_buffers():
            key = f"opdiff.select.{name}"
            if key not in state:
                raise ValueError(f"checkpoint lacks the selection state {key!r}")
            buf.copy_(state[key])
        sel.restore(model)


SELECTION_SETTINGS = (MPO_CORES, MPO_LR, MPO_LR_POWER, SELECT_TOP_N)
register(Selecting(
    "lora-over-mpop", "LoRA-Over-MPOP: LoRA warm-up, then the top-N matrices per group by Eq. 7 become MPO.",
    strategy="predefined", settings=(*SELECTION_SETTINGS, SELECT_WARMUP_STEPS, SELECT_BATCHES),
    about="LoRA-Over with a predefined selection: LoRA trains first; then the matrices whose removal changes the "
          "loss most get MPO cores. Close to LoRA's cost, plus one scoring pass per matrix after the warm-up. "
          "Ships as a plain LoRA.",
    ref="lora-over.txt Sec. 4.3, Eq. 7, Alg. 2",
))
register(Selecting(
    "lora-over-mpor", "LoRA-Over-MPOR: every t steps the top matrices per group by Eq. 8 become MPO, until N.",
    strategy="runtime", settings=(*SELECTION_SETTINGS, SELECT_SPLIT, SELECT_EVERY),
    about="LoRA-Over with a runtime selection: every few steps the matrices with the largest gradient-times-weight "
          "get MPO cores, until N per group have them. Close to LoRA's cost per step. Ships as a plain LoRA.",
    ref="lora-over.txt Sec. 4.3, Eq. 8, Alg. 2",
))
