"""Image references -> confined paths -> RGB PIL images, with the user-facing errors for each step.

* :func:`resolve_image` turns a row's image reference into a path inside the source's image root.
* :func:`image_size` reads only the header (cheap): the displayed size, EXIF rotation included.
* :func:`load_image` decodes fully: EXIF orientation applied, converted to RGB, pixel limit enforced.

Every failure is an :class:`AlignError` naming the file and the numbers involved; the subclasses
:class:`ImageNotFound`, :class:`ImageTooLarge` and :class:`ImageUnreadable` let ``align data check`` count them.
"""

from __future__ import annotations

import io
import math
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from align.data.config import DEFAULT_MAX_IMAGE_PIXELS
from align.errors import AlignError


class ImageNotFound(AlignError):
    """The image file does not exist."""


class ImageTooLarge(AlignError):
    """More pixels than the decompression-bomb limit."""


class ImageUnreadable(AlignError):
    """Not an image, corrupt or truncated."""


# EXIF orientations 5-8 rotate by 90 degrees: the displayed width is the stored height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()


def resolve_image(ref: str, image_root: str | Path, allow_outside_root: bool = False) -> Path:
    """The path of image ``ref`` (relative to ``image_root``), confined to the root unless allowed.

    Confinement is lexical: ``..`` and absolute paths are refused, symlinks inside the root are trusted
    (a dataset folder that links to a shared image store is the user's own choice).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise AlignError(f"image reference must be a non-empty path, got {ref!r}")
    root = Path(os.path.normpath(os.path.abspath(image_root)))
    if os.path.isabs(ref):
        if not allow_outside_root:
            raise AlignError(
                f"image path '{ref}' is absolute; make it relative to image_root {root} "
                "or set allow_outside_root: true"
            )
        return Path(os.path.normpath(ref))
    path = Path(os.path.normpath(root / ref))
    if not allow_outside_root and not path.is_relative_to(root):
        raise AlignError(
            f"image path '{ref}' escapes image_root {root} (resolves to {path}); set allow_outside_root: true to allow"
        )
    return path


@contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """PIL's global decompression-bomb check off while we open a file: ``_check_pixels`` is the one limit.

    PIL refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` whatever the recipe says, so without this a
    recipe could not raise ``data.max_image_pixels`` above ~179M pixels. The lock keeps concurrent opens
    from restoring each other's value.
    """
    with _PIL_LIMIT_LOCK:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open the header of ``path`` and check its pixel count against ``max_pixels``."""
    if not path.exists():
        raise ImageNotFound(f"image not found: {path}")
    try:
        with _our_pixel_limit():
            image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageUnreadable(
            f"image {path}: not an image file PIL can read ({path.stat().st_size} bytes)"
        ) from None
    except OSError as err:
        raise ImageUnreadable(f"image {path}: cannot be read: {err}") from None
    try:
        _check_pixels(image, str(path), max_pixels)
    except ImageTooLarge:
        image.close()
        raise
    return image


def open_image_bytes(data: bytes) -> Image.Image:
    """An encoded image held in a dataset row (header read, pixels decoded later by :func:`load_image`)."""
    try:
        with _our_pixel_limit():
            return Image.open(io.BytesIO(data))
    except (OSError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ImageUnreadable(
            f"embedded image ({len(data)} bytes): not an image PIL can read: {err}"
        ) from None


def pixel_limit_warning(max_pixels: int) -> str | None:
    """The warning for a pixel limit raised above PIL's default decompression-bomb limit, or ``None``."""
    if max_pixels <= DEFAULT_MAX_IMAGE_PIXELS:
        return None
    side = int(math.sqrt(max_pixels))
    return (
        f"WARNING: data.max_image_pixels is {max_pixels:,}, {max_pixels / DEFAULT_MAX_IMAGE_PIXELS:.1f}x PIL's "
        f"decompression-bomb limit of {DEFAULT_MAX_IMAGE_PIXELS:,}: an image of up to {side:,}x{side:,} pixels "
        f"({3 * max_pixels / 2**30:.1f} GiB decoded as RGB) will be decoded, per image and per process; "
        "keep the default unless your data really has images that large"
    )


_warned: set[int] = set()


def warn_pixel_limit(max_pixels: int) -> None:
    """Print :func:`pixel_limit_warning` to stderr, once per process and value."""
    message = pixel_limit_warning(max_pixels)
    if message is not None and max_pixels not in _warned:
        _warned.add(max_pixels)
        print(message, file=sys.stderr, flush=True)


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"image {name}: {w}x{h} = {w * h} pixels exceeds max_image_pixels {max_pixels} "
            "(decompression-bomb limit; raise data.max_image_pixels if the image is genuine)"
        )


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    w, h = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):  # a broken EXIF block does not make the pixels wrong
        orientation = 1
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def image_size(image: str | Path | Image.Image, max_pixels: int) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), reading only the file header."""
    if isinstance(image, Image.Image):
        _check_pixels(image, "in dataset", max_pixels)
        return _displayed_size(image)
    with _open(Path(image), max_pixels) as opened:
        return _displayed_size(opened)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (dropping alpha would turn transparent areas black)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits before RGB, PIL would otherwise clip at 255
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_image(image: str | Path | Image.Image, max_pixels: int, origin: str | None = None) -> Image.Image:
    """A fully decoded RGB image, EXIF orientation applied: the one image-loading path of every stage, ``align
    data check``, ``align eval`` and ``align chat``.

    A file is opened (pixel limit checked on the header), its structure verified (PNG chunk CRCs and the end
    chunk: PIL decodes a PNG cut short in its last chunk without complaint), decoded in full and converted.
    Any failure is an :class:`AlignError` naming the image, prefixed with the row's ``origin`` when given.
    """
    try:
        return _load(image, max_pixels)
    except AlignError as err:
        if origin is None:
            raise
        raise type(err)(f"{origin}: {err}") from None


def _load(image: str | Path | Image.Image, max_pixels: int) -> Image.Image:
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "in dataset"
        _check_pixels(image, name, max_pixels)
        opened = image
    else:
        name = str(image)
        with _open(Path(image), max_pixels) as header:
            try:
                header.verify()  # leaves the image unusable: it is opened again below
            except (OSError, SyntaxError, ValueError) as err:
                raise ImageUnreadable(f"image {name}: corrupt or truncated: {err}") from None
        opened = _open(Path(image), max_pixels)
    try:
        opened.load()
        return to_rgb(ImageOps.exif_transpose(opened))  # both return new images: closing `opened` is safe
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
        raise ImageUnreadable(f"image {name}: corrupt or truncated: {err}") from None
    finally:
        if opened is not image:
            opened.close()


def pixel_values(
    images: Sequence[Any], image_processor: Any, max_pixels: int, origins: Sequence[str] | None = None
):
    """``(pixel_values or None, [(width, height), ...])`` of ``images`` in order, each decoded once.

    ``origins`` (one per image: the row it belongs to) makes a failure name the row as well as the image.
    """
    names = origins if origins is not None else [None] * len(images)
    loaded = [load_image(im, max_pixels, origin) for im, origin in zip(images, names, strict=True)]
    if not loaded:
        return None, []
    return image_processor(images=loaded, return_tensors="pt")["pixel_values"], [im.size for im in loaded]
