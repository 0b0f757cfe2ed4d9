"""Image loading for item encoders: RGB, resized to a fixed square resolution, failures reported.

    >>> from merlin_molar.items.images import load_image
    >>> image, problem = load_image("/no/such/poster.jpg", size=224)
    >>> image is None, problem
    (True, 'file not found')
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple


def load_image(path, size: Optional[int] = 224) -> Tuple[Optional["PIL.Image.Image"], Optional[str]]:  # noqa: F821
    """``(image, None)`` or ``(None, problem)``; never raises for a missing or unreadable file.

    A fixed square ``size`` gives every item the same number of vision tokens (224 px = 64 merged
    Qwen2-VL tokens), which keeps batches uniform and throughput predictable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return None, "file not found"
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            else:
                img.load()
        return img, None
    except UnidentifiedImageError:
        return None, "unreadable image (not a recognised image format)"
    except (OSError, ValueError) as e:
        return None, f"unreadable image ({e})"
