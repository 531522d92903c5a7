"""Build the bundled tiny SDXL-architecture model in diffusers folder layout.

The model has every part of Stable Diffusion XL base 1.0 (two CLIP text encoders, the second
with a projection; a 4-channel VAE that downsamples by 8; a cross-attention U-Net with
``addition_embed_type="text_time"``; Euler scheduler) at a width that trains in seconds on a
CPU. Weights are random (fixed seeds), so a rebuild gives the same tensors; they are the starting
point of ``pretrain_tiny_sdxl.py``, which writes the committed, pretrained weights. The tokenizers are
real CLIP BPE tokenizers rebuilt from the vocabulary that open_clip ships, so prompts tokenize
exactly as they do for SDXL.

Weights are stored in float16 to keep the folder small; the configs say float32, so every
loader (diffusers, transformers with its default ``dtype="auto"``) builds a float32 model.

Usage: ``python assets/build_tiny_sdxl.py [--out assets/tiny-sdxl] [--no-check]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "tiny-sdxl"
SEED = 0

VOCAB_SIZE = 49408  # 256 bytes + 256 bytes</w> + 48894 merges + 2 special tokens, as CLIP
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SDXL's tokenizer pads with <|endoftext|>; tokenizer_2 (OpenCLIP bigG) pads with "!" (id 0),
# which is the 0 that open_clip's tokenizer writes after the end token.
PAD_TOKENS = {"tokenizer": EOS, "tokenizer_2": "!"}

# Hidden sizes differ, as in SDXL (768 and 1280), so code that mixes up the encoders fails here.
TEXT_HIDDEN = {"text_encoder": 16, "text_encoder_2": 32}
TEXT_TIME_DIM = 8  # addition_time_embed_dim; SDXL: 256
# Six micro-conditioning numbers (original size, crop top-left, target size), each embedded
# with TEXT_TIME_DIM sinusoids, plus text_encoder_2's pooled projection (SDXL: 6 * 256 + 1280).
PROJECTION_CLASS_DIM = 6 * TEXT_TIME_DIM + TEXT_HIDDEN["text_encoder_2"]

# No "!" in these: tokenizer_2's pad token "!" is a special token, so like SDXL's own tokenizer_2
# it splits a "!" off as id 0 where open_clip reads "!</w>" (id 256).
CHECK_PROMPTS = (
    "a painting of a red circle on a blue background, opdiff style",
    "A Photo of TWO cats; one's asleep, the other isn't?",
    "sdxl 1024x1024 v2.0 -- (masterpiece:1.2), ultra-detailed",
    " ".join(["a very long prompt that runs past the seventy-seven token context"] * 8),
)


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """Rebuild CLIP's BPE vocabulary and merges from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    Returns ``(vocab, merges)``: token -> id (49408 entries) and the merge rules as "a b" lines,
    both in the order ``open_clip.tokenizer.SimpleTokenizer`` builds them.
    """
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # Line 0 is a header; CLIP keeps the first 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"{default_bpe()} gave {len(tokens)} tokens, CLIP has {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) in SDXL's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        **special,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_tokenizer(tokenizer: CLIPTokenizer, prompts: tuple[str, ...] = CHECK_PROMPTS) -> None:
    """Raise ValueError unless ``tokenizer`` gives open_clip's ids on every prompt.

    open_clip pads with id 0; where the tokenizer pads with another token, only the ids up to
    and including the end token are compared.
    """
    reference = SimpleTokenizer()
    for prompt in prompts:
        expected = reference(prompt, context_length=MAX_LENGTH)[0].tolist()  # (77,)
        got = tokenizer(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        if tokenizer.pad_token_id != 0:
            n = expected.index(reference.eot_token_id) + 1
            expected, got = expected[:n], got[:n]
        if got != expected:
            raise ValueError(f"{prompt!r}: {got} != open_clip's {expected}")


def text_encoder_config(hidden_size: int, hidden_act: str) -> CLIPTextConfig:
    """Return a tiny CLIP text config with CLIP's vocabulary, context and special token ids."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_LENGTH,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=hidden_size // 8,
        projection_dim=hidden_size,  # as SDXL's text_encoder_2: projection width = hidden width
        hidden_act=hidden_act,  # SDXL: quick_gelu (OpenAI ViT-L) and gelu (OpenCLIP bigG)
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,  # the pooled output is read at the first end token
        pad_token_id=1,
    )


def make_vae() -> AutoencoderKL:
    """Return SDXL's VAE layout (4 latent channels, 4 blocks = downsampling by 8) at tiny width."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        # 4, 8, 16, 16 channels per group, as SDXL's VAE (32 groups of 128-512). With one channel per group
        # the decoder's last norm would erase each channel's mean, and a flat colour could not be decoded.
        norm_num_groups=2,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE
        force_upcast=True,  # SDXL's VAE overflows in fp16, so pipelines decode it in fp32
    )


def make_unet() -> UNet2DConditionModel:
    """Return SDXL base's U-Net structure (3 levels, text_time conditioning) at tiny width."""
    return UNet2DConditionModel(
        sample_size=8,  # latent side; 64 px images
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 32, 32),  # SDXL: (320, 640, 1280)
        layers_per_block=2,  # as SDXL, so kohya's SGM block numbering uses n = 2 + 1
        transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10); the mid block takes the last
        attention_head_dim=(2, 2, 2),  # diffusers' historical name for the number of heads
        norm_num_groups=8,  # 4 channels per group; 32 would make every norm a per-channel instance norm
        cross_attention_dim=sum(TEXT_HIDDEN.values()),  # both encoders' hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TEXT_TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION_CLASS_DIM,
    )


def make_scheduler() -> EulerDiscreteScheduler:
    """Return SDXL base's scheduler."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )


def build(out: Path) -> Path:
    """Build the pipeline with fixed seeds and save it to ``out``; return ``out``."""
    vocab, merges = clip_bpe()
    tokenizers = {}
    for name, pad_token in PAD_TOKENS.items():
        write_tokenizer(out / name, vocab, merges, pad_token)
        tokenizers[name] = CLIPTokenizer.from_pretrained(out / name)
        check_tokenizer(tokenizers[name])

    # One seed per component, so changing one part leaves the others' weights as they were.
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(text_encoder_config(TEXT_HIDDEN["text_encoder"], "quick_gelu"))
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(TEXT_HIDDEN["text_encoder_2"], "gelu"))
    torch.manual_seed(SEED + 2)
    vae = make_vae()
    torch.manual_seed(SEED + 3)
    unet = make_unet()

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers["tokenizer"],
        tokenizer_2=tokenizers["tokenizer_2"],
        unet=unet,
        scheduler=make_scheduler(),
    )
    # Our own tokenizer files (vocab.json + merges.txt) are what we ship, so only models and
    # the scheduler are saved through diffusers.
    for name in ("text_encoder", "text_encoder_2", "vae", "unet", "scheduler"):
        getattr(pipe, name).save_pretrained(out / name)
    pipe.save_config(out)  # model_index.json: the components and their classes
    for path in sorted(out.glob("*/*.safetensors")):
        to_fp16(path)
    return out


def to_fp16(path: Path) -> None:
    """Rewrite a safetensors file with its floating-point tensors in float16."""
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def unet_step_seconds(unet: UNet2DConditionModel, repeats: int = 5) -> float:
    """Return the median wall time of one U-Net forward + backward at batch 1, 64 px."""
    cfg = unet.config
    side = cfg.sample_size
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, side, side, generator=gen)  # (1, 4, 8, 8)
    context = torch.randn(1, MAX_LENGTH, cfg.cross_attention_dim, generator=gen)  # (1, 77, 48)
    added = {
        "text_embeds": torch.randn(1, text_dim, generator=gen),  # (1, 32)
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),  # (1, 6)
    }
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pred = unet(latents, 500, context, added_cond_kwargs=added).sample  # (1, 4, 8, 8)
        pred.square().mean().backward()
        times.append(time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def check(out: Path) -> dict[str, float]:
    """Load the saved folder offline in float32, run it end to end and time one training step.

    Returns the measured timings in seconds (``load``, ``generate``, ``unet_step``).
    """
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    load_s = time.perf_counter() - start
    for name in ("tokenizer", "tokenizer_2"):
        check_tokenizer(getattr(pipe, name))
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        dtypes = {p.dtype for p in getattr(pipe, name).parameters()}
        if dtypes != {torch.float32}:
            raise RuntimeError(f"{name} loaded as {dtypes}, expected float32")

    start = time.perf_counter()
    image = pipe(
        CHECK_PROMPTS[0],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # (1, 64, 64, 3)
    generate_s = time.perf_counter() - start
    if image.shape != (1, 64, 64, 3) or not np.isfinite(image).all():
        raise RuntimeError(f"generation gave shape {image.shape}, finite: {np.isfinite(image).all()}")
    return {"load": load_s, "generate": generate_s, "unet_step": unet_step_seconds(pipe.unet)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--no-check", action="store_true", help="skip loading and running the saved pipeline")
    args = parser.parse_args()
    start = time.perf_counter()
    build(args.out)
    print(f"built {args.out} in {time.perf_counter() - start:.1f} s")
    if not args.no_check:
        for name, seconds in check(args.out).items():
            print(f"{name}: {seconds:.3f} s")


if __name__ == "__main__":
    main()
