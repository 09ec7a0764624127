"""Crop size against image size: the warning a run on photos with the defaults' 28 px crops needs.

The defaults are tuned for 28 px Fashion-MNIST: `train.crop_size` and `extract.crop_size` are 28, and the
network is small_alexnet. On a tree of photos those settings still run, but every photo reaches the
network as a 28 px thumbnail, which is rarely what anyone wants and easy to miss. `prepare` knows the
images' sizes (the manifest's width and height) and prints one line when a crop is far smaller than
the images; the fix is the `photos` preset (docs/operations.md "Your own images").
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# A crop below a quarter of the images' short side throws away more than 15/16 of their pixels.
FAR_SMALLER = 4
FIX = "for photos apply the `photos` preset (AlexNet, 224 px crops): `deepcluster preset photos`"


def image_side(meta: dict, manifest: pd.DataFrame) -> int | None:
    """The training images' typical short side in px: an array dataset's size, or the median short side of
    an image tree's training images (the manifest's width and height); None where it is not known."""
    if meta.get("kind") == "array":
        return int(meta["image_size"])
    if not {"width", "height", "split"} <= set(manifest.columns):
        return None
    train = manifest[manifest["split"] == "train"]
    sides = np.minimum(train["width"].to_numpy(dtype=float, na_value=np.nan),
                       train["height"].to_numpy(dtype=float, na_value=np.nan))
    sides = sides[np.isfinite(sides)]
    return int(np.median(sides)) if len(sides) else None


def crop_warning(side: int | None, crops: dict[str, int]) -> str | None:
    """One line when a crop setting is far smaller than the images (crop · 4 < side), naming the settings
    and the fix; None when the crops suit the images or their size is not known.

    crops: setting name -> crop size, e.g. {"extract.crop_size": 28, "train.crop_size": 28}.
    """
    if not side:
        return None
    small = {name: int(size) for name, size in crops.items() if int(size) * FAR_SMALLER < side}
    if not small:
        return None
    settings = " and ".join(f"{name}={size}" for name, size in small.items())
    return (f"warning: {settings} shrink these {side} px images (median short side) to {min(small.values())} px "
            f"inputs, a small fraction of their detail; {FIX}")
