"""Image preprocessing and the placeholder layout against transformers' Step3p7 image processor and
processor: pixel tensors bit for bit, token ids equal; decoding and limits give clear errors."""

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from checkpoints import write_vision_checkpoint
from stepflash.config import ModelConfig
from stepflash.multimodal import IMAGE_TOKEN, ImageError, ImageProcessor, decode_data_url, decode_image, plan_crops
from stepflash.tokenizer import Tokenizer

# (width, height): no crops, wide (4x2 crops of 56), elongated small (window 40, 3x1), tall, a square
# with 2x2 crops and snapping, slivers padded square (both ways), huge ones scaled down to 3024 first
SIZES = [(112, 112), (200, 100), (100, 40), (60, 150), (130, 120), (300, 10), (12, 97), (3100, 500), (40, 3200)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_vision_checkpoint(tmp_path_factory.mktemp("mm"), seed=1)


@pytest.fixture(scope="module")
def processor(checkpoint) -> ImageProcessor:
    cfg = ModelConfig.from_pretrained(checkpoint).vision
    return ImageProcessor.of(cfg, Tokenizer.from_pretrained(checkpoint).token_to_id)


def _random_image(width: int, height: int, seed: int) -> torch.Tensor:
    """uint8 RGB [3, H, W]: smooth gradients plus noise, so resizing has something to average."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    base = torch.stack([x * 200 + y * 40, (1 - x) * 120 + y * 100, (x * y) * 255])
    return (base + torch.randint(0, 50, (3, height, width), generator=gen)).clamp(0, 255).to(torch.uint8)


def test_plan_matches_the_reference_examples() -> None:
    """The published sizes' worked examples (global 728, crops 504, max 3024)."""
    def grid(w, h):
        p = plan_crops(w, h, 728, 504, 3024)
        return p.crop_width, p.crop_height, p.nx, p.ny

    assert grid(728, 728)[2:] == (0, 0)
    assert grid(1024, 1024) == (1008, 1008, 2, 2)
    assert grid(1920, 1080) == (2016, 1008, 4, 2)
    assert grid(700, 300) == (900, 300, 3, 1)
    assert grid(4000, 3000) == (3024, 2520, 6, 5)
    assert plan_crops(30000, 40, 728, 504, 3024).num_crops == 756


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixels_and_ids_equal_the_reference_processor(checkpoint, processor, size) -> None:
    from reference import reference_processor

    ref = reference_processor(checkpoint)
    pixels = _random_image(*size, seed=size[0] * 7 + size[1])
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    text = f"Look: {IMAGE_TOKEN} and say what it is."
    expected = ref(text=text, images=[pil], return_tensors="pt")
    image = processor.process(pixels)
    assert torch.equal(image.pixels[None], expected["pixel_values"])
    if image.num_crops:
        assert torch.equal(image.crops, expected["pixel_values_local"])
    assert image.num_crops == int(expected["num_local_patches"][0])
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids, placed = processor.expand(tokenizer.encode(text, add_special_tokens=True), [image])
    assert ids == expected["input_ids"][0].tolist()
    assert placed[0].length == processor.num_tokens(processor.plan(*size))
    assert len(placed[0].rows) == image.num_crops * 1 + 4  # one feature row per crop, four per global view


def test_two_images_in_one_prompt(checkpoint, processor) -> None:
    from reference import reference_processor

    ref = reference_processor(checkpoint)
    a, b = _random_image(200, 100, 1), _random_image(90, 90, 2)
    text = f"{IMAGE_TOKEN} first, then {IMAGE_TOKEN}."
    expected = ref(text=text, images=[Image.fromarray(p.permute(1, 2, 0).numpy()) for p in (a, b)],
                   return_tensors="pt")
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids, placed = processor.expand(tokenizer.encode(text, add_special_tokens=True), [processor.process(a), processor.process(b)])
    assert ids == expected["input_ids"][0].tolist()
    assert [p.start for p in placed] == [1, placed[0].end + len(tokenizer.encode(" first, then "))]


def _encoded(fmt: str, mode: str = "RGB", size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 0) if mode == "RGBA" else (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_formats(fmt) -> None:
    pixels = decode_image(_encoded(fmt), max_pixels=1000)
    assert pixels.shape == (3, 10, 20) and pixels.dtype == torch.uint8


def test_transparent_pixels_become_white() -> None:
    assert decode_image(_encoded("PNG", "RGBA"), 1000).unique().tolist() == [255]


def test_same_pixels_same_key_different_pixels_different_key(processor) -> None:
    a = processor.process(_encoded("PNG"))
    assert a.key == processor.process(_encoded("PNG")).key
    assert a.key != processor.process(_encoded("PNG", size=(21, 10))).key


@pytest.mark.parametrize("data, words", [
    (b"not an image at all", ["not an image"]),
    (_encoded("GIF"), ["GIF", "not supported"]),
    (_encoded("PNG", size=(200, 100)), ["200x100", "limit"]),
])
def test_bad_images_are_named(data, words) -> None:
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=10_000)
    for word in words:
        assert word in str(e.value)


def test_data_urls() -> None:
    png = _encoded("PNG")
    assert decode_data_url("data:image/png;base64," + base64.b64encode(png).decode(), 10_000) == png
    with pytest.raises(ImageError, match="base64"):
        decode_data_url("data:image/png;base64,%%%not-base64", 10_000)
    with pytest.raises(ImageError, match="data URL"):
        decode_data_url("data:image/png,rawbytes", 10_000)
    with pytest.raises(ImageError, match="20 bytes"):
        decode_data_url("data:image/png;base64," + base64.b64encode(png).decode(), 20)


def test_too_many_image_tokens_refused(checkpoint) -> None:
    cfg = ModelConfig.from_pretrained(checkpoint).vision
    small = ImageProcessor.of(cfg, Tokenizer.from_pretrained(checkpoint).token_to_id, max_image_tokens=100)
    with pytest.raises(ImageError, match="tokens"):
        small.process(_random_image(3024, 32, 0))


def test_placeholder_count_must_match(processor) -> None:
    with pytest.raises(ValueError, match="1 image placeholders"):
        processor.expand([5, processor.image_token_id], [])


def test_config_image_token_must_be_the_tokenizers(checkpoint) -> None:
    from dataclasses import replace

    cfg = ModelConfig.from_pretrained(checkpoint).vision
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="image_token_id 151679"):
        ImageProcessor.of(replace(cfg, image_token_id=151679), tokenizer.token_to_id)
    with pytest.raises(ValueError, match="lacks the image tokens"):
        ImageProcessor.of(cfg, lambda token: None if token == "<patch_newline>" else 5)


def test_media_policy_fetches_only_allowed_domains_within_limits(tmp_path) -> None:
    """A loopback HTTP server stands in for a remote host."""
    import http.server
    import threading

    from stepflash.multimodal import MediaPolicy

    png = _encoded("PNG", size=(64, 64))
    (tmp_path / "cat.png").write_bytes(png)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    try:
        assert MediaPolicy(allowed_domains=("127.0.0.1",)).load(url) == png
        with pytest.raises(ImageError, match="not allowed"):
            MediaPolicy().load(url)
        with pytest.raises(ImageError, match="10 bytes"):
            MediaPolicy(max_image_bytes=10, allowed_domains=("127.0.0.1",)).load(url)
        with pytest.raises(ImageError, match="could not fetch"):
            MediaPolicy(allowed_domains=("127.0.0.1",)).load(url.replace("cat", "dog"))
        assert MediaPolicy(local_path=str(tmp_path)).load(f"file://{tmp_path}/cat.png") == png
        with pytest.raises(ImageError, match="not a file under"):
            MediaPolicy(local_path=str(tmp_path / "sub")).load(f"file://{tmp_path}/cat.png")
    finally:
        server.shutdown()
