"""CLIP image embeddings for CMMD, as the reference computes them (google-research `cmmd/embedding.py`).

The reference model is OpenAI's CLIP ViT-L/14 at 336 px. In open_clip that architecture with OpenAI's
weights is `ViT-L-14-336-quickgelu`: OpenAI trained it with QuickGELU, and the plain `ViT-L-14-336`
config uses exact GELU, which gives different features from the same weights.

Weights come from a local checkpoint file or from open_clip's pretrained tag `openai` through the
Hugging Face cache. When neither is available, loading raises `ClipWeightsMissing` saying how to provide
them: CMMD on random features would be a meaningless number, so there is no silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

REFERENCE_MODEL = "ViT-L-14-336-quickgelu"
"""open_clip name of the reference architecture: ViT-L/14, 336 px input, QuickGELU."""
REFERENCE_PRETRAINED_TAG = "openai"
"""open_clip pretrained tag of OpenAI's released weights."""
REFERENCE_IMAGE_SIZE = 336
"""Side of the square image the reference model reads."""
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of OpenAI's CLIP preprocessing (pixel values in [0, 1])."""
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of OpenAI's CLIP preprocessing."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
"""File extensions `ClipEmbedder.embed_folder` reads (case-insensitive)."""

# Bump when anything that changes embedding values for the same files and weights changes (preprocessing,
# normalization), so stale on-disk caches are never reused.
_CACHE_FORMAT = 1
# OpenAI's original release (what `clip.load` stores in ~/.cache/clip) is a TorchScript archive.
_OPENAI_URL_CACHE = Path("~/.cache/clip")


class ClipWeightsMissing(RuntimeError):
    """Raised when no CLIP weights can be found; the message says how to provide them."""


def _how_to_provide_weights(model_name: str) -> str:
    """Return the instructions that end every `ClipWeightsMissing` message."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, REFERENCE_PRETRAINED_TAG)
    hub_repo = os.path.split(cfg.get("hf_hub", ""))[0]
    hub_hint = f"https://huggingface.co/{hub_repo}" if hub_repo else "the model's open_clip hub repository"
    url_hint = f" or OpenAI's original file {cfg['url']}" if cfg.get("url") else ""
    return (
        "CMMD needs real CLIP weights and never falls back to random features. Provide them in one of two ways:\n"
        f"  1. a local checkpoint file: --clip-checkpoint PATH, where PATH is open_clip_model.safetensors "
        f"(or open_clip_pytorch_model.bin) from {hub_hint}{url_hint};\n"
        f"  2. the open_clip / Hugging Face cache: on a machine with network access run\n"
        f"       python -c \"import open_clip; open_clip.create_model('{model_name}', "
        f"pretrained='{REFERENCE_PRETRAINED_TAG}')\"\n"
        f"     and copy its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) to this machine; "
        f"this machine looks in {_hub_cache_dir()}."
    )


def _env_true(name: str) -> bool:
    """Return whether environment variable `name` is set to a true value, as huggingface_hub reads it."""
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str:
    """Return the Hugging Face hub cache folder the environment names now.

    huggingface_hub freezes these variables when it is imported; reading them at call time lets a process
    (or a test) that sets them later be honored.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(os.path.expandvars(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(hf_home)), "hub")


def _file_id(path: Path) -> str:
    """Return a cheap identity of a weights file: resolved path, size and modification time."""
    real = path.resolve()
    st = real.stat()
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


def _is_torchscript_archive(path: Path) -> bool:
    """Return whether `path` is a TorchScript archive (OpenAI's released `.pt` files are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        # TorchScript archives hold `<archive name>/constants.pkl`; plain torch.save zips do not.
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in zf.namelist())


class _DropLogMessage(logging.Filter):
    """A logging filter that drops records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _build_model(model_name: str, weights: Path | None, device: torch.device, seed: int) -> torch.nn.Module:
    """Return open_clip model `model_name` on `device` with the weights in file `weights`, strictly loaded.

    With `weights=None` the weights are random, drawn from `seed`.
    """
    import open_clip

    torchscript = weights is not None and _is_torchscript_archive(weights)
    # open_clip loads plain checkpoint files itself (an absolute path is never mistaken for a tag name).
    pretrained = str(weights.resolve()) if weights is not None and not torchscript else None
    # A TorchScript archive is loaded after the build, which open_clip would report as "initialized randomly".
    quiet = _DropLogMessage("initialized randomly")
    root_logger = logging.getLogger()
    if torchscript:
        root_logger.addFilter(quiet)
    try:
        # A forked, seeded RNG makes random weights reproducible without touching the caller's RNG state.
        with torch.random.fork_rng(), torch.device(device):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    finally:
        root_logger.removeFilter(quiet)
    if torchscript:
        # torch.load refuses TorchScript with weights_only=True; torch.jit.load reads it without unpickling
        # arbitrary objects. OpenAI's key names are open_clip's (see build_model_from_openai_state_dict).
        state = dict(torch.jit.load(str(weights), map_location="cpu").state_dict())
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        # TorchScript also saves non-persistent buffers (the text attention mask); the model rebuilds those.
        persistent = model.state_dict().keys()
        for name, _ in model.named_buffers():
            if name not in persistent:
                state.pop(name, None)
        model.load_state_dict(state, strict=True)
    return model


def cached_weights(model_name: str = REFERENCE_MODEL) -> Path | None:
    """Return the file of `model_name`'s OpenAI weights in the Hugging Face or OpenAI cache, or None; never
    touches the network."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name, REFERENCE_PRETRAINED_TAG) or {}
    hub_repo, hub_file = os.path.split(cfg.get("hf_hub", ""))
    if hub_repo:
        for filename in [hub_file] if hub_file else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            cached = try_to_load_from_cache(hub_repo, filename, cache_dir=_hub_cache_dir())
            if isinstance(cached, str):
                return Path(cached)
    if cfg.get("url"):
        legacy = _OPENAI_URL_CACHE.expanduser() / os.path.basename(cfg["url"])
        if legacy.is_file():
            return legacy
    return None


def download_allowed() -> bool:
    """Whether the environment lets weights be downloaded (HF_HUB_OFFLINE is not set)."""
    from huggingface_hub import constants as hf_constants

    return not (_env_true("HF_HUB_OFFLINE") or hf_constants.is_offline_mode())


def _find_pretrained_weights(model_name: str) -> Path:
    """Return the path of `model_name`'s OpenAI weights, from the caches or (where allowed) a download.

    Raises ClipWeightsMissing when they cannot be had.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, REFERENCE_PRETRAINED_TAG)
    if not cfg:
        raise ClipWeightsMissing(
            f"open_clip has no '{REFERENCE_PRETRAINED_TAG}' weights for model {model_name!r}; "
            f"pass a checkpoint file with --clip-checkpoint PATH."
        )
    how_to = _how_to_provide_weights(model_name)
    cache_dir = _hub_cache_dir()

    # 1. Caches first, without touching the network.
    cached = cached_weights(model_name)
    if cached is not None:
        return cached

    # 2. Download, where the environment allows it.
    if not download_allowed():
        raise ClipWeightsMissing(
            f"CLIP weights for {model_name} (open_clip tag '{REFERENCE_PRETRAINED_TAG}') are not in the cache "
            f"{cache_dir} and HF_HUB_OFFLINE is set, so they cannot be downloaded.\n{how_to}"
        )
    try:
        return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir))
    except Exception as e:  # any network or hub error means the same thing here: no weights
        raise ClipWeightsMissing(
            f"CLIP weights for {model_name} (open_clip tag '{REFERENCE_PRETRAINED_TAG}') are not cached in "
            f"{cache_dir} and downloading them failed: {e}\n{how_to}"
        ) from e


def _center_square_crop(im: Image.Image) -> Image.Image:
    """Return the largest centered square of `im` (odd leftovers go to the right/bottom, as in the reference)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def preprocess(images: Sequence[Image.Image], size: int = REFERENCE_IMAGE_SIZE) -> torch.Tensor:
    """Return images as a float32 tensor (N, 3, size, size), prepared as the CMMD reference prepares them.

    The reference (`cmmd/io_util.py`, `cmmd/embedding.py`) first center-crops to a square, then resizes
    with PIL's bicubic filter (antialiased, on 8-bit pixels), then scales to [0, 1] and applies OpenAI's
    mean/std; this follows the same order. Its second bicubic resize to the same size is the identity and
    is left out. Grayscale, palette and RGBA images become RGB (alpha is dropped).
    """
    if not images:
        raise ValueError("preprocess needs at least one image")
    mean = torch.tensor(OPENAI_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)  # (N, 3, size, size)
    for i, im in enumerate(images):
        square = _center_square_crop(im.convert("RGB")).resize(
            (size, size), resample=Image.Resampling.BICUBIC
        )
        pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)  # (size, size, 3)
        out[i] = (pixels.permute(2, 0, 1) - mean) / std
    return out


def _list_images(folder: Path) -> list[Path]:
    """Return the image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path) -> Image.Image:
    """Return the image at `path`, fully decoded, or raise ValueError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ClipEmbedder:
    """The image tower of an open_clip CLIP model plus the reference preprocessing.

    `trustworthy` is False when the weights are random (`load(random_init=True)`, for tests); CMMD values
    computed from such an embedder mean nothing.
    """

    def __init__(
        self,
        visual: torch.nn.Module,
        model_name: str,
        checkpoint_id: str,
        image_size: int,
        device: torch.device,
        trustworthy: bool = True,
    ) -> None:
        self.visual = visual.eval()
        self.model_name = model_name
        self.checkpoint_id = checkpoint_id
        self.image_size = image_size
        self.device = device
        self.trustworthy = trustworthy

    @classmethod
    def load(
        cls,
        model_name: str = REFERENCE_MODEL,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        random_init: bool = False,
        seed: int = 0,
    ) -> ClipEmbedder:
        """Return an embedder for open_clip model `model_name`.

        Weights come from `checkpoint` (an open_clip safetensors/bin file or OpenAI's TorchScript `.pt`)
        when given, else from open_clip's `openai` tag via the Hugging Face cache, downloading only where
        the network and HF_HUB_OFFLINE allow. Raises ClipWeightsMissing when none are available.
        `random_init=True` builds the architecture with random weights drawn from `seed` (tests only;
        the embedder is then marked untrustworthy).
        """
        import open_clip

        device = torch.device(device)
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {model_name!r}")
        image_size = model_cfg["vision_cfg"]["image_size"]
        if not isinstance(image_size, int):
            height, width = image_size
            if height != width:
                raise ValueError(
                    f"{model_name} reads non-square {height}x{width} images; CMMD uses square crops"
                )
            image_size = height

        if random_init:
            if checkpoint is not None:
                raise ValueError("pass either checkpoint or random_init=True, not both")
            weights, checkpoint_id = None, f"random-init|seed={seed}"
        elif checkpoint is not None:
            weights = Path(checkpoint).expanduser()
            if not weights.is_file():
                raise ClipWeightsMissing(
                    f"CLIP checkpoint file not found: {weights}\n" + _how_to_provide_weights(model_name)
                )
            checkpoint_id = _file_id(weights)
        else:
            weights = _find_pretrained_weights(model_name)
            checkpoint_id = _file_id(weights)

        model = _build_model(model_name, weights, device, seed)
        # Only the image tower is needed; dropping the text tower frees its memory (123M parameters for ViT-L/14).
        return cls(model.visual, model_name, checkpoint_id, image_size, device, trustworthy=not random_init)

    def _embed_batches(self, batches: Iterator[torch.Tensor], total: int, progress: bool) -> np.ndarray:
        """Return L2-normalized float64 embeddings (N, D) of preprocessed image batches."""
        chunks = []
        with torch.inference_mode(), tqdm(total=total, unit="img", desc="CLIP", disable=not progress) as bar:
            for pixels in batches:  # (B, 3, S, S)
                features = self.visual(pixels.to(self.device))  # (B, D)
                chunks.append(features.to(device="cpu", dtype=torch.float64).numpy())
                bar.update(len(pixels))
        emb = np.concatenate(chunks, axis=0)  # (N, D)
        # The reference model returns unit-norm embeddings; normalizing in float64 keeps rounding out of CMMD.
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def embed(self, images: Sequence[Image.Image], batch_size: int = 16, progress: bool = True) -> np.ndarray:
        """Return the L2-normalized CLIP embeddings of `images` as a float64 array (N, D)."""
        if not images:
            raise ValueError("no images to embed")
        batches = (
            preprocess(images[i : i + batch_size], self.image_size) for i in range(0, len(images), batch_size)
        )
        return self._embed_batches(batches, len(images), progress)

    def embed_folder(
        self,
        folder: str | Path,
        cache_dir: str | Path | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> np.ndarray:
        """Return the embeddings (N, D) float64 of every image in `folder` (png/jpg/jpeg/webp, sorted by name).

        With `cache_dir`, the result is stored there under a key of (model name, checkpoint id, image
        size, content hash of every file in order), so the same folder is embedded only once per model.
        Unlike the reference, which drops the images of a last incomplete batch, every image is embedded.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"not a folder: {folder}")
        paths = _list_images(folder)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")

        cache_file = None
        if cache_dir is not None:
            key = {
                "format": _CACHE_FORMAT,
                "model": self.model_name,
                "checkpoint": self.checkpoint_id,
                "image_size": self.image_size,
                "files": [_sha256_file(p) for p in paths],
            }
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            cache_file = Path(cache_dir) / f"clip-{digest}.npy"
            if cache_file.is_file():
                cached = np.load(cache_file, allow_pickle=False)
                if cached.shape[0] == len(paths):
                    return cached

        batches = (
            preprocess([_read_image(p) for p in paths[i : i + batch_size]], self.image_size)
            for i in range(0, len(paths), batch_size)
        )
        emb = self._embed_batches(batches, len(paths), progress)

        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so an interrupted run never leaves a truncated cache entry behind.
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, emb)
            os.replace(tmp, cache_file)
        return emb
