"""The demo model's edit task: coloured shapes on a plain background, and the edit a prompt names.

Data (all procedural, drawn from a seed; nothing is downloaded):
- a scene is a 128x128 picture: a plain background (white, grey or black) and two or three shapes (square,
  circle, triangle), each of a different colour (red, green, blue, yellow, purple, orange), 22-40 px across,
  not touching each other or the border; drawn 4x supersampled and box-filtered, so edges are anti-aliased;
- an edit is one of: recolour every shape ("make the shapes blue", any of the six shape colours), recolour the
  background ("make the background black", one of the two other background colours), or no instruction (an
  empty prompt: the picture stays as it is). Which pixels change and to what follows from the prompt's last
  word and each pixel of the control image alone (shape colours are saturated, backgrounds are not): an edit
  a model of a few hundred thousand weights learns in an hour of CPU, and one it can only do by reading its
  prompt.

How the training uses these pairs for classifier-free guidance (`train.training_pairs`): some pairs have their
prompt dropped (the null prompt, target kept), so the negative prompt learns "some edit of this picture", and
some edit pairs keep the control image as their target (the edit not carried out), so that, as with real edit
models, the prompt alone under-commits and guidance makes the edit happen. With "keep the picture" as the only
null-prompt target, the unconditional prediction never follows a render that has settled on an edit, and
guidance 4 pushed every edit three or four times past its colour (the decoded renders were speckles).

An edit is judged from pixels (`edit_is_right`): the median colour of each region the edit names (every
shape, or the background), in the rendered picture scaled to the scene's size, must be nearest (in RGB) to the
colour the edit asks for among all the task's colours. `untouched_mask` is the region an edit must leave as it was (used for resemblance).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4

SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 85, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (245, 245, 240), "grey": (125, 125, 125), "black": (25, 25, 25)}
PALETTE = {**SHAPE_COLOURS, **BACKGROUNDS}
KINDS = ("square", "circle", "triangle")
EDITS = ("shapes", "background", "none")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    radius: float  # half the side of a square, the radius of a circle, circumradius-ish for a triangle


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def draw(self, size: int = SIZE) -> Image.Image:
        big = size * SUPERSAMPLE
        scale = big / SIZE
        im = Image.new("RGB", (big, big), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(im)
        for shape in self.shapes:
            if shape.kind == "circle":
                draw.ellipse(box(shape, scale), fill=SHAPE_COLOURS[shape.colour])
            else:
                draw.polygon(outline(shape, scale), fill=SHAPE_COLOURS[shape.colour])
        return im.resize((size, size), Image.Resampling.BOX)

    def mask(self, index: int, size: int = SIZE) -> np.ndarray:
        """Where shape `index` is (boolean, size x size)."""
        im = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(im)
        shape, scale = self.shapes[index], size / SIZE
        if shape.kind == "circle":
            draw.ellipse(box(shape, scale), fill=255)
        else:
            draw.polygon(outline(shape, scale), fill=255)
        return np.asarray(im) > 127

    def background_mask(self, size: int = SIZE) -> np.ndarray:
        covered = np.zeros((size, size), bool)
        for i in range(len(self.shapes)):
            covered |= self.mask(i, size)
        return ~covered


def box(shape: Shape, scale: float) -> tuple[float, float, float, float]:
    r = shape.radius * scale
    return (shape.cx * scale - r, shape.cy * scale - r, shape.cx * scale + r, shape.cy * scale + r)


def outline(shape: Shape, scale: float) -> list[tuple[float, float]]:
    x, y, r = shape.cx * scale, shape.cy * scale, shape.radius * scale
    if shape.kind == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    return [(x, y - r), (x + r, y + r * 0.85), (x - r, y + r * 0.85)]  # triangle, apex up


@dataclass(frozen=True)
class Edit:
    kind: str  # one of EDITS
    prompt: str
    target: Scene
    colour: str | None = None  # the colour the edited region must have afterwards


def random_scene(rng: random.Random) -> Scene:
    count = rng.choice((2, 2, 3))
    colours = rng.sample(sorted(SHAPE_COLOURS), count)
    shapes: list[Shape] = []
    while len(shapes) < count:
        radius = rng.uniform(11, 20)
        cx, cy = rng.uniform(radius + 6, SIZE - radius - 6), rng.uniform(radius + 6, SIZE - radius - 6)
        if all((cx - s.cx) ** 2 + (cy - s.cy) ** 2 > (radius + s.radius + 8) ** 2 for s in shapes):
            shapes.append(Shape(rng.choice(KINDS), colours[len(shapes)], cx, cy, radius))
    return Scene(rng.choice(sorted(BACKGROUNDS)), tuple(shapes))


def background_edit(scene: Scene, colour: str) -> Edit:
    return Edit("background", f"make the background {colour}", replace(scene, background=colour), colour=colour)


@dataclass(frozen=True)
class Favour:
    """Background edits drawn more often than `random_edit`'s weights give them: on a scene whose background is
    `source`, an edit is `make the background <target>` with chance `share` (`target` "any": one of the other
    two backgrounds, uniformly), else the usual draw. Parsed from `SOURCE:TARGET:SHARE`, e.g. `grey:white:0.3`."""

    source: str
    target: str
    share: float

    @classmethod
    def parse(cls, text: str) -> "Favour":
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"--favour {text!r}: expected SOURCE:TARGET:SHARE, e.g. grey:white:0.3")
        source, target, share = parts
        if source not in BACKGROUNDS or (target != "any" and target not in BACKGROUNDS) or target == source:
            raise ValueError(f"--favour {text!r}: SOURCE and TARGET are two different backgrounds of "
                             f"{sorted(BACKGROUNDS)} (TARGET may be 'any')")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--favour {text!r}: SHARE is a number in (0, 1]")
        return cls(source, target, value)


def random_edit(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = EDITS,
                weights: tuple[float, ...] = (0.45, 0.35, 0.2), favour: Favour | None = None) -> Edit:
    """One edit of `scene`: a kind drawn with `weights`, then its colour. With `favour` (see `Favour`) an edit
    of a scene on its source background is first drawn to be the favoured one; without it the draws are the
    same as they always were (the bundled model's data)."""
    if favour is not None and scene.background == favour.source and rng.random() < favour.share:
        others = [c for c in sorted(BACKGROUNDS) if c != scene.background]
        return background_edit(scene, rng.choice(others) if favour.target == "any" else favour.target)
    kind = rng.choices(kinds, weights=weights[: len(kinds)])[0]
    if kind == "none":
        return Edit("none", "", scene)
    if kind == "background":
        return background_edit(scene, rng.choice([c for c in sorted(BACKGROUNDS) if c != scene.background]))
    colour = rng.choice(sorted(SHAPE_COLOURS))  # shapes differ in colour: every choice changes one at least
    shapes = tuple(replace(s, colour=colour) for s in scene.shapes)
    return Edit(kind, f"make the shapes {colour}", replace(scene, shapes=shapes), colour=colour)


def edit_region(scene: Scene, edit: Edit, size: int = SIZE) -> np.ndarray:
    """The pixels an edit changes (boolean)."""
    if edit.kind == "shapes":
        return ~scene.background_mask(size)
    if edit.kind == "background":
        return scene.background_mask(size)
    return np.zeros((size, size), bool)


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, np.ones((3, 3), bool), iterations=pixels) if pixels else mask


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, np.ones((3, 3), bool), iterations=pixels) if pixels else mask


def untouched_mask(scene: Scene, edit: Edit, size: int = SIZE) -> np.ndarray:
    """Pixels the edit must leave as they were: everything but its region, kept 4 px (in any direction) clear
    of the region's edge, so no 7x7 SSIM window centred there reaches into the edited pixels."""
    return ~dilate(edit_region(scene, edit, size), 4)


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], float)
    return names[int(np.argmin(((table - rgb[None]) ** 2).sum(1)))]


def region_colour(image: Image.Image, mask: np.ndarray) -> str | None:
    """The palette colour nearest the median colour of `image` (scaled to the mask's size) over `mask`,
    kept 2 px inside the region; None when the region is too small to judge."""
    size = mask.shape[0]
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), float)
    inner = erode(mask, 2)
    if inner.sum() < 8:
        return None
    return nearest_colour(np.median(pixels[inner], axis=0))


def edit_is_right(render: Image.Image, scene: Scene, edit: Edit) -> bool:
    """Whether the render carries out the edit (see the module docstring)."""
    if edit.kind == "none":
        return all(region_colour(render, scene.mask(i)) == s.colour for i, s in enumerate(scene.shapes))
    if edit.kind == "shapes":
        return all(region_colour(render, scene.mask(i)) == edit.colour for i in range(len(scene.shapes)))
    return region_colour(render, edit_region(scene, edit)) == edit.colour


def resemblance(render: Image.Image, control: Image.Image, scene: Scene, edit: Edit) -> float:
    """Mean SSIM (colour, 7x7 windows, at the scene's size) between render and control over the untouched region."""
    from skimage.metrics import structural_similarity

    a = np.asarray(render.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    b = np.asarray(control.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    _, full = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    keep = untouched_mask(scene, edit)
    return float(full.mean(axis=2)[keep].mean())
