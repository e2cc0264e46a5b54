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

Why one file: a seed's files are byte-identical only while the renderer's random draws happen
in one order; anatomy, specimen texture and optics are its sections, in the order they are drawn.
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

# Stain density of each structure: darker structures absorb more electrons. Dense protein
# (tubule walls, the A tubule's filled lumen, the central pair) is the darkest; the dynein arms,
# spokes and projections are faint, fuzzy material drawn as an excess over the matrix on a
# separate soft layer that is blurred more than the walls (see `draw_density`).
DENSITY = {
    "membrane": 0.90,
    "membrane_middle": 0.25,
    "coat": 0.16,
    "matrix": 0.10,
    "outside_matrix": 0.04,
    "central_matrix": 0.14,
    "tubule_wall": 0.90,
    "a_lumen": 0.50,
    "b_lumen": 0.24,
    "central_lumen": 0.30,
    "spoke": 0.28,
    "spoke_head": 0.36,
    "nexin": 0.08,
    "bridge": 0.40,
    "projection": 0.34,
    "sheath": 0.24,
    "halo": 0.22,
    "central_halo": 0.10,
    "cytoplasm": 0.12,
    "axoneme_matrix": 0.12,
}

# Geometry in nanometres, from published axoneme dimensions.
DOUBLET_RING_RADIUS = 86.0
A_TUBULE_RADIUS = 12.5
B_TUBULE_RADIUS = 13.5
TUBULE_WALL = 4.5
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
INNER_ARM_HALF_WIDTHS = np.array([4.6, 4.4, 4.0, 3.4])


@dataclass
class Doublet:
    centre: np.ndarray  # nm, in the cilium's frame
    angle: float  # direction (radians) the doublet faces outward; arms and spokes follow it
    tilt: float  # the A-B axis turns inward from the tangent by this much (radians)
    present: bool = True
    has_b_tubule: bool = True
    outer_arm: float = 1.0  # 1 full density, 0 absent
    inner_arm: float = 1.0
    sharpness: float = 1.0  # 1 crisp walls; lower values blur the doublet into a soft halo

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
    membrane_blebs: list  # (angle, angular width, relative height) of folds and blebs
    membrane_darkness: list  # (order, amplitude, phase): how the stain of the membrane varies along it
    doublets: list
    central_tubules: list = field(default_factory=list)  # centres in nm
    central_angle: float = 0.0  # direction of the line through the central pair
    central_bridge: bool = True
    central_projections: bool = True
    sheath_centre: np.ndarray = None  # None when the central sheath is absent
    transposed_doublet: Doublet = None  # 8+1: a peripheral doublet moved into the centre
    displacements: list = field(default_factory=list)  # nm each displaced doublet moved (tests)
    arm_contrast: float = 0.45  # a full dynein arm's density excess, as a share of the wall's
    interior_stain: float = 1.0  # how much denser than the pale band the inside of the doublet ring is


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


def sample_membrane(rng):
    """A membrane outline that is irregular on its own terms, not nine lobes tied to the doublets.

    Real ones are roughly round or polygonal (soft corners, 5-9 of them), with folds and blebs
    anywhere, and their stain varies along their length.
    """
    harmonics = [
        (order, rng.uniform(0.0, 0.045) * (2.0 / order) ** 0.7, rng.uniform(0, 2 * math.pi))
        for order in range(2, 13)
    ]
    harmonics.append((int(rng.integers(5, 10)), rng.uniform(0.0, 0.035), rng.uniform(0, 2 * math.pi)))
    # Blebs are broad bulges; folds are narrow points where the membrane is pinched outward.
    blebs = [
        (rng.uniform(0, 2 * math.pi), rng.uniform(0.08, 0.3), rng.uniform(0.015, 0.06))
        for _ in range(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    ]
    blebs += [
        (rng.uniform(0, 2 * math.pi), rng.uniform(0.025, 0.06), rng.uniform(0.02, 0.07))
        for _ in range(rng.choice(7, p=[0.25, 0.15, 0.15, 0.15, 0.1, 0.1, 0.1]))
    ]
    darkness = [(order, rng.uniform(0.0, 0.18), rng.uniform(0, 2 * math.pi)) for order in (1, 2, 3, 5, 8)]
    return harmonics, blebs, darkness


def sample_normal_cilium(rng):
    # Diameter 236-280 nm around a doublet ring of radius ~86: real sections show a pale band of
    # matrix (about a tenth of the diameter) between the doublets' outer face and the membrane.
    membrane_radius = rng.uniform(118.0, 140.0)
    harmonics, blebs, darkness = sample_membrane(rng)
    ring_radius = DOUBLET_RING_RADIUS * rng.uniform(0.98, 1.08)
    # How crisp the doublets come out varies within one section (tilt, stain, depth of focus).
    crispness = rng.uniform(0.3, 1.0)
    doublets = []
    for index in range(9):
        angle = index * 2 * math.pi / 9 + rng.normal(0.0, 0.025)
        radius = ring_radius + rng.normal(0.0, 1.2)
        doublets.append(
            Doublet(
                centre=radius * np.array([math.cos(angle), math.sin(angle)]),
                angle=angle + rng.normal(0.0, 0.04),
                tilt=math.radians(rng.uniform(10.0, 20.0)),
                outer_arm=rng.uniform(0.85, 1.0),
                inner_arm=rng.uniform(0.8, 1.0),
                sharpness=float(np.clip(crispness + rng.normal(0.0, 0.2), 0.2, 1.0)),
            )
        )
    central_angle = rng.uniform(0, math.pi)
    centre = rng.normal(0.0, 1.5, size=2)
    axis = np.array([math.cos(central_angle), math.sin(central_angle)])
    return Cilium(
        membrane_radius=membrane_radius,
        membrane_thickness=rng.uniform(6.0, 9.5),
        membrane_harmonics=harmonics,
        membrane_blebs=blebs,
        membrane_darkness=darkness,
        doublets=doublets,
        central_tubules=[
            centre + CENTRAL_PAIR_HALF_DISTANCE * axis,
            centre - CENTRAL_PAIR_HALF_DISTANCE * axis,
        ],
        central_angle=central_angle,
        sheath_centre=centre.copy(),
        # Faint, fuzzy arms: 30-60% of the wall's contrast, the same draw for every class.
        arm_contrast=rng.uniform(0.5, 0.8),
        interior_stain=rng.uniform(0.2, 1.2),
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


MEMBRANE_POINTS = 180


def membrane_outline(cilium, inset, count=MEMBRANE_POINTS):
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    relative = np.ones(count)
    for order, amplitude, phase in cilium.membrane_harmonics:
        relative += amplitude * np.cos(order * turns + phase)
    for angle, width, height in cilium.membrane_blebs:
        apart = np.angle(np.exp(1j * (turns - angle)))
        relative += height * np.exp(-0.5 * (apart / width) ** 2)
    radius = cilium.membrane_radius * relative - inset
    return np.stack([radius * np.cos(turns), radius * np.sin(turns)], axis=1)


def membrane_darkness(cilium, count=MEMBRANE_POINTS):
    """Stain of the membrane along its length, 0.5-1: a bilayer is never evenly dark all round."""
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    variation = sum(
        amplitude * np.cos(order * turns + phase) for order, amplitude, phase in cilium.membrane_darkness
    )
    return np.clip(0.8 + variation, 0.4, 1.0)


def draw_strip(polygon, outer, inner, densities):
    """A closed band between two outlines, one quadrilateral per outline point, each its own density."""
    following = np.roll(np.arange(len(outer)), -1)
    for index, density in enumerate(densities):
        after = following[index]
        polygon(np.array([outer[index], outer[after], inner[after], inner[index]]), density)


def draw_membrane(polygon, soft_polygon, cilium):
    """A thin bilayer: two dense leaflets around a paler middle, its stain varying along it."""
    thickness = cilium.membrane_thickness
    # A faint fuzzy coat (glycocalyx) outside the membrane only: the soft layer is cleared inside.
    soft_polygon(membrane_outline(cilium, -7.0), DENSITY["coat"])
    soft_polygon(membrane_outline(cilium, thickness), 0.0)
    polygon(membrane_outline(cilium, 0.0), DENSITY["matrix"])
    faces = [membrane_outline(cilium, thickness * share) for share in (0.0, 0.38, 0.62, 1.0)]
    darkness = membrane_darkness(cilium)
    leaflet = DENSITY["matrix"] + darkness * (DENSITY["membrane"] - DENSITY["matrix"])
    draw_strip(polygon, faces[0], faces[1], leaflet)
    draw_strip(polygon, faces[1], faces[2], np.full(len(darkness), DENSITY["membrane_middle"]))
    # The inner leaflet follows the outer one's stain, a little offset along the membrane.
    draw_strip(polygon, faces[2], faces[3], np.roll(leaflet, len(leaflet) // 24))


def arm_density(cilium, strength, share=1.0):
    """Density excess of an arm drawn at `strength` (0-1): faint next to the tubule walls."""
    return strength * share * cilium.arm_contrast * (DENSITY["tubule_wall"] - DENSITY["matrix"])


def draw_doublet_halo(soft_polygon, doublet):
    """The blurred material around a doublet: more of it, and paler walls, on a soft doublet."""
    soft_polygon(
        ellipse(doublet.centre, 21.0, count=24, minor_radius=11.0, angle=doublet.angle + math.pi / 2),
        DENSITY["halo"] * (1.2 - doublet.sharpness),
    )


def draw_doublet_tubules(polygon, doublet):
    """A dense, nearly filled A tubule and a C-shaped B tubule fused to its side.

    A soft doublet is drawn paler and leaves more of itself to the blurred halo around it.
    """
    a_centre = doublet.a_tubule_centre()
    wall = DENSITY["matrix"] + (0.75 + 0.25 * doublet.sharpness) * (
        DENSITY["tubule_wall"] - DENSITY["matrix"]
    )
    if doublet.has_b_tubule:
        # Drawn first, the A tubule covers the B tubule's inner side and leaves the crescent.
        b_centre = doublet.b_tubule_centre()
        polygon(ellipse(b_centre, B_TUBULE_RADIUS), wall)
        polygon(ellipse(b_centre, B_TUBULE_RADIUS - TUBULE_WALL * 0.8), DENSITY["b_lumen"])
    polygon(ellipse(a_centre, A_TUBULE_RADIUS), wall)
    polygon(ellipse(a_centre, A_TUBULE_RADIUS - TUBULE_WALL), DENSITY["a_lumen"])


def draw_cilium(draw, soft_draw, cilium, view):
    """Paint one cilium, back to front: dense structures on the base layer, fuzzy ones on the soft one."""

    def polygon(points, density):
        draw.polygon(view.to_canvas(points), fill=float(density))

    def soft_polygon(points, density):
        soft_draw.polygon(view.to_canvas(points), fill=float(density))

    draw_membrane(polygon, soft_polygon, cilium)
    # Inside the doublet ring the section is denser than in the pale band under the membrane:
    # smeared spokes, the central apparatus' matrix and whatever the section's depth adds.
    soft_polygon(
        ellipse(np.zeros(2), DOUBLET_RING_RADIUS * 0.92, count=48),
        DENSITY["axoneme_matrix"] * cilium.interior_stain,
    )
    if cilium.sheath_centre is not None:
        soft_polygon(ellipse(cilium.sheath_centre, 39.0, count=40), DENSITY["sheath"])
        inside_sheath = DENSITY["axoneme_matrix"] * cilium.interior_stain
        soft_polygon(ellipse(cilium.sheath_centre, 33.0, count=40), inside_sheath)
    doublets = cilium.doublets
    for doublet in doublets:
        if not doublet.present:
            continue
        draw_doublet_halo(soft_polygon, doublet)
        _, outward = doublet.frame()
        a_centre = doublet.a_tubule_centre()
        head = a_centre - SPOKE_HEAD_INSET * outward
        # Radial spokes are smeared in real sections: faint, wide, only their heads a little denser.
        soft_polygon(segment(a_centre - 10.0 * outward, head, 2.6), DENSITY["spoke"])
        soft_polygon(
            ellipse(head, 6.5, count=20, minor_radius=4.2, angle=doublet.angle + math.pi / 2),
            DENSITY["spoke_head"],
        )

    # Nexin links join each A tubule to the next doublet's B tubule, clockwise.
    for index, doublet in enumerate(doublets):
        following = doublets[(index + 1) % len(doublets)]
        if doublet.present and following.present and following.has_b_tubule:
            start, end = doublet.a_tubule_centre(), following.b_tubule_centre()
            direction = (end - start) / np.linalg.norm(end - start)
            soft_polygon(segment(start + 11.0 * direction, end - 12.0 * direction, 1.6), DENSITY["nexin"])

    for doublet in doublets:
        if not doublet.present:
            continue
        if doublet.inner_arm > 0.0:
            soft_polygon(doublet.place(INNER_ARM_OUTLINE), arm_density(cilium, doublet.inner_arm, 0.9))
        if doublet.outer_arm > 0.0:
            soft_polygon(doublet.place(OUTER_ARM_OUTLINE), arm_density(cilium, doublet.outer_arm))
        draw_doublet_tubules(polygon, doublet)

    if cilium.transposed_doublet is not None:
        draw_doublet_halo(soft_polygon, cilium.transposed_doublet)
        draw_doublet_tubules(polygon, cilium.transposed_doublet)

    draw_central_pair(polygon, soft_polygon, cilium)


def draw_central_pair(polygon, soft_polygon, cilium):
    """The central tubules, dense, with their projections and the bridge when the cilium has them."""
    tubules = cilium.central_tubules
    if len(tubules) == 2:
        pair_centre = (tubules[0] + tubules[1]) / 2
        if cilium.central_projections:
            for centre in tubules:
                away = (centre - pair_centre) / np.linalg.norm(centre - pair_centre)
                for turn, length in ((1.15, 24.0), (-1.15, 21.0), (0.0, 18.0)):
                    direction = rotation_matrix(turn) @ away
                    soft_polygon(
                        segment(centre + 10.0 * direction, centre + length * direction, 3.0),
                        DENSITY["projection"],
                    )
        if cilium.central_bridge:
            soft_polygon(segment(tubules[0], tubules[1], 6.0), DENSITY["bridge"])
    for centre in tubules:
        soft_polygon(ellipse(centre, CENTRAL_TUBULE_RADIUS + 4.0, count=24), DENSITY["central_halo"])
        polygon(ellipse(centre, CENTRAL_TUBULE_RADIUS), DENSITY["tubule_wall"])
        polygon(ellipse(centre, CENTRAL_TUBULE_RADIUS - TUBULE_WALL), DENSITY["central_lumen"])


def irregular_outline(rng, centre, radius, count=64):
    """A blob with a wavy edge: cut microvilli and pieces of cytoplasm are never perfect discs."""
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    relative = np.ones(count)
    for order in range(2, 7):
        relative += rng.uniform(0.0, 0.12 / order) * np.cos(order * turns + rng.uniform(0, 2 * math.pi))
    stretch = rng.uniform(1.0, 1.6)
    points = np.stack(
        [radius * relative * np.cos(turns) * stretch, radius * relative * np.sin(turns)], axis=1
    )
    return np.asarray(centre) + points @ rotation_matrix(rng.uniform(0, math.pi)).T


def draw_surroundings(draw, view, surroundings):
    """Microvilli and cut cytoplasm: a membrane-dark rim around a paler, stained inside."""
    for outline, rim, fill in surroundings:
        draw.polygon(view.to_canvas(outline), fill=DENSITY["membrane"] * rim)
        inner = outline.mean(axis=0) + (outline - outline.mean(axis=0)) * fill
        draw.polygon(view.to_canvas(inner), fill=DENSITY["cytoplasm"])


def draw_density(cilium, view, width, height, supersample, neighbours=(), surroundings=(), soft_blur_nm=2.5):
    """Stain density of the crop at crop size: the dense layer plus the fuzzy layer, blurred.

    The soft layer (arms, spokes, projections, sheath, halos) is blurred by `soft_blur_nm` before it
    is added: that is what makes the arms faint, fuzzy projections instead of sharp hooks.
    """
    size = (width * supersample, height * supersample)
    canvas, soft = Image.new("F", size, 0.0), Image.new("F", size, 0.0)
    draw, soft_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(soft)
    draw_surroundings(draw, view, surroundings)
    for neighbour, neighbour_view, reach in neighbours:
        # Neighbours entirely outside the crop cost time and change nothing.
        x, y = neighbour_view.offset
        if -reach < x < canvas.width + reach and -reach < y < canvas.height + reach:
            draw_cilium(draw, soft_draw, neighbour, neighbour_view)
    draw_cilium(draw, soft_draw, cilium, view)
    if supersample > 1:
        canvas, soft = canvas.reduce(supersample), soft.reduce(supersample)
    canvas_per_nm = float(np.sqrt(abs(np.linalg.det(view.matrix)))) / supersample
    blurred = blur(np.asarray(soft, dtype=np.float32), soft_blur_nm * canvas_per_nm)
    return np.asarray(canvas, dtype=np.float32) + blurred


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
    waviness += max((height for _, _, height in cilium.membrane_blebs), default=0.0)
    return cilium.membrane_radius * (1.0 + waviness) * stretch


def sample_surroundings(rng, main_extent, stretch):
    """Microvilli and pieces of cytoplasm around the cilium, in its frame, most cut by the crop."""
    surroundings = []
    for _ in range(rng.choice(5, p=[0.4, 0.25, 0.15, 0.12, 0.08])):
        large = rng.random() < 0.25  # a piece of cell body rather than a microvillus
        radius = rng.uniform(90.0, 200.0) if large else rng.uniform(30.0, 55.0)
        distance = main_extent + radius + rng.uniform(5.0, 80.0)
        direction = rng.uniform(0, 2 * math.pi)
        centre = distance / stretch * np.array([math.cos(direction), math.sin(direction)])
        outline = irregular_outline(rng, centre, radius)
        surroundings.append((outline, rng.uniform(0.5, 1.0), 1.0 - rng.uniform(4.0, 8.0) / radius))
    return surroundings


def compose_section(rng, cilium, width, height):
    """Place the cilium in the crop, with neighbours cut by the crop's edge; return density."""
    stretch = rng.uniform(1.0, 1.3)
    fill = rng.uniform(0.8, 1.0)  # share of the crop's short side the cilium spans
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
    surroundings = sample_surroundings(rng, main_extent, stretch)
    # Thicker sections and heavier stain smear the fuzzy material further.
    soft_blur_nm = rng.uniform(0.8, 1.7)
    density = draw_density(cilium, view, width, height, supersample, neighbours, surroundings, soft_blur_nm)
    return density, pixels_per_nm


# ----------------------------------------------------------------------------------------
# 3. The microscope: density -> 8-bit micrograph
# ----------------------------------------------------------------------------------------

ABSORPTION = 1.8  # transmitted intensity is exp(-ABSORPTION * density)


def upsampled_noise(rng, shape, cell_size):
    """Smooth random field with blobs about `cell_size` pixels across, unit standard deviation.

    Drawn on a coarse grid and enlarged with bicubic interpolation: as smooth as a Gaussian
    filter of white noise, at a fraction of the cost.
    """
    rows, columns = (max(2, math.ceil(side / cell_size) + 1) for side in shape)
    coarse = Image.fromarray(rng.standard_normal((rows, columns), dtype=np.float32), mode="F")
    smooth = np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), dtype=np.float32)
    return smooth / (smooth.std() + 1e-6)


def blur(array, sigma):
    """Gaussian blur of `sigma` pixels; wide ones on a reduced copy, which they cannot tell apart.

    A blur of 4 px or more removes everything a 2x reduction loses, so it runs at a half or a
    quarter of the size (a third of the rendering time otherwise went to wide blurs).
    """
    factor = 1 if sigma < 4.0 else (2 if sigma < 8.0 else 4)
    if factor == 1:
        return ndimage.gaussian_filter(array, sigma, truncate=3.0)
    height, width = array.shape
    small = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F").reduce(factor)
    small = ndimage.gaussian_filter(np.asarray(small), sigma / factor, truncate=3.0)
    enlarged = Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(enlarged, dtype=np.float32)


def grain(rng, shape, sigma):
    """White noise blurred by `sigma` pixels, unit standard deviation: grain a few pixels across."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
    return field / (field.std() + 1e-6)


def stain(rng, density, pixels_per_nm):
    """Stain is grainy and patchy, and more so inside cells than in the empty resin around them.

    Three scales: grains of a few pixels, clumps of ~4-8 nm and patches of 20-60 nm.
    """
    shape = density.shape
    inside = blur((density > 0.08).astype(np.float32), 2.0)
    clumps = np.maximum(upsampled_noise(rng, shape, max(1.5, rng.uniform(4.0, 8.0) * pixels_per_nm)), -0.7)
    patches = upsampled_noise(rng, shape, max(4.0, rng.uniform(20.0, 60.0) * pixels_per_nm))
    grains = grain(rng, shape, rng.uniform(0.7, 1.6))
    texture = (
        rng.uniform(0.03, 0.07) * clumps + rng.uniform(0.02, 0.08) * patches + rng.uniform(0.03, 0.1) * grains
    )
    # Protein-dense structures take up stain unevenly too: their walls come out grainy.
    return density + 0.02 + texture * (0.35 + 0.65 * inside) * (0.6 + density)


def defocus(rng, density, pixels_per_nm):
    """Blur of 1.2-3.2 nm that itself varies across the crop (focus, tilt, section thickness)."""
    sigma = rng.uniform(1.0, 2.3) * pixels_per_nm
    sharp = blur(density, sigma)
    soft = blur(density, sigma * rng.uniform(1.15, 1.7))
    weight = 1.0 / (1.0 + np.exp(-2.0 * upsampled_noise(rng, density.shape, max(density.shape) / 2.0)))
    return sharp + (soft - sharp) * weight, sigma


def expose(rng, density, sigma):
    """Electrons through the section: absorption, a faint defocus fringe, uneven illumination, shot noise."""
    shape = density.shape
    intensity = np.exp(-ABSORPTION * density * rng.uniform(0.85, 1.15))
    # Underfocus leaves a pale fringe beside dense edges (the membrane, walls).
    intensity += rng.uniform(0.0, 0.25) * (intensity - blur(intensity, 3.0 * sigma))
    intensity *= 1.0 + rng.uniform(0.02, 0.07) * upsampled_noise(
        rng, shape, max(shape) / rng.uniform(2.0, 5.0)
    )
    dose = rng.uniform(20.0, 300.0)
    noise = grain(rng, shape, rng.uniform(0.5, 1.3))
    return intensity + noise * np.sqrt(np.maximum(intensity, 0.0) / dose)


def print_levels(rng, intensity):
    """Intensity -> grey levels: exposure, contrast (sometimes washed out) and gamma of the print."""
    darkest = math.exp(-ABSORPTION * DENSITY["tubule_wall"])
    normalised = np.clip((intensity - darkest) / (1.0 - darkest), 0.0, None)
    background_level = rng.uniform(180.0, 234.0)
    dense_level = 18.0 + 120.0 * rng.random() ** 2
    values = dense_level + (background_level - dense_level) * normalised ** rng.uniform(0.75, 1.3)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def apply_microscope(rng, density, pixels_per_nm):
    density = stain(rng, density, pixels_per_nm)
    density, sigma = defocus(rng, density, pixels_per_nm)
    pixels = print_levels(rng, expose(rng, density, sigma))
    if rng.random() < 0.5:
        # Many archives were saved as JPEG (the real crops are): its blocks and ringing are part of the look.
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=int(rng.integers(50, 95)))
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
