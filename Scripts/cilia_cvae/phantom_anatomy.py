"""The anatomy of a phantom cilium in nanometres, and each class's defect as a change of it.

`sample_normal_cilium` lays out a 9+2 axoneme that varies like a specimen: the section's size
and its doublets' size, a membrane that is wavy, wrinkled and sometimes double-lined, nine
doublets each tilted, spaced, stained and sized a little differently, arms whose shape and
strength differ from doublet to doublet, spokes that bend, a cloudy central matrix and a
granular sheath. Then a class's defect (`DEFECTS`) changes that structure, and nothing else:
every draw of appearance here is made the same way for every class.

Coordinates are screen coordinates (x to the right, y down), so a growing angle turns
clockwise on screen: a cilium is drawn as seen from base to tip, with the dynein arms pointing
clockwise (the view mirrors half of them).
"""

import math
from dataclasses import dataclass, field

import numpy as np

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
# separate soft layer that is blurred more than the walls (see phantom_drawing.draw_density).
DENSITY = {
    "membrane": 0.90,
    "coat": 0.16,
    "matrix": 0.10,
    "tubule_wall": 0.90,
    "central_lumen": 0.30,
    "spoke": 0.14,
    "spoke_head": 0.2,
    "nexin": 0.08,
    "bridge": 0.3,
    "projection": 0.24,
    "sheath_granule": 0.36,
    "halo": 0.22,
    "central_halo": 0.15,
    "cytoplasm": 0.12,
    "axoneme_matrix": 0.12,
}

# Geometry in nanometres, from published axoneme dimensions; each doublet is drawn at a size
# of its own (Doublet.size, 0.74-0.96 of these), as real doublets are smaller than the naive
# 25 nm circles suggest once blurred into the matrix.
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
# the next doublet's B tubule, the inner arm a shorter, fainter hook on the inner face. Each
# doublet bends, stretches and thins its own copy (`arm_shape`).
OUTER_ARM_PATH = np.array([(-2.0, 10.0), (0.0, 16.5), (4.5, 21.5), (11.0, 23.5), (17.5, 21.5), (21.0, 17.5)])
OUTER_ARM_HALF_WIDTHS = np.array([5.6, 5.4, 5.0, 4.6, 4.0, 3.4])
INNER_ARM_PATH = np.array([(-2.0, -10.0), (1.5, -16.0), (7.5, -19.0), (14.0, -17.5)])
INNER_ARM_HALF_WIDTHS = np.array([4.6, 4.4, 4.0, 3.4])
PROTOFILAMENTS = 13  # segments of a tubule wall, each stained a little differently
MEMBRANE_POINTS = 160  # points along the membrane's outline


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
    size: float = 1.0  # scale of the tubules and their distance
    spread: float = 1.0  # the A-B distance, as a share of A_TO_B_DISTANCE (before `size`)
    b_wall: float = 0.8  # the B tubule's wall, as a share of the A tubule's width and stain
    squash: float = 1.0  # minor/major axis of the tubules' outline (compression, obliquity)
    wall_profile: np.ndarray = field(default_factory=lambda: np.ones(PROTOFILAMENTS))
    outer_arm_path: np.ndarray = field(default_factory=lambda: OUTER_ARM_PATH)
    outer_arm_widths: np.ndarray = field(default_factory=lambda: OUTER_ARM_HALF_WIDTHS)
    inner_arm_path: np.ndarray = field(default_factory=lambda: INNER_ARM_PATH)
    inner_arm_widths: np.ndarray = field(default_factory=lambda: INNER_ARM_HALF_WIDTHS)
    spoke: tuple = (1.0, 0.0, 1.0)  # length factor, sideways bend (nm), stain factor

    def frame(self):
        """Unit vectors (clockwise tangent, outward radial) of the doublet."""
        outward = np.array([math.cos(self.angle), math.sin(self.angle)])
        clockwise = np.array([-outward[1], outward[0]])
        return clockwise, outward

    def axis(self):
        clockwise, outward = self.frame()
        return math.cos(self.tilt) * clockwise - math.sin(self.tilt) * outward

    def a_tubule_centre(self):
        return self.centre + 0.5 * A_TO_B_DISTANCE * self.spread * self.size * self.axis()

    def b_tubule_centre(self):
        return self.centre - 0.5 * A_TO_B_DISTANCE * self.spread * self.size * self.axis()

    def place(self, offsets):
        """Points given as (clockwise, outward) offsets from the A tubule, in the cilium's frame."""
        clockwise, outward = self.frame()
        return self.a_tubule_centre() + offsets[:, :1] * clockwise + offsets[:, 1:] * outward


@dataclass
class Cilium:
    membrane_radius: float  # nm, mean radius of the membrane's outer face
    membrane_thickness: float
    membrane_harmonics: list  # (order, relative amplitude, phase) of the membrane's waviness and wrinkles
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
    membrane_width_variation: list = field(default_factory=list)  # (order, amplitude, phase) of its width
    membrane_split: float = 0.24  # share of the membrane's width that is its pale middle
    outer_line: float = 0.0  # nm outside the membrane of a faint second line (0: none)
    matrix: float = 0.10  # stain of the matrix between the structures in this section
    wall_density: float = 0.9  # the tubule walls' stain in this section
    wall_width: float = 1.0  # the tubule walls' width, as a share of TUBULE_WALL
    coat: tuple = (1.0, 7.0)  # the fuzzy coat outside the membrane: stain factor, width (nm)
    membrane_roughness: np.ndarray = None  # nm each face of the membrane is frayed in or out, per point
    a_lumen: float = 0.5  # stain inside the A tubule: nearly filled
    b_lumen: float = 0.24
    central_cloud: tuple = (0.0, 45.0)  # excess density and radius (nm) of the cloudy central matrix
    sheath_granules: list = field(
        default_factory=list
    )  # (angle, radius, size, density) of the sheath's grains
    projection_lengths: tuple = (24.0, 21.0, 18.0)


def choose_doublets(rng, low, high):
    """Indices of `low` to `high` (inclusive) of the nine doublets, drawn without repeats."""
    return rng.choice(9, size=rng.integers(low, high + 1), replace=False)


def sample_membrane(rng):
    """A membrane outline that is irregular on its own terms, not nine lobes tied to the doublets.

    Real ones are roughly round or polygonal (soft corners, 5-9 of them), wavy and wrinkled at
    finer scales, with folds and blebs anywhere; their stain and width vary along them.
    """
    harmonics = [
        (order, rng.uniform(0.0, 0.045) * (2.0 / order) ** 0.7, rng.uniform(0, 2 * math.pi))
        for order in range(2, 13)
    ]
    harmonics.append((int(rng.integers(5, 10)), rng.uniform(0.0, 0.05), rng.uniform(0, 2 * math.pi)))
    # Wrinkles: many small ripples, stronger in some sections than in others.
    wrinkle = rng.uniform(0.0, 0.01)
    harmonics += [
        (order, wrinkle * rng.uniform(0.2, 1.0), rng.uniform(0, 2 * math.pi)) for order in range(14, 34, 2)
    ]
    # Blebs are broad bulges; folds are narrow points where the membrane is pinched outward.
    blebs = [
        (rng.uniform(0, 2 * math.pi), rng.uniform(0.08, 0.3), rng.uniform(0.015, 0.06))
        for _ in range(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    ]
    blebs += [
        (rng.uniform(0, 2 * math.pi), rng.uniform(0.025, 0.06), rng.uniform(0.02, 0.07))
        for _ in range(rng.choice(7, p=[0.25, 0.15, 0.15, 0.15, 0.1, 0.1, 0.1]))
    ]
    darkness = [
        (order, rng.uniform(0.0, 0.18), rng.uniform(0, 2 * math.pi)) for order in (1, 2, 3, 5, 8, 13, 21)
    ]
    width = [
        (order, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * math.pi)) for order in (2, 3, 5, 7, 11, 17, 27)
    ]
    return harmonics, blebs, darkness, width


def arm_shape(rng, path, widths, size):
    """One doublet's own copy of an arm: longer or shorter, bent, thinner or thicker."""
    base = path[0]
    local = (path - base) * rng.uniform(0.7, 1.0)
    turn = rng.normal(0.0, 0.18)
    local = local @ np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
    # The hook's tip curls more or less: its points move along the arm's outward coordinate.
    curl = np.linspace(0.0, 1.0, len(path)) ** 2 * rng.normal(-1.5, 3.0)
    local[:, 1] += curl
    return (base + local) * size, widths * rng.uniform(0.9, 1.25) * size


def rough_faces(rng, amplitude):
    """Frayed faces: smooth random offsets (nm) along the outer and the inner face of the membrane."""
    noise = rng.standard_normal((2, MEMBRANE_POINTS))
    smooth = sum(np.roll(noise, shift, axis=1) for shift in range(-2, 3)) / math.sqrt(5.0)
    return amplitude * smooth


def sample_doublets(rng, ring_radius):
    """Nine doublets, unevenly spaced on a slightly oval ring, each sized, tilted and stained its own way."""
    size = rng.uniform(0.84, 1.0)
    crispness = rng.uniform(0.3, 1.0)
    oval, oval_angle = rng.uniform(0.0, 0.05), rng.uniform(0, math.pi)
    spacing = rng.normal(0.0, 0.07, size=9)
    doublets = []
    for index in range(9):
        angle = index * 2 * math.pi / 9 + spacing[index] - spacing.mean()
        radius = ring_radius * (1.0 + oval * math.cos(2 * (angle - oval_angle))) + rng.normal(0.0, 2.5)
        own_size = size * rng.uniform(0.92, 1.06)
        outer_path, outer_widths = arm_shape(rng, OUTER_ARM_PATH, OUTER_ARM_HALF_WIDTHS, own_size)
        inner_path, inner_widths = arm_shape(rng, INNER_ARM_PATH, INNER_ARM_HALF_WIDTHS, own_size)
        # Protofilaments: the wall's stain varies around the tubule, a little at random.
        profile = 1.0 + rng.normal(0.0, 0.1, PROTOFILAMENTS)
        profile *= 1.0 + rng.uniform(0.0, 0.25) * np.cos(
            np.linspace(0, 2 * math.pi, PROTOFILAMENTS, endpoint=False) + rng.uniform(0, 2 * math.pi)
        )
        doublets.append(
            Doublet(
                centre=radius * np.array([math.cos(angle), math.sin(angle)]),
                angle=angle + rng.normal(0.0, 0.08),
                tilt=math.radians(rng.uniform(4.0, 28.0)),
                outer_arm=rng.uniform(0.65, 1.0),
                inner_arm=rng.uniform(0.6, 1.0),
                sharpness=float(np.clip(crispness + rng.normal(0.0, 0.2), 0.2, 1.0)),
                size=own_size,
                spread=rng.uniform(1.0, 1.18),
                b_wall=rng.uniform(0.55, 0.9),
                squash=rng.uniform(0.82, 1.0),
                wall_profile=np.clip(profile, 0.5, 1.3),
                outer_arm_path=outer_path,
                outer_arm_widths=outer_widths,
                inner_arm_path=inner_path,
                inner_arm_widths=inner_widths,
                spoke=(rng.uniform(0.85, 1.1), rng.normal(0.0, 2.5), rng.uniform(0.5, 1.3)),
            )
        )
    return doublets


def sample_normal_cilium(rng):
    # Diameter 236-280 nm around a doublet ring of radius ~86: real sections show a pale band of
    # matrix (about a tenth of the diameter) between the doublets' outer face and the membrane.
    membrane_radius = rng.uniform(118.0, 140.0)
    harmonics, blebs, darkness, width = sample_membrane(rng)
    doublets = sample_doublets(rng, DOUBLET_RING_RADIUS * rng.uniform(1.04, 1.14))
    central_angle = rng.uniform(0, math.pi)
    centre = rng.normal(0.0, 2.0, size=2)
    axis = np.array([math.cos(central_angle), math.sin(central_angle)])
    # The membrane is sometimes seen as two clearly separate lines (a wide pale middle).
    split = rng.uniform(0.35, 0.55) if rng.random() < 0.45 else rng.uniform(0.2, 0.3)
    granules = [
        (rng.uniform(0, 2 * math.pi), rng.uniform(26.0, 40.0), rng.uniform(2.5, 5.0), rng.uniform(0.4, 1.2))
        for _ in range(int(rng.integers(22, 40)))
    ]
    return Cilium(
        membrane_radius=membrane_radius,
        membrane_thickness=rng.uniform(6.5, 10.0) * (1.0 + 1.2 * (split - 0.25)),
        membrane_harmonics=harmonics,
        membrane_blebs=blebs,
        membrane_darkness=darkness,
        membrane_width_variation=width,
        membrane_split=split,
        outer_line=rng.uniform(4.0, 9.0) if rng.random() < 0.3 else 0.0,
        doublets=doublets,
        central_tubules=[
            centre + CENTRAL_PAIR_HALF_DISTANCE * axis,
            centre - CENTRAL_PAIR_HALF_DISTANCE * axis,
        ],
        central_angle=central_angle,
        sheath_centre=centre.copy(),
        # Faint, fuzzy arms, the same draw for every class.
        arm_contrast=rng.uniform(0.55, 0.85),
        interior_stain=rng.uniform(0.4, 1.8),
        matrix=rng.uniform(0.06, 0.2),
        wall_density=rng.uniform(0.62, 0.9),
        wall_width=rng.uniform(1.25, 1.75),
        coat=(rng.uniform(0.3, 1.8), rng.uniform(4.0, 14.0)),
        membrane_roughness=rough_faces(rng, rng.uniform(0.2, 1.8)),
        a_lumen=rng.uniform(0.22, 0.5),
        b_lumen=rng.uniform(0.12, 0.3),
        central_cloud=(rng.uniform(0.05, 0.22), rng.uniform(34.0, 50.0)),
        sheath_granules=granules,
        projection_lengths=tuple(rng.uniform(16.0, 27.0, size=3)),
    )


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
        size=cilium.doublets[index].size,
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
