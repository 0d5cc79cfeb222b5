"""The vision tower's input: images cut into patches on the host as bytes, normalised where they are used.

Contract
--------
- `pixel_values(agent, images, device)` -> [sum of patches, C*tp*p*p] float32 on `device`, equal BIT FOR
  BIT to Qwen's image processor (`Agent.encode_image`, the reference path, tested equal on the real
  processor and the toy's) for images already at their shown size (sides multiples of 28).
- Why: the processor rescales and normalises every value in float on the host, then copies it into
  patches: ~25-40 ms for a 1K-token image here, serial with the GPU, and 4 bytes a value (x2: a still
  image is its own second temporal frame) to send to the GPU. Here the host only cuts the image's BYTES
  into patches (uint8, ~2 ms, 8x fewer bytes to send); the rest runs on `device`.
- How: for an 8-bit image the processor's rescale and normalisation are a map of each channel's 256
  values. `table` fills that map by running the processor itself once on a probe image holding every value
  in every channel, and checks that it IS such a map (the same input value always gives the same output).
- An image that is not RGB (the processor composites transparency onto white first) takes the reference
  path; every shown image is RGB (`crop_tool.resize_to_budget`).
- `cut_ahead(image, patch, merge)` cuts an image's patches on any thread (lfpc.rollout's pool, while the
  engine runs) and keeps them on the image (`image.info`) until `pixel_values` takes them, once.
- Patch layout (the processor's): patches in merge-window order (rows of windows, windows row-major, the
  merge x merge patches of a window row-major); each patch flattened as (channel, temporal frame, y, x).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pixel_values(agent, images: list[Image.Image], device=None) -> torch.Tensor:
    """[sum of patches, C*tp*p*p] float32 on `device` (default the agent's) for `images`, in order."""
    device = torch.device(agent.device if device is None else device)
    ip = agent.image_processor
    if not images:
        return torch.zeros(0, 3 * ip.temporal_patch_size * ip.patch_size ** 2, device=device)
    if any(im.mode != "RGB" for im in images):                       # the processor's own conversion
        return torch.cat([agent.encode_image(im)[0] for im in images]).to(device)
    cut = torch.cat([_taken(im, ip.patch_size, ip.merge_size) for im in images])      # [n, C, p*p] uint8
    return normalise(cut.to(device), table(ip, device), ip.temporal_patch_size)


CUT_KEY = "lfpc_patches"          # image.info: (patch, merge, [n, C, p*p] uint8) cut ahead by `cut_ahead`


def cut_ahead(image: Image.Image, patch: int, merge: int) -> None:
    """Cut an RGB image's patches now (on any thread) and keep them on it until `pixel_values` takes them."""
    if image.mode == "RGB":
        image.info[CUT_KEY] = (patch, merge, patches(image, patch, merge))


def _taken(image: Image.Image, patch: int, merge: int) -> torch.Tensor:
    """The patches `cut_ahead` kept (removed from the image: they are the image's size again), else cut now."""
    kept = image.info.pop(CUT_KEY, None)
    if kept is not None and kept[:2] == (patch, merge):
        return kept[2]
    return patches(image, patch, merge)


def patches(image: Image.Image, patch: int, merge: int) -> torch.Tensor:
    """An RGB image at its shown size -> its patches' bytes [n, C, p*p] uint8, in the processor's order."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)             # [C, H, W]
    c, h, w = x.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image of {w}x{h} px is not at a shown size (sides multiples of {patch * merge})")
    gh, gw = h // patch, w // patch
    x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)                     # [gh/m, gw/m, m, m, C, p, p]: windows, then patches
    return x.reshape(gh * gw, c, patch * patch)


def normalise(cut: torch.Tensor, lut: torch.Tensor, temporal: int) -> torch.Tensor:
    """[n, C, p*p] uint8 -> [n, C*temporal*p*p] float32: each byte through its channel's table, the still
    image repeated as each of the `temporal` frames of a patch (as the processor does)."""
    n, c, pp = cut.shape
    flat = lut.reshape(-1)                                                  # [C*256]
    offset = torch.arange(c, device=cut.device).view(1, c, 1) * 256
    v = flat[cut.int() + offset]                                           # [n, C, p*p]
    return v.unsqueeze(2).expand(n, c, temporal, pp).reshape(n, c * temporal * pp)


_TABLES: dict[tuple, tuple[object, torch.Tensor]] = {}


def table(image_processor, device=None) -> torch.Tensor:
    """[C, 256] float32 on `device`: what `image_processor` makes of each byte value in each channel,
    found by running it on a probe image (kept per processor, its settings and the device). Raises if the
    processor is not a map of each channel's own byte values."""
    ip = image_processor
    key = (id(ip), str(device), *(repr(getattr(ip, k, None)) for k in
                                  ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                                   "patch_size", "merge_size", "temporal_patch_size")))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is ip:
        return hit[1]
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    side = p * m
    width = side * -(-256 // side)                                         # >= 256 columns, one per value
    y, x = np.mgrid[0:side, 0:width]
    # every value of every channel in each row, at a different place in each row, beside other values of
    # the other channels: a processor that mixes channels or positions gives one value two outputs
    probe = np.stack([(x * k + 85 * c + 37 * c * y) % 256 for c, k in enumerate((1, 3, 5))], -1)   # [side, width, C]
    image = Image.fromarray(probe.astype(np.uint8))
    out = ip(images=[image], do_resize=False, return_tensors="pt")["pixel_values"]
    cut = patches(image, p, m)                                             # [n, C, p*p]
    n, c, pp = cut.shape
    out = out.reshape(n, c, tp, pp).float()
    lut = torch.full((c, 256), float("nan"))
    for ch in range(c):
        lut[ch, cut[:, ch].reshape(-1).long()] = out[:, ch, 0].reshape(-1)
    if torch.isnan(lut).any() or not torch.equal(normalise(cut, lut, tp), out.reshape(n, -1)):
        raise ValueError(f"{type(ip).__name__} is not a map of each channel's byte values "
                         f"(or patches in another order): use Agent.encode_image")
    lut = lut.to(device) if device is not None else lut
    _TABLES[key] = (ip, lut)
    return lut
