"""Writes the demo's example images (examples/images/) deterministically with numpy + Pillow.

    python examples/make_images.py

Synthetic scenes (sky gradient, ground, sun, blocks) at assorted sizes and aspect ratios, so the
demo covers every anyres grid shape: wide, tall, square, small and large.
"""

import os

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
# name, (height, width), format
IMAGES = [("landscape_640x480.jpg", (480, 640)), ("tall_300x900.png", (900, 300)),
          ("panorama_1000x250.jpg", (250, 1000)), ("square_128.png", (128, 128)),
          ("photo_800x600.jpg", (600, 800)), ("tiny_40x60.png", (60, 40))]


def scene(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 100 * y / height, 150 + 60 * y / height, 255 - 40 * y / height], -1)
    img = sky.copy()
    horizon = int(height * rng.uniform(0.5, 0.75))
    ground = np.array(rng.choice([[70, 140, 60], [200, 180, 120], [60, 90, 160]]), np.float32)
    img[horizon:] = ground * (0.8 + 0.2 * (y[horizon:, :, None] - horizon) / max(1, height - horizon))
    cy, cx, r = rng.uniform(0.1, 0.4) * height, rng.uniform(0.1, 0.9) * width, 0.08 * min(height, width) + 2
    img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = [255, 220, 80]
    for _ in range(3):
        h, w = int(rng.uniform(0.1, 0.3) * height) + 1, int(rng.uniform(0.05, 0.2) * width) + 1
        top, left = max(0, horizon - h), int(rng.uniform(0, 1) * (width - w))
        img[top:horizon, left:left + w] = rng.integers(40, 220, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, (height, width)) in enumerate(IMAGES):
        image = Image.fromarray(scene(height, width, seed))
        path = os.path.join(OUT, name)
        image.save(path, **({"quality": 85} if name.endswith(".jpg") else {"optimize": True}))
        print(f"{path}: {width}x{height}, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
