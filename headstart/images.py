"""Decode one image file into a square RGB uint8 array: the single normalisation used by
prepare (training data) and predict (new images), so both see pixels the same way."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".dib",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".ico",
        ".tga",
    }
)


class BadImage(Exception):
    """The file cannot be used as an image; the message is the quarantine reason."""


class NotAnImage(BadImage):
    """The content is not an image format Pillow knows (for non-image extensions: ignore)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; alpha is flattened onto white, 16-bit is scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


RESIZE_MODES = ("pad", "stretch")
PAD_COLOUR = (0, 0, 0)


def preprocessing(size: int, resize: str) -> dict:
    """The preprocessing record (labels.json `preprocessing`, beside every model): what turns
    an image file into the model's input, for predict, the exports and a deployer."""
    return {
        "image_size": size,
        "resize": resize,  # pad: aspect kept, long side to image_size, centred | stretch
        "pad_colour": list(PAD_COLOUR),
        "interpolation": "bilinear (Pillow)",
        "colour": "8-bit RGB: EXIF rotation applied, first frame, alpha flattened onto white, "
        "16-bit scaled to 8-bit, palette / CMYK / grey converted",
        "input": "float32 RGB 0-255, batch x image_size x image_size x 3 (no scaling: the model "
        "holds its own)",
    }


def _fit(image: Image.Image, size: int, resize: str) -> Image.Image:
    if resize == "stretch":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    # pad: keep the aspect ratio, scale the long side to `size`, centre on black
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BILINEAR, color=PAD_COLOUR)


def decode(data: bytes, size: int, resize: str = "pad", max_pixels: int = 89_478_485) -> np.ndarray:
    """Decode image bytes into a (size, size, 3) uint8 array, or raise BadImage with a reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise NotAnImage("not an image Pillow can identify") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadImage(f"too large: {err}") from None
        except Exception as err:  # corrupt headers raise assorted errors inside Pillow
            raise BadImage(f"corrupt image header ({type(err).__name__}: {err})") from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage(
                f"too large: {width}x{height} = {width * height} pixels "
                f"> prepare.max_pixels {max_pixels} (decompression-bomb guard)"
            )
        if width < 1 or height < 1:
            raise BadImage(f"empty image ({width}x{height})")
        try:
            image.seek(0)  # animated images: the first frame
            image.load()
            upright = _to_rgb(ImageOps.exif_transpose(image))
        except Exception as err:
            raise BadImage(f"cannot decode {image.format or 'image'} ({err})") from None
    array = np.asarray(_fit(upright, size, resize), dtype=np.uint8)
    if array.shape != (size, size, 3):  # never expected; guard the contract
        raise BadImage(f"decoded to unexpected shape {array.shape}")
    return array


def load(path: Path | str, size: int, resize: str = "pad", max_pixels: int = 89_478_485):
    """Read and decode one file (see `decode`); an unreadable file raises BadImage."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImage(f"unreadable ({err.strerror or err})") from None
    return decode(data, size, resize, max_pixels)
