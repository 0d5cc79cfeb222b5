"""support/pixels.py: the vision tower's input cut on the host as bytes, equal bit for bit to the image
processor's (the reference path, Agent.encode_image)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

import crop_tool
from support import models, pixels
from tests.conftest import noise_image

REAL = Qwen2VLImageProcessorPil(**models.QWEN_IMAGE_PROCESSOR)


class Shim:
    """What pixels.pixel_values reads of an agent, around one image processor."""

    def __init__(self, image_processor):
        self.image_processor, self.device = image_processor, torch.device("cpu")

    def encode_image(self, image):
        out = self.image_processor(images=[image], do_resize=False, return_tensors="pt")
        return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def reference(agent, images):
    return torch.cat([agent.encode_image(im)[0] for im in images])


def test_pixel_values_equal_the_image_processors_bit_for_bit(tiny, tmp_path):
    REAL.save_pretrained(tmp_path)                                   # the real loading path: from_pretrained
    loaded = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    ramp = np.broadcast_to(np.arange(252 * 168 * 3, dtype=np.int64).reshape(168, 252, 3) % 256, (168, 252, 3))
    images = [noise_image(56, 56), noise_image(252, 168, seed=1), noise_image(112, 896, seed=2),
              Image.fromarray(ramp.astype(np.uint8)), Image.new("RGB", (56, 112), (255, 0, 7))]
    for agent in (tiny, Shim(REAL), Shim(loaded)):
        ours = pixels.pixel_values(agent, images)
        assert ours.dtype == torch.float32 and torch.equal(ours, reference(agent, images))


def test_the_host_sends_bytes_in_the_processors_patch_order():
    im = noise_image(112, 56)
    cut = pixels.patches(im, 14, 2)                                  # [n, C, p*p]
    assert cut.dtype == torch.uint8 and cut.shape == (32, 3, 196) and cut.numel() == 112 * 56 * 3
    x = np.asarray(im)
    # patch 2 is the first merge window's second row, first column: pixels y 14..27, x 0..13
    assert torch.equal(cut[2, 1].reshape(14, 14), torch.from_numpy(x[14:28, 0:14, 1].copy()))
    # patch 4 opens the second window of the first window row: y 0..13, x 28..41
    assert torch.equal(cut[4, 0].reshape(14, 14), torch.from_numpy(x[0:14, 28:42, 0].copy()))
    with pytest.raises(ValueError, match="shown size"):
        pixels.patches(noise_image(57, 56), 14, 2)


def test_an_image_that_is_not_rgb_takes_the_processors_conversion():
    agent = Shim(REAL)
    rgba = np.random.default_rng(3).integers(0, 255, (56, 84, 4), dtype=np.uint8)
    images = [Image.fromarray(rgba, "RGBA"), noise_image(56, 56).convert("L")]
    assert torch.equal(pixels.pixel_values(agent, images), reference(agent, images))
    assert pixels.pixel_values(agent, []).shape == (0, 3 * 2 * 14 * 14)
    # the shown image of an in-memory RGBA original: alpha composited onto white, as a file's is (open_image)
    # and as qwen_vl_utils does (transformers' processor composites from 5.24 on; 5.17 dropped the alpha)
    shown = crop_tool.resize_to_budget(images[0], 3136, 84 * 56)
    alpha = rgba[:, :, 3:] / 255
    white = rgba[:, :, :3] * alpha + 255 * (1 - alpha)
    assert shown.mode == "RGB" and np.abs(np.asarray(shown, dtype=float) - white).max() <= 1


def test_a_processor_that_is_not_a_map_of_each_channels_byte_values_is_refused():
    class Positional(Qwen2VLImageProcessorPil):          # adds each patch's index
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            out["pixel_values"] = out["pixel_values"] + torch.arange(out["pixel_values"].shape[0])[:, None]
            return out

    class Swapped(Qwen2VLImageProcessorPil):             # reads the image as BGR
        def __call__(self, images, **kwargs):
            return super().__call__(images=[Image.fromarray(np.asarray(im)[:, :, ::-1].copy()) for im in images],
                                    **kwargs)
    for kind in (Positional, Swapped):
        with pytest.raises(ValueError, match="not a map"):
            pixels.table(kind(**models.QWEN_IMAGE_PROCESSOR))


def test_the_table_follows_the_processors_settings_and_device():
    ip = Qwen2VLImageProcessorPil(**models.QWEN_IMAGE_PROCESSOR)
    before = pixels.table(ip)
    ip.image_mean = [0.5, 0.5, 0.5]
    after = pixels.table(ip)
    assert not torch.equal(before, after) and torch.equal(after, pixels.table(ip, torch.device("cpu")))
    assert torch.equal(pixels.pixel_values(Shim(ip), [noise_image(56, 56)]), reference(Shim(ip), [noise_image(56, 56)]))
