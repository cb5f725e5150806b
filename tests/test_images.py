"""Preprocessing on real encoded files: modes, EXIF, transparency, and every kind of bad input."""

import numpy as np
import pytest
from PIL import Image

from pipeline.io.images import Rejected, decode_image
from tests.conftest import encode_image, png_header_only, rgb_image

RES = 16


def decode(data, **kw):
    args = dict(resolution=RES, max_pixels=10_000_000, min_side=8) | kw
    return decode_image(data, **args)


def test_output_is_square_uint8_rgb_and_reports_original_size():
    pixels, size = decode(encode_image(rgb_image(0, (40, 30)), "PNG"))
    assert pixels.shape == (RES, RES, 3) and pixels.dtype == np.uint8
    assert size == (40, 30)


def test_exif_orientation_is_applied_before_the_crop():
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)   # left half red
    stored[:, 20:] = (0, 0, 255)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6               # "rotate 90 degrees clockwise to display": left half ends up on top
    pixels, size = decode(encode_image(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95))
    assert size == (20, 40)
    top_right, bottom_left = pixels[2, 13].astype(int), pixels[13, 2].astype(int)
    assert top_right[0] > 200 and top_right[2] < 60      # red on top
    assert bottom_left[2] > 200 and bottom_left[0] < 60  # blue below


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    img = Image.new(mode, (20, 20), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    pixels, _ = decode(encode_image(img, "PNG"))
    assert (pixels == 255).all()


def test_palette_with_transparency_and_animated_gif_first_frame():
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    data = encode_image(red.convert("P"), "GIF", save_all=True, append_images=[blue.convert("P")])
    pixels, _ = decode(data)
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 60

    clear = Image.new("P", (20, 20), 0)
    clear.putpalette([0, 0, 0] * 256)
    pixels, _ = decode(encode_image(clear, "PNG", transparency=0))
    assert (pixels == 255).all()


def test_cmyk_16bit_grayscale_webp_and_bmp():
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    pixels, _ = decode(encode_image(cmyk, "JPEG", quality=95))
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 60

    grey16 = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    pixels, _ = decode(encode_image(grey16, "PNG"))
    assert abs(int(pixels.mean()) - 128) <= 2

    for fmt in ("WEBP", "BMP"):
        pixels, _ = decode(encode_image(rgb_image(1), fmt))
        assert pixels.shape == (RES, RES, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"this is a text file pretending to be a jpeg", "not_an_image"),
    (encode_image(rgb_image(2, (64, 64)), "JPEG")[:300], "corrupt_image"),
    (png_header_only(100_000, 100_000), "too_many_pixels"),
    (encode_image(rgb_image(3, (6, 30)), "PNG"), "too_small"),
])
def test_bad_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected) as err:
        decode(data)
    assert err.value.reason == reason
