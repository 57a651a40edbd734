"""Procedurally drawn aerial scenes for five remote-sensing classes.

The tutorial's dataset (airplane, bridge, palace, ship, stadium) cannot ship with this
package, so this module paints small stand-ins with numpy and Pillow: each image is a
textured, cluttered ground seen from above with one object in it, at a random position,
angle, scale and colour. Palettes overlap between classes and water, roofs, roads and
trees turn up in every class's background, so a classifier has to learn the object's
*shape*; mean colour alone is a poor guess.

Everything is drawn at twice the target size and box-downsampled for cheap antialiasing.
Each image has its own random generator derived from ``(seed, class index, image index)``,
so the same seed always gives byte-identical files and asking for more images per class
leaves the earlier ones unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

CLASSES: tuple[str, ...] = ("airplane", "bridge", "palace", "ship", "stadium")

MIN_SIZE = 32
FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}

Color = tuple[int, int, int]
BBox = tuple[int, int, int, int]

# Palettes are deliberately broad and overlapping (grey roofs, grey decks, grey hulls,
# green fields, green water...) so that no class owns a colour.
GROUND: tuple[Color, ...] = (
    (86, 112, 62),  # grass
    (62, 88, 50),  # dark vegetation
    (138, 134, 86),  # dry grass
    (122, 98, 72),  # bare soil
    (182, 168, 132),  # sand
    (128, 128, 122),  # urban grey
    (158, 156, 148),  # concrete
    (104, 100, 92),  # dark urban
)
FIELDS: tuple[Color, ...] = (
    (96, 128, 64),
    (150, 140, 80),
    (120, 100, 70),
    (170, 160, 110),
    (80, 104, 60),
    (140, 120, 90),
)
WATER: tuple[Color, ...] = (
    (38, 66, 104),  # deep blue
    (34, 84, 98),  # teal
    (60, 88, 78),  # green-grey
    (92, 94, 78),  # murky
    (28, 40, 58),  # dark
    (72, 108, 136),  # light blue
    (100, 110, 104),  # silty grey
)
PAVEMENT: tuple[Color, ...] = (
    (92, 92, 92),
    (70, 72, 75),
    (112, 110, 104),
    (150, 150, 144),
    (170, 160, 140),
)
ROOFS: tuple[Color, ...] = (
    (170, 72, 52),  # terracotta
    (122, 122, 128),  # slate
    (84, 132, 112),  # copper green
    (200, 182, 142),  # sandstone
    (64, 82, 132),  # blue
    (220, 214, 200),  # pale
    (140, 102, 72),  # brown
    (90, 90, 95),  # dark grey
)
PAINT: tuple[Color, ...] = (
    (236, 236, 236),
    (200, 202, 208),
    (160, 164, 170),
    (64, 92, 160),
    (178, 62, 52),
    (92, 102, 74),
    (82, 82, 88),
    (210, 190, 150),
)
TRACK: tuple[Color, ...] = (
    (180, 82, 62),
    (62, 100, 160),
    (72, 130, 82),
    (190, 170, 140),
    (122, 122, 122),
)
TURF: tuple[Color, ...] = (
    (70, 130, 60),
    (92, 140, 70),
    (60, 110, 56),
    (150, 130, 90),  # dirt field
    (110, 150, 90),
)


def _jit(rng: np.random.Generator, color: Color, amount: float = 16.0) -> Color:
    """A colour near ``color``: one shared brightness shift plus a little per-channel noise."""
    shift = rng.normal(0.0, amount) + rng.normal(0.0, amount / 3, 3)
    r, g, b = np.clip(np.asarray(color, np.float64) + shift, 0, 255).astype(int)
    return int(r), int(g), int(b)


def _pick(rng: np.random.Generator, palette: Sequence[Color], amount: float = 16.0) -> Color:
    return _jit(rng, palette[int(rng.integers(len(palette)))], amount)


def _shade(color: Color, factor: float) -> Color:
    r, g, b = (int(min(255, max(0, round(c * factor)))) for c in color)
    return r, g, b


def _luma(color: Sequence[float]) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _stand_out(color: Color, img: Image.Image, bbox: BBox, gap: float = 50.0) -> Color:
    """Shift ``color``'s brightness away from that of the ground under ``bbox``.

    Palettes overlap on purpose, but a grey plane on grey tarmac is nearly invisible at
    64 px and makes the label guesswork; real objects are rarely that well camouflaged.
    """
    ground = _luma(np.asarray(img.crop(bbox), np.float32).reshape(-1, 3).mean(axis=0))
    diff = _luma(color) - ground
    if abs(diff) >= gap:
        return color
    # Go lighter unless there is no headroom (or the colour is already darker and can go on).
    lighter = ground + gap <= 235 and (diff >= 0 or ground - gap < 20)
    shift = (ground + gap if lighter else ground - gap) - _luma(color)
    r, g, b = (int(min(255, max(0, round(c + shift)))) for c in color)
    return r, g, b


# ----------------------------------------------------------------------------- geometry


def _rect(cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """Axis-aligned rectangle (in local coordinates) as a 4x2 array of corners."""
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 36) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _stadium_shape(a: float, b: float, n: int = 18) -> np.ndarray:
    """Rectangle with semicircular ends: half-length ``a`` along x, half-width ``b``."""
    straight = max(a - b, 0.0)
    t = np.linspace(-math.pi / 2, math.pi / 2, n)
    right = np.stack([straight + b * np.cos(t), b * np.sin(t)], axis=1)
    left = np.stack([-straight - b * np.cos(t), -b * np.sin(t)], axis=1)
    return np.concatenate([right, left])


def _wobbly_band(
    rng: np.random.Generator, length: float, half_width: float, amp: float, n: int = 40
) -> np.ndarray:
    """A band along the y axis whose centre line and banks meander a little."""
    y = np.linspace(-length, length, n)
    phase, freq = rng.uniform(0, 2 * math.pi, 2), rng.uniform(0.6, 2.0, 2) * math.pi / length
    centre = amp * np.sin(freq[0] * y + phase[0])
    width = half_width * (1 + 0.12 * np.sin(freq[1] * 3 * y + phase[1]))
    left = np.stack([centre - width, y], axis=1)
    right = np.stack([centre + width, y], axis=1)[::-1]
    return np.concatenate([left, right])


class _Frame:
    """Maps an object's local coordinates (about one unit across) onto canvas pixels."""

    def __init__(self, angle: float, scale: float, offset: np.ndarray) -> None:
        c, s = math.cos(angle), math.sin(angle)
        self.matrix = np.array([[c, -s], [s, c]]) * scale
        self.scale = scale
        self.offset = np.asarray(offset, np.float64)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, np.float64) @ self.matrix.T + self.offset


def _frame_angle(frame: _Frame) -> float:
    """Rotation angle of a frame, in radians."""
    return math.atan2(frame.matrix[1, 0], frame.matrix[0, 0])


def _place(
    rng: np.random.Generator, parts: Sequence[np.ndarray], s: int, lo: float = 0.35, hi: float = 0.6
) -> tuple[_Frame, BBox]:
    """Choose a random angle, scale and position for an object made of ``parts``.

    The rotated object's longest side spans ``lo..hi`` of the canvas and it stays inside a
    small margin; returns the frame and the object's box in canvas pixels.
    """
    pts = np.concatenate(parts)
    angle = rng.uniform(0.0, 2 * math.pi)
    unit = _Frame(angle, 1.0, np.zeros(2))(pts)
    mins, maxs = unit.min(axis=0), unit.max(axis=0)
    scale = rng.uniform(lo, hi) * s / float((maxs - mins).max())
    margin = 0.04 * s
    off = np.array(
        [rng.uniform(margin - mins[i] * scale, s - margin - maxs[i] * scale) for i in range(2)]
    )
    frame = _Frame(angle, scale, off)
    canvas = frame(pts)
    x0, y0 = np.floor(canvas.min(axis=0)).astype(int)
    x1, y1 = np.ceil(canvas.max(axis=0)).astype(int)
    return frame, (max(int(x0), 0), max(int(y0), 0), min(int(x1), s), min(int(y1), s))


def _flat(pts: np.ndarray) -> list[float]:
    return pts.ravel().tolist()


# ----------------------------------------------------------------------------- texture


def _fbm(rng: np.random.Generator, s: int, rough: float, finest: int = 48) -> Image.Image:
    """Fractal noise as an 8-bit mask of side ``s``.

    Octaves are summed on a small grid and upsampled once, which costs far less than
    upsampling every octave to full size; ``rough`` is the amplitude kept per octave.
    """
    grid = rng.random((3, 3), dtype=np.float32)
    cells, amp = 3, 1.0
    while cells < finest:
        cells, amp = cells * 2, amp * rough
        up = np.asarray(Image.fromarray(grid).resize((cells, cells), Image.Resampling.BICUBIC))
        grid = up + amp * rng.random((cells, cells), dtype=np.float32)
    lo, hi = float(grid.min()), float(grid.max())
    small = ((grid - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    return Image.fromarray(small, "L").resize((s, s), Image.Resampling.BICUBIC)


def _texture(rng: np.random.Generator, s: int, c1: Color, c2: Color, rough: float) -> Image.Image:
    """Two colours blended by fractal noise."""
    a, b = Image.new("RGB", (s, s), c1), Image.new("RGB", (s, s), c2)
    return Image.composite(b, a, _fbm(rng, s, rough))


def _water_texture(rng: np.random.Generator, s: int) -> Image.Image:
    base = _pick(rng, WATER, 12)
    return _texture(rng, s, _shade(base, 0.85), _shade(base, 1.12), rng.uniform(0.35, 0.55))


def _paste_water(
    img: Image.Image, rng: np.random.Generator, polys: Sequence[np.ndarray], bank: bool = True
) -> None:
    """Fill ``polys`` (canvas coordinates) with a water texture, with an optional shoreline."""
    s = img.size[0]
    mask = Image.new("L", img.size, 0)
    mdraw = ImageDraw.Draw(mask)
    for poly in polys:
        mdraw.polygon(_flat(poly), fill=255)
    if bank and rng.random() < 0.6:
        # A thin rim of sand, mud or stone reads as a shoreline or embankment from above.
        rim = mask.copy()
        rdraw = ImageDraw.Draw(rim)
        for poly in polys:
            rdraw.polygon(_flat(poly), outline=255, width=max(2, s // 64))
        edge = _pick(rng, (*GROUND[3:5], *PAVEMENT[2:4]), 12)
        img.paste(Image.new("RGB", img.size, edge), (0, 0), rim)
    img.paste(_water_texture(rng, s), (0, 0), mask)


def _water_shape(rng: np.random.Generator, s: int, kind: str) -> np.ndarray:
    """A random river, lake or coast polygon in canvas coordinates."""
    centre = rng.uniform(0, s, 2)
    if kind == "lake":
        n = 28
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        r = rng.uniform(0.12, 0.3) * s * (1 + 0.18 * np.sin(3 * t + rng.uniform(0, 6)))
        r *= 1 + rng.normal(0, 0.05, n)
        ratio = rng.uniform(0.5, 1.0)
        return np.stack([centre[0] + r * np.cos(t), centre[1] + ratio * r * np.sin(t)], axis=1)
    frame = _Frame(rng.uniform(0, 2 * math.pi), float(s), centre)
    if kind == "river":
        return frame(_wobbly_band(rng, 1.6, rng.uniform(0.06, 0.16), rng.uniform(0.0, 0.08)))
    # Coast: a wobbly shoreline with the sea on one side.
    y = np.linspace(-1.6, 1.6, 30)
    x = rng.uniform(0.01, 0.05) * np.sin(rng.uniform(2, 6) * y + rng.uniform(0, 6))
    shore = np.stack([x, y], axis=1)
    far = np.array([[3.0, 1.6], [3.0, -1.6]])
    return frame(np.concatenate([shore, far]))


# ----------------------------------------------------------------------------- background


def _background(
    rng: np.random.Generator, s: int, avoid: BBox | None, water_prob: float = 0.3
) -> Image.Image:
    """Ground texture with fields, roads, buildings, trees and sometimes water.

    ``avoid`` is the object's box: background water is kept off it so the object never sits
    in a lake, but any other clutter may run underneath (the object is drawn on top).
    """
    c1 = _pick(rng, GROUND, 14)
    c2 = _pick(rng, GROUND, 14) if rng.random() < 0.6 else _shade(c1, rng.uniform(0.8, 1.2))
    img = _texture(rng, s, c1, c2, rng.uniform(0.45, 0.75))
    draw = ImageDraw.Draw(img)

    if rng.random() < 0.4:  # patchwork of fields on a rotated grid
        fields = img.copy()
        fdraw = ImageDraw.Draw(fields)
        frame = _Frame(rng.uniform(0, math.pi), s * rng.uniform(0.14, 0.32), rng.uniform(0, s, 2))
        n = math.ceil(1.5 * s / frame.scale)
        ij = np.stack(np.meshgrid(np.arange(-n, n), np.arange(-n, n)), -1).reshape(-1, 2) + 0.5
        centres = frame(ij)
        # Only the parcels that can touch the canvas are worth drawing.
        near = ((centres > -0.8 * frame.scale) & (centres < s + 0.8 * frame.scale)).all(axis=1)
        for cx, cy in ij[near]:
            if rng.random() < 0.35:
                continue
            parcel = _rect(cx, cy, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
            fdraw.polygon(_flat(frame(parcel)), fill=_pick(rng, FIELDS, 18))
        # Seen from altitude, crops differ subtly; full-strength parcels would out-shout objects.
        img = Image.blend(img, fields, rng.uniform(0.35, 0.75))
        draw = ImageDraw.Draw(img)

    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):  # roads and tracks
        frame = _Frame(rng.uniform(0, math.pi), float(s), rng.uniform(0, s, 2))
        line = frame(np.array([[-1.6, 0.0], [1.6, 0.0]]))
        width = max(2, int(s * rng.uniform(0.012, 0.045)))
        draw.line(_flat(line), fill=_pick(rng, PAVEMENT + GROUND[3:5], 10), width=width)

    if rng.random() < 0.3:  # scattered small buildings, mostly sharing one street grid angle
        angle = rng.uniform(0, math.pi)
        for _ in range(int(rng.integers(4, 22))):
            a = angle + (rng.normal(0, 0.6) if rng.random() < 0.3 else 0.0)
            frame = _Frame(a, s * rng.uniform(0.02, 0.05), rng.uniform(0, s, 2))
            pts = frame(_rect(0, 0, 1.0, rng.uniform(0.5, 1.0)))
            draw.polygon(_flat(pts), fill=_pick(rng, ROOFS, 14))

    if rng.random() < 0.55:  # clumps of trees
        for _ in range(int(rng.integers(1, 5))):
            cx, cy = rng.uniform(0, s, 2)
            spread = s * rng.uniform(0.03, 0.15)
            base = _pick(rng, ((44, 70, 40), (60, 86, 46), (36, 56, 36)), 8)
            for _ in range(int(rng.integers(5, 30))):
                x, y = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
                r = s * rng.uniform(0.008, 0.025)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=_jit(rng, base, 8))

    if avoid is not None and rng.random() < water_prob:
        x0, y0, x1, y1 = avoid
        pad = int(0.03 * s)
        for _ in range(6):  # a few tries to find water that keeps clear of the object
            poly = _water_shape(rng, s, str(rng.choice(["river", "lake", "coast"])))
            mask = Image.new("L", (s, s), 0)
            ImageDraw.Draw(mask).polygon(_flat(poly), fill=255)
            m = np.asarray(mask)
            if not m[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad].any() and m.any():
                _paste_water(img, rng, [poly])
                break
    return img


def _pad(
    img: Image.Image, rng: np.random.Generator, frame: _Frame, half: tuple[float, float]
) -> None:
    """A paved or gravel area under the object (apron, forecourt, car park)."""
    draw = ImageDraw.Draw(img)
    grow = rng.uniform(1.1, 1.6)
    angle = 0.0 if rng.random() < 0.6 else rng.uniform(-0.5, 0.5)
    local = _rect(*rng.normal(0, 0.05, 2), 2 * half[0] * grow, 2 * half[1] * grow)
    c, s_ = math.cos(angle), math.sin(angle)
    local = local @ np.array([[c, -s_], [s_, c]]).T
    draw.polygon(_flat(frame(local)), fill=_pick(rng, PAVEMENT, 14))


def _shadow(
    img: Image.Image,
    polys: Sequence[np.ndarray],
    offset: np.ndarray,
    strength: float,
) -> None:
    """Darken the ground under ``polys`` shifted by ``offset`` (canvas coordinates)."""
    mask = Image.new("L", img.size, 0)
    mdraw = ImageDraw.Draw(mask)
    for poly in polys:
        mdraw.polygon(_flat(poly + offset), fill=255)
    dark = ImageEnhance.Brightness(img).enhance(1.0 - strength)
    img.paste(dark, (0, 0), mask)


def _sun(rng: np.random.Generator, frame: _Frame, height: float) -> np.ndarray:
    """Shadow offset in canvas pixels for an object ``height`` local units tall."""
    a = rng.uniform(0, 2 * math.pi)
    return np.array([math.cos(a), math.sin(a)]) * height * frame.scale


def _line(draw: ImageDraw.ImageDraw, pts: np.ndarray, color: Color, width: float) -> None:
    draw.line(_flat(pts), fill=color, width=max(1, round(width)))


def _pitched_roof(
    draw: ImageDraw.ImageDraw, frame: _Frame, cx: float, cy: float, w: float, h: float, c: Color
) -> None:
    """A wing with a ridge along its long axis: two halves lit differently."""
    light, dark = _shade(c, 1.12), _shade(c, 0.84)
    if w >= h:
        draw.polygon(_flat(frame(_rect(cx, cy - h / 4, w, h / 2))), fill=light)
        draw.polygon(_flat(frame(_rect(cx, cy + h / 4, w, h / 2))), fill=dark)
    else:
        draw.polygon(_flat(frame(_rect(cx - w / 4, cy, w / 2, h))), fill=light)
        draw.polygon(_flat(frame(_rect(cx + w / 4, cy, w / 2, h))), fill=dark)


# ----------------------------------------------------------------------------- classes


def _airplane(rng: np.random.Generator, s: int) -> tuple[Image.Image, BBox]:
    fw = rng.uniform(0.055, 0.08)  # fuselage half-width
    span = rng.uniform(0.38, 0.55)  # half-span
    sweep = math.tan(rng.uniform(0.2, 0.65))
    root = rng.uniform(0.22, 0.32)
    tip = root * rng.uniform(0.3, 0.55)
    wx = rng.uniform(-0.02, 0.1)  # wing root position along the fuselage

    xs = np.linspace(-0.5, 0.5, 25)
    half = np.full_like(xs, fw)
    nose = xs > 0.33
    half[nose] = fw * np.sqrt(np.clip(1 - ((xs[nose] - 0.33) / 0.17) ** 2, 0.02, 1))
    tail = xs < -0.25
    half[tail] = fw * (0.3 + 0.7 * (xs[tail] + 0.5) / 0.25)
    body = np.concatenate([np.stack([xs, half], 1), np.stack([xs, -half], 1)[::-1]])

    def wing(
        x: float, y0: float, half_span: float, c_root: float, c_tip: float
    ) -> list[np.ndarray]:
        le_tip = x + c_root / 2 - half_span * sweep
        top = np.array(
            [
                [x + c_root / 2, y0],
                [le_tip, half_span],
                [le_tip - c_tip, half_span],
                [x - c_root / 2, y0],
            ]
        )
        return [top, top * np.array([1.0, -1.0])]

    wings = wing(wx, fw * 0.8, span, root, tip)
    ts = rng.uniform(0.15, 0.22)
    tails = wing(-0.42, fw * 0.5, ts, rng.uniform(0.08, 0.11), 0.04)
    engines: list[np.ndarray] = []
    n_eng = int(rng.choice([0, 2, 2, 4]))
    for k in range(n_eng // 2):
        y = span * (0.35 if n_eng == 2 else (0.3, 0.62)[k])
        x = wx + root / 2 - y * sweep + 0.02
        for sign in (1.0, -1.0):
            engines.append(_ellipse(x, sign * y, 0.055, 0.022, 16))

    frame, bbox = _place(rng, [body, *wings, *tails], s, 0.4)
    img = _background(rng, s, bbox)
    if rng.random() < 0.7:  # apron with a taxi line
        _pad(img, rng, frame, (0.6, span + 0.05))
        if rng.random() < 0.6:
            yellow = _jit(rng, (200, 170, 60), 20)
            line = frame(np.array([[-2.0, 0.0], [2.0, 0.0]]) + rng.normal(0, 0.03, 2))
            _line(ImageDraw.Draw(img), line, yellow, frame.scale * 0.012)
    parts = [*wings, *tails, body]
    canvas = [frame(p) for p in parts]
    _shadow(img, canvas, _sun(rng, frame, rng.uniform(0.03, 0.08)), rng.uniform(0.3, 0.55))

    draw = ImageDraw.Draw(img)
    # Most aircraft are painted light; dark ones stay possible but rarer.
    paint = _pick(rng, PAINT[:3] if rng.random() < 0.55 else PAINT, 12)
    paint = _stand_out(paint, img, bbox)
    # Wings usually match the fuselage: the cross-shaped silhouette is what says 'aircraft'.
    wing_c = paint if rng.random() < 0.85 else _stand_out(_pick(rng, PAINT, 12), img, bbox)
    for p in wings + tails:
        draw.polygon(_flat(frame(p)), fill=wing_c)
    for e in engines:
        draw.polygon(_flat(frame(e)), fill=_shade(wing_c, 0.75))
    draw.polygon(_flat(frame(body)), fill=paint)
    if rng.random() < 0.5:  # livery stripe along the spine
        stripe = _pick(rng, PAINT, 20)
        _line(draw, frame(np.array([[-0.45, 0.0], [0.4, 0.0]])), stripe, frame.scale * fw * 0.7)
    fin = frame(np.array([[-0.49, 0.0], [-0.36, 0.0]]))
    _line(draw, fin, _shade(paint, 0.7), frame.scale * fw * 0.5)
    draw.polygon(_flat(frame(_ellipse(0.44, 0.0, 0.025, fw * 0.6, 12))), fill=(40, 44, 52))
    return img, bbox


def _bridge(rng: np.random.Generator, s: int) -> tuple[Image.Image, BBox]:
    hw = rng.uniform(0.04, 0.07)  # deck half-width
    river = rng.uniform(0.2, 0.33)  # river half-width, always less than the deck's half-length
    deck = _rect(0, 0, 1.0, 2 * hw)
    frame, bbox = _place(rng, [deck], s, 0.45, 0.62)
    img = _background(rng, s, bbox, water_prob=0.15)
    draw = ImageDraw.Draw(img)

    far = 2.5 * s / frame.scale  # long enough to cross the whole canvas
    road_c = _pick(rng, PAVEMENT, 12)
    if rng.random() < 0.75:  # approach roads carry on beyond the banks
        for sign in (1.0, -1.0):
            road = np.array([[sign * 0.45, 0.0], [sign * far, 0.0]])
            _line(draw, frame(road), road_c, frame.scale * 2 * hw * rng.uniform(0.6, 1.0))
    band = _wobbly_band(rng, far, river, rng.uniform(0.0, 0.03))
    _paste_water(img, rng, [frame(band)])

    draw = ImageDraw.Draw(img)
    span = _rect(0, 0, 2 * river * 1.1, 2 * hw)
    _shadow(img, [frame(span)], _sun(rng, frame, rng.uniform(0.04, 0.1)), rng.uniform(0.3, 0.5))
    deck_c = _stand_out(_pick(rng, (*PAVEMENT, (170, 92, 62), (120, 138, 158)), 12), img, bbox)
    draw.polygon(_flat(frame(deck)), fill=deck_c)
    rail = _shade(deck_c, rng.choice([0.7, 1.25]))
    for y in (-hw, hw):
        _line(draw, frame(np.array([[-0.5, y], [0.5, y]])), rail, frame.scale * hw * 0.3)
    if rng.random() < 0.5:  # dashed centre line
        for x in np.arange(-0.45, 0.45, 0.08):
            seg = np.array([[x, 0.0], [x + 0.04, 0.0]])
            _line(draw, frame(seg), (220, 220, 210), frame.scale * hw * 0.15)
    if rng.random() < 0.4:  # towers of a suspension or cable-stayed span
        tower = _shade(deck_c, 0.8)
        for x in (-river * 0.6, river * 0.6):
            draw.polygon(_flat(frame(_rect(x, 0, 0.04, 2 * hw * 1.5))), fill=tower)
    for _ in range(int(rng.integers(0, 6))):  # traffic
        x, y = rng.uniform(-0.45, 0.45), rng.choice([-1, 1]) * hw * 0.45
        car = _rect(x, y, 0.035, hw * 0.6)
        draw.polygon(_flat(frame(car)), fill=_pick(rng, PAINT, 20))
    return img, bbox


def _palace(rng: np.random.Generator, s: int) -> tuple[Image.Image, BBox]:
    depth = rng.uniform(0.5, 0.95)
    t = rng.uniform(0.14, 0.21)  # wing thickness
    # Closed courtyards are the most palatial and the least like anything else here.
    layout = str(rng.choice(["ring", "ring", "ring2", "ring2", "E", "U", "H"]))
    hx, hy = 0.5, depth / 2
    wings: list[tuple[float, float, float, float]] = []  # (cx, cy, w, h) in local units
    court: np.ndarray | None = None
    if layout in ("ring", "ring2"):
        wings = [
            (0, -hy + t / 2, 1.0, t),
            (0, hy - t / 2, 1.0, t),
            (-hx + t / 2, 0, t, depth),
            (hx - t / 2, 0, t, depth),
        ]
        court = _rect(0, 0, 1.0 - t, depth - t)
        if layout == "ring2":  # a cross wing splits the courtyard in two
            wings.append((0, 0, t, depth))
    elif layout in ("E", "U"):
        wings = [(0, -hy + t / 2, 1.0, t)]
        xs = (-hx + t / 2, hx - t / 2) if layout == "U" else (-hx + t / 2, 0.0, hx - t / 2)
        wings += [(x, 0, t, depth) for x in xs]
    else:
        wings = [(-hx + t / 2, 0, t, depth), (hx - t / 2, 0, t, depth), (0, 0, 1.0, t)]
    garden_d = rng.uniform(0.18, 0.32) if rng.random() < 0.75 else 0.0
    garden = _rect(0, hy + 0.03 + garden_d / 2, 0.8, garden_d) if garden_d else None

    outline = [_rect(*w) for w in wings]
    extent = [*outline, *([garden] if garden is not None else [])]
    frame, bbox = _place(rng, extent, s, 0.42)
    img = _background(rng, s, bbox)
    if rng.random() < 0.3:  # gravel forecourt / grounds
        _pad(img, rng, frame, (0.55, hy + garden_d / 2 + 0.08))
    draw = ImageDraw.Draw(img)

    if garden is not None:  # formal parterre: lawns split by a cross of paths, a fountain
        lawn = _pick(rng, TURF, 12)
        path = _pick(rng, PAVEMENT[2:], 10)
        draw.polygon(_flat(frame(garden)), fill=path)
        gy = hy + 0.03 + garden_d / 2
        qw, qh = 0.8 / 2 - 0.03, garden_d / 2 - 0.03
        for sx in (-1, 1):
            for sy in (-1, 1):
                q = _rect(sx * (qw / 2 + 0.015), gy + sy * (qh / 2 + 0.015), qw, qh)
                draw.polygon(_flat(frame(q)), fill=lawn)
        r = min(0.05, garden_d / 4)
        draw.polygon(_flat(frame(_ellipse(0, gy, r, r, 20))), fill=_pick(rng, WATER, 10))

    offset = _sun(rng, frame, rng.uniform(0.03, 0.07))
    _shadow(img, [frame(p) for p in outline], offset, rng.uniform(0.3, 0.5))
    draw = ImageDraw.Draw(img)
    if court is not None:
        # Mostly paved courts, so a palace ring is not a stadium's green-in-a-ring.
        court_c = _pick(rng, TURF if rng.random() < 0.3 else PAVEMENT[1:], 14)
        draw.polygon(_flat(frame(court)), fill=court_c)
    roof = _stand_out(_pick(rng, ROOFS, 12), img, bbox)
    for w in wings:
        _pitched_roof(draw, frame, *w, roof)
    if rng.random() < 0.6:  # central pavilion, sometimes domed
        py = -hy + t / 2
        pav_c = _pick(rng, ROOFS, 12)
        _pitched_roof(draw, frame, 0, py, t * 1.8, t * 1.6, pav_c)
        if rng.random() < 0.5:
            dome = _ellipse(0, py, t * 0.6, t * 0.6, 20)
            draw.polygon(_flat(frame(dome)), fill=_shade(pav_c, 1.2))
    return img, bbox


def _ship(rng: np.random.Generator, s: int) -> tuple[Image.Image, BBox]:
    beam = rng.uniform(0.13, 0.2)
    bow = rng.uniform(0.08, 0.25)  # where the bow taper starts
    xs = np.linspace(-0.5, 0.5, 31)
    half = np.full_like(xs, beam / 2)
    fore = xs > bow
    half[fore] *= 1 - ((xs[fore] - bow) / (0.5 - bow)) ** rng.uniform(1.4, 2.4)
    aft = xs < -0.44
    half[aft] *= np.sqrt(np.clip(1 - ((xs[aft] + 0.44) / 0.07) ** 2 * 0.5, 0.2, 1))
    hull = np.concatenate([np.stack([xs, half], 1), np.stack([xs, -half], 1)[::-1]])

    frame, bbox = _place(rng, [hull], s)
    img = _background(rng, s, None)
    centre = frame(np.zeros((1, 2)))[0]
    sea = str(rng.choice(["open", "open", "coast", "river"]))
    if sea == "open":
        _paste_water(img, rng, [np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float64)], False)
        if rng.random() < 0.4:  # a bit of land or a pier in a corner, clear of the ship
            land = Image.new("L", img.size, 0)
            ImageDraw.Draw(land).polygon(_flat(_water_shape(rng, s, "coast")), fill=255)
            if not np.asarray(land)[bbox[1] : bbox[3], bbox[0] : bbox[2]].any():
                g = _pick(rng, GROUND, 14)
                img.paste(_texture(rng, s, g, _shade(g, 0.85), 0.6), (0, 0), land)
        polys: list[np.ndarray] = []
    elif sea == "coast":
        # Shoreline behind the ship, sea on the ship's side.
        normal = rng.uniform(0, 2 * math.pi)
        dist = frame.scale * 0.6 + rng.uniform(0, 0.2) * s
        n = np.array([math.cos(normal), math.sin(normal)])
        frame_c = _Frame(normal, float(s), centre - n * dist)
        y = np.linspace(-1.6, 1.6, 30)
        x = rng.uniform(0.0, 0.03) * np.sin(rng.uniform(2, 6) * y + rng.uniform(0, 6))
        polys = [frame_c(np.concatenate([np.stack([x, y], 1), [[3.0, 1.6], [3.0, -1.6]]]))]
    else:  # ships sail along rivers, unlike a bridge which crosses one
        river = _Frame(_frame_angle(frame) + math.pi / 2, frame.scale, centre)
        band = _wobbly_band(rng, 2.5 * s / frame.scale, beam * rng.uniform(2.0, 4.0), 0.0)
        polys = [river(band)]
    if polys:
        _paste_water(img, rng, polys)

    if rng.random() < 0.6:  # wake: a V of foam behind the stern, laid over the water
        over = Image.new("RGBA", img.size, (0, 0, 0, 0))
        odraw = ImageDraw.Draw(over)
        length = rng.uniform(0.4, 1.2)
        spread = length * math.tan(math.radians(rng.uniform(12, 22)))
        foam = (230, 236, 238, int(rng.integers(70, 150)))
        for sign in (1.0, -1.0):
            arm = np.array([[-0.45, sign * beam / 2], [-0.45 - length, sign * (beam / 2 + spread)]])
            odraw.line(_flat(frame(arm)), fill=foam, width=max(1, round(frame.scale * 0.012)))
        churn = np.array(
            [
                [-0.48, beam * 0.3],
                [-0.5 - length * 0.4, beam * 0.5],
                [-0.5 - length * 0.4, -beam * 0.5],
                [-0.48, -beam * 0.3],
            ]
        )
        odraw.polygon(_flat(frame(churn)), fill=(foam[0], foam[1], foam[2], foam[3] // 3))
        img.paste(Image.alpha_composite(img.convert("RGBA"), over).convert("RGB"))

    _shadow(img, [frame(hull)], _sun(rng, frame, rng.uniform(0.01, 0.04)), rng.uniform(0.3, 0.5))
    draw = ImageDraw.Draw(img)
    hull_c = _stand_out(_pick(rng, PAINT, 12), img, bbox)
    draw.polygon(_flat(frame(hull)), fill=hull_c)
    deck = hull * np.array([0.96, 0.78])
    deck_c = _pick(rng, PAVEMENT + PAINT[:3] + ((150, 60, 50), (90, 110, 80)), 12)
    draw.polygon(_flat(frame(deck)), fill=deck_c)
    kind = str(rng.choice(["cargo", "tanker", "liner", "plain"]))
    if kind == "cargo":
        for x in np.arange(-0.3, bow, 0.07):
            for y in (-beam * 0.2, beam * 0.2):
                box = _rect(x + 0.03, y, 0.06, beam * 0.36)
                draw.polygon(_flat(frame(box)), fill=_pick(rng, PAINT + ROOFS, 20))
    elif kind == "tanker":
        pipe = np.array([[-0.32, 0.0], [bow + 0.05, 0.0]])
        _line(draw, frame(pipe), _shade(deck_c, 0.7), frame.scale * beam * 0.08)
        for x in np.linspace(-0.25, bow, 4):
            r = beam * 0.14
            draw.polygon(_flat(frame(_ellipse(x, 0, r, r, 12))), fill=_shade(deck_c, 1.2))
    elif kind == "liner":
        top = hull * np.array([0.7, 0.6]) + np.array([-0.05, 0.0])
        draw.polygon(_flat(frame(top)), fill=_pick(rng, PAINT[:3], 8))
    bridge_c = _pick(rng, PAINT[:3], 8)
    draw.polygon(_flat(frame(_rect(-0.38, 0, 0.1, beam * 0.75))), fill=bridge_c)
    draw.polygon(_flat(frame(_rect(-0.42, 0, 0.03, beam * 0.22))), fill=(40, 40, 44))
    return img, bbox


def _stadium(rng: np.random.Generator, s: int) -> tuple[Image.Image, BBox]:
    a = 0.5
    b = rng.uniform(0.28, 0.4)
    stands = rng.uniform(0.05, 0.09) if rng.random() < 0.65 else 0.0
    tw = rng.uniform(0.06, 0.1)
    outer = _stadium_shape(a, b)
    frame, bbox = _place(rng, [outer], s)
    img = _background(rng, s, bbox)
    if rng.random() < 0.5:  # car park
        _pad(img, rng, frame, (a + 0.05, b + 0.05))
    if stands:
        off = _sun(rng, frame, rng.uniform(0.02, 0.05))
        _shadow(img, [frame(outer)], off, rng.uniform(0.3, 0.5))
    draw = ImageDraw.Draw(img)

    if stands:
        stand_c = _stand_out(_pick(rng, PAVEMENT + ROOFS[:2] + PAINT[3:5], 14), img, bbox)
        draw.polygon(_flat(frame(outer)), fill=stand_c)
        for k in range(16):  # aisles between seating blocks
            ang = 2 * math.pi * k / 16
            ray = np.array([[0.0, 0.0], [math.cos(ang) * 2, math.sin(ang) * 2]])
            ray = np.clip(ray, [-a, -b], [a, b])
            _line(draw, frame(ray), _shade(stand_c, 0.75), frame.scale * 0.006)
    ta, tb = a - stands, b - stands
    track_c = _pick(rng, TRACK, 14)
    if not stands:
        track_c = _stand_out(track_c, img, bbox)
    draw.polygon(_flat(frame(_stadium_shape(ta, tb))), fill=track_c)
    lane = _jit(rng, (225, 225, 220), 10)
    for k in range(1, 4):
        d = tw * k / 4
        ring = frame(_stadium_shape(ta - d, tb - d))
        _line(draw, np.concatenate([ring, ring[:1]]), lane, frame.scale * 0.004)
    fa, fb = ta - tw, tb - tw
    turf = _pick(rng, TURF, 12)
    draw.polygon(_flat(frame(_stadium_shape(fa, fb))), fill=turf)

    pl, pw = max(fa - fb * 0.3, fb), fb * 0.85  # pitch half-length / half-width
    n = int(rng.integers(6, 12))
    for k in range(n):  # mowing stripes
        x0 = -pl + 2 * pl * k / n
        stripe = _rect(x0 + pl / n, 0, 2 * pl / n, 2 * pw)
        draw.polygon(_flat(frame(stripe)), fill=_shade(turf, 1.1 if k % 2 else 0.93))
    white = (235, 235, 230)
    box = _rect(0, 0, 2 * pl, 2 * pw)
    lw = frame.scale * 0.006
    _line(draw, frame(np.concatenate([box, box[:1]])), white, lw)
    _line(draw, frame(np.array([[0.0, -pw], [0.0, pw]])), white, lw)
    circle = _ellipse(0, 0, pw * 0.35, pw * 0.35, 24)
    _line(draw, frame(np.concatenate([circle, circle[:1]])), white, lw)
    return img, bbox


_DRAWERS: dict[str, Callable[[np.random.Generator, int], tuple[Image.Image, BBox]]] = {
    "airplane": _airplane,
    "bridge": _bridge,
    "palace": _palace,
    "ship": _ship,
    "stadium": _stadium,
}


# ----------------------------------------------------------------------------- public API


def _check_class(cls: str) -> None:
    if cls not in _DRAWERS:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join(CLASSES)}")


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")


def _finish(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera effects: exposure and white balance, haze, slight blur, sensor noise."""
    if rng.random() < 0.35:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = np.asarray(img, np.float32)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    arr = arr * gain + np.float32(rng.uniform(-12, 12))
    if rng.random() < 0.3:
        haze = np.float32(rng.uniform(0.05, 0.25))
        arr = arr * (1 - haze) + haze * np.asarray(_pick(rng, PAINT[:3], 10), np.float32)
    # Mostly luminance noise, as from a sensor; one channel is also a third of the cost.
    sigma = np.float32(rng.uniform(2.0, 7.0))
    arr += sigma * rng.standard_normal((*arr.shape[:2], 1), dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def render_scene(
    cls: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Return an RGB image of `size` x `size` and the object's bounding box.

    The box is ``(x0, y0, x1, y1)`` in pixels, with ``0 <= x0 < x1 <= size`` (likewise y).
    """
    _check_class(cls)
    _check_size(size)
    canvas, (x0, y0, x1, y1) = _DRAWERS[cls](rng, 2 * size)
    img = _finish(canvas.resize((size, size), Image.Resampling.BOX), rng)
    bbox = (x0 // 2, y0 // 2, min(size, (x1 + 1) // 2), min(size, (y1 + 1) // 2))
    return img, bbox


def image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """The generator for one image, independent of how many images each class gets."""
    return np.random.default_rng(np.random.SeedSequence([seed, class_index, image_index]))


def generate(
    dst: str | Path,
    per_class: int = 100,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    fmt: str = "png",
) -> dict[str, int]:
    """Write DST/CLASS/CLASS_0001.png ... (raw one-folder-per-class layout).

    Returns the number of images written per class. ``fmt`` is ``"png"`` or ``"jpg"``
    (quality 90).
    """
    if isinstance(classes, str):
        classes = (classes,)
    for cls in classes:
        _check_class(cls)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat, got {list(classes)}")
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    _check_size(size)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    ext = FORMATS.get(fmt.lower())
    if ext is None:
        raise ValueError(f"unknown format {fmt!r}; expected 'png' or 'jpg'")

    root = Path(dst)
    counts: dict[str, int] = {}
    for cls in classes:
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        # The index into CLASSES (not into ``classes``) keeps a class's images the same
        # whichever subset of classes is generated.
        ci = CLASSES.index(cls)
        for i in range(per_class):
            img, _ = render_scene(cls, size, image_rng(seed, ci, i))
            path = folder / f"{cls}_{i + 1:04d}.{ext}"
            # Fixed options and no metadata, so equal seeds give byte-identical files.
            if ext == "png":
                img.save(path, format="PNG", compress_level=1)
            else:
                img.save(path, format="JPEG", quality=90, subsampling=0)
        counts[cls] = per_class
    return counts


def generate_mosaic(
    dst: str | Path,
    rows: int,
    cols: int,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> list[tuple[int, int, str]]:
    """Write one large scene of ``rows`` x ``cols`` built-in scenes of random classes on a grid
    (``DST/mosaic.png``) and its truth (``DST/mosaic.csv``: row, col, class); returns the truth.

    Its scenes are drawn with image indexes from 1,000,000 on, so none of them is among the
    images :func:`generate` writes with the same seed: a model trained on those maps unseen
    scenes.
    """
    for cls in classes:
        _check_class(cls)
    _check_size(size)
    if rows < 1 or cols < 1:
        raise ValueError(f"a mosaic needs at least 1x1 scenes, got {rows}x{cols}")
    pick = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1]))
    canvas = Image.new("RGB", (cols * size, rows * size))
    truth = []
    for r in range(rows):
        for c in range(cols):
            cls = classes[int(pick.integers(len(classes)))]
            rng = image_rng(seed, CLASSES.index(cls), 1_000_000 + r * cols + c)
            canvas.paste(render_scene(cls, size, rng)[0], (c * size, r * size))
            truth.append((r, c, cls))
    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    canvas.save(root / "mosaic.png", format="PNG", compress_level=1)
    lines = ["row,col,class", *(f"{r},{c},{cls}" for r, c, cls in truth)]
    (root / "mosaic.csv").write_text("\n".join(lines) + "\n")
    return truth
