"""Images in prompts (Step 3.7): decoding (Pillow), the reference image processor's crop plan and
pixel tensors, and the reference processor's placeholder token layout.

An image becomes a global view (squashed to `image_size`^2) and, when it is large or elongated,
local crops (`crop_size`^2 each) cut from a resized copy on a window grid. Every resize is bilinear
with antialiasing on uint8 pixels, rounded back to uint8, as transformers' torchvision backend does:
torch's `interpolate` on a uint8 CPU tensor is that resize bit for bit (Pillow's own bilinear is
not). Pixels are normalized last with the OpenAI-CLIP mean/std, fused with the 1/255 rescale.

In the prompt, the chat template writes one `<im_patch>` per image; `ImageProcessor.expand`
replaces the i-th with image i's layout: per crop (row-major) `<patch_start>`, patch_token_len x
`<im_patch>`, `<patch_end>`, plus `<patch_newline>` after the last crop of each row but the last;
then `<im_start>`, image_token_len x `<im_patch>`, `<im_end>`. The k-th `<im_patch>` of an image
takes the k-th row of its features: its crops' rows in order, then the global view's.

Decoding policy: EXIF orientation is applied, transparency is composited onto white, the result is
8-bit RGB. Decompression bombs are refused from the header, before any pixel is decoded.
"""

import base64
import binascii
import hashlib
import importlib.util
import io
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stepflash.config import VisionConfig

IMAGE_TOKEN = "<im_patch>"  # one per feature row; the chat template writes one per image
PATCH_START, PATCH_END, PATCH_NEWLINE = "<patch_start>", "<patch_end>", "<patch_newline>"
VIEW_START, VIEW_END = "<im_start>", "<im_end>"  # around the global view (not the chat turn's <|im_start|>)
IMAGE_TOKENS = (IMAGE_TOKEN, PATCH_START, PATCH_END, PATCH_NEWLINE, VIEW_START, VIEW_END)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FORMATS = ("PNG", "JPEG", "WEBP")


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


# -- decoding -----------------------------------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """PNG / JPEG / WebP bytes -> uint8 RGB [3, H, W]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("the data is not an image Pillow can read (PNG, JPEG or WebP expected)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image refused: {e}") from None
    if image.format not in FORMATS:
        raise ImageError(f"image format {image.format} is not supported (PNG, JPEG or WebP)")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    try:
        image = ImageOps.exif_transpose(image)
        return to_rgb_tensor(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"image data is corrupt: {e}") from None


def to_rgb_tensor(image) -> torch.Tensor:
    """A PIL image -> uint8 RGB [3, H, W]; transparent pixels composited onto white."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = image.convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise ImageError("an image data URL must look like data:image/png;base64,<data>")
    if len(payload) > 4 * math.ceil(max_bytes / 3) + 4:
        raise ImageError(f"image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL holds malformed base64") from None
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than the limit of {max_bytes} bytes")
    return data


# -- the crop plan and pixels ------------------------------------------------------------------------
@dataclass(frozen=True)
class CropPlan:
    """The reference's `_plan_patches`: the (padded, downscaled) size, the snapped size crops are cut
    from, the window (0: no crops) and the grid of crops."""

    pad: bool
    width: int
    height: int
    crop_width: int
    crop_height: int
    window: int
    nx: int
    ny: int

    @property
    def num_crops(self) -> int:
        return self.nx * self.ny


def plan_crops(width: int, height: int, image_size: int, crop_size: int, max_size: int) -> CropPlan:
    pad = min(width, height) < 32 and max(width / height, height / width) > 4  # a sliver: square it first
    if pad:
        width = height = max(width, height)
    if max(width, height) > max_size:
        scale = max_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    short, long = min(width, height), max(width, height)
    if long <= image_size:
        window = short if long / short > 1.5 else 0
    elif long / short > 4:
        window = min(short, crop_size)
    else:
        window = crop_size
    if window == 0:
        return CropPlan(pad, width, height, width, height, 0, 0, 0)

    def snap(side: int) -> int:
        return window * (side // window + (side % window > 0.2 * window)) if side >= window else side

    crop_width, crop_height = snap(width), snap(height)
    return CropPlan(pad, width, height, crop_width, crop_height, window, max(1, crop_width // window),
                    max(1, crop_height // window))


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> [..., 3, height, width]: bilinear, antialiased, rounded to uint8."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    batch = pixels.reshape(-1, *pixels.shape[-3:])
    out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*pixels.shape[:-2], height, width)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> fp32 (x - 255 mean) / (255 std), the reference's fused rescale + normalize."""
    mean = (torch.tensor(CLIP_MEAN) * (1.0 / (1 / 255)))[:, None, None]
    std = (torch.tensor(CLIP_STD) * (1.0 / (1 / 255)))[:, None, None]
    return (pixels.float() - mean) / std


@dataclass
class ImageInput:
    """One preprocessed image: the global view [3, S, S], its crops [P, 3, c, c] (fp32, normalized),
    the crop grid, and `key`, a hash of its decoded pixels (the prefix cache's name for it)."""

    pixels: torch.Tensor
    crops: torch.Tensor
    nx: int
    ny: int
    key: bytes

    @property
    def num_crops(self) -> int:
        return self.crops.shape[0]


@dataclass
class PlacedImage:
    """An image at its place in a prompt: its layout spans positions start .. start + length - 1, and
    `rows` are the positions of its `<im_patch>` tokens (feature row k goes to rows[k])."""

    image: ImageInput
    start: int
    length: int
    rows: list[int] = field(repr=False)

    @property
    def end(self) -> int:
        return self.start + self.length


class ImageProcessor:
    """The model's image pipeline: bytes or pixels -> ImageInput; prompt ids -> expanded ids."""

    def __init__(self, cfg: VisionConfig, token_ids: dict[str, int], max_pixels: int = 50_000_000,
                 max_image_tokens: int = 16384) -> None:
        self.cfg = cfg
        self.ids = token_ids
        self.image_token_id = token_ids[IMAGE_TOKEN]
        self.max_pixels, self.max_image_tokens = max_pixels, max_image_tokens

    @classmethod
    def of(cls, cfg: VisionConfig, token_to_id, **limits: int) -> "ImageProcessor":
        """Token ids from the tokenizer (`token_to_id`); the config's image_token_id must agree."""
        if importlib.util.find_spec("PIL") is None:
            raise ValueError("this model takes images, which need Pillow: pip install 'stepflash[vision]'")
        ids = {token: token_to_id(token) for token in IMAGE_TOKENS}
        lacking = [token for token, i in ids.items() if i is None]
        if lacking:
            raise ValueError(f"the tokenizer lacks the image tokens {lacking}")
        if cfg.image_token_id is not None and cfg.image_token_id != ids[IMAGE_TOKEN]:
            raise ValueError(f"config image_token_id {cfg.image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                             f"({ids[IMAGE_TOKEN]})")
        return cls(cfg, ids, **limits)

    def plan(self, width: int, height: int) -> CropPlan:
        return plan_crops(width, height, self.cfg.image_size, self.cfg.crop_size, self.cfg.max_image_size)

    def num_tokens(self, plan: CropPlan) -> int:
        """Placeholder tokens of an image's layout."""
        crops = plan.num_crops
        return crops * (self.cfg.patch_token_len + 2) + max(plan.ny - 1, 0) + self.cfg.image_token_len + 2

    def process(self, image: "bytes | torch.Tensor | object") -> ImageInput:
        """Encoded bytes, a PIL image or uint8 RGB [3, H, W] -> ImageInput; too many tokens refused."""
        if isinstance(image, (bytes, bytearray)):
            pixels = decode_image(bytes(image), self.max_pixels)
        elif isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ImageError("an image tensor must be uint8 RGB [3, H, W]")
            pixels = image
        elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL
            pixels = to_rgb_tensor(image)
        else:
            raise ImageError(f"an image must be bytes, a PIL image or a uint8 tensor, not {type(image).__name__}")
        _, height, width = pixels.shape
        if width * height > self.max_pixels:
            raise ImageError(f"image of {width}x{height} pixels exceeds the limit of {self.max_pixels} pixels")
        plan = self.plan(width, height)
        tokens = self.num_tokens(plan)
        if tokens > self.max_image_tokens:
            raise ImageError(f"image of {width}x{height} pixels takes {tokens} tokens ({plan.num_crops} crops), "
                             f"more than the limit of {self.max_image_tokens}")
        key = hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=16,
                              person=b"stepflash-image").digest()
        return self._views(pixels, plan, key)

    def _views(self, pixels: torch.Tensor, plan: CropPlan, key: bytes) -> ImageInput:
        if plan.pad:
            side = max(pixels.shape[1:])
            pixels = F.pad(pixels, (0, side - pixels.shape[2], 0, side - pixels.shape[1]))
        size, crop = self.cfg.image_size, self.cfg.crop_size
        view = resize(resize(pixels, plan.height, plan.width), size, size)
        crops = torch.zeros(0, 3, crop, crop)
        if plan.window:
            resized, w = resize(pixels, plan.crop_height, plan.crop_width), plan.window
            tiles = [resized[:, y:y + w, x:x + w] for y in range(0, plan.crop_height, w)
                     for x in range(0, plan.crop_width, w)]
            crops = normalize(torch.stack([resize(tile, crop, crop) for tile in tiles]))
        return ImageInput(normalize(view), crops, plan.nx, plan.ny, key)

    def layout(self, image: ImageInput) -> list[int]:
        """The placeholder ids of one image."""
        ids, cfg, out = self.ids, self.cfg, []
        for i in range(image.num_crops):
            out += [ids[PATCH_START]] + [self.image_token_id] * cfg.patch_token_len + [ids[PATCH_END]]
            if i % image.nx == image.nx - 1 and i // image.nx < image.ny - 1:
                out.append(ids[PATCH_NEWLINE])
        return out + [ids[VIEW_START]] + [self.image_token_id] * cfg.image_token_len + [ids[VIEW_END]]

    def expand(self, token_ids: list[int], images: list[ImageInput]) -> tuple[list[int], list[PlacedImage]]:
        """Replace the i-th `<im_patch>` of `token_ids` with image i's layout."""
        slots = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise ValueError(f"the prompt has {len(slots)} image placeholders ({IMAGE_TOKEN}) for {len(images)} "
                             "images")
        out, placed, last = [], [], 0
        for slot, image in zip(slots, images):
            out += token_ids[last:slot]
            layout = self.layout(image)
            start = len(out)
            rows = [start + j for j, t in enumerate(layout) if t == self.image_token_id]
            placed.append(PlacedImage(image, start, len(layout), rows))
            out += layout
            last = slot + 1
        return out + token_ids[last:], placed


# -- where images come from (OpenAI content parts) ---------------------------------------------------
@dataclass(frozen=True)
class MediaPolicy:
    """What image URLs a request may use: `data:` URLs always; http(s) only from the listed domains
    (fetched with httpx under a size and a time limit); local files (`file://` or plain paths) only
    under `local_path`. Nothing is fetched by default."""

    max_image_bytes: int = 20 << 20
    allowed_domains: tuple[str, ...] = ()
    local_path: str | None = None
    fetch_timeout: float = 10.0

    def load(self, url: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url, self.max_image_bytes)
        if url.startswith(("http://", "https://")):
            return self._fetch(url)
        return self._read_local(url.removeprefix("file://"))

    def _fetch(self, url: str) -> bytes:
        from urllib.parse import urlsplit

        host = (urlsplit(url).hostname or "").lower()
        if not any(host == d or host.endswith("." + d) for d in self.allowed_domains):
            raise ImageError(f"remote image URLs are not allowed ({host or url!r}); send the image as a data: URL, "
                             "or start the server with --allowed-media-domains")
        try:
            import httpx
        except ImportError:
            raise ImageError("fetching remote images needs httpx: pip install 'stepflash[vision]'") from None
        try:
            with httpx.stream("GET", url, timeout=self.fetch_timeout, follow_redirects=False) as response:
                response.raise_for_status()
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > self.max_image_bytes:
                        raise ImageError(f"image at {url} is larger than the limit of {self.max_image_bytes} bytes")
                return bytes(data)
        except httpx.HTTPError as e:
            raise ImageError(f"could not fetch image {url}: {e}") from None

    def _read_local(self, path: str) -> bytes:
        from pathlib import Path

        if self.local_path is None:
            raise ImageError("image URLs must be data: URLs (local files need --allowed-local-media-path)")
        root, file = Path(self.local_path).resolve(), Path(path).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise ImageError(f"image file {path!r} is not a file under the allowed media path")
        if file.stat().st_size > self.max_image_bytes:
            raise ImageError(f"image file {path!r} is larger than the limit of {self.max_image_bytes} bytes")
        return file.read_bytes()


IMAGE_PART_TYPES = ("image_url", "image")


def chat_images(messages: list[dict], policy: MediaPolicy) -> list[bytes]:
    """The images of a conversation's content parts, in order (what the chat template's
    placeholders stand for); `{"type": "image_url", "image_url": {"url": ...}}` as in OpenAI's API."""
    images = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                source = part.get("image_url", part.get("image"))
                url = source.get("url") if isinstance(source, dict) else source
                if not isinstance(url, str):
                    raise ImageError("an image part needs image_url.url (a data: URL)")
                images.append(policy.load(url))
    return images
