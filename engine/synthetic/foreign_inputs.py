"""Series no MR model should accept, all saved as valid DICOM MR: the out-of-distribution flag's
test set.

``write_foreign_archive(out_dir, per_case, seed)`` writes ``per_case`` series of each case under
``out_dir/<case>/<n>/`` and returns ``{series_uid: case}``. Every series is a well-formed MR image
series (it loads and every head runs on it); what is wrong is its content:

- ``ct_like``: a head or trunk in Hounsfield units (air -1000, fat -100, soft tissue 40, bone
  700-1500, lungs -800), as a CT scanner writes it, relabelled MR;
- ``noise``: Gaussian, uniform, Rician or salt-and-pepper noise with no anatomy;
- ``photo``: a grayscale photograph (scikit-image's sample pictures: a camera man, an astronaut,
  coffee, a cat, a rocket, ...) as one slice or a stack of shifted copies;
- ``blank``: zeros, a constant, or a constant with faint noise.

Deterministic per seed; the photograph case needs scikit-image (a test dependency) and raises a
clear error without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .dicom_writer import derive_uid, write_dicom_series

CASES = ("ct_like", "noise", "photo", "blank")
PHOTOS = (
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
)


def _affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = -np.array(spacing) * (np.array(shape) - 1) / 2
    return a


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float32)
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0


def ct_like(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A head (skull around brain) or a trunk (ribs, lungs, fat) in Hounsfield units."""
    shape = (int(rng.integers(80, 129)), int(rng.integers(80, 129)), int(rng.integers(24, 49)))
    centre = np.array(shape) / 2 + rng.normal(0, 3, 3)
    vol = np.full(shape, -1000.0, dtype=np.float32)
    outer = np.array(shape) * rng.uniform(0.36, 0.46, 3) * np.array([1, 1, 1.3])
    body = _ellipsoid(shape, centre, outer)
    if rng.random() < 0.5:  # head: scalp, skull, brain
        vol[body] = 40
        skull = _ellipsoid(shape, centre, outer * 0.93)
        vol[skull] = rng.uniform(700, 1500)
        vol[_ellipsoid(shape, centre, outer * 0.85)] = rng.uniform(25, 45)
    else:  # trunk: fat rim, soft tissue, two lungs, a spine
        vol[body] = -100
        vol[_ellipsoid(shape, centre, outer * 0.9)] = 45
        for side in (-1, 1):
            c = centre + np.array([side * outer[0] * 0.45, 0, 0])
            vol[_ellipsoid(shape, c, outer * np.array([0.35, 0.6, 0.8]))] = -800
        spine = centre + np.array([0, -outer[1] * 0.6, 0])
        vol[_ellipsoid(shape, spine, np.array([5, 5, shape[2]]))] = rng.uniform(700, 1200)
    vol += rng.normal(0, rng.uniform(5, 25), shape).astype(np.float32)
    return vol, (float(rng.uniform(0.7, 1.5)),) * 2 + (float(rng.uniform(1.5, 5)),)


def noise(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
    shape = (int(rng.integers(48, 129)), int(rng.integers(48, 129)), int(rng.integers(8, 49)))
    kind = rng.integers(4)
    if kind == 0:
        vol = rng.normal(500, 150, shape)
    elif kind == 1:
        vol = rng.uniform(0, 1000, shape)
    elif kind == 2:  # magnitude of complex Gaussian: Rician background with no signal
        vol = np.hypot(rng.normal(0, 100, shape), rng.normal(0, 100, shape))
    else:
        vol = np.where(rng.random(shape) < 0.1, 1000.0, 0.0)
    return np.clip(vol, 0, None).astype(np.float32), tuple(float(x) for x in rng.uniform(0.8, 4, 3))  # type: ignore[return-value]


def photo(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
    try:
        import skimage.data as pictures
        from skimage.color import rgb2gray
    except ImportError as exc:
        raise RuntimeError("the photograph case needs scikit-image (pip install scikit-image)") from exc
    name = PHOTOS[int(rng.integers(len(PHOTOS)))]
    image = np.asarray(getattr(pictures, name)(), dtype=np.float32)
    if image.ndim == 3:
        image = rgb2gray(image[..., :3]) * 255
    image = image[::-1].T  # rows top to bottom -> i left to right, j posterior to anterior
    step = max(1, int(max(image.shape) // 256))
    image = image[::step, ::step] * 4
    depth = 1 if rng.random() < 0.4 else int(rng.integers(3, 17))
    vol = np.stack([np.roll(image, 2 * k, axis=0) for k in range(depth)], axis=-1)
    return vol.astype(np.float32), (float(rng.uniform(0.5, 1.5)),) * 2 + (float(rng.uniform(1, 5)),)


def blank(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
    shape = (int(rng.integers(32, 129)), int(rng.integers(32, 129)), int(rng.integers(4, 49)))
    kind = rng.integers(3)
    level = 0.0 if kind == 0 else float(rng.uniform(10, 2000))
    vol = np.full(shape, level, dtype=np.float32)
    if kind == 2:
        vol += rng.normal(0, 1, shape).astype(np.float32)
    return np.clip(vol, 0, None), tuple(float(x) for x in rng.uniform(0.8, 4, 3))  # type: ignore[return-value]


MAKERS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, tuple[float, float, float]]]] = {
    "ct_like": ct_like,
    "noise": noise,
    "photo": photo,
    "blank": blank,
}


def write_foreign_archive(
    out_dir: str | Path, per_case: int = 6, seed: int = 0, cases: tuple[str, ...] = CASES
) -> dict[str, str]:
    """Write ``per_case`` DICOM MR series of each case; returns {series_uid: case}."""
    out = Path(out_dir)
    truth: dict[str, str] = {}
    for c, case in enumerate(cases):
        for n in range(per_case):
            rng = np.random.default_rng([seed, c, n])
            vol, spacing = MAKERS[case](rng)
            study_uid = derive_uid("foreign", seed, case, n, "study")
            series_uid = derive_uid("foreign", seed, case, n, "series")
            # CT values go negative: store them shifted, as a scanner's rescale intercept would
            intercept = float(min(0.0, np.floor(vol.min())))
            write_dicom_series(
                out / case / f"{n:02d}",
                vol,
                _affine(spacing, vol.shape),
                study_uid=study_uid,
                series_uid=series_uid,
                description=f"FOREIGN {case.upper()} {n}",
                rescale=(1.0, intercept),
            )
            truth[series_uid] = case
    return truth
