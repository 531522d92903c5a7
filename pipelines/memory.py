"""Peak accelerator memory of a training run, estimated on the CPU before anything loads.

The base's U-Net is built from its config under PyTorch's fake tensors (shapes and dtypes, no storage), the adapter
is injected as training injects it, and one training forward and backward pass at the run's resolution, batch,
precision and checkpointing runs under a dispatch mode that counts every live tensor (rounded up to the CUDA
allocator's 512-byte blocks) and keeps the peak. Optimizer state is added from the optimizer's bytes per trainable
value (`pipelines.optimizers.STATE_BYTES`): Prodigy reads values while it steps, which fake tensors do not have.

A run goes through three phases, and the estimate is the largest:
- encode: the VAE (float32) and text encoders on the device, encoding one image at a time (cached latents);
- train: U-Net, adapter, gradients, activations, optimizer state, plus encoders kept there (uncached latents, or
  the text encoders for shuffled captions);
- samples while training: the training state minus gradients, with the encoders, the U-Net's inference (two
  images: guidance) or the VAE decoding one image, whichever is larger.
`CUDA_OVERHEAD` (the CUDA context and cuBLAS workspace, outside PyTorch's allocator) is added for the total a GPU
must have. bench/RESULTS.md compares the estimate with measured peaks.
"""

from __future__ import annotations

import json
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import opdiff
from pipelines import single_file
from pipelines.config import TrainConfig
from pipelines.optimizers import state_bytes
from pipelines.step import _evaluate_adapters

GiB = 2**30
CUDA_OVERHEAD = int(0.75 * GiB)
"""Memory a CUDA process holds outside PyTorch's allocator: context, kernels, cuBLAS/cuDNN workspaces."""
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHIPPED_CONFIGS = {"stabilityai/stable-diffusion-xl-base-1.0": single_file.ARCHITECTURES["SDXL base 1.0"]}
"""Hub ids whose configs opdiff ships, so their estimate needs no download."""
TEXT_TOKENS = 77
BLOCK = 512  # the CUDA caching allocator's smallest block


@dataclass
class MemoryEstimate:
    """Estimated peak memory of each phase of a run on its accelerator, in bytes."""

    phases: dict[str, int]
    """encode, train and (with sample_every) samples: the peak of each, in PyTorch's allocator."""
    train_parts: dict[str, int] = field(default_factory=dict)
    """What the training phase's peak is made of: weights, adapter, gradients, activations, optimizer state..."""
    settings: dict[str, object] = field(default_factory=dict)
    """The settings the estimate is for."""

    @property
    def peak(self) -> int:
        """The largest phase: what PyTorch's allocator will peak at (torch.cuda.max_memory_allocated)."""
        return max(self.phases.values())

    @property
    def total(self) -> int:
        """The peak plus `CUDA_OVERHEAD`: what the GPU must have free."""
        return self.peak + CUDA_OVERHEAD

    def fits(self, budget_gb: float) -> bool:
        """Whether the run fits a GPU of `budget_gb` GiB."""
        return self.total <= budget_gb * GiB

    def to_dict(self) -> dict:
        """JSON-ready, in GiB, for the run's config.json."""
        gib = lambda b: round(b / GiB, 3)  # noqa: E731
        return {"total_gib": gib(self.total), "peak_allocated_gib": gib(self.peak),
                "cuda_overhead_gib": gib(CUDA_OVERHEAD), "phases_gib": {k: gib(v) for k, v in self.phases.items()},
                "train_parts_gib": {k: gib(v) for k, v in self.train_parts.items()}, "settings": self.settings}

    def summary(self) -> str:
        """A few lines for the terminal."""
        gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        phase = max(self.phases, key=self.phases.get)
        lines = [f"estimated peak accelerator memory: {gib(self.total)} ({gib(self.peak)} in PyTorch's allocator, "
                 f"at {phase}, + {gib(CUDA_OVERHEAD)} CUDA context)",
                 "  phases: " + ", ".join(f"{k} {gib(v)}" for k, v in self.phases.items()),
                 "  training: " + ", ".join(f"{k} {gib(v)}" for k, v in self.train_parts.items() if v),
                 "  for: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        return "\n".join(lines)


def estimate_memory(cfg: TrainConfig, configs: Path | None = None) -> MemoryEstimate:
    """Estimate the peak accelerator memory of training `cfg` (per process; see the module docstring).

    `configs` is a diffusers pipeline folder whose unet/, vae/, text_encoder/ and text_encoder_2/ configs describe
    the base; None reads them from `cfg.base` (`base_configs`).
    """
    folder = configs or base_configs(cfg.base)
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    vae_config = AutoencoderKL.load_config(folder / "vae")
    dtype = DTYPES[cfg.mixed_precision]
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    resolution = cfg.resolution or unet_config["sample_size"] * scale
    latent = (cfg.batch_size, unet_config["in_channels"], resolution // scale, resolution // scale)
    text = _text_encoder_bytes(folder, dtype)
    vae = _vae_phases(vae_config, resolution)
    train, parts, resident = _train_phase(unet_config, cfg, dtype, latent)
    if not cfg.cache_latents:
        parts["encoders"] = vae["weights"] + text
    elif cfg.shuffle_caption:
        parts["text encoders"] = text
    phases = {"encode": vae["weights"] + text + vae["encode"], "train": train + parts.get("encoders", 0)
              + parts.get("text encoders", 0)}
    if cfg.sample_every:
        inference = _inference_activations(unet_config, dtype, (2, *latent[1:]))
        phases["samples"] = resident + vae["weights"] + text + max(inference, vae["decode"])
    settings = {"resolution": resolution, "batch_size": cfg.batch_size, "mixed_precision": cfg.mixed_precision,
                "gradient_checkpointing": cfg.gradient_checkpointing, "method": cfg.method,
                "optimizer": cfg.optimizer}
    return MemoryEstimate(phases, parts, settings)


def base_configs(base: str) -> Path:
    """The diffusers folder whose configs describe `base`: itself, the shipped configs of its single-file
    architecture or of a known hub id, or the hub id's snapshot in the local Hugging Face cache."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return single_file.architecture(path)[1]
    if base in SHIPPED_CONFIGS:
        return SHIPPED_CONFIGS[base]
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json"]))
    except Exception as e:  # noqa: BLE001 - offline and not cached, or no such repository
        raise ValueError(f"cannot read the configs of base {base!r} to estimate memory ({type(e).__name__}: {e}); "
                         "pass a local folder or download the model once") from None


def _fake_cpu(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """`module` (built on the meta device) with every parameter and buffer a fake CPU tensor of `mode`.

    Modules are built on the meta device and converted afterwards because `Module.to` (which PEFT calls while
    injecting) cannot swap fake parameters in place.
    """
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(_fake_like(p, mode), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = _fake_like(b, mode)
    return module


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` (on the meta device) with its floating-point tensors in `dtype`, as a 16-bit base is loaded."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return module


def _fake_like(t: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    return FakeTensor(mode, torch.empty(t.shape, dtype=t.dtype, device="meta"), torch.device("cpu"))


class _PeakMemory(TorchDispatchMode):
    """Counts the bytes of every live tensor storage, rounded up as the CUDA caching allocator rounds them, and
    keeps the peak. Tensors made while active count from their creation to their death; `add` counts tensors that
    already exist (a model's weights). What torch's MemTracker does, at constant cost per operation."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.counted: set[int] = set()

    def add(self, *tensors: torch.Tensor) -> None:
        """Count tensors made before the mode was entered."""
        for t in tensors:
            self._count(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.counted:
            return
        size = -(-storage.nbytes() // BLOCK) * BLOCK
        self.counted.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.counted.discard(key)
        self.current -= size


def _train_phase(unet_config: dict, cfg: TrainConfig, dtype: torch.dtype, latent: tuple[int, ...]
                 ) -> tuple[int, dict[str, int], int]:
    """(peak of a training step, its parts, what stays resident between steps: weights and optimizer state)."""
    with torch.device("meta"):
        unet = _cast(UNet2DConditionModel.from_config(unet_config), dtype)
        unet.requires_grad_(False)
        opdiff.inject(unet, cfg.adapter)
        opdiff.method_of(unet).at_largest(unet)  # e.g. after a selection has given layers cores
    for p in opdiff.trainable_parameters(unet):
        p.data = p.data.float()  # as training keeps them
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    mode = FakeTensorMode()
    unet = _fake_cpu(unet.train(), mode)
    trainable = opdiff.trainable_parameters(unet)
    memory = _PeakMemory()
    memory.add(*unet.parameters(), *unet.buffers())
    with mode:
        inputs = _unet_inputs(unet_config, latent, dtype)
        with memory:
            autocast = torch.autocast("cpu", dtype) if dtype != torch.float32 else nullcontext()
            with opdiff.materialize(unet):
                _evaluate_adapters(unet)
                with autocast:
                    pred = unet(*inputs[:2], **inputs[2]).sample
                torch.nn.functional.mse_loss(pred.float(), inputs[0].float()).backward()
    optimizer = state_bytes(cfg.optimizer, trainable)
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    weights = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()]) - adapter
    parts = {"weights": weights, "adapter": adapter, "gradients": adapter, "optimizer state": optimizer,
             "activations": memory.peak - weights - 2 * adapter}
    return memory.peak + optimizer, parts, weights + adapter + optimizer


def _unet_inputs(unet_config: dict, latent: tuple[int, ...], dtype: torch.dtype) -> tuple:
    """(noisy latents, timesteps, keyword inputs) of SDXL's U-Net for a batch of `latent` shape."""
    batch = latent[0]
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    return (torch.randn(latent), torch.randint(0, 1000, (batch,)),
            {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, unet_config["cross_attention_dim"]).to(dtype),
             "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled).to(dtype),
                                   "time_ids": torch.randn(batch, 6)}})


@torch.no_grad()
def _inference_activations(unet_config: dict, dtype: torch.dtype, latent: tuple[int, ...]) -> int:
    """Peak activations of one denoising step of the U-Net (no gradients) on a batch of `latent` shape."""
    with torch.device("meta"):
        unet = _cast(UNet2DConditionModel.from_config(unet_config), dtype).eval()
    mode = FakeTensorMode()
    unet = _fake_cpu(unet, mode)
    memory = _PeakMemory()
    with mode:
        inputs = _unet_inputs(unet_config, latent, dtype)
        with memory:
            unet(inputs[0].to(dtype), inputs[1], **inputs[2])
    return memory.peak


@torch.no_grad()
def _vae_phases(vae_config: dict, resolution: int) -> dict[str, int]:
    """The float32 VAE's weights, and its activation peaks encoding and decoding one image at `resolution`."""
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config).eval()
    mode = FakeTensorMode()
    vae = _fake_cpu(vae, mode)
    out = {"weights": sum(p.numel() * p.element_size() for p in vae.parameters())}
    with mode:
        image = torch.randn(1, 3, resolution, resolution)
        latent = torch.randn(1, vae_config["latent_channels"], resolution // scale, resolution // scale)
        for name, run in (("encode", lambda: vae.encode(image)), ("decode", lambda: vae.decode(latent))):
            memory = _PeakMemory()
            with memory:
                run()
            out[name] = memory.peak
    return out


def _text_encoder_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes of both text encoders' weights in `dtype` (built on the meta device: no memory)."""
    total = 0
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        config = CLIPTextConfig(**json.loads((folder / sub / "config.json").read_text(encoding="utf-8")))
        with torch.device("meta"):
            model = cls(config)
        total += sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    return total
