"""The labelled sample grid (`pipelines.sample.grid_image`): every title and row label whole, in its own band."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.sample import LABEL_HEIGHT, MIN_CELL, _wrap, grid_image

LONG = "seed 0: a painting of a purple circle in the style of the training images, opdiff style"
WORD = "x" * 80  # wider than a cell: broken inside the word


def test_long_labels_wrap_into_a_taller_band_and_the_images_start_below_it():
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    grid = grid_image([(LONG, [red]), ("seed 1: short", [blue])], ["step 8"])
    font = ImageFont.load_default(size=11)
    draw = ImageDraw.Draw(grid)
    lines = _wrap(draw, LONG, font, MIN_CELL - 8)
    assert len(lines) > 1 and " ".join(lines) == LONG
    assert all(draw.textlength(line, font=font) <= MIN_CELL - 8 for line in lines)
    pixels = np.asarray(grid)
    first = LABEL_HEIGHT + LABEL_HEIGHT * len(lines)  # title band, then the label's lines
    assert grid.size == (MIN_CELL, first + MIN_CELL + LABEL_HEIGHT + MIN_CELL)
    assert (pixels[first:first + MIN_CELL] == (255, 0, 0)).all()  # the image is whole, under its label
    assert (pixels[first + MIN_CELL + LABEL_HEIGHT:] == (0, 0, 255)).all()


def test_a_word_wider_than_a_line_is_broken_and_kept_whole():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default(size=11)
    lines = _wrap(draw, f"seed 0: {WORD}", font, 100)
    assert "".join(lines).replace(" ", "") == f"seed0:{WORD}"
    assert all(draw.textlength(line, font=font) <= 100 for line in lines)
