"""Images in and out: [-1, 1] floats to uint8, grids, PNG files on any epath (local or gs://)."""
import io
import math

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(x) -> np.ndarray:
  """Model space [-1, 1] to pixels {0..255}, the inverse of the pipeline's x / 127.5 - 1."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, ncol: int = 0, pad: int = 1, pad_value: int = 255):
  """[N, H, W, C] uint8 to one [rows * (H + pad) + pad, cols * (W + pad) + pad, C] image."""
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def save_png(path, image: np.ndarray, *, upscale: int = 1) -> str:
  """Writes an [H, W, C] uint8 image (C = 1 or 3) as PNG; small images can be upscaled."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if upscale > 1:
    pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return str(path)
