"""The vision demo's task (`verl-mega demo --task vision`): count the squares of one colour in a drawn image.

    image:   a white canvas of 56, 84 or 112 pixels a side with 1-4 coloured squares
    prompt:  "<image>How many red squares?"   (verl's multimodal format: one <image> marker per image)
    answer:  "0" .. "4"                       (one token of the tiny character tokenizer)

Why this task fits a tiny VLM on 2 CPU cores: the canvas is a grid of 28x28 pixel cells, one per image
token (patch 14, 2x2 merge), and each square lies inside one cell, so "is this token red" is a local
feature the vision tower reads from one merged patch; the language model then counts matching tokens
among at most 16 (4x4 cells on 112 pixels). Square sizes and positions inside their cells are random,
so no two images of a count look alike.

- Generator: seeded (`random.Random(seed)`), so every rank and every run draws the same rows; scenes are
  unique across train and held-out (the held-out split is never trained on).
- Rows: verl's parquet format (`prompt`, `images` = [{"bytes": png}], `data_source`,
  `reward_model.ground_truth`, `extra_info`), written with `write_parquet` so that the demo reads them
  through `RLDataset` like any multimodal data set.
- Reward: exact match of the stripped response with the answer digit (verl's compute_score signature).

Images are drawn with PIL (`ImageDraw.rectangle`); resizing and normalisation are left to the model's
image processor.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

DATA_SOURCE = "vision_count"
CELL = 28  # pixels per cell = patch 14 x merge 2: one image token per cell
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SIZES = (56, 84, 112)  # canvas sides: 2x2, 3x3, 4x4 cells = 4, 9, 16 image tokens
MIN_SIDE = 12  # smallest square side, pixels (the largest fills its cell but for a 2-pixel margin)


@dataclass(frozen=True)
class Square:
    cell: int  # index of the cell, row-major
    colour: str
    side: int  # pixels
    dx: int  # offset inside the cell, pixels
    dy: int


@dataclass(frozen=True)
class Scene:
    size: int  # canvas side, pixels
    squares: tuple[Square, ...]
    asked: str  # the colour the question asks about

    @property
    def answer(self) -> str:
        return str(sum(s.colour == self.asked for s in self.squares))

    @property
    def question(self) -> str:
        return f"<image>How many {self.asked} squares?"


def random_scene(rng: random.Random, *, sizes: tuple[int, ...] = SIZES, max_squares: int = 4,
                 colours: tuple[str, ...] = tuple(COLOURS), asked: tuple[str, ...] = ("red",)) -> Scene:
    """One scene: a canvas side from `sizes`, 1..max_squares squares in distinct cells, colours from
    `colours`, a question about a colour from `asked`. The answer (the asked colour's count) is drawn
    first, uniformly from 0..min(max_squares, cells), then the number of squares from count..max, the
    others in the other colours: every answer is equally likely (a constant guess scores 1/5)."""
    size = rng.choice(sizes)
    most = min(max_squares, (size // CELL) ** 2)
    target = rng.choice(asked)
    others = [c for c in colours if c != target]
    if not others:
        raise ValueError(f"colours {colours} must hold a colour besides the asked {target!r}")
    count = rng.randint(0, most)
    n = rng.randint(max(count, 1), most)
    palette = [target] * count + [rng.choice(others) for _ in range(n - count)]
    rng.shuffle(palette)
    squares = []
    for cell, colour in zip(sorted(rng.sample(range((size // CELL) ** 2), n)), palette):
        side = rng.randint(MIN_SIDE, CELL - 4)
        squares.append(Square(cell, colour, side, rng.randint(2, CELL - 2 - side), rng.randint(2, CELL - 2 - side)))
    return Scene(size, tuple(squares), target)


def draw(scene: Scene):
    """The scene as an RGB `PIL.Image` (white background, filled squares)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.size, scene.size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    per_row = scene.size // CELL
    for s in scene.squares:
        x0 = (s.cell % per_row) * CELL + s.dx
        y0 = (s.cell // per_row) * CELL + s.dy
        pen.rectangle((x0, y0, x0 + s.side - 1, y0 + s.side - 1), fill=COLOURS[s.colour])
    return image


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def to_row(scene: Scene, index: int, split: str) -> dict:
    """A verl-format multimodal row of the scene (the image as PNG bytes)."""
    return {"prompt": [{"role": "user", "content": scene.question}], "images": [{"bytes": png_bytes(draw(scene))}],
            "data_source": DATA_SOURCE, "reward_model": {"ground_truth": scene.answer, "style": "rule"},
            "extra_info": {"split": split, "index": index, "size": scene.size, "squares": len(scene.squares),
                           "asked": scene.asked}}


def make_vision_task(seed: int = 0, num_train: int = 2000, num_heldout: int = 200, **scene_kw
                     ) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of distinct scenes, drawn with `random.Random(seed)`; `scene_kw` go to
    `random_scene` (sizes, max_squares, colours, asked)."""
    if num_train < 1 or num_heldout < 1:
        raise ValueError(f"num_train and num_heldout must be >= 1, got {num_train} and {num_heldout}")
    rng = random.Random(seed)
    scenes: dict[Scene, None] = {}  # insertion-ordered set
    for _ in range(100 * (num_train + num_heldout)):
        scenes[random_scene(rng, **scene_kw)] = None
        if len(scenes) == num_train + num_heldout:
            break
    else:
        raise ValueError(f"could not draw {num_train + num_heldout} distinct scenes with {scene_kw}")
    ordered = list(scenes)
    heldout, train = ordered[:num_heldout], ordered[num_heldout:]
    return [to_row(s, i, "train") for i, s in enumerate(train)], [to_row(s, i, "test") for i, s in enumerate(heldout)]


def write_parquet(rows: list[dict], path: str) -> str:
    """Write rows as verl's multimodal parquet (images: list<struct<bytes: binary>>); returns `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def answer(row: dict) -> str:
    return row["reward_model"]["ground_truth"]


def compute_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the response, stripped of whitespace, is exactly the answer digit, else 0.0."""
    return float(solution_str.strip() == str(ground_truth))
