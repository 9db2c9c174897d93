"""Image + caption folders in kohya's layout, read into tensors at a fixed resolution or in buckets.

    train_data/
      10_sks dog/          ← "N_name": every image in it is repeated N times per epoch
        001.png  001.txt   ← the caption sits beside the image, same stem, ``.txt``
      3_style/ ...
      extra.jpg extra.txt  ← images directly in the root: 1 repeat

Bad input:
* an image PIL cannot read → ``DataError`` naming the file (a half-written download, a .txt renamed);
* an image without a caption → by default a ``DataError`` naming the image and the missing file;
  ``missing_caption="skip"`` skips it (the count is reported in the run summary);
  ``missing_caption="folder"`` uses the folder's name after ``N_`` (kohya's DreamBooth-style class
  caption).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
MISSING = ("error", "skip", "folder")


@dataclass
class Item:
    image: Path
    caption: str
    repeats: int


@dataclass
class Dataset:
    items: list[Item]
    skipped: list[Path] = field(default_factory=list)  # images without a caption (missing_caption="skip")

    def expanded(self) -> list[int]:
        """Item indices, each repeated its folder's N times (one epoch)."""
        return [i for i, it in enumerate(self.items) for _ in range(it.repeats)]


def scan(root: str | Path, caption_ext: str = ".txt", missing_caption: str = "error") -> Dataset:
    """Find images and captions under ``root`` (kohya's ``N_name`` folders, or images in ``root`` itself)."""
    root = Path(root)
    check_caption_ext(caption_ext, DataError)
    if missing_caption not in MISSING:
        raise DataError(f"missing_caption={missing_caption!r}: use one of {', '.join(MISSING)}.")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; pass a folder of images with a caption {caption_ext} beside each.")
    folders: list[tuple[Path, int, str]] = [(root, 1, "")]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _REPEAT_DIR.match(sub.name)
        if m is None:
            raise DataError(f"{sub}: subfolders must be named N_name (N = repeats, e.g. '10_sks dog'); rename it "
                            "or move it out of the data folder.")
        folders.append((sub, int(m[1]), m[2]))
    ds = Dataset([])
    for folder, repeats, label in folders:
        if repeats < 1:
            raise DataError(f"{folder}: repeat count {repeats} must be ≥ 1.")
        for img in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
            cap_file = img.with_suffix(caption_ext)
            if cap_file.is_file():
                caption = read_caption(cap_file)
            elif missing_caption == "skip":
                ds.skipped.append(img)
                continue
            elif missing_caption == "folder" and label:
                caption = label
            else:
                raise DataError(f"{img}: no caption file {cap_file.name} beside it. Write one (one line of text), "
                                "or pass missing_caption=skip (skip and count such images) or "
                                "missing_caption=folder (use the N_name folder's name).")
            ds.items.append(Item(img, caption, repeats))
    if not ds.items:
        raise DataError(f"{root}: no captioned image found ({', '.join(IMAGE_EXTS)} with a {caption_ext} beside "
                        f"each, in the folder or its N_name subfolders); {len(ds.skipped)} skipped without caption.")
    return ds


def check_caption_ext(ext, error) -> None:
    """A file suffix like ".txt" (``Path.with_suffix`` raised a bare ValueError on "txt" or "a/.txt")."""
    if not isinstance(ext, str) or len(ext) < 2 or not ext.startswith(".") or any(c in ext for c in "/\\\x00") \
            or ext.count(".") != 1:
        raise error(f"caption_ext={ext!r}: must be a file suffix with its dot, e.g. '.txt' or '.caption'.")


def read_caption(path: Path) -> str:
    """A caption file's text (UTF-8, kohya's encoding); other bytes are a DataError naming file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:  # a raw traceback from the CLI before
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save the caption as UTF-8.") from None


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: resized so it covers ``size`` (W, H), then centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = size
            scale = max(w / im.width, h / im.height)
            nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - w) // 2, (nh - h) // 2
            im = im.crop((left, top, left + w, top + h))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({exc}); replace or delete the file.") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({exc}); replace or delete the file.") from None


def buckets(resolution: int, step: int = 8, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(W, H) sizes of about resolution² pixels, sides multiples of ``step`` and aspect ≤ max_ratio
    (kohya's aspect-ratio buckets, simplified)."""
    out = set()
    area = resolution * resolution
    w = step
    while w <= resolution * max_ratio:
        h = int(area / w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out)


def assign_buckets(ds: Dataset, resolution: int, use_buckets: bool, step: int = 8) -> list[tuple[int, int]]:
    """The (W, H) each item is trained at: the square resolution, or the bucket closest in log-aspect."""
    if not use_buckets:
        return [(resolution, resolution)] * len(ds.items)
    choices = buckets(resolution, step)
    out = []
    for it in ds.items:
        w, h = image_size(it.image)
        out.append(min(choices, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(w / h))))
    return out
