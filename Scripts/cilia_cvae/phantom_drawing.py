"""Drawing a phantom: the nanometre layout of phantom_anatomy -> stain density on the crop's pixels.

Three layers are painted with Pillow polygons through one affine view (rotation, oblique
stretch, mirror, scale), at a supersampled size reduced to the crop's:
- dense: the membrane, the tubule walls and lumens, the central tubules;
- soft: fuzzy material (spokes, projections, sheath granules, halos, the cloudy centre,
  cytoplasm's granules), blurred by 0.8-1.7 nm before it is added;
- arms: the dynein arms, added to the soft layer before its blur, so an arm adds its stain to
  whatever lies beneath it (a halo, a spoke) instead of replacing it;
- texture: how strongly each region takes up the stain's clumpy texture (the resin little,
  the pale band under the membrane more, the axoneme's interior and the cytoplasm most),
  painted at a quarter of the size: phantom_microscope.stain reads it.
`compose_section` places the cilium in the crop among neighbouring cilia, microvilli and
pieces of cytoplasm, most of them cut by the crop's edge.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cilia_cvae.phantom_anatomy import (
    A_TUBULE_RADIUS,
    B_TUBULE_RADIUS,
    CENTRAL_TUBULE_RADIUS,
    DENSITY,
    DOUBLET_RING_RADIUS,
    MEMBRANE_POINTS,
    PROTOFILAMENTS,
    SPOKE_HEAD_INSET,
    TUBULE_WALL,
    sample_normal_cilium,
)

TEXTURE_REDUCTION = 4  # the texture layer is painted at this fraction of the canvas
# How strongly each region takes up the clumpy texture of the stain (phantom_microscope.stain).
TEXTURE = {"resin": 0.2, "pale_band": 0.7, "axoneme": 1.8, "centre": 1.25, "cytoplasm": 1.6}


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


class Painter:
    """The three layers of one crop, painted through one view at a time."""

    def __init__(self, size):
        self.dense_image, self.soft_image = Image.new("F", size, 0.0), Image.new("F", size, 0.0)
        self.arm_image = Image.new("F", size, 0.0)
        small = tuple(max(2, math.ceil(side / TEXTURE_REDUCTION)) for side in size)
        self.texture_image = Image.new("F", small, TEXTURE["resin"])
        self.layers = [ImageDraw.Draw(image) for image in (self.dense_image, self.soft_image, self.arm_image)]
        self.texture_draw = ImageDraw.Draw(self.texture_image)
        self.view = None

    def dense(self, points, density):
        self.layers[0].polygon(self.view.to_canvas(points), fill=float(density))

    def soft(self, points, density):
        self.layers[1].polygon(self.view.to_canvas(points), fill=float(density))

    def arm(self, points, density):
        self.layers[2].polygon(self.view.to_canvas(points), fill=float(density))

    def texture(self, points, strength):
        canvas = (np.asarray(points) @ self.view.matrix.T + self.view.offset) / TEXTURE_REDUCTION
        self.texture_draw.polygon(canvas.ravel().tolist(), fill=float(strength))

    def strip(self, outer, inner, densities, layer=0):
        """A closed band between two outlines, one quadrilateral per outline point, each its own density."""
        draw = self.layers[layer]
        outer = np.asarray(outer) @ self.view.matrix.T + self.view.offset
        inner = np.asarray(inner) @ self.view.matrix.T + self.view.offset
        following = np.roll(np.arange(len(outer)), -1)
        quads = np.stack([outer, outer[following], inner[following], inner], axis=1).reshape(len(outer), -1)
        for corners, density in zip(quads.tolist(), np.asarray(densities, dtype=float).tolist()):
            draw.polygon(corners, fill=density)


@functools.cache
def unit_circle(count):
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    return np.stack([np.cos(turns), np.sin(turns)], axis=1)


def ellipse(centre, radius, count=28, minor_radius=None, angle=0.0):
    local = unit_circle(count) * np.array([radius, minor_radius or radius])
    if angle:
        local = local @ rotation_matrix(angle).T
    return np.asarray(centre) + local


def band(path, half_widths, samples=12):
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


def segment(start, end, half_width):
    along = end - start
    across = np.array([-along[1], along[0]]) * (half_width / np.linalg.norm(along))
    return np.array([start + across, end + across, end - across, start - across])


def harmonic_sum(terms, turns):
    return sum(amplitude * np.cos(order * turns + phase) for order, amplitude, phase in terms)


def membrane_outline(cilium, inset, count=MEMBRANE_POINTS):
    """The membrane's outline moved `inset` nm inward (a number, or one per outline point)."""
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    relative = 1.0 + harmonic_sum(cilium.membrane_harmonics, turns)
    for angle, width, height in cilium.membrane_blebs:
        apart = np.angle(np.exp(1j * (turns - angle)))
        relative += height * np.exp(-0.5 * (apart / width) ** 2)
    radius = cilium.membrane_radius * relative - inset
    return np.stack([radius * np.cos(turns), radius * np.sin(turns)], axis=1)


def draw_membrane(painter, cilium):
    """A bilayer: two dense leaflets around a paler middle, its stain and width varying along it.

    A wide middle shows it double-lined; some sections add a faint second line outside.
    """
    turns = np.linspace(0.0, 2 * math.pi, MEMBRANE_POINTS, endpoint=False)
    width = cilium.membrane_thickness * np.clip(
        1.0 + harmonic_sum(cilium.membrane_width_variation, turns), 0.55, 1.6
    )
    darkness = np.clip(0.8 + harmonic_sum(cilium.membrane_darkness, turns), 0.4, 1.0)
    # A faint fuzzy coat (glycocalyx) outside the membrane only: the soft layer is cleared inside.
    coat_stain, coat_width = cilium.coat
    painter.soft(membrane_outline(cilium, -coat_width), DENSITY["coat"] * coat_stain)
    painter.texture(membrane_outline(cilium, -coat_width), TEXTURE["cytoplasm"])
    painter.soft(membrane_outline(cilium, cilium.membrane_thickness), 0.0)
    if cilium.outer_line:
        line = membrane_outline(cilium, -cilium.outer_line)
        painter.strip(line, membrane_outline(cilium, -cilium.outer_line + 1.8), 0.3 * darkness, layer=1)
    painter.dense(membrane_outline(cilium, 0.0), cilium.matrix)
    painter.texture(membrane_outline(cilium, 0.0), TEXTURE["pale_band"])
    middle = (1.0 - cilium.membrane_split) / 2
    rough = cilium.membrane_roughness if cilium.membrane_roughness is not None else np.zeros((2, 1))
    insets = (rough[0], width * middle, width * (1.0 - middle), width + rough[1])
    faces = [membrane_outline(cilium, inset) for inset in insets]
    leaflet = cilium.matrix + darkness * (DENSITY["membrane"] - cilium.matrix)
    painter.strip(faces[0], faces[1], leaflet)
    painter.strip(faces[1], faces[2], cilium.matrix + 0.2 * (leaflet - cilium.matrix))
    # The inner leaflet follows the outer one's stain, offset along the membrane.
    painter.strip(faces[2], faces[3], np.roll(leaflet, MEMBRANE_POINTS // 9))


def arm_density(cilium, strength, share=1.0):
    """Density excess of an arm drawn at `strength` (0-1): faint next to the tubule walls."""
    return strength * share * cilium.arm_contrast * (DENSITY["tubule_wall"] - DENSITY["matrix"])


def tubule_ring(painter, centre, radius, wall, squash, angle, densities, lumen):
    """A tubule: its wall as one segment per protofilament, each stained its own way, and its lumen."""
    count = len(densities)
    outer = ellipse(centre, radius, count, radius * squash, angle)
    inner = ellipse(centre, radius - wall, count, (radius - wall) * squash, angle)
    painter.strip(outer, inner, densities)
    painter.dense(inner, lumen)


def draw_halo(painter, doublet):
    """The blurred material around a doublet: more of it on a doublet drawn less crisp."""
    painter.soft(
        ellipse(doublet.centre, 25.0 * doublet.size, 20, 12.5 * doublet.size, doublet.angle + math.pi / 2),
        DENSITY["halo"] * (1.3 - 0.7 * doublet.sharpness),
    )


def draw_doublet(painter, cilium, doublet):
    """A dense, nearly filled A tubule and a thinner, paler C-shaped B tubule fused to its side.

    A soft doublet is drawn paler and leaves more of itself to the blurred halo around it.
    """
    size = doublet.size
    matrix = cilium.matrix
    wall = matrix + (0.75 + 0.25 * doublet.sharpness) * (cilium.wall_density - matrix)
    angle = doublet.angle + doublet.tilt
    if doublet.has_b_tubule:
        # Drawn first, the A tubule covers the B tubule's inner side and leaves the C shape.
        b_wall = matrix + doublet.b_wall * (wall - matrix)
        tubule_ring(
            painter,
            doublet.b_tubule_centre(),
            B_TUBULE_RADIUS * size,
            TUBULE_WALL * cilium.wall_width * size * doublet.b_wall,
            doublet.squash,
            angle,
            b_wall * np.roll(doublet.wall_profile, 5),
            cilium.b_lumen,
        )
    tubule_ring(
        painter,
        doublet.a_tubule_centre(),
        A_TUBULE_RADIUS * size,
        TUBULE_WALL * cilium.wall_width * size,
        doublet.squash,
        angle,
        wall * doublet.wall_profile,
        cilium.a_lumen,
    )


def draw_halos_and_spokes(painter, doublets, interior_level):
    """Each doublet's halo, and its radial spoke: smeared, faint and wide, only its head a little denser."""
    for doublet in doublets:
        if not doublet.present:
            continue
        draw_halo(painter, doublet)
        clockwise, outward = doublet.frame()
        a_centre = doublet.a_tubule_centre()
        length, bend, strength = doublet.spoke
        head = a_centre - SPOKE_HEAD_INSET * length * outward + bend * clockwise
        middle = (a_centre - 10.0 * outward + head) / 2 + 0.6 * bend * clockwise
        painter.soft(
            band([a_centre - 10.0 * outward, middle, head], 3.4, 6),
            interior_level + DENSITY["spoke"] * strength,
        )
        painter.soft(
            ellipse(head, 6.5, count=12, minor_radius=4.2, angle=doublet.angle + math.pi / 2),
            interior_level + DENSITY["spoke_head"] * strength,
        )


def draw_cilium(painter, cilium, view):
    """Paint one cilium, back to front: dense structures, fuzzy ones and where the texture goes."""
    painter.view = view
    draw_membrane(painter, cilium)
    # Inside the doublet ring the section is denser than in the pale band under the membrane:
    # smeared spokes, the central apparatus' matrix and whatever the section's depth adds.
    interior = ellipse(np.zeros(2), DOUBLET_RING_RADIUS * 0.92, count=40)
    # Soft fills replace what is under them, so each structure inside adds its excess to this level.
    interior_level = DENSITY["axoneme_matrix"] * cilium.interior_stain
    painter.soft(interior, interior_level)
    painter.texture(interior, TEXTURE["axoneme"])
    cloud, cloud_radius = cilium.central_cloud
    centre_region = ellipse(np.zeros(2), cloud_radius, count=32)
    centre_level = interior_level + cloud
    painter.soft(centre_region, centre_level)
    painter.texture(centre_region, TEXTURE["centre"])
    if cilium.sheath_centre is not None:
        for angle, radius, size, density in cilium.sheath_granules:
            position = cilium.sheath_centre + radius * np.array([math.cos(angle), math.sin(angle)])
            painter.soft(ellipse(position, size, count=8), centre_level + DENSITY["sheath_granule"] * density)
    doublets = cilium.doublets
    draw_halos_and_spokes(painter, doublets, interior_level)
    # Nexin links join each A tubule to the next doublet's B tubule, clockwise.
    for index, doublet in enumerate(doublets):
        following = doublets[(index + 1) % len(doublets)]
        if doublet.present and following.present and following.has_b_tubule:
            start, end = doublet.a_tubule_centre(), following.b_tubule_centre()
            direction = (end - start) / np.linalg.norm(end - start)
            painter.soft(segment(start + 11.0 * direction, end - 12.0 * direction, 1.6), DENSITY["nexin"])

    for doublet in doublets:
        if not doublet.present:
            continue
        if doublet.inner_arm > 0.0:
            outline = band(doublet.inner_arm_path, doublet.inner_arm_widths)
            painter.arm(doublet.place(outline), arm_density(cilium, doublet.inner_arm, 0.9))
        if doublet.outer_arm > 0.0:
            outline = band(doublet.outer_arm_path, doublet.outer_arm_widths)
            painter.arm(doublet.place(outline), arm_density(cilium, doublet.outer_arm))
        draw_doublet(painter, cilium, doublet)

    if cilium.transposed_doublet is not None:
        draw_halo(painter, cilium.transposed_doublet)
        draw_doublet(painter, cilium, cilium.transposed_doublet)
    draw_central_pair(painter, cilium, centre_level)


def draw_central_pair(painter, cilium, level):
    """The central tubules, dense, with their projections and the bridge when the cilium has them."""
    tubules = cilium.central_tubules
    if len(tubules) == 2:
        pair_centre = (tubules[0] + tubules[1]) / 2
        if cilium.central_projections:
            for centre in tubules:
                away = (centre - pair_centre) / np.linalg.norm(centre - pair_centre)
                for turn, length in zip((1.15, -1.15, 0.0), cilium.projection_lengths):
                    direction = rotation_matrix(turn) @ away
                    painter.soft(
                        segment(centre + 10.0 * direction, centre + length * direction, 3.0),
                        level + DENSITY["projection"],
                    )
        if cilium.central_bridge:
            painter.soft(segment(tubules[0], tubules[1], 6.0), level + DENSITY["bridge"])
    profile = np.ones(PROTOFILAMENTS)
    profile[::3] = 0.85
    for number, centre in enumerate(tubules):
        painter.soft(ellipse(centre, CENTRAL_TUBULE_RADIUS + 5.0, count=20), level + DENSITY["central_halo"])
        wall = cilium.wall_density * np.roll(profile, number * 4)
        tubule_ring(
            painter, centre, CENTRAL_TUBULE_RADIUS, TUBULE_WALL, 1.0, 0.0, wall, DENSITY["central_lumen"]
        )


def irregular_outline(rng, centre, radius, count=48):
    """A blob with a wavy edge: cut microvilli and pieces of cytoplasm are never perfect discs."""
    turns = np.linspace(0.0, 2 * math.pi, count, endpoint=False)
    relative = np.ones(count)
    for order in range(2, 9):
        relative += rng.uniform(0.0, 0.12 / order) * np.cos(order * turns + rng.uniform(0, 2 * math.pi))
    stretch = rng.uniform(1.0, 1.6)
    points = np.stack(
        [radius * relative * np.cos(turns) * stretch, radius * relative * np.sin(turns)], axis=1
    )
    return np.asarray(centre) + points @ rotation_matrix(rng.uniform(0, math.pi)).T


def sample_surroundings(rng, main_extent, stretch):
    """Microvilli and pieces of cytoplasm around the cilium, in its frame, most cut by the crop.

    Each has a membrane rim and content: cytoplasm granules and vesicles, a microvillus's
    filaments as a few dense dots.
    """
    surroundings = []
    for _ in range(rng.choice(5, p=[0.35, 0.25, 0.18, 0.12, 0.1])):
        large = rng.random() < 0.3  # a piece of cell body rather than a microvillus
        radius = rng.uniform(90.0, 200.0) if large else rng.uniform(30.0, 55.0)
        distance = main_extent + radius + rng.uniform(5.0, 80.0)
        direction = rng.uniform(0, 2 * math.pi)
        centre = distance / stretch * np.array([math.cos(direction), math.sin(direction)])
        outline = irregular_outline(rng, centre, radius)
        spread = 0.75 * radius
        count = int(rng.integers(12, 40)) if large else int(rng.integers(2, 8))
        grains = [
            (centre + rng.uniform(-spread, spread, 2), rng.uniform(2.0, 6.0), rng.uniform(0.15, 0.45))
            for _ in range(count)
        ]
        vesicles = [
            (centre + rng.uniform(-0.6, 0.6, 2) * radius, rng.uniform(10.0, 35.0))
            for _ in range(rng.integers(0, 4) if large else 0)
        ]
        surroundings.append(
            (outline, rng.uniform(0.5, 1.0), 1.0 - rng.uniform(4.0, 8.0) / radius, grains, vesicles)
        )
    return surroundings


def draw_surroundings(painter, view, surroundings):
    """Microvilli and cut cytoplasm: a membrane-dark rim around a stained, grainy inside."""
    painter.view = view
    for outline, rim, fill, grains, vesicles in surroundings:
        painter.dense(outline, DENSITY["membrane"] * rim)
        inner = outline.mean(axis=0) + (outline - outline.mean(axis=0)) * fill
        painter.dense(inner, DENSITY["cytoplasm"])
        painter.texture(inner, TEXTURE["cytoplasm"])
        for centre, radius in vesicles:
            painter.soft(ellipse(centre, radius, count=16, minor_radius=radius * 0.8), 0.25 * rim)
            painter.soft(ellipse(centre, radius - 3.0, count=16, minor_radius=radius * 0.8 - 3.0), -0.08)
        for centre, radius, density in grains:
            painter.soft(ellipse(centre, radius, count=8), density)


def draw_density(cilium, view, width, height, supersample, neighbours=(), surroundings=(), soft_blur_nm=2.5):
    """Stain density of the crop at crop size (the dense layer plus the fuzzy layer, blurred), and
    the texture layer at the same size.

    The soft layer is blurred by `soft_blur_nm` before it is added: that is what makes the arms
    faint, fuzzy projections instead of sharp hooks.
    """
    painter = Painter((width * supersample, height * supersample))
    draw_surroundings(painter, view, surroundings)
    for neighbour, neighbour_view, reach in neighbours:
        # Neighbours entirely outside the crop cost time and change nothing.
        x, y = neighbour_view.offset
        if -reach < x < width * supersample + reach and -reach < y < height * supersample + reach:
            draw_cilium(painter, neighbour, neighbour_view)
    draw_cilium(painter, cilium, view)
    canvas, soft, arms = painter.dense_image, painter.soft_image, painter.arm_image
    if supersample > 1:
        canvas, soft, arms = canvas.reduce(supersample), soft.reduce(supersample), arms.reduce(supersample)
    soft = np.asarray(soft, dtype=np.float32) + np.asarray(arms, dtype=np.float32)
    canvas_per_nm = float(np.sqrt(abs(np.linalg.det(view.matrix)))) / supersample
    blurred = ndimage.gaussian_filter(
        np.asarray(soft, dtype=np.float32), soft_blur_nm * canvas_per_nm, truncate=3.0
    )
    # Region edges are soft (6 nm): blurred at the texture layer's own reduced size, then enlarged.
    small = np.asarray(painter.texture_image, dtype=np.float32)
    small = ndimage.gaussian_filter(
        small, 6.0 * canvas_per_nm * supersample / TEXTURE_REDUCTION, truncate=2.0
    )
    texture = Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(canvas, dtype=np.float32) + blurred, np.asarray(texture, dtype=np.float32)


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


def compose_section(rng, cilium, width, height):
    """Place the cilium in the crop, with neighbours cut by the crop's edge.

    Returns the density, the texture layer and the pixel size (pixels per nm).
    """
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
    for _ in range(rng.choice(3, p=[0.4, 0.42, 0.18])):
        neighbour = sample_normal_cilium(rng)
        # Neighbours are often cut more obliquely than the cilium chosen for the crop.
        neighbour_stretch = rng.uniform(1.0, 1.6)
        distance = main_extent + outer_extent(neighbour, neighbour_stretch) + rng.uniform(5.0, 50.0)
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
    density, texture = draw_density(
        cilium, view, width, height, supersample, neighbours, surroundings, soft_blur_nm
    )
    return density, texture, pixels_per_nm
