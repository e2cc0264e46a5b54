"""The evaluation of a folder of generated images against the real splits, and its report."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cilia_cvae import metrics, texture_report  # noqa: E402
from cilia_cvae.classifier import cached_domain_classifier, predict  # noqa: E402
from cilia_cvae.config import UserError  # noqa: E402
from cilia_cvae.files import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from cilia_cvae.images import first_unreadable, list_images, load_images  # noqa: E402


def readable_images(paths, size):
    """load_images, with a damaged file (Pillow names none) refused in one line naming it."""
    try:
        return load_images(paths, size)
    except (OSError, SyntaxError, ValueError):
        damaged = first_unreadable(paths)
        if damaged is None:
            raise
        path, error = damaged
        raise UserError(
            f"{path} cannot be read ({error}); move it out of the folder (or write it again), then run again"
        ) from None


def quality_metrics(features, labels, predictions, class_names, seed):
    """Every feature-space measure of one generated set; `features` etc. are dicts by split name."""
    generated, test, train = features["generated"], features["test"], features["train"]
    fidelity, fidelity_per_class = metrics.class_fidelity(
        predictions["generated"], labels["generated"], len(class_names)
    )
    kid, kid_std = metrics.kernel_inception_distance(generated, test, seed=seed)
    kid_floor, kid_floor_std = metrics.kernel_inception_distance(train, test, seed=seed)
    precision, recall = metrics.precision_recall(test, generated, k=3)
    density, coverage = metrics.density_coverage(test, generated, k=5)
    report = {
        "class_fidelity": fidelity,
        "class_fidelity_per_class": dict(zip(class_names, fidelity_per_class)),
        "fid": metrics.frechet_distance(generated, test),
        "fid_floor": metrics.frechet_distance(train, test),
        "kid": kid,
        "kid_std": kid_std,
        "kid_floor": kid_floor,
        "kid_floor_std": kid_floor_std,
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        **metrics.memorisation(train, test, generated),
    }
    if "pixels" in features:
        report.update(pixel_measures(features, len(labels["train"])))
    report["per_class"] = per_class_measures(features, labels, fidelity_per_class, class_names, seed)
    return report


def pixel_measures(features, training_count):
    """Memorisation in pixel space: the judge's features could call two different images alike, or
    miss a copy whose difference the judge happens to notice; and whether an image is nearest the very
    crop it was made from (posterior draws, counterfactuals, variations)."""
    pixels = features["pixels"]
    measures = {
        f"pixel_{name}": value
        for name, value in metrics.memorisation(pixels["train"], pixels["test"], pixels["generated"]).items()
    }
    measures["pixel_nearest_is_source_share"] = metrics.nearest_is_source_share(
        pixels["train"], pixels["generated"], features["sources"], training_count
    )
    return measures


def per_class_measures(features, labels, fidelity_per_class, class_names, seed):
    """Each class's fidelity and KID against its own real test images (and the train-test floor)."""
    generated, test, train = features["generated"], features["test"], features["train"]
    per_class = {}
    for label, class_name in enumerate(class_names):
        mask = {split: labels[split] == label for split in ("generated", "test", "train")}
        if mask["generated"].sum() < 2 or mask["test"].sum() < 2:
            continue
        class_kid, class_kid_std = metrics.kernel_inception_distance(
            generated[mask["generated"]], test[mask["test"]], seed=seed
        )
        class_floor, _ = metrics.kernel_inception_distance(
            train[mask["train"]], test[mask["test"]], seed=seed
        )
        per_class[class_name] = {
            "generated_images": int(mask["generated"].sum()),
            "class_fidelity": fidelity_per_class[label],
            "kid": class_kid,
            "kid_std": class_kid_std,
            "kid_floor": class_floor,
        }
    return per_class


def source_indices(generated_dir, generated_paths, train_paths):
    """For each generated image, the training crops it was made from, by index into train_paths, as its
    manifest records them: a counterfactual's or variation's source (and second source), a posterior
    draw's stored latent (row i of a class's latents is its i-th training crop by name). None where the
    manifest records none (no manifest, other sampling, a crop no longer in the split)."""
    manifest_path = generated_dir / "generation_manifest.csv"
    if not manifest_path.is_file():
        return [None] * len(generated_paths)
    index_of = {f"{path.parent.name}/{path.name}": index for index, path in enumerate(train_paths)}
    crops_of_class = {}
    for path in train_paths:
        crops_of_class.setdefault(path.parent.name, []).append(f"{path.parent.name}/{path.name}")
    with open(manifest_path, newline="", encoding="utf-8") as manifest:
        rows = {row.get("file"): row for row in csv.DictReader(manifest)}
    sources = []
    for path in generated_paths:
        row = rows.get(f"{path.parent.name}/{path.name}") or {}
        names = [row[column] for column in ("counterfactual_source", "second_source") if row.get(column)]
        if not names and row.get("sampling") == "posterior":
            crops = crops_of_class.get(row.get("class"), [])
            latent_index = int(float(row.get("source_latent_index") or -1))
            names = [crops[latent_index]] if 0 <= latent_index < len(crops) else []
        found = {index_of[name] for name in names if name in index_of}
        sources.append(found or None)
    return sources


def judged_splits(judge, images):
    """The judge's features and predicted classes of every split, the features in the real training
    split's units (see feature_standardiser)."""
    features, predictions = {}, {}
    for split in images:
        scores, features[split] = predict(judge, images[split])
        predictions[split] = scores.argmax(axis=1)
    centre, scale = metrics.feature_standardiser(features["train"])
    return {split: (values - centre) / scale for split, values in features.items()}, predictions


def real_accuracy(predicted, labels, class_names):
    """The judge's accuracy on the real test split, overall and per class: the ceiling of fidelity."""
    return {
        "real_accuracy": float(np.mean(predicted == labels)),
        "real_accuracy_per_class": {
            name: float(np.mean(predicted[labels == label] == label))
            for label, name in enumerate(class_names)
            if (labels == label).any()
        },
    }


def evaluate_generated(
    processed_dir,
    generated_dir,
    class_names,
    fingerprint,
    classifier_cache_dir,
    classifier_size,
    classifier_epochs,
    images_per_class,
    seed,
):
    """Train or load the judge, embed real and generated images, and compute every measure."""
    paths, labels = {}, {}
    for split in ("train", "test"):
        paths[split], labels[split] = list_images(Path(processed_dir) / split, class_names)
    paths["generated"], labels["generated"] = list_images(generated_dir, class_names, images_per_class)
    unknown = sorted(
        {path.name for path in Path(generated_dir).iterdir() if path.is_dir()} - set(class_names)
    )
    if unknown:
        raise UserError(f"generated folders {unknown} are not classes of the processed data {class_names}")
    images = {split: readable_images(paths[split], classifier_size) for split in paths}
    judge, reused = cached_domain_classifier(
        classifier_cache_dir,
        fingerprint,
        images["train"],
        labels["train"],
        len(class_names),
        classifier_epochs,
        seed,
    )
    features, predictions = judged_splits(judge, images)
    # Training crops in their eight orientations: a turned or mirrored copy is still a copy.
    features["pixels"] = {split: metrics.pixel_vectors(images[split]) for split in ("test", "generated")}
    features["pixels"]["train"] = metrics.pixel_vectors_in_eight_orientations(images["train"])
    features["sources"] = source_indices(Path(generated_dir), paths["generated"], paths["train"])
    report = {
        **real_accuracy(predictions["test"], labels["test"], class_names),
        "judge_reused_from_cache": reused,
        "classifier_size": classifier_size,
        "classifier_epochs": classifier_epochs,
        "counts": {
            split: {name: int((labels[split] == label).sum()) for label, name in enumerate(class_names)}
            for split in labels
        },
        **quality_metrics(features, labels, predictions, class_names, seed),
    }
    report["confusion"] = confusion_matrix(
        labels["generated"], predictions["generated"], len(class_names)
    ).tolist()
    report["class_names"] = list(class_names)
    # The look, beside the judge's view: blur can pass a classifier and still fail a TEM reader.
    report["texture"] = texture_report.texture_report(
        paths["generated"], labels["generated"], paths["test"], labels["test"], seed
    )
    return report


def confusion_matrix(requested, predicted, class_count):
    matrix = np.zeros((class_count, class_count), dtype=np.int64)
    np.add.at(matrix, (requested, predicted), 1)
    return matrix


def _plot_report(report, path):
    class_names = report["class_names"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    shares = [report["class_fidelity_per_class"][name] for name in class_names]
    left.bar(class_names, shares, color="#4a7ab0")
    left.axhline(
        report["class_fidelity"],
        color="black",
        linestyle="--",
        label=f"overall {report['class_fidelity']:.0%}",
    )
    left.set_ylim(0, 1)
    left.set_ylabel("share classified as the requested class")
    left.set_title("Class fidelity of generated images")
    left.legend()
    matrix = np.array(report["confusion"], dtype=np.float64)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    right.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    right.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    right.set_yticks(range(len(class_names)), class_names)
    right.set_xlabel("judged as")
    right.set_ylabel("requested")
    right.set_title("Generated images: requested vs judged class")
    for row in range(len(class_names)):
        for column in range(len(class_names)):
            right.text(
                column,
                row,
                f"{rows[row, column]:.2f}",
                ha="center",
                va="center",
                color="white" if rows[row, column] > 0.5 else "black",
                fontsize=8,
            )
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def markdown_report(report):
    class_names = report["class_names"]
    lines = [
        "# Evaluation report",
        "",
        f"Judge: a CNN at {report['classifier_size']} px trained {report['classifier_epochs']} epochs on the real "
        f"training split; accuracy on the real test split **{report['real_accuracy']:.1%}**.",
        "",
        "| measure | generated | real-vs-real floor |",
        "| --- | --- | --- |",
        f"| class fidelity | {report['class_fidelity']:.1%} | {report['real_accuracy']:.1%} (judge accuracy) |",
        f"| KID (x1000, +- spread over subsets) | {1000 * report['kid']:.2f} +- {1000 * report['kid_std']:.2f} "
        f"| {1000 * report['kid_floor']:.2f} +- {1000 * report['kid_floor_std']:.2f} |",
        f"| FID | {report['fid']:.2f} | {report['fid_floor']:.2f} |",
        f"| precision / recall (k=3) | {report['precision']:.2f} / {report['recall']:.2f} | |",
        f"| density / coverage (k=5) | {report['density']:.2f} / {report['coverage']:.2f} | |",
        f"| memorisation ratio (median nearest-train distance, generated / test) | {report['memorisation_ratio']:.2f} | 1.00 |",
        f"| near-copies of training images | {report['near_copy_share']:.1%} | {report['test_near_copy_share']:.1%} (real test images) |",
        f"| pixel-space memorisation ratio ({metrics.PIXEL_SIDE} px, training crops in 8 orientations) | {report['pixel_memorisation_ratio']:.2f} | 1.00 |",
        f"| pixel-space near-copies | {report['pixel_near_copy_share']:.1%} | {report['pixel_test_near_copy_share']:.1%} (real test images) |",
        "| nearest training crop (pixel space, any orientation) is the image's own source | "
        + (
            "no sources recorded"
            if report.get("pixel_nearest_is_source_share") is None
            else f"{report['pixel_nearest_is_source_share']:.1%}"
        )
        + " | chance |",
        "",
        "## Per class",
        "",
        "| class | generated | fidelity | KID x1000 | floor x1000 | judge accuracy on real test |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in class_names:
        row = report["per_class"].get(name)
        if row:
            lines.append(
                f"| {name} | {row['generated_images']} | {row['class_fidelity']:.1%} | {1000 * row['kid']:.2f} "
                f"| {1000 * row['kid_floor']:.2f} | {report['real_accuracy_per_class'].get(name, float('nan')):.1%} |"
            )
    lines += ["", "![class fidelity](evaluation_fidelity.png)", ""]
    if report.get("texture"):
        lines += texture_report.markdown_lines(report["texture"])
    if report.get("usefulness"):
        lines += usefulness_markdown(report["usefulness"], class_names)
    return "\n".join(lines)


def usefulness_markdown(usefulness, class_names):
    """The report's usefulness section: macro-F1 per share of real data, then recall per class."""
    lines = [
        "## Usefulness: a classifier trained on real vs real + synthetic data",
        "",
        "Macro-F1 on the real test split, mean +- standard deviation over seeds (each seed's score the "
        "mean of its classifier repeats); the generator used at a fraction was trained on that fraction "
        "only. The gain is real + synthetic minus real only, seed by seed.",
        "",
        "| share of real training data | real only | real + synthetic | synthetic only | gain per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for fraction, result in usefulness.items():
        cells = [
            f"{result[f'{name}_f1']:.3f} +- {result[f'{name}_f1_std']:.3f}"
            for name in ("real_only", "real_plus_synthetic", "synthetic_only")
        ]
        cells.append(", ".join(f"{gain:+.3f}" for gain in result.get("gain_per_seed", [])))
        lines.append(f"| {float(fraction):.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Recall per class (mean over seeds):",
        "",
        "| share | variant | " + " | ".join(class_names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in class_names) + " |",
    ]
    for fraction, result in usefulness.items():
        for name in ("real_only", "real_plus_synthetic", "synthetic_only"):
            recalls = result[f"{name}_recall_per_class"]
            lines.append(
                f"| {float(fraction):.0%} | {name.replace('_', ' ')} | "
                + " | ".join(f"{recalls[class_name]:.2f}" for class_name in class_names)
                + " |"
            )
    lines.append("")
    return lines


def write_report(report, generated_layout):
    """The report as JSON and Markdown, with its fidelity figure, beside the generated images."""
    json_path, markdown_path = (
        generated_layout.evaluation_report_json,
        generated_layout.evaluation_report_markdown,
    )
    _plot_report(report, generated_layout.fidelity_figure)
    write_json_atomic(json_path, report)
    write_text_atomic(markdown_path, markdown_report(report))
    return json_path, markdown_path
