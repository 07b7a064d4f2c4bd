"""anyres geometry: the one place that knows how an image becomes tiles and image tokens.

Both the processor (how many `<image>` tokens to write) and the model (which feature vector goes
into which token) call these functions, so the two can never disagree.

Vocabulary, for an image of `(height, width)` pixels and tiles of `S x S` pixels with `p x p`
patches (`n = S // p` patches a side):

  best resolution  the pinpoint `(Hb, Wb)` the image is resized (keeping aspect) and padded to.
  grid             `(Hb // S, Wb // S)` tiles; the model input is `[base] + grid tiles`, row-major.
  feature map      the grid tiles' patch features reassembled into one `(rows*n, cols*n)` map,
                   then cropped ("unpadded") back to the image's aspect ratio.
  tokens           `base_tokens` base features, then the cropped map row by row, each row followed
                   by one `image_newline` vector: `base_tokens + h * (w + 1)`.

Worked example, a 480x640 (h x w) photo with the released 336px geometry (n = 24):
  best resolution (672, 672) -> grid 2x2 -> 5 tiles -> feature map 48x48;
  the photo is wider than the map (640/480 > 1) so rows are cropped: new height
  int(round(480 * (48/640), 7)) = 36, pad (48-36)//2 = 6, keep rows [6, 42) -> 36x48;
  tokens = 576 + 36 * 49 = 2340.

Everything here is plain Python/numpy on host values: image sizes are known before the device
program runs, and the device only ever sees fixed-shape index arrays (see `token_sources`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

NEWLINE = -1
"""Source index meaning "the `image_newline` vector" in `feature_sources`."""

TEXT = -2
"""Source index meaning "not an image token" in `token_sources`."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The numbers the anyres packing depends on (all from the checkpoint's configs).

    tile_size:   S, the vision tower's input size (336 in the releases).
    patch_size:  p, the vision tower's patch size (14).
    pinpoints:   candidate best resolutions as (height, width) pairs.
    base_tokens: feature vectors the base (whole-image) tile contributes, n*n for CLIP with the
                 `default` strategy (CLS dropped).
    """

    tile_size: int
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...]
    base_tokens: int

    def __post_init__(self):
        if not self.pinpoints:
            raise ValueError("image_grid_pinpoints is empty: anyres needs at least one (height, width)")
        for h, w in self.pinpoints:
            if h % self.tile_size or w % self.tile_size or h <= 0 or w <= 0:
                raise ValueError(
                    f"image_grid_pinpoints entry {[h, w]} is not a positive multiple of the tile size "
                    f"{self.tile_size}")

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def max_tiles(self) -> int:
        """Most tiles any image can need (base included): the static tile dimension."""
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)


def base_tokens(patches_per_side: int, num_additional_image_tokens: int, select_strategy: str) -> int:
    """Feature vectors of the base tile: n*n patches, plus the CLS-like extras unless `default` drops one."""
    if select_strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy={select_strategy!r} is not supported: use 'default' or 'full'")
    return patches_per_side ** 2 + num_additional_image_tokens - (1 if select_strategy == "default" else 0)


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size (height, width) = {(height, width)} has zero area")
    return height, width


def select_best_resolution(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most of the image, ties to the least padding (first wins)."""
    height, width = _check_size(image_size)
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def grid_shape(image_size: Sequence[int], geometry: Geometry) -> tuple[int, int]:
    """(rows, cols) of S x S tiles covering the best resolution."""
    h, w = select_best_resolution(image_size, geometry.pinpoints)
    return h // geometry.tile_size, w // geometry.tile_size


def num_tiles(image_size: Sequence[int], geometry: Geometry) -> int:
    """Tiles the processor produces for this image: the base tile plus the grid."""
    rows, cols = grid_shape(image_size, geometry)
    return 1 + rows * cols


def unpad_window(image_size: Sequence[int], map_height: int, map_width: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of a padded feature map that hold the image.

    The map was made from the image resized to fit and centred with padding; this undoes the padding
    on the long side. Rounds as the reference does (`int(round(x, 7))`, not `int(x)`: they differ for
    e.g. (55, 176)), with the same float association (`h * (map_w / w)`).
    """
    height, width = _check_size(image_size)
    if width / height > map_width / map_height:
        new_height = int(round(height * (map_width / width), 7))
        pad = (map_height - new_height) // 2
        return pad, map_height - pad, 0, map_width
    new_width = int(round(width * (map_height / height), 7))
    pad = (map_width - new_width) // 2
    return 0, map_height, pad, map_width - pad


def unpadded_shape(image_size: Sequence[int], geometry: Geometry) -> tuple[int, int]:
    """(h, w) of the cropped grid feature map, in patches."""
    rows, cols = grid_shape(image_size, geometry)
    n = geometry.patches_per_side
    r0, r1, c0, c1 = unpad_window(image_size, rows * n, cols * n)
    return r1 - r0, c1 - c0


def num_image_tokens(image_size: Sequence[int], geometry: Geometry) -> int:
    """Image tokens (`<image>` expansions) for one image: base features + cropped map + one newline a row."""
    h, w = unpadded_shape(image_size, geometry)
    return geometry.base_tokens + h * (w + 1)


def feature_sources(image_size: Sequence[int], geometry: Geometry) -> np.ndarray:
    """For each of this image's tokens, where its vector comes from.

    Returns int32 `[num_image_tokens]`: an index into this image's tile features flattened as
    `[tile, patch]` (tile 0 is the base, patch = row * n + col within the tile), or `NEWLINE`.
    Only valid for `base_tokens == n*n` (CLS dropped), which the model checks.
    """
    rows, cols = grid_shape(image_size, geometry)
    n = geometry.patches_per_side
    r0, r1, c0, c1 = unpad_window(image_size, rows * n, cols * n)
    y = np.arange(r0, r1)[:, None]              # feature-map row
    x = np.arange(c0, c1)[None, :]              # feature-map column
    tile = 1 + (y // n) * cols + (x // n)       # grid tiles follow the base tile, row-major
    src = tile * n * n + (y % n) * n + (x % n)  # [h, w]
    src = np.concatenate([src, np.full((r1 - r0, 1), NEWLINE)], axis=1)  # newline closes each row
    return np.concatenate([np.arange(n * n), src.reshape(-1)]).astype(np.int32)


def check_tiles(image_sizes, geometry: Geometry, tiles_per_image: int) -> None:
    """A ValueError naming the first image whose tiles do not fit `tiles_per_image`."""
    for i, size in enumerate(image_sizes):
        size = tuple(int(v) for v in size)
        need = num_tiles(size, geometry)
        if need > tiles_per_image:
            raise ValueError(
                f"image {i} of size {size} needs {need} tiles but pixel_values has only {tiles_per_image} per image")


def token_sources(input_ids: np.ndarray, image_token_id: int, image_sizes: np.ndarray | None,
                  geometry: Geometry, tiles_per_image: int, image_slots: int | None = None) -> np.ndarray:
    """Maps every position of `input_ids` to the feature vector the model puts there.

    input_ids:       int `[B, T]`, `<image>` already expanded (one token per feature vector).
    image_sizes:     int `[B_img, 2]` (height, width), or None for text only.
    tiles_per_image: P, the tile dimension of `pixel_values [B_img, P, 3, S, S]`.
    image_slots:     B_img, when pixel_values holds more (zero) images than image_sizes lists, padded
                     for a fixed shape; default len(image_sizes).

    Returns int32 `[B, T]`: `TEXT` at text positions; at image positions an index into the whole
    batch's features flattened as `[B_img * P * n*n]`, or `B_img * P * n*n` for the newline vector
    (the model appends it as one extra row, after every slot's features). Images fill image positions in row-major order of
    `input_ids`, as in the reference. A count that does not match is a ValueError.
    """
    input_ids = np.asarray(input_ids)
    is_image = input_ids == image_token_id
    sources = np.full(input_ids.shape, TEXT, dtype=np.int32)
    n_tokens = int(is_image.sum())
    sizes = [] if image_sizes is None else [tuple(int(v) for v in s) for s in np.asarray(image_sizes)]
    if not sizes:
        if n_tokens:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (id {image_token_id}) but no images were given")
        return sources
    check_tiles(sizes, geometry, tiles_per_image)
    per_image = [feature_sources(size, geometry) for size in sizes]
    counts = [len(s) for s in per_image]
    if n_tokens != sum(counts):
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {image_token_id}) but the {len(sizes)} images of sizes "
            f"{sizes} need {sum(counts)} ({counts} each); expand each <image> with the processor "
            f"(anyres.num_image_tokens)")
    per_tile = geometry.patches_per_side ** 2
    if image_slots is not None and image_slots < len(sizes):
        raise ValueError(f"image_slots {image_slots} < the {len(sizes)} images given")
    newline_row = (len(sizes) if image_slots is None else image_slots) * tiles_per_image * per_tile
    flat = np.concatenate([np.where(s == NEWLINE, newline_row, s + i * tiles_per_image * per_tile)
                           for i, s in enumerate(per_image)])
    sources[is_image] = flat
    return sources
