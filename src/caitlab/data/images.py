"""Image files: class folders, decoding (high bit depths rescaled, not clipped) and the policy
for a file that cannot be decoded (``on_corrupt``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from caitlab.data.errors import DataConfigError, ImageReadError, error_reason

log = logging.getLogger(__name__)

ON_CORRUPT = ("stop", "skip")

# What PIL raises for a file it cannot decode (UnidentifiedImageError and truncated files are
# OSErrors; some broken headers raise SyntaxError or ValueError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def find_class_folders(directory: str | Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (``.ipynb_checkpoints`` is no class)."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def load_rgb(path: str) -> Image.Image:
    """torchvision's loader, but high-bit-depth images keep their contrast: Pillow's
    ``convert("RGB")`` clips 16-bit and 32-bit values at 255, so a 16-bit scan comes out
    all white. Such images are rescaled to 8 bits first: 16-bit ranges by 1/257, others
    (float, 32-bit int) from their own minimum and maximum."""
    with open(path, "rb") as f:
        img: Image.Image = Image.open(f)  # a file's image, converted below
        img.load()
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        low, high = float(a.min()), float(a.max())
        if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535
                                           and high > 255):
            a = a / 257.0
        elif img.mode == "F" and low >= 0 and high <= 1:
            a = a * 255.0
        elif high > 255 or low < 0:
            a = (a - low) * (255.0 / (high - low)) if high > low else a * 0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


class CheckedImages:
    """What :func:`checked_image_folder` adds to torchvision's ``ImageFolder``: no hidden class
    folders, :func:`load_rgb`, and the ``on_corrupt`` policy.

    ``stop``: a file that cannot be decoded raises :class:`DataConfigError` naming it.
    ``skip``: it is logged (once per file and process) and the next decodable sample in the
    index order is returned instead, so a batch keeps its size and shapes.
    Any other error reading or transforming a file raises :class:`ImageReadError` with the file
    and the cause in its one line: inside a DataLoader worker torch would otherwise show only
    ``Caught ValueError in DataLoader worker process 1``.
    """

    # set by ImageFolder, the class this one is mixed into
    root: str
    samples: list[tuple[str, int]]
    loader: Callable[[str], Any]
    transform: Callable | None
    target_transform: Callable | None

    def __init__(self, root: str, transform: Callable | None, on_corrupt: str) -> None:
        self.on_corrupt = on_corrupt
        self.skipped: set[str] = set()
        # super() is ImageFolder, which checked_image_folder mixes this class into
        super().__init__(root, transform=transform, loader=load_rgb)  # type: ignore[call-arg]

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = find_class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"no class folders under {directory}")
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for attempt in range(n):
            path, target = self.samples[(index + attempt) % n]
            sample = self._decode(path)
            if sample is not None:
                return self._transformed(path, sample, target)
        raise DataConfigError(f"data.root: no image under {self.root} can be decoded")

    def _decode(self, path: str) -> Any:
        """The image at ``path``; None when it cannot be decoded and ``on_corrupt`` skips it."""
        try:
            return self.loader(path)
        except DECODE_ERRORS as e:
            reason = error_reason(e)
            if self.on_corrupt == "stop":
                raise DataConfigError(f"data.root: cannot decode image {path} ({reason}); fix "
                                      "or remove it, or set data.on_corrupt=skip") from e
            if path not in self.skipped:
                self.skipped.add(path)
                log.warning("data.on_corrupt=skip: skipping undecodable image %s (%s)",
                            path, reason)
            return None
        except Exception as e:
            raise ImageReadError(f"data: reading image {path} failed ({error_reason(e)})") from e

    def _transformed(self, path: str, sample: Any, target: int) -> tuple[Any, Any]:
        try:
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
        except Exception as e:
            raise ImageReadError(f"data: the transform failed on image {path} "
                                 f"({error_reason(e)})") from e
        return sample, target


def checked_image_folder(root: str, transform: Callable | None, on_corrupt: str) -> Any:
    """torchvision's ``ImageFolder`` of ``root`` with :class:`CheckedImages`' checks."""

    class CheckedImageFolder(CheckedImages, ImageFolder):
        __doc__ = CheckedImages.__doc__

    return CheckedImageFolder(root, transform, on_corrupt)
