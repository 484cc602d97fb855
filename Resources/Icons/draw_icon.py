"""Draw the TransferSeg icon: a 3 x 3 x 3 voxel grid in isometric view, a segment in it coloured.

The grey voxels are the image, the green ones a segment; one voxel is orange, a label the model
learns anew. Writes ``TransferSeg.png`` (128 x 128, RGBA) here and in the module's resources::

    python Resources/Icons/draw_icon.py
"""

from pathlib import Path

import numpy as np
from matplotlib.image import imsave
from matplotlib.path import Path as Polygon

SIZE, SUPERSAMPLE, GRID = 128, 4, 3
SEGMENT = {(x, y, z) for x in (1, 2) for y in (1, 2) for z in (0, 1)} | {(2, 0, 0)}
NEW_LABEL = {(2, 2, 2)}
COLOURS = {"image": (0.72, 0.76, 0.82), "segment": (0.18, 0.66, 0.36),
           "new": (0.95, 0.55, 0.12)}
SHADES = {"top": 1.0, "left": 0.78, "right": 0.6}  # light from above and the left


def project(x: float, y: float, z: float, unit: float, centre: np.ndarray) -> np.ndarray:
    """Isometric projection of grid point (x, y, z) (z up) to pixel (column, row)."""
    column = (x - y) * unit * np.cos(np.pi / 6)
    row = (x + y) * unit * 0.5 - z * unit
    return centre + np.array([column, row])


def faces(x: int, y: int, z: int, unit: float, centre: np.ndarray) -> dict[str, np.ndarray]:
    """The three visible faces of voxel (x, y, z) as polygons (pixel corners)."""
    p = lambda a, b, c: project(a, b, c, unit, centre)  # noqa: E731
    return {
        "top": np.array([p(x, y, z + 1), p(x + 1, y, z + 1), p(x + 1, y + 1, z + 1),
                         p(x, y + 1, z + 1)]),
        "left": np.array([p(x, y + 1, z), p(x + 1, y + 1, z), p(x + 1, y + 1, z + 1),
                          p(x, y + 1, z + 1)]),
        "right": np.array([p(x + 1, y, z), p(x + 1, y + 1, z), p(x + 1, y + 1, z + 1),
                           p(x + 1, y, z + 1)]),
    }


def draw() -> np.ndarray:
    """The icon as a (128, 128, 4) float array in [0, 1]."""
    size = SIZE * SUPERSAMPLE
    canvas = np.zeros((size, size, 4))
    rows, columns = np.mgrid[:size, :size]
    pixels = np.column_stack([columns.ravel() + 0.5, rows.ravel() + 0.5])
    unit = size / 6.4  # the grid spans 6 units from its top corner to its bottom one
    centre = np.array([size / 2, size / 2])
    # Painter's order: far voxels first (small x + y), low before high.
    order = sorted(np.ndindex(GRID, GRID, GRID), key=lambda v: (v[0] + v[1], v[2]))
    for voxel in order:
        kind = "new" if voxel in NEW_LABEL else "segment" if voxel in SEGMENT else "image"
        alpha = 1.0 if kind != "image" else 0.4
        for face, corners in faces(*voxel, unit, centre).items():
            inside = Polygon(corners).contains_points(pixels).reshape(size, size)
            colour = np.array(COLOURS[kind]) * SHADES[face]
            canvas[inside, :3] = canvas[inside, :3] * (1 - alpha) + colour * alpha
            canvas[inside, 3] = canvas[inside, 3] * (1 - alpha) + alpha
            edge = Polygon(corners).contains_points(pixels, radius=-SUPERSAMPLE * 1.6)
            outline = inside & ~edge.reshape(size, size)
            canvas[outline] = (0.16, 0.2, 0.26, 1.0)
    # Average each SUPERSAMPLE x SUPERSAMPLE block: smooth edges.
    blocks = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 4)
    alpha = blocks[..., 3].mean(axis=(1, 3))
    colour = (blocks[..., :3] * blocks[..., 3:]).mean(axis=(1, 3)) / np.maximum(alpha, 1e-6)[
        ..., None]
    return np.clip(np.dstack([colour, alpha]), 0, 1)


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    icon = draw()
    for target in (root / "Resources" / "Icons" / "TransferSeg.png",
                   root / "TransferSeg" / "Resources" / "Icons" / "TransferSeg.png"):
        target.parent.mkdir(parents=True, exist_ok=True)
        imsave(target, icon)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
