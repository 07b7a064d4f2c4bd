"""The anyres geometry against HF's own functions, over many sizes and the edge cases."""

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                image_size_to_num_patches, unpad_image)

from llava_next_jax import anyres
from tiny_models import RELEASED_PINPOINTS, TINY_PINPOINTS

RELEASED = anyres.Geometry(336, 14, tuple(map(tuple, RELEASED_PINPOINTS)), 576)
TINY = anyres.Geometry(56, 14, tuple(map(tuple, TINY_PINPOINTS)), 16)
EDGE_SIZES = [(55, 176), (88, 55), (1, 1), (1, 2000), (2000, 1), (1, 337), (337, 1), (336, 336), (672, 672),
              (335, 671), (1008, 336), (336, 1008), (2, 3), (3, 2), (299, 1000), (480, 640), (1080, 1920)]


def sizes(count, seed=0, high=2000):
    rng = np.random.default_rng(seed)
    log = rng.uniform(0, np.log(high), (count, 2))
    return [tuple(int(v) for v in np.exp(pair)) for pair in log] + EDGE_SIZES


def hf_tokens(size, pinpoints, tile, n):
    gh, gw = get_anyres_image_grid_shape(size, pinpoints, tile)
    rows, cols = unpad_image(torch.zeros(1, gh * n, gw * n), size).shape[1:]
    return n * n + rows * (cols + 1), (rows, cols)


@pytest.mark.parametrize("geometry", [RELEASED, TINY], ids=["336px", "56px"])
def test_geometry_matches_hf(geometry):
    pinpoints = [list(p) for p in geometry.pinpoints]
    n = geometry.patches_per_side
    for size in sizes(400):
        assert anyres.select_best_resolution(size, geometry.pinpoints) == tuple(hf_best(size, pinpoints)), size
        assert anyres.num_tiles(size, geometry) == image_size_to_num_patches(size, pinpoints, geometry.tile_size)
        tokens, shape = hf_tokens(size, pinpoints, geometry.tile_size, n)
        assert anyres.unpadded_shape(size, geometry) == shape, size
        assert anyres.num_image_tokens(size, geometry) == tokens, size


def test_released_token_counts():
    for size, tokens in {(480, 640): 2340, (1080, 1920): 1948, (300, 200): 984, (2000, 300): 1368,
                         (899, 1024): 2634, (100, 1000): 1160}.items():
        assert anyres.num_image_tokens(size, RELEASED) == tokens == hf_tokens(size, RELEASED_PINPOINTS, 336, 24)[0]


def test_round_not_truncate():
    """(55, 176) and (88, 55): int(round(x, 7)) and int(x) disagree; we must follow the reference."""
    for size in [(55, 176), (88, 55)]:
        rows, cols = anyres.grid_shape(size, RELEASED)
        r0, r1, c0, c1 = anyres.unpad_window(size, rows * 24, cols * 24)
        h, w = size
        if w / h > cols / rows:
            assert r1 - r0 != rows * 24 - 2 * ((rows * 24 - int(h * (cols * 24 / w))) // 2)
        else:
            assert c1 - c0 != cols * 24 - 2 * ((cols * 24 - int(w * (rows * 24 / h))) // 2)


def test_feature_sources_follow_hf_packing():
    """Packing HF's way (view/permute/unpad/newline) a labelled feature tensor gives our gather order."""
    n, tile = TINY.patches_per_side, TINY.tile_size
    for size in sizes(60, seed=1, high=600):
        tiles = anyres.num_tiles(size, TINY)
        labels = torch.arange(tiles * n * n, dtype=torch.float64).reshape(tiles, n * n, 1)
        gh, gw = get_anyres_image_grid_shape(size, TINY_PINPOINTS, tile)
        grid = labels[1:].view(gh, gw, n, n, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, size)
        grid = torch.cat([grid, torch.full((1, grid.shape[1], 1), -1.0)], dim=-1).flatten(1, 2).transpose(0, 1)
        expected = torch.cat([labels[0], grid]).flatten().long().numpy()
        np.testing.assert_array_equal(anyres.feature_sources(size, TINY), expected)


def test_token_sources_and_errors():
    size = (100, 300)
    count = anyres.num_image_tokens(size, TINY)
    ids = np.array([[5] * 3 + [9] * count + [5], [5] * (count + 4)])
    src = anyres.token_sources(ids, 9, np.array([size]), TINY, tiles_per_image=5)
    assert (src[1] == anyres.TEXT).all() and (src[0, :3] == anyres.TEXT).all()
    newline_row = 5 * 16
    assert (src[0, 3:3 + count] == np.where(anyres.feature_sources(size, TINY) < 0, newline_row,
                                            anyres.feature_sources(size, TINY))).all()
    padded = anyres.token_sources(ids, 9, np.array([size]), TINY, tiles_per_image=5, image_slots=3)
    assert (padded[src == newline_row] == 3 * newline_row).all() and (padded[src != newline_row] ==
                                                                      src[src != newline_row]).all()
    with pytest.raises(ValueError, match="need"):
        anyres.token_sources(ids[:, 1:], 9, np.array([size, size]), TINY, 5)
    with pytest.raises(ValueError, match="only 2 per image"):
        anyres.token_sources(ids, 9, np.array([size]), TINY, 2)
    with pytest.raises(ValueError, match="zero area"):
        anyres.num_image_tokens((0, 10), TINY)
    with pytest.raises(ValueError, match="multiple of the tile size"):
        anyres.Geometry(56, 14, ((56, 100),), 16)
