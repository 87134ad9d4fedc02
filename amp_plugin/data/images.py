"""Image files read as the transforms expect them: 8-bit RGB.

Pillow's `convert("RGB")` handles palette, CMYK, grey and alpha images (alpha is dropped,
as torchvision's loader does), but clips 16-bit grey to white: those are scaled to 8 bits
here. What would hang or mislead is refused with the file's name: a FIFO or device (a read
that blocks), a loop of symbolic links in a folder (os.walk would list its images again and
again), a decompression bomb (Pillow refuses past twice its pixel limit), float pixels of
no known range.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

GREY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit integer) grey


def to_rgb(im):
    """An open PIL image as 8-bit RGB."""
    from PIL import Image

    if im.mode in GREY16:
        a = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        raise OSError("float pixels of no known range (mode F): save it as 8 or 16 bits")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # (Pillow warns when a palette's transparency is dropped)
    return im.convert("RGB")


def load_rgb(path: str | Path):
    """The image file at `path` as 8-bit RGB; OSError naming what is wrong otherwise (a
    decompression bomb raises Pillow's DecompressionBombError)."""
    from PIL import Image

    st = os.stat(path)  # a loop of links fails here (ELOOP)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"not a regular file (mode {stat.filemode(st.st_mode)}): reading it "
                      "could block")
    with Image.open(path) as im:
        return to_rgb(im)


def refuse_link_loops(root: str | Path, key: str = "data.root") -> None:
    """Refuse a folder in which following symbolic links leads back to a folder already on
    the way down (torchvision's ImageFolder follows links: it would list the same images
    again at every turn of the loop, until the path grew too long)."""
    on_path: dict[str, tuple[int, int]] = {}
    for top, _, _ in os.walk(root, followlinks=True):
        st = os.stat(top)
        here = (st.st_dev, st.st_ino)
        parent = os.path.dirname(top)
        while parent in on_path:
            if on_path[parent] == here:
                raise ValueError(f"{key}: {top} is {parent} again (a loop of symbolic links): "
                                 "remove the link")
            parent = os.path.dirname(parent)
        on_path[top] = here


def image_files(root: str | Path, transform=None, key: str = "data.root"):
    """torchvision's ImageFolder over `root` (class folders, sorted), read with `load_rgb`,
    after the folder is checked for loops of links."""
    from torchvision.datasets import ImageFolder

    refuse_link_loops(root, key)
    return ImageFolder(str(root), transform=transform, loader=load_rgb)
