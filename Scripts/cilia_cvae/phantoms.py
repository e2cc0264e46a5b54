"""Synthetic TEM crops of cilia cross sections: anatomy, defects and the microscope's look.

A phantom is made in three steps, each a plain function:
1. `sample_cilium` lays out the axoneme in nanometres: a wavy
   membrane, nine doublets (A and B tubules) on a ring, outer and inner dynein arms,
   radial spokes with heads, nexin links and the central pair with bridge, projections and
   sheath; then the class's defect changes that structure, and nothing else.
2. `draw_density` draws that layout as a stain-density map (0 empty, ~0.85 densest) with
   Pillow polygons, through an affine view that rotates, stretches (oblique cut), mirrors
   and scales it into the crop, at a supersampled size that is reduced to the crop size.
3. `apply_microscope` turns density into an 8-bit micrograph: stained-matrix texture,
   blur, exponential absorption, mottling, shot noise, grain, contrast and gamma, and
   sometimes JPEG compression.

Every random choice comes from one generator seeded by (seed, class name, image number),
so any image can be rendered again alone, in any order, in any process. The camera
settings (size, zoom, blur, noise, contrast) are drawn the same way for every class, so a
model can only tell the classes apart by their anatomy.

Coordinates are screen coordinates (x to the right, y down), so a growing angle turns
clockwise on screen: a cilium is drawn as seen from base to tip, with the dynein arms
pointing clockwise, and the view mirrors half of them.
"""

import functools
import io
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cilia_cvae.files import atomic_path, sha256_of_file

# Share of each class in a dataset. Normal crops dominate real collections; among the
# defects, outer-arm loss is the most common ultrastructural finding in PCD, disarrangement
# (MTD with IDA loss) and central-pair defects follow, and isolated inner-arm loss is rare.
CLASS_PROPORTIONS = {
    "five": {"Normal": 0.40, "Disarranged": 0.17, "ODA": 0.20, "IDA": 0.10, "CP": 0.13},
    "ten": {
        "Normal": 0.34,
        "ODA": 0.14,
        "ODA_IDA": 0.10,
        "IDA": 0.05,
        "Disarranged": 0.07,
        "IDA_Disarranged": 0.08,
        "Microtub Abnorm": 0.06,
        "No CP": 0.06,
        "CP 2": 0.04,
        "Subtle CP": 0.06,
    },
}

# Stain density of each structure: darker structures absorb more electrons.
DENSITY = {
    "membrane": 0.86,
    "membrane_middle": 0.55,
    "coat": 0.40,
    "matrix": 0.24,
    "central_matrix": 0.32,
    "tubule_wall": 0.88,
    "a_lumen": 0.42,
    "b_lumen": 0.26,
    "central_lumen": 0.40,
    "outer_arm": 0.90,
    "inner_arm": 0.78,
    "spoke": 0.52,
    "spoke_head": 0.64,
    "nexin": 0.44,
    "bridge": 0.70,
    "projection": 0.68,
    "sheath": 0.56,
    "microvillus_core": 0.28,
}

# Geometry in nanometres, from published axoneme dimensions.
DOUBLET_RING_RADIUS = 86.0
A_TUBULE_RADIUS = 12.5
B_TUBULE_RADIUS = 13.5
TUBULE_WALL = 5.0
A_TO_B_DISTANCE = 14.0
CENTRAL_TUBULE_RADIUS = 12.5
CENTRAL_PAIR_HALF_DISTANCE = 15.5
SPOKE_HEAD_INSET = 44.0  # from the A tubule's centre toward the cilium's centre
# Centre lines of the dynein arms in the doublet's frame, as (clockwise, outward) offsets from
# the A tubule's centre, with half-widths: the outer arm is a hook ~24 nm long curling toward
# the next doublet's B tubule, the inner arm a shorter, fainter hook on the inner face.
OUTER_ARM_PATH = np.array([(-2.0, 10.0), (0.0, 16.5), (4.5, 21.5), (11.0, 23.5), (17.5, 21.5), (21.0, 17.5)])
OUTER_ARM_HALF_WIDTHS = np.array([5.6, 5.4, 5.0, 4.6, 4.0, 3.4])
INNER_ARM_PATH = np.array([(-2.0, -10.0), (1.5, -16.0), (7.5, -19.0), (14.0, -17.5)])
INNER_ARM_HALF_WIDTHS = np.array([5.0, 4.8, 4.4, 3.8])


@dataclass
class Doublet:
    centre: np.ndarray  # nm, in the cilium's frame
    angle: float  # direction (radians) the doublet faces outward; arms and spokes follow it
    tilt: float  # the A-B axis turns inward from the tangent by this much (radians)
    present: bool = True
    has_b_tubule: bool = True
    outer_arm: float = 1.0  # 1 full density, 0 absent
    inner_arm: float = 1.0

    def frame(self):
        """Unit vectors (clockwise tangent, outward radial) of the doublet."""
        outward = np.array([math.cos(self.angle), math.sin(self.angle)])
        clockwise = np.array([-outward[1], outward[0]])
        return clockwise, outward

    def a_tubule_centre(self):
        clockwise, outward = self.frame()
        axis = math.cos(self.tilt) * clockwise - math.sin(self.tilt) * outward
        return self.centre + 0.5 * A_TO_B_DISTANCE * axis

    def b_tubule_centre(self):
        clockwise, outward = self.frame()
        axis = math.cos(self.tilt) * clockwise - math.sin(self.tilt) * outward
        return self.centre - 0.5 * A_TO_B_DISTANCE * axis

    def place(self, offsets):
        """Points given as (clockwise, outward) offsets from the A tubule, in the cilium's frame."""
        clockwise, outward = self.frame()
        return self.a_tubule_centre() + offsets[:, :1] * clockwise + offsets[:, 1:] * outward


@dataclass
class Cilium:
    membrane_radius: float  # nm, mean radius of the membrane's outer face
    membrane_thickness: float
    membrane_harmonics: list  # (order, relative amplitude, phase) of the membrane's waviness
    doublets: list
    central_tubules: list = field(default_factory=list)  # centres in nm
    central_angle: float = 0.0  # direction of the line through the central pair
    central_bridge: bool = True
    central_projections: bool = True
    sheath_centre: np.ndarray = None  # None when the central sheath is absent
    transposed_doublet: Doublet = None  # 8+1: a peripheral doublet moved into the centre
    displacements: list = field(default_factory=list)  # nm each displaced doublet moved (tests)


def class_names(scheme):
    return list(CLASS_PROPORTIONS[scheme])


def class_counts(num_images, scheme):
    """Split `num_images` over the scheme's classes by its proportions (largest remainder)."""
    proportions = CLASS_PROPORTIONS[scheme]
    exact = {name: num_images * share for name, share in proportions.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(proportions, key=lambda name: (counts[name] - exact[name], -proportions[name]))
    for name in by_remainder[: num_images - sum(counts.values())]:
        counts[name] += 1
    # Small datasets (tests, quick trials) still get every class: the largest gives way.
    for name in proportions:
        if counts[name] == 0:
            counts[max(counts, key=counts.get)] -= 1
            counts[name] = 1
    return counts


def phantom_rng(seed, class_name, number):
    """The one random generator of image `number` of a class: independent of every other image."""
    class_key = zlib.crc32(class_name.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, class_key, number]))


# ----------------------------------------------------------------------------------------
# 1. Anatomy and defects
# ----------------------------------------------------------------------------------------


def sample_normal_cilium(rng):
    # Diameter 236-260 nm: a little above the usual 200-250 so that, as in real sections, a
    # pale band separates the outer arms' tips from the membrane instead of merging with it.
    membrane_radius = rng.uniform(118.0, 130.0)
    harmonics = [(order, rng.uniform(0.0, 0.035), rng.uniform(0, 2 * math.pi)) for order in (2, 3, 4)]
    # Nine lobes where the membrane drapes over the doublets and their outer arms (which
    # reach ~12 degrees clockwise of a doublet's centre), plus fine ripples.
    harmonics.append((9, rng.uniform(0.0, 0.045), -9 * math.radians(12.0)))
    harmonics += [(order, rng.uniform(0.0, 0.005), rng.uniform(0, 2 * math.pi)) for order in range(11, 24, 3)]
    ring_radius = DOUBLET_RING_RADIUS * rng.uniform(0.96, 1.04)
    doublets = []
    for index in range(9):
        angle = index * 2 * math.pi / 9 + rng.normal(0.0, 0.025)
        radius = ring_radius + rng.normal(0.0, 1.2)
        doublets.append(
            Doublet(
                centre=radius * np.array([math.cos(angle), math.sin(angle)]),
                angle=angle + rng.normal(0.0, 0.04),
                tilt=math.radians(rng.uniform(10.0, 20.0)),
                outer_arm=rng.uniform(0.9, 1.0),
                inner_arm=rng.uniform(0.85, 1.0),
            )
        )
    central_angle = rng.uniform(0, math.pi)
    centre = rng.normal(0.0, 1.5, size=2)
    axis = np.array([math.cos(central_angle), math.sin(central_angle)])
    return Cilium(
        membrane_radius=membrane_radius,
        membrane_thickness=rng.uniform(7.0, 8.0),
        membrane_harmonics=harmonics,
        doublets=doublets,
        central_tubules=[
            centre + CENTRAL_PAIR_HALF_DISTANCE * axis,
            centre - CENTRAL_PAIR_HALF_DISTANCE * axis,
        ],
        central_angle=central_angle,
        sheath_centre=centre.copy(),
    )


def choose_doublets(rng, low, high):
    """Indices of `low` to `high` (inclusive) of the nine doublets, drawn without repeats."""
    return rng.choice(9, size=rng.integers(low, high + 1), replace=False)


def fade_one_arm(rng, cilium):
    """Normal: occasionally one arm is faint, as sectioning sometimes makes it."""
    if rng.random() < 0.1:
        doublet = cilium.doublets[rng.integers(9)]
        if rng.random() < 0.5:
            doublet.outer_arm *= 0.5
        else:
            doublet.inner_arm *= 0.4


def remove_outer_arms(rng, cilium):
    for index in choose_doublets(rng, 7, 9):
        cilium.doublets[index].outer_arm = 0.0


def remove_inner_arms(rng, cilium):
    """IDA defect: inner arms absent on most doublets, or faint to the point of absence."""
    for index in choose_doublets(rng, 7, 9):
        cilium.doublets[index].inner_arm = 0.0 if rng.random() < 0.75 else rng.uniform(0.0, 0.2)


def displace_doublets(rng, cilium):
    """Disarrangement: 1-3 doublets pushed 10-40 nm out of the ring or turned, one maybe lost."""
    chosen = rng.choice(9, size=rng.integers(1, 4), replace=False)
    for order, index in enumerate(chosen):
        doublet = cilium.doublets[index]
        # The first displacement is large enough to be seen at 128 px; the others vary freely.
        distance = rng.uniform(25.0, 40.0) if order == 0 else rng.uniform(10.0, 40.0)
        clockwise, outward = doublet.frame()
        # Displaced doublets mostly fall inward, toward the central apparatus, or slide sideways.
        direction_angle = rng.uniform(math.radians(100), math.radians(260))
        shift = distance * (math.cos(direction_angle) * outward + math.sin(direction_angle) * clockwise)
        doublet.centre = doublet.centre + shift
        doublet.angle += rng.uniform(-1.2, 1.2)
        cilium.displacements.append(distance)
    if rng.random() < 0.3:
        cilium.doublets[rng.choice([i for i in range(9) if i not in chosen])].present = False


def shift_central_pair(rng, cilium, low, high):
    offset_angle = rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(low, high) * np.array([math.cos(offset_angle), math.sin(offset_angle)])
    cilium.central_tubules = [centre + offset for centre in cilium.central_tubules]
    cilium.sheath_centre = None


def remove_central_pair(cilium):
    cilium.central_tubules = []
    cilium.sheath_centre = None


def transpose_doublet(rng, cilium):
    """8+1: a peripheral doublet is missing from the ring and sits in the centre instead."""
    index = rng.integers(9)
    cilium.doublets[index].present = False
    remove_central_pair(cilium)
    cilium.transposed_doublet = Doublet(
        centre=rng.normal(0.0, 3.0, size=2),
        angle=rng.uniform(0, 2 * math.pi),
        tilt=math.radians(15.0),
        outer_arm=0.0,
        inner_arm=0.0,
    )


def single_central_tubule(rng, cilium):
    cilium.central_tubules = [rng.normal(0.0, 3.0, size=2)]
    cilium.central_bridge = False
    cilium.sheath_centre = None


def disarrange(rng, cilium, lose_inner_arms_probability):
    displace_doublets(rng, cilium)
    if rng.random() < lose_inner_arms_probability:
        remove_inner_arms(rng, cilium)
    outcome = rng.random()
    if outcome < 0.25:
        remove_central_pair(cilium)
    elif outcome < 0.65:
        shift_central_pair(rng, cilium, 10.0, 25.0)


def central_pair_defect(rng, cilium):
    kind = rng.choice(["absent", "transposition", "single", "eccentric"], p=[0.4, 0.2, 0.2, 0.2])
    if kind == "absent":
        remove_central_pair(cilium)
    elif kind == "transposition":
        transpose_doublet(rng, cilium)
    elif kind == "single":
        single_central_tubule(rng, cilium)
    else:
        shift_central_pair(rng, cilium, 22.0, 32.0)


def microtubule_abnormality(rng, cilium):
    """Singlets (B tubules missing) on some doublets, or a doublet missing from a regular ring."""
    if rng.random() < 0.6:
        for index in choose_doublets(rng, 2, 4):
            cilium.doublets[index].has_b_tubule = False
    else:
        cilium.doublets[rng.integers(9)].present = False


def subtle_central_pair_defect(rng, cilium):
    """A central pair that is there but wrong: one tubule, or off-centre without a sheath."""
    if rng.random() < 0.5:
        single_central_tubule(rng, cilium)
    else:
        shift_central_pair(rng, cilium, 15.0, 25.0)
    cilium.central_projections = False


def disarranged_five(rng, cilium):
    """Five-class "Disarranged" pools microtubular disorganisation with and without IDA loss."""
    disarrange(rng, cilium, lose_inner_arms_probability=0.6)


def disarranged_ten(rng, cilium):
    """Ten-class "Disarranged" keeps the inner arms: their loss is "IDA_Disarranged"."""
    disarrange(rng, cilium, lose_inner_arms_probability=0.0)


def disarranged_without_inner_arms(rng, cilium):
    disarrange(rng, cilium, lose_inner_arms_probability=1.0)


def remove_both_arms(rng, cilium):
    remove_outer_arms(rng, cilium)
    remove_inner_arms(rng, cilium)


DEFECTS = {
    "five": {
        "Normal": fade_one_arm,
        "Disarranged": disarranged_five,
        "ODA": remove_outer_arms,
        "IDA": remove_inner_arms,
        "CP": central_pair_defect,
    },
    "ten": {
        "Normal": fade_one_arm,
        "ODA": remove_outer_arms,
        "ODA_IDA": remove_both_arms,
        "IDA": remove_inner_arms,
        "Disarranged": disarranged_ten,
        "IDA_Disarranged": disarranged_without_inner_arms,
        "Microtub Abnorm": microtubule_abnormality,
        "No CP": lambda rng, cilium: remove_central_pair(cilium),
        "CP 2": transpose_doublet,
        "Subtle CP": subtle_central_pair_defect,
    },
}


def sample_cilium(rng, scheme, class_name):
    cilium = sample_normal_cilium(rng)
    DEFECTS[scheme][class_name](rng, cilium)
    return cilium


# ----------------------------------------------------------------------------------------
# 2. Drawing: nanometre layout -> stain density on the crop's pixel grid
# ----------------------------------------------------------------------------------------


@dataclass
class View:
    """The affine map from a cilium's nanometre frame to canvas pixels."""

    matrix: np.ndarray  # 2x2, canvas pixels per nm, with rotation, oblique stretch and mirror
    offset: np.ndarray  # canvas pixel where the cilium's centre lands

    def to_canvas(self, points):
        return (np.asarray(points) @ self.matrix.T + self.offset).ravel().tolist()


def rotation_matrix(angle):
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def make_view(pixels_per_nm, rotation, stretch, stretch_angle, mirror, offset):
    """An oblique cut elongates the section along one direction by `stretch` (1.0-1.3)."""
    elongation = rotation_matrix(stretch_angle) @ np.diag([stretch, 1.0]) @ rotation_matrix(-stretch_angle)
    mirroring = np.diag([-1.0, 1.0]) if mirror else np.eye(2)
    matrix = pixels_per_nm * mirroring @ rotation_matrix(rotation) @ elongation
    return View(matrix=matrix, offset=np.asarray(offset, dtype=float))


@functools.cache
def unit_circle(count):
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    return np.stack([np.cos(turns), np.sin(turns)], axis=1)


def ellipse(centre, radius, count=28, minor_radius=None, angle=0.0):
    local = unit_circle(count) * np.array([radius, minor_radius or radius])
    if angle:
        local = local @ rotation_matrix(angle).T
    return np.asarray(centre) + local


def band(path, half_widths, samples=16):
    """A polygon of varying width around a centre line (arms, spokes, links)."""
    path = np.asarray(path, dtype=float)
    half_widths = np.broadcast_to(np.asarray(half_widths, dtype=float), (len(path),))
    knots = np.linspace(0.0, 1.0, len(path))
    steps = np.linspace(0.0, 1.0, samples)
    line = np.stack([np.interp(steps, knots, path[:, axis]) for axis in (0, 1)], axis=1)
    widths = np.interp(steps, knots, half_widths)
    tangents = np.gradient(line, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
    return np.concatenate([line + normals * widths[:, None], (line - normals * widths[:, None])[::-1]])


# The arms' outlines in the doublet's frame, computed once.
OUTER_ARM_OUTLINE = band(OUTER_ARM_PATH, OUTER_ARM_HALF_WIDTHS)
INNER_ARM_OUTLINE = band(INNER_ARM_PATH, INNER_ARM_HALF_WIDTHS)


def segment(start, end, half_width):
    along = end - start
    across = np.array([-along[1], along[0]]) * (half_width / np.linalg.norm(along))
    return np.array([start + across, end + across, end - across, start - across])


def membrane_outline(cilium, inset, count=240):
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    relative = np.ones(count)
    for order, amplitude, phase in cilium.membrane_harmonics:
        relative += amplitude * np.cos(order * turns + phase)
    radius = cilium.membrane_radius * relative - inset
    return np.stack([radius * np.cos(turns), radius * np.sin(turns)], axis=1)


def faded(density_name, strength, background="matrix"):
    """Density of a structure drawn at `strength` (0-1) over the matrix around it."""
    return DENSITY[background] + strength * (DENSITY[density_name] - DENSITY[background])


def draw_doublet_tubules(polygon, doublet):
    a_centre = doublet.a_tubule_centre()
    if doublet.has_b_tubule:
        # The B tubule is an incomplete ring closed by the A tubule's wall: drawn first, the A
        # tubule covers half of it and leaves the familiar crescent on its side.
        b_centre = doublet.b_tubule_centre()
        polygon(ellipse(b_centre, B_TUBULE_RADIUS), DENSITY["tubule_wall"])
        polygon(ellipse(b_centre, B_TUBULE_RADIUS - TUBULE_WALL), DENSITY["b_lumen"])
    polygon(ellipse(a_centre, A_TUBULE_RADIUS), DENSITY["tubule_wall"])
    polygon(ellipse(a_centre, A_TUBULE_RADIUS - TUBULE_WALL), DENSITY["a_lumen"])


def draw_cilium(draw, cilium, view):
    """Paint one cilium, back to front, so that denser structures lie on top."""

    def polygon(points, density):
        draw.polygon(view.to_canvas(points), fill=float(density))

    thickness = cilium.membrane_thickness
    # A faint fuzzy coat (glycocalyx) outside; then the membrane, a bilayer: two dense leaflets
    # around a paler middle.
    polygon(membrane_outline(cilium, -6.0), DENSITY["coat"])
    polygon(membrane_outline(cilium, 0.0), DENSITY["membrane"])
    polygon(membrane_outline(cilium, thickness * 0.36), DENSITY["membrane_middle"])
    polygon(membrane_outline(cilium, thickness * 0.64), DENSITY["membrane"])
    polygon(membrane_outline(cilium, thickness), DENSITY["matrix"])

    if cilium.sheath_centre is not None:
        polygon(ellipse(cilium.sheath_centre, 39.0, count=40), DENSITY["sheath"])
        polygon(ellipse(cilium.sheath_centre, 34.5, count=40), DENSITY["central_matrix"])

    doublets = cilium.doublets
    for doublet in doublets:
        if not doublet.present:
            continue
        _, outward = doublet.frame()
        a_centre = doublet.a_tubule_centre()
        head = a_centre - SPOKE_HEAD_INSET * outward
        polygon(segment(a_centre - 10.0 * outward, head, 1.9), DENSITY["spoke"])
        polygon(
            ellipse(head, 6.0, count=20, minor_radius=3.8, angle=doublet.angle + math.pi / 2),
            DENSITY["spoke_head"],
        )

    # Nexin links join each A tubule to the next doublet's B tubule, clockwise.
    for index, doublet in enumerate(doublets):
        following = doublets[(index + 1) % len(doublets)]
        if doublet.present and following.present and following.has_b_tubule:
            start, end = doublet.a_tubule_centre(), following.b_tubule_centre()
            direction = (end - start) / np.linalg.norm(end - start)
            polygon(segment(start + 11.0 * direction, end - 12.0 * direction, 1.3), DENSITY["nexin"])

    for doublet in doublets:
        if not doublet.present:
            continue
        if doublet.inner_arm > 0.0:
            polygon(doublet.place(INNER_ARM_OUTLINE), faded("inner_arm", doublet.inner_arm))
        if doublet.outer_arm > 0.0:
            polygon(doublet.place(OUTER_ARM_OUTLINE), faded("outer_arm", doublet.outer_arm))
        draw_doublet_tubules(polygon, doublet)

    if cilium.transposed_doublet is not None:
        draw_doublet_tubules(polygon, cilium.transposed_doublet)

    draw_central_pair(polygon, cilium)


def draw_central_pair(polygon, cilium):
    """The central tubules, with their projections and the bridge between them when the cilium has them."""
    tubules = cilium.central_tubules
    if len(tubules) == 2:
        pair_centre = (tubules[0] + tubules[1]) / 2
        across = np.array([-math.sin(cilium.central_angle), math.cos(cilium.central_angle)])
        if cilium.central_projections:
            for centre in tubules:
                away = (centre - pair_centre) / np.linalg.norm(centre - pair_centre)
                for turn, length in ((1.15, 23.0), (-1.15, 20.0), (0.0, 17.0)):
                    direction = rotation_matrix(turn) @ away
                    polygon(
                        segment(centre + 10.0 * direction, centre + length * direction, 2.4),
                        DENSITY["projection"],
                    )
        if cilium.central_bridge:
            for side in (-4.5, 4.5):
                polygon(
                    segment(tubules[0] + side * across, tubules[1] + side * across, 1.5), DENSITY["bridge"]
                )
    for centre in tubules:
        polygon(ellipse(centre, CENTRAL_TUBULE_RADIUS), DENSITY["tubule_wall"])
        polygon(ellipse(centre, CENTRAL_TUBULE_RADIUS - TUBULE_WALL), DENSITY["central_lumen"])


def draw_microvillus(draw, view, centre, radius):
    draw.polygon(view.to_canvas(ellipse(centre, radius, count=48)), fill=DENSITY["membrane"])
    draw.polygon(view.to_canvas(ellipse(centre, radius - 7.0, count=48)), fill=DENSITY["microvillus_core"])


def draw_density(cilium, view, width, height, supersample, neighbours=(), microvilli=()):
    """Stain density of the crop: the cilium, its neighbours and microvilli, at crop size."""
    canvas = Image.new("F", (width * supersample, height * supersample), 0.0)
    draw = ImageDraw.Draw(canvas)
    for centre, radius in microvilli:
        draw_microvillus(draw, view, centre, radius)
    for neighbour, neighbour_view, reach in neighbours:
        # Neighbours entirely outside the crop cost time and change nothing.
        x, y = neighbour_view.offset
        if -reach < x < canvas.width + reach and -reach < y < canvas.height + reach:
            draw_cilium(draw, neighbour, neighbour_view)
    draw_cilium(draw, cilium, view)
    if supersample > 1:
        canvas = canvas.reduce(supersample)
    return np.asarray(canvas, dtype=np.float32)


def sample_crop_size(rng):
    """Width and height matching the real crops: 524.6 +- 174.4 by 508.5 +- 173.9, w/h 1.040 +- 0.117."""
    while True:
        size = rng.normal(510.0, 176.0)
        aspect = rng.normal(1.040, 0.117)
        if 120.0 <= size <= 1100.0 and 0.7 <= aspect <= 1.45:
            return round(size * math.sqrt(aspect)), round(size / math.sqrt(aspect))


def outer_extent(cilium, stretch):
    """Largest distance (nm) of the membrane from the centre after an oblique stretch."""
    waviness = sum(amplitude for _, amplitude, _ in cilium.membrane_harmonics)
    return cilium.membrane_radius * (1.0 + waviness) * stretch


def compose_section(rng, cilium, width, height):
    """Place the cilium in the crop, with neighbours cut by the crop's edge; return density."""
    stretch = rng.uniform(1.0, 1.3)
    fill = rng.uniform(0.72, 0.95)  # share of the crop's short side the cilium spans
    pixels_per_nm = fill * min(width, height) / (2.0 * cilium.membrane_radius * stretch)
    # Supersample small crops so thin walls stay smooth after the reduction.
    supersample = int(min(3, max(1, math.ceil(0.9 / pixels_per_nm))))
    canvas_per_nm = pixels_per_nm * supersample
    slack = (1.0 - fill) * 0.4 * np.array([width, height])
    centre = (np.array([width, height]) / 2 + rng.uniform(-1, 1, size=2) * slack) * supersample
    mirror = bool(rng.random() < 0.5)
    view = make_view(
        canvas_per_nm, rng.uniform(0, 2 * math.pi), stretch, rng.uniform(0, math.pi), mirror, centre
    )

    main_extent = outer_extent(cilium, stretch)
    neighbours = []
    for _ in range(rng.choice(3, p=[0.45, 0.4, 0.15])):
        neighbour = sample_normal_cilium(rng)
        neighbour_stretch = rng.uniform(1.0, 1.3)
        distance = main_extent + outer_extent(neighbour, neighbour_stretch) + rng.uniform(5.0, 60.0)
        direction = rng.uniform(0, 2 * math.pi)
        position = centre + canvas_per_nm * distance * np.array([math.cos(direction), math.sin(direction)])
        # Neighbours in one section share the orientation of the epithelium, so the handedness too.
        neighbour_view = make_view(
            canvas_per_nm,
            rng.uniform(0, 2 * math.pi),
            neighbour_stretch,
            rng.uniform(0, math.pi),
            mirror,
            position,
        )
        neighbours.append(
            (neighbour, neighbour_view, canvas_per_nm * outer_extent(neighbour, neighbour_stretch))
        )
    microvilli = []
    for _ in range(rng.choice(5, p=[0.45, 0.25, 0.15, 0.1, 0.05])):
        radius = rng.uniform(35.0, 55.0)
        distance = main_extent + radius + rng.uniform(5.0, 80.0)
        direction = rng.uniform(0, 2 * math.pi)
        # Microvilli are positioned in the cilium's frame and drawn through its view.
        microvilli.append((distance / stretch * np.array([math.cos(direction), math.sin(direction)]), radius))
    density = draw_density(cilium, view, width, height, supersample, neighbours, microvilli)
    return density, pixels_per_nm


# ----------------------------------------------------------------------------------------
# 3. The microscope: density -> 8-bit micrograph
# ----------------------------------------------------------------------------------------

ABSORPTION = 1.8  # transmitted intensity is exp(-ABSORPTION * density)
# A binomial kernel, close to a Gaussian of 0.7 px; filtering white noise with it in both
# directions shrinks its standard deviation by the sum of the squared weights.
GRAIN_KERNEL = np.array([0.25, 0.5, 0.25], dtype=np.float32)
GRAIN_KERNEL_GAIN = float(np.sum(GRAIN_KERNEL**2))


def upsampled_noise(rng, shape, cell_size):
    """Smooth random field with blobs about `cell_size` pixels across, unit standard deviation.

    Drawn on a coarse grid and enlarged with bicubic interpolation: as smooth as a Gaussian
    filter of white noise, at a fraction of the cost.
    """
    rows, columns = (max(2, math.ceil(side / cell_size) + 1) for side in shape)
    coarse = Image.fromarray(rng.standard_normal((rows, columns), dtype=np.float32), mode="F")
    smooth = np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), dtype=np.float32)
    return smooth / (smooth.std() + 1e-6)


def apply_microscope(rng, density, pixels_per_nm):
    shape = density.shape
    # Stained cytoplasm is flocculent, not flat: clumps ~6 nm across inside cells, none in the
    # empty background. Added rather than multiplied, so dense lines (membrane, walls) stay whole.
    texture = upsampled_noise(rng, shape, max(1.5, 6.0 * pixels_per_nm))
    # Clumps of stain are darker than the matrix; gaps in it are only a little paler.
    texture = np.maximum(texture, -0.6)
    density = density + 0.03 + rng.uniform(0.10, 0.16) * texture * np.minimum(density * 4.0, 1.0)
    density = ndimage.gaussian_filter(density, rng.uniform(1.5, 3.2) * pixels_per_nm, truncate=3.0)
    intensity = np.exp(-ABSORPTION * density)
    # Uneven section thickness and illumination: a few broad, faint patches.
    intensity *= 1.0 + rng.uniform(0.02, 0.07) * upsampled_noise(
        rng, shape, max(shape) / rng.uniform(2.0, 5.0)
    )
    # Shot noise: few electrons per pixel make dark areas noisier in relative terms; the
    # detector's point spread correlates neighbouring pixels a little, which reads as grain.
    grain = rng.standard_normal(shape, dtype=np.float32)
    for axis in (0, 1):
        grain = ndimage.correlate1d(grain, GRAIN_KERNEL, axis=axis)
    grain /= GRAIN_KERNEL_GAIN
    dose = rng.uniform(150.0, 900.0)
    intensity += grain * np.sqrt(np.maximum(intensity, 0.0) / dose)
    darkest = math.exp(-ABSORPTION * DENSITY["tubule_wall"])
    normalised = np.clip((intensity - darkest) / (1.0 - darkest), 0.0, None)
    background_level = rng.uniform(195.0, 232.0)
    dense_level = 20.0 + 90.0 * rng.random() ** 2
    values = dense_level + (background_level - dense_level) * normalised ** rng.uniform(0.8, 1.25)
    pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        # Many archives were saved as JPEG: its 8x8 blocks and ringing are part of the look.
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=int(rng.integers(30, 80)))
        pixels = np.asarray(Image.open(buffer).convert("L"))
    return pixels


def plan_phantom(seed, scheme, class_name, number):
    """The first draws of image `number`: its cilium and crop size (cheap; tests use it alone).

    Returns the random generator too, positioned where rendering continues.
    """
    rng = phantom_rng(seed, class_name, number)
    cilium = sample_cilium(rng, scheme, class_name)
    width, height = sample_crop_size(rng)
    return rng, cilium, width, height


def render_phantom(seed, scheme, class_name, number):
    """Image `number` of a class: an 8-bit grayscale array, and the cilium it shows."""
    rng, cilium, width, height = plan_phantom(seed, scheme, class_name, number)
    density, pixels_per_nm = compose_section(rng, cilium, width, height)
    return apply_microscope(rng, density, pixels_per_nm), cilium


# ----------------------------------------------------------------------------------------
# 4. Files
# ----------------------------------------------------------------------------------------


def phantom_relative_path(class_name, number):
    return f"{class_name}/{class_name}_{number:04d}.png"


def write_phantom(task):
    """Render one phantom and write it atomically (runs in a worker process).

    Returns the file's path relative to the folder, its SHA-256, width and height.
    """
    directory, seed, scheme, class_name, number = task
    pixels, _ = render_phantom(seed, scheme, class_name, number)
    relative_path = phantom_relative_path(class_name, number)
    path = Path(directory) / relative_path
    # Fast deflate: noisy micrographs barely compress anyway, and the default level would
    # take a third of the time per image for 10% smaller files.
    with atomic_path(path) as temporary_path:
        Image.fromarray(pixels, mode="L").save(temporary_path, format="PNG", compress_level=1)
    return relative_path, sha256_of_file(path), pixels.shape[1], pixels.shape[0]
