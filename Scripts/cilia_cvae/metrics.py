"""Quality measures of generated images, computed in a domain classifier's feature space.

No ImageNet network can be downloaded here, and ImageNet features say little about TEM
anyway, so every distance below is measured between feature vectors of a classifier trained
on the real training split (DESIGN.md section 8). All functions take numpy arrays of shape
(number of images, feature size) and return plain floats, so they are easy to test on
hand-made cases with known answers.
"""

import warnings

import numpy as np
from scipy import linalg
from sklearn.metrics import pairwise_distances

SQUARE_ROOT_TOLERANCE = 1e-3  # relative error of a matrix square root above which FID's is not trusted
PIXEL_SIDE = 32  # pixel-space memorisation compares images averaged down to this side
COPY_DISTANCE_FRACTION = (
    0.2  # nearer to a training image than this share of the typical test-to-train distance is a near-copy
)


def feature_standardiser(real_features, floor_fraction=0.1):
    """Centre and scale that give the real images' features unit spread, for KID, FID and the k-NN radii.

    KID's polynomial kernel and the radii assume features of about unit scale, as Inception
    features roughly are. A judge has dead features, near-constant on real images; dividing by
    their near-zero spread turned a generated image that switches one on into a distance of
    1e27 (the original architecture's KID in the first comparison). Each scale is therefore at
    least floor_fraction of the median spread of the features: a generated set that lights up a
    dead feature still pays for it, in proportion.
    """
    real_features = np.asarray(real_features, dtype=np.float64)
    spread = real_features.std(axis=0)
    alive = spread[spread > 0]
    floor = floor_fraction * float(np.median(alive)) if alive.size else 1.0
    return real_features.mean(axis=0), np.maximum(spread, floor)


def class_fidelity(predicted_labels, requested_labels, class_count):
    """Share of generated images the classifier assigns to the class they were asked for: overall, per class."""
    predicted_labels, requested_labels = np.asarray(predicted_labels), np.asarray(requested_labels)
    overall = float(np.mean(predicted_labels == requested_labels)) if len(requested_labels) else float("nan")
    per_class = []
    for label in range(class_count):
        asked = requested_labels == label
        per_class.append(float(np.mean(predicted_labels[asked] == label)) if asked.any() else float("nan"))
    return overall, per_class


def checked_square_root(matrix):
    """scipy's matrix square root and its relative error ||root @ root - matrix|| / ||matrix|| (Frobenius).

    A covariance product is singular whenever the judge has dead features or fewer images than
    features, and sqrtm then warns "Matrix is singular" although its root is usually exact; the
    measured error says whether it is, so the warning is not shown.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(matrix)
    if not np.isfinite(root).all():
        return root, float("inf")
    scale = np.linalg.norm(matrix)
    return root, float(np.linalg.norm(root @ root - matrix) / scale) if scale > 0 else 0.0


def frechet_distance(features_a, features_b):
    """FID: distance between Gaussians fitted to two feature sets."""
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    covariance_a = np.cov(features_a, rowvar=False)
    covariance_b = np.cov(features_b, rowvar=False)
    root, error = checked_square_root(covariance_a @ covariance_b)
    if error > SQUARE_ROOT_TOLERANCE:
        # An inaccurate root: nudge both covariances as the reference implementation does.
        offset = np.eye(covariance_a.shape[0]) * 1e-6
        root, error = checked_square_root((covariance_a + offset) @ (covariance_b + offset))
        if error > SQUARE_ROOT_TOLERANCE:
            warnings.warn(
                f"FID is inexact (its matrix square root is off by {error:.1%}); judge more "
                f"images per class than the judge's {covariance_a.shape[0]} features",
                stacklevel=2,
            )
    # The product of two covariances has real, non-negative eigenvalues; an imaginary part is round-off.
    root = np.real(root)
    return float(
        np.sum((mean_a - mean_b) ** 2) + np.trace(covariance_a) + np.trace(covariance_b) - 2 * np.trace(root)
    )


def kernel_inception_distance(features_a, features_b, subset_count=50, subset_size=200, seed=0):
    """KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Returns (mean, standard deviation over subsets). Unlike FID it is unbiased, so the floor
    between two samples of the same distribution is near zero (slightly negative is normal).
    """
    rng = np.random.default_rng(seed)
    dimension = features_a.shape[1]
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        return float("nan"), float("nan")
    estimates = []
    for _ in range(subset_count):
        x = features_a[rng.choice(len(features_a), size, replace=False)]
        y = features_b[rng.choice(len(features_b), size, replace=False)]
        kernel_xx = (x @ x.T / dimension + 1) ** 3
        kernel_yy = (y @ y.T / dimension + 1) ** 3
        kernel_xy = (x @ y.T / dimension + 1) ** 3
        off_diagonal = size * (size - 1)
        estimate = (
            (kernel_xx.sum() - np.trace(kernel_xx)) / off_diagonal
            + (kernel_yy.sum() - np.trace(kernel_yy)) / off_diagonal
            - 2 * kernel_xy.mean()
        )
        estimates.append(estimate)
    return float(np.mean(estimates)), float(np.std(estimates))


def _kth_neighbour_radii(features, k):
    """Distance from each point to its k-th nearest neighbour within the same set (itself excluded)."""
    distances = pairwise_distances(features, features)
    return np.sort(distances, axis=1)[:, k]


def precision_recall(real_features, generated_features, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour manifolds.

    Precision: share of generated samples inside the real manifold (are they realistic?).
    Recall: share of real samples inside the generated manifold (is the variety covered?).
    """
    real_radii = _kth_neighbour_radii(real_features, k)
    generated_radii = _kth_neighbour_radii(generated_features, k)
    cross = pairwise_distances(generated_features, real_features)
    precision = np.mean((cross <= real_radii[None, :]).any(axis=1))
    recall = np.mean((cross.T <= generated_radii[None, :]).any(axis=1))
    return float(precision), float(recall)


def density_coverage(real_features, generated_features, k=5):
    """Density and coverage (Naeem et al. 2020): robust to outliers in the real set."""
    real_radii = _kth_neighbour_radii(real_features, k)
    cross = pairwise_distances(generated_features, real_features)
    inside = cross <= real_radii[None, :]
    density = inside.sum() / (k * len(generated_features))
    # Coverage: share of real samples whose neighbourhood holds at least one generated sample.
    coverage = np.mean(cross.min(axis=0) < real_radii)
    return float(density), float(coverage)


def pixel_vectors(images, side=PIXEL_SIDE):
    """Images (n, size, size) as vectors for pixel-space distances: averaged down to side x side
    (kept whole when their size is not a multiple of side), each standardised to zero mean and
    unit spread, so a copy that is merely brighter, or smoothed as a decoder smooths, still sits
    next to its source."""
    images = np.asarray(images, dtype=np.float64)
    count, size = images.shape[0], images.shape[1]
    side = side if size % side == 0 else size
    factor = size // side
    reduced = images.reshape(count, side, factor, side, factor).mean(axis=(2, 4)).reshape(count, -1)
    reduced -= reduced.mean(axis=1, keepdims=True)
    return reduced / np.maximum(reduced.std(axis=1, keepdims=True), 1e-6)


def pixel_vectors_in_eight_orientations(images, side=PIXEL_SIDE):
    """pixel_vectors of the eight orientations of each image (quarter turns, then those of the mirror
    image), row o * n + i for orientation o of image i: a generated image that is a turned or mirrored
    training crop is as near its source as an upright copy."""
    images = np.asarray(images)
    mirrored = images[:, :, ::-1]
    turned = [np.rot90(batch, turns, axes=(1, 2)) for batch in (images, mirrored) for turns in range(4)]
    return pixel_vectors(np.concatenate(turned), side)


def nearest_is_source_share(training_features, generated_features, sources, training_count):
    """The share of generated images whose nearest training image is one of their own sources.

    `training_features` may hold k rows per training image (its orientations, row o * n + i, n the
    `training_count`);
    `sources[j]` is the set of training indices image j was made from (None: no source recorded,
    left out). None when no image records a source."""
    known = [index for index, source in enumerate(sources) if source]
    if not known:
        return None
    nearest = pairwise_distances(np.asarray(generated_features)[known], training_features).argmin(axis=1)
    return float(
        np.mean([int(index) % training_count in sources[image] for image, index in zip(known, nearest)])
    )


def memorisation(training_features, test_features, generated_features):
    """Do generated images copy training images? Nearest-training distances, generated against real test.

    Returns the ratio of medians (generated over test; about 1 or more is healthy, near 0 is
    copying), the share of generated images that are near-copies, the real test split's own
    share by the same rule (a fresh real image is sometimes that near a training one: the
    control a generator's share is held to), and both medians.
    """
    test_distances = pairwise_distances(test_features, training_features).min(axis=1)
    generated_distances = pairwise_distances(generated_features, training_features).min(axis=1)
    test_median = float(np.median(test_distances))
    generated_median = float(np.median(generated_distances))
    threshold = COPY_DISTANCE_FRACTION * test_median
    return {
        "memorisation_ratio": generated_median / test_median if test_median > 0 else float("nan"),
        "near_copy_share": float(np.mean(generated_distances < threshold)),
        "test_near_copy_share": float(np.mean(test_distances < threshold)),
        "generated_to_train_median": generated_median,
        "test_to_train_median": test_median,
    }
