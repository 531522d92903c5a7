"""CLIP features for CMMD: reference model and preprocessing, weight loading, embeddings and their cache.

No weights are downloaded: the reference architecture is only built on the meta device, and embeddings
come from a tiny ViT registered with open_clip here.
"""

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file

from metrics import ClipEmbedder, ClipWeightsMissing
from metrics.clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    REFERENCE_IMAGE_SIZE,
    REFERENCE_MODEL,
    preprocess,
)

TINY = "opdiff-test-tiny-vit"
TINY_SIZE = 32
TINY_DIM = 16


@pytest.fixture(scope="module", autouse=True)
def tiny_model_config(tmp_path_factory):
    """Register a 1-layer ViT (32 px, 16-dim embeddings) with open_clip."""
    cfg = {
        "embed_dim": TINY_DIM,
        "quick_gelu": True,
        "vision_cfg": {"image_size": TINY_SIZE, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


def _images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _expected_pixel(rgb: tuple[int, int, int]) -> torch.Tensor:
    """The normalized value a pixel of colour `rgb` must become, per channel (3,)."""
    return (torch.tensor(rgb, dtype=torch.float64) / 255.0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(
        OPENAI_STD
    )


def _count_forward_calls(embedder: ClipEmbedder) -> list[int]:
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1

    embedder.visual.register_forward_hook(hook)
    return calls


# --- the reference model -------------------------------------------------------------------------------


def test_reference_name_is_vit_l14_336_quickgelu():
    cfg = open_clip.get_model_config(REFERENCE_MODEL)
    assert cfg["quick_gelu"] is True
    assert cfg["embed_dim"] == 768
    vision = cfg["vision_cfg"]
    assert (vision["image_size"], vision["width"], vision["layers"], vision["patch_size"]) == (
        336,
        1024,
        24,
        14,
    )
    assert REFERENCE_IMAGE_SIZE == 336

    tag = open_clip.get_pretrained_cfg(REFERENCE_MODEL, "openai")
    assert tag["quick_gelu"] is True
    assert "ViT-L-14-336px.pt" in tag["url"]
    assert tuple(tag["mean"]) == OPENAI_MEAN
    assert tuple(tag["std"]) == OPENAI_STD


def test_reference_architecture_built_on_meta_device():
    # The meta device builds the 300M-parameter tower without allocating or initializing it.
    embedder = ClipEmbedder.load(REFERENCE_MODEL, random_init=True, device="meta")
    visual = embedder.visual
    assert embedder.image_size == 336
    assert visual.output_dim == 768
    assert tuple(visual.patch_size) == (14, 14)
    assert len(visual.transformer.resblocks) == 24
    # OpenAI trained this model with QuickGELU; exact GELU would change every feature.
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in visual.transformer.resblocks)
    assert embedder.trustworthy is False


def test_openai_constants():
    assert OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_STD == (0.26862954, 0.26130258, 0.27577711)
    assert OPENAI_MEAN == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert OPENAI_STD == tuple(open_clip.OPENAI_DATASET_STD)


# --- preprocessing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value", "rgb"),
    [
        ("RGB", (255, 128, 0), (255, 128, 0)),
        ("L", 100, (100, 100, 100)),
        ("RGBA", (10, 200, 30, 7), (10, 200, 30)),
    ],
)
def test_preprocess_constant_colour(mode, value, rgb):
    x = preprocess([Image.new(mode, (500, 300), value)])
    assert x.shape == (1, 3, 336, 336)
    assert x.dtype == torch.float32
    expected = _expected_pixel(rgb).float().view(3, 1, 1).expand(3, 336, 336)
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("landscape", [True, False])
def test_preprocess_center_crops_non_square(landscape):
    # 400 x 100: red quarter, green middle half, blue quarter. The centered 100 x 100 square is all green;
    # squashing the whole image or cropping at a corner would bring red or blue in.
    pixels = np.zeros((100, 400, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:300] = (0, 255, 0)
    pixels[:, 300:] = (0, 0, 255)
    if not landscape:
        pixels = pixels.transpose(1, 0, 2).copy()
    x = preprocess([Image.fromarray(pixels)], size=64)
    assert x.shape == (1, 3, 64, 64)
    expected = _expected_pixel((0, 255, 0)).float().view(3, 1, 1).expand(3, 64, 64)
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)


def test_preprocess_left_half_red_keeps_its_halves():
    # A square whose left half is red: after the resize the left half is still red, the right half blue,
    # so the layout is kept (channels-first, no flip or transpose).
    pixels = np.zeros((200, 200, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:] = (0, 0, 255)
    x = preprocess([Image.fromarray(pixels)], size=64)[0]  # (3, 64, 64)
    red, blue = _expected_pixel((255, 0, 0)).float(), _expected_pixel((0, 0, 255)).float()
    # Away from the edge the bicubic filter leaves the colours exact.
    torch.testing.assert_close(x[:, :, :28], red.view(3, 1, 1).expand(3, 64, 28), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[:, :, 36:], blue.view(3, 1, 1).expand(3, 64, 28), atol=1e-6, rtol=0)


def test_preprocess_odd_leftover_follows_reference_offset():
    # 101 x 100: the reference's offset (w - side) // 2 = 0 keeps column 0 and drops column 100.
    pixels = np.zeros((100, 101, 3), dtype=np.uint8)
    pixels[:, :100] = (0, 255, 0)
    pixels[:, 100] = (255, 0, 0)
    x = preprocess([Image.fromarray(pixels)], size=100)
    expected = _expected_pixel((0, 255, 0)).float().view(3, 1, 1).expand(3, 100, 100)
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)


def test_preprocess_uses_pil_bicubic_on_8bit_pixels():
    im = _images(1, seed=3, size=(90, 70))[0]
    resized = im.crop((10, 0, 80, 70)).resize((32, 32), resample=Image.Resampling.BICUBIC)
    expected = (
        torch.from_numpy(np.asarray(resized, dtype=np.float64) / 255.0) - torch.tensor(OPENAI_MEAN)
    ) / (torch.tensor(OPENAI_STD))
    x = preprocess([im], size=32)[0]  # (3, 32, 32)
    torch.testing.assert_close(x, expected.permute(2, 0, 1).float(), atol=1e-6, rtol=0)


def test_preprocess_rejects_empty():
    with pytest.raises(ValueError, match="at least one image"):
        preprocess([])


# --- embeddings ----------------------------------------------------------------------------------------


def test_embeddings_are_unit_norm_float64_and_deterministic():
    images = _images(5)
    embedder = ClipEmbedder.load(TINY, random_init=True, seed=1)
    assert embedder.trustworthy is False
    assert embedder.image_size == TINY_SIZE
    emb = embedder.embed(images, batch_size=2, progress=False)
    assert emb.shape == (5, TINY_DIM)
    assert emb.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-12)
    # Different images give different embeddings, so the checks below compare something.
    assert np.abs(emb[0] - emb[1]).max() > 1e-3

    again = ClipEmbedder.load(TINY, random_init=True, seed=1).embed(images, batch_size=5, progress=False)
    np.testing.assert_allclose(again, emb, atol=1e-6)
    other_seed = ClipEmbedder.load(TINY, random_init=True, seed=2).embed(images, progress=False)
    assert np.abs(other_seed - emb).max() > 1e-3


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ClipEmbedder.load(TINY, random_init=True, seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_embed_rejects_empty():
    with pytest.raises(ValueError, match="no images to embed"):
        ClipEmbedder.load(TINY, random_init=True).embed([], progress=False)


# --- weights -------------------------------------------------------------------------------------------


def _tiny_state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return open_clip.create_model(TINY).state_dict()


def test_loads_safetensors_checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(_tiny_state_dict(seed=7), str(path))
    loaded = ClipEmbedder.load(TINY, checkpoint=path)
    assert loaded.trustworthy is True
    images = _images(3)
    reference = ClipEmbedder.load(TINY, random_init=True, seed=7).embed(images, progress=False)
    np.testing.assert_allclose(loaded.embed(images, progress=False), reference, atol=1e-6)


@pytest.mark.filterwarnings(
    "ignore::FutureWarning"
)  # torch.jit.script is deprecated, still how OpenAI shipped
def test_loads_openai_style_torchscript_archive(tmp_path):
    torch.manual_seed(8)
    model = open_clip.create_model(TINY)
    path = tmp_path / "tiny-openai.pt"
    torch.jit.script(model).save(str(path))
    loaded = ClipEmbedder.load(TINY, checkpoint=path)
    images = _images(3)
    np.testing.assert_allclose(
        loaded.embed(images, progress=False),
        ClipEmbedder.load(TINY, random_init=True, seed=8).embed(images, progress=False),
        atol=1e-6,
    )


def test_missing_checkpoint_file_raises_with_instructions(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ClipWeightsMissing, match="CLIP checkpoint file not found") as info:
        ClipEmbedder.load(checkpoint=missing)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert str(missing) in message
    assert "--clip-checkpoint" in message
    assert "never falls back to random features" in message


def test_no_cached_weights_raises_with_instructions(empty_caches):
    with pytest.raises(ClipWeightsMissing, match="not in the cache") as info:
        ClipEmbedder.load()
    message = str(info.value)
    assert "--clip-checkpoint" in message
    assert f"open_clip.create_model('{REFERENCE_MODEL}', pretrained='openai')" in message
    assert "huggingface.co/timm/vit_large_patch14_clip_336.openai" in message
    assert str(empty_caches / "hf" / "hub") in message  # where it looked


def test_model_without_openai_weights_raises(empty_caches):
    with pytest.raises(ClipWeightsMissing, match="no 'openai' weights"):
        ClipEmbedder.load(TINY)


def test_finds_weights_in_hugging_face_cache(empty_caches, monkeypatch):
    # Give the tiny model an `openai` tag on a hub repository and lay its weights out as the HF cache does.
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        TINY,
        {"openai": {"hf_hub": "opdiff/tiny-clip/", "quick_gelu": True}},
    )
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf" / "hub" / "models--opdiff--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(_tiny_state_dict(seed=9), str(snapshot / "open_clip_model.safetensors"))

    loaded = ClipEmbedder.load(TINY)
    assert loaded.trustworthy is True
    assert str(snapshot) in loaded.checkpoint_id
    images = _images(2)
    np.testing.assert_allclose(
        loaded.embed(images, progress=False),
        ClipEmbedder.load(TINY, random_init=True, seed=9).embed(images, progress=False),
        atol=1e-6,
    )


def test_random_init_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        ClipEmbedder.load(TINY, checkpoint=tmp_path / "x.safetensors", random_init=True)


# --- embed_folder and its cache ------------------------------------------------------------------------


def _write_folder(folder, images):
    folder.mkdir()
    names = ["b.png", "a.jpg", "c.webp"]
    for name, im in zip(names, images, strict=True):
        im.save(folder / name)
    (folder / "a.txt").write_text("a caption, not an image")
    return sorted(names)


def test_embed_folder_reads_sorted_images(tmp_path):
    images = _images(3)
    names = _write_folder(tmp_path / "imgs", images)
    embedder = ClipEmbedder.load(TINY, random_init=True)
    from_folder = embedder.embed_folder(tmp_path / "imgs", progress=False)
    decoded = [
        Image.open(tmp_path / "imgs" / name) for name in names
    ]  # jpg/webp are lossy: embed what is on disk
    np.testing.assert_allclose(from_folder, embedder.embed(decoded, progress=False), atol=1e-12)


def test_embed_folder_cache_is_hit_the_second_time(tmp_path):
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    _write_folder(folder, _images(3))

    first = ClipEmbedder.load(TINY, random_init=True)
    calls = _count_forward_calls(first)
    emb = first.embed_folder(folder, cache_dir=cache, batch_size=2, progress=False)
    assert calls[0] == 2
    assert len(list(cache.glob("*.npy"))) == 1

    second = ClipEmbedder.load(TINY, random_init=True)
    calls = _count_forward_calls(second)
    np.testing.assert_array_equal(second.embed_folder(folder, cache_dir=cache, progress=False), emb)
    assert calls[0] == 0

    # Other weights or other file content must miss the cache.
    other = ClipEmbedder.load(TINY, random_init=True, seed=1)
    calls = _count_forward_calls(other)
    other.embed_folder(folder, cache_dir=cache, progress=False)
    assert calls[0] == 1
    _images(1, seed=42)[0].save(folder / "b.png")
    calls = _count_forward_calls(second)
    changed = second.embed_folder(folder, cache_dir=cache, progress=False)
    assert calls[0] == 1
    assert np.abs(changed - emb).max() > 1e-3


def test_embed_folder_errors(tmp_path):
    embedder = ClipEmbedder.load(TINY, random_init=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        embedder.embed_folder(tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        embedder.embed_folder(tmp_path / "missing", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        embedder.embed_folder(tmp_path / "bad", progress=False)
