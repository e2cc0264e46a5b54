"""Figures that show at a glance whether generated images look right."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cilia_cvae.files import atomic_path  # noqa: E402


def save_figure(figure, path, dpi=110):
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(figure)


def _show(axis, image, title=None):
    axis.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8)


def image_grid(rows, row_labels, column_titles, path, title):
    """A grid of grayscale images: one row per class, the titles above the first row."""
    row_count, column_count = len(rows), max(len(row) for row in rows)
    figure, axes = plt.subplots(
        row_count, column_count, figsize=(1.6 * column_count, 1.7 * row_count), squeeze=False
    )
    for row_index, row in enumerate(rows):
        for column_index in range(column_count):
            axis = axes[row_index][column_index]
            if column_index < len(row) and row[column_index] is not None:
                _show(axis, row[column_index], column_titles[column_index] if row_index == 0 else None)
            else:
                axis.axis("off")
        axes[row_index][0].set_ylabel(row_labels[row_index], fontsize=9)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    save_figure(figure, path)


def image_comparison(real_paths, generated_paths, class_names, path, examples=4):
    """A row per class: real training examples, then generated ones."""
    rows = []
    for class_name in class_names:
        real = [Image.open(item).convert("L") for item in real_paths.get(class_name, [])[:examples]]
        generated = [Image.open(item).convert("L") for item in generated_paths.get(class_name, [])[:examples]]
        real += [None] * (examples - len(real))
        rows.append(real + generated)
    titles = [f"real {index + 1}" for index in range(examples)] + [
        f"generated {index + 1}" for index in range(examples)
    ]
    image_grid(rows, class_names, titles, path, "Real training images (left) beside generated ones (right)")


def cross_resolution(
    real_paths,
    generated_by_size,
    class_names,
    path,
    examples=2,
    title="Real images beside generated ones at each resolution",
):
    """A row per class: real examples, then generated ones of each source (resolution or model),
    as the original's Image Comparison did for resolutions."""
    rows, titles = [], [f"real {index + 1}" for index in range(examples)]
    for size_name in generated_by_size:
        titles += [f"{size_name} #{index + 1}" for index in range(examples)]
    for class_name in class_names:
        row = [Image.open(item).convert("L") for item in real_paths.get(class_name, [])[:examples]]
        row += [None] * (examples - len(row))
        for generated in generated_by_size.values():
            images = [Image.open(item).convert("L") for item in generated.get(class_name, [])[:examples]]
            row += images + [None] * (examples - len(images))
        rows.append(row)
    image_grid(rows, class_names, titles, path, title)


def latent_space(latents_by_class, path):
    """The stored training latents in two dimensions (PCA), coloured by class."""
    from sklearn.decomposition import PCA

    class_names = list(latents_by_class)
    stacked = np.concatenate([latents_by_class[name] for name in class_names])
    points = (
        PCA(n_components=2, random_state=0).fit_transform(stacked)
        if len(stacked) > 2
        else np.zeros((len(stacked), 2))
    )
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    start = 0
    for class_name in class_names:
        count = len(latents_by_class[class_name])
        axis.scatter(
            points[start : start + count, 0],
            points[start : start + count, 1],
            s=6,
            alpha=0.6,
            label=f"{class_name} ({count})",
        )
        start += count
    axis.set_xlabel("principal component 1")
    axis.set_ylabel("principal component 2")
    axis.set_title("Latent means of the training images (PCA)")
    axis.legend(markerscale=3, fontsize=8)
    save_figure(figure, path)


def class_interpolation(
    decode, latent_dim, class_names, reference_class, reference_latent, defect_latents, path, steps=6
):
    """Top row: one latent decoded under every class label. Below: morphs from the reference class to each defect.

    `decode(latents, label_vectors)` returns uint8 images; label vectors may blend two classes.
    """
    count = len(class_names)
    reference = class_names.index(reference_class)
    same_latent = np.repeat(reference_latent[None, :], count, axis=0)
    top_row = decode(same_latent, np.eye(count, dtype=np.float32))
    defects = [name for name in class_names if name != reference_class]
    fractions = np.linspace(0.0, 1.0, steps)
    morph_rows = []
    for defect in defects:
        target = class_names.index(defect)
        latents = np.array(
            [(1 - t) * reference_latent + t * defect_latents[defect] for t in fractions], np.float32
        )
        labels = np.zeros((steps, count), np.float32)
        labels[:, reference] = 1 - fractions
        labels[:, target] = fractions
        morph_rows.append(decode(latents, labels))
    columns = max(count, steps)
    figure, axes = plt.subplots(
        1 + len(defects), columns, figsize=(1.6 * columns, 1.75 * (1 + len(defects))), squeeze=False
    )
    for column in range(columns):
        if column < count:
            _show(axes[0][column], top_row[column], f"as {class_names[column]}")
        else:
            axes[0][column].axis("off")
    axes[0][0].set_ylabel("same latent", fontsize=9)
    for row, (defect, images) in enumerate(zip(defects, morph_rows), start=1):
        for column in range(columns):
            if column < steps:
                _show(axes[row][column], images[column], f"{fractions[column]:.1f}" if row == 1 else None)
            else:
                axes[row][column].axis("off")
        axes[row][0].set_ylabel(f"{reference_class}\n-> {defect}", fontsize=9)
    figure.suptitle(
        "One latent under each class label (top); morphs towards each defect (below)", fontsize=11
    )
    figure.tight_layout()
    save_figure(figure, path)


def first_images(folder, class_names, count, pattern="*.png"):
    return {name: sorted((Path(folder) / name).glob(pattern))[:count] for name in class_names}


def real_phantom_generated(real_tem_paths, phantom_paths, generated_paths, class_names, path, examples=3):
    """The README's picture: per class, phantoms beside generated images; real TEM crops (when given) below."""
    rows, labels = [], []
    for class_name in class_names:
        phantoms = [Image.open(item).convert("L") for item in phantom_paths.get(class_name, [])[:examples]]
        generated = [Image.open(item).convert("L") for item in generated_paths.get(class_name, [])[:examples]]
        rows.append(phantoms + [None] * (examples - len(phantoms)) + generated)
        labels.append(class_name)
    if real_tem_paths:
        # Real crops are not square: shown squashed to the model's square, as preprocessing does.
        side = Image.open(phantom_paths[class_names[0]][0]).size[0]
        rows.append(
            [Image.open(item).convert("L").resize((side, side)) for item in real_tem_paths[: 2 * examples]]
        )
        labels.append("real TEM")
    titles = [f"phantom {index + 1}" for index in range(examples)] + [
        f"generated {index + 1}" for index in range(examples)
    ]
    image_grid(
        rows,
        labels,
        titles,
        path,
        "Phantoms (left) and generated images (right) per class; real TEM crops below, when given",
    )


# Training progress: the sample grid of every epoch and the loss curves.


def sample_grid(model, latents, labels, references, num_classes, *, posterior_draws=False):
    """A uint8 mosaic, one row per class: a reference image, its reconstruction, then the
    decoded fixed prior draws, or, with posterior_draws (a latent map, whose prior draws are
    texture, not cilia), draws around the reference's latent with the same fixed noise."""
    # Direct calls, not predict: predict would run on every replica and, in a multi-worker
    # run, wait for workers that never call it (only the chief draws samples).
    reference, reference_labels = references
    z_mean, z_log_var = model.encoder([reference, reference_labels], training=False)
    reconstructions = model.decoder([z_mean.numpy(), reference_labels], training=False).numpy()
    if posterior_draws:
        columns = len(latents) // num_classes
        latents = (
            np.repeat(z_mean.numpy(), columns, axis=0)
            + np.repeat(np.exp(0.5 * z_log_var.numpy()), columns, axis=0) * latents
        )
    samples = model.decoder([latents, labels], training=False).numpy()
    size = reference.shape[1]
    rows = samples.reshape(num_classes, -1, size, size)
    rows = np.concatenate([reference[:, None, :, :, 0], reconstructions[:, None, :, :, 0], rows], axis=1)
    grid = rows.transpose(0, 2, 1, 3).reshape(num_classes * size, -1)
    return np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8)


def save_sample_figure(path, grid, class_names, epoch, posterior_draws=False):
    """The training sample grid with its rows named by class and its first two columns explained."""
    row_height = grid.shape[0] / len(class_names)
    figure, axis = plt.subplots(
        figsize=(grid.shape[1] / row_height * 1.6 + 2.0, len(class_names) * 1.6 + 0.8)
    )
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255)
    axis.set_yticks([(row + 0.5) * row_height for row in range(len(class_names))], class_names)
    axis.set_xticks([(column + 0.5) * row_height for column in range(2)], ["real", "reconstructed"])
    drawn = "draws around its latent" if posterior_draws else "prior samples (same noise in every row)"
    axis.set_title(f"after epoch {epoch}: a real image, its reconstruction, then {drawn}")
    figure.tight_layout()
    with atomic_path(path) as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)
    plt.close(figure)


def save_loss_plot(path, history, terms):
    """One panel per loss term, training and (when there is any) validation, by epoch."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.6))
    for axis, term in zip(axes, terms):
        axis.plot(epochs, [row[term] for row in history], label="training")
        if f"val_{term}" in history[0]:
            axis.plot(epochs, [row[f"val_{term}"] for row in history], label="validation")
        axis.set_title(term.replace("_", " "))
        axis.set_xlabel("epoch")
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)
    plt.close(figure)
