"""The figures of generation with the latent prior: what the class label does to one starting noise,
what guidance does, and counterfactuals (one real cilium under every class).

With posterior sampling, class_interpolation.png decodes one stored latent under every label, and
the images barely differ: the decoder ignores its label. With the prior the class acts earlier, in
which latent map the noise is walked to, so the figure decodes the same noise under each class.
"""

import numpy as np
from PIL import Image

from cilia_cvae import figures, generation

CLASS_FIGURE_NAME = "class_interpolation.png"
GUIDANCE_FIGURE_NAME = "guidance_sweep.png"
COUNTERFACTUAL_FIGURE_NAME = "counterfactuals.png"
NOISE_ROWS = 4  # starting noises (rows) of the class figure
GUIDANCE_SWEEP = (1.0, 2.0, 4.0)
GUIDANCE_SWEEP_NOISES = 2  # starting noises per class in the guidance sweep
COUNTERFACTUAL_ROWS = 6  # source crops shown in the counterfactual figure
# The figures' own random stream, apart from the generated images', so adding a figure never changes an image.
FIGURE_STREAM = 7_919


def figure_noise(generator, seed, count):
    map_shape = generator["prior"]["config"].map_shape
    rng = np.random.default_rng([seed, FIGURE_STREAM])
    return rng.standard_normal((count, *map_shape)).astype(np.float32)


def decoded_prior_draws(generator, labels, noise, *, guidance, steps):
    """uint8 images of the prior's maps from this noise under these class indices, each decoded under its class."""
    labels = np.asarray(labels, np.int32)
    latents = generation.prior_latents(generator, labels, noise, {"guidance": guidance, "steps": steps})
    one_hot = np.eye(len(generator["parameters"]["class_names"]), dtype=np.float32)[labels]
    return generation.decode_mixed(generator["decoder"], latents, one_hot, grain_model=generator.get("grain"))


def same_noise_under_each_class(generator, class_names, path, *, seed, guidance, steps):
    """A row per starting noise, a column per class: the same noise walked to a map of each class."""
    everyone = list(generator["parameters"]["class_names"])
    labels = np.tile([everyone.index(name) for name in class_names], NOISE_ROWS)
    noise = np.repeat(figure_noise(generator, seed, NOISE_ROWS), len(class_names), axis=0)
    images = decoded_prior_draws(generator, labels, noise, guidance=guidance, steps=steps)
    rows = list(images.reshape(NOISE_ROWS, len(class_names), *images.shape[1:]))
    figures.image_grid(
        rows,
        [f"noise {row + 1}" for row in range(NOISE_ROWS)],
        [f"as {name}" for name in class_names],
        path,
        f"The same starting noise under each class (latent prior, guidance {guidance:g}, {steps} steps)",
    )


def guidance_sweep(generator, class_names, path, *, seed, steps):
    """A row per class; for each starting noise, its image at guidance 1 (the conditional model alone), 2 and 4."""
    everyone = list(generator["parameters"]["class_names"])
    labels = np.repeat([everyone.index(name) for name in class_names], GUIDANCE_SWEEP_NOISES)
    noise = np.tile(figure_noise(generator, seed, GUIDANCE_SWEEP_NOISES), (len(class_names), 1, 1, 1))
    # images[guidance][class][noise]
    images = [
        decoded_prior_draws(generator, labels, noise, guidance=guidance, steps=steps).reshape(
            len(class_names), GUIDANCE_SWEEP_NOISES, *generator["decoder"].output_shape[1:3]
        )
        for guidance in GUIDANCE_SWEEP
    ]
    rows = [
        [
            images[column][row][sample]
            for sample in range(GUIDANCE_SWEEP_NOISES)
            for column in range(len(GUIDANCE_SWEEP))
        ]
        for row in range(len(class_names))
    ]
    titles = [
        f"noise {sample + 1}, guidance {guidance:g}"
        for sample in range(GUIDANCE_SWEEP_NOISES)
        for guidance in GUIDANCE_SWEEP
    ]
    figures.image_grid(
        rows, list(class_names), titles, path, "Guidance trades variety (1) for class fidelity (2, 4)"
    )


def counterfactuals(generator, processed_layout, source_class, written, class_names, path, *, edit_strength):
    """A row per source crop: the real crop, its reconstruction, then the written image of it under each class."""
    z_mean = generator["latents"][source_class][0]
    crops = processed_layout.images("train", source_class)
    count = min(COUNTERFACTUAL_ROWS, *(len(written[name]) for name in class_names))
    # Image i of every class was edited from source crop i (cycling through the crops in file order).
    sources = [index % len(z_mean) for index in range(count)]
    source_label = list(generator["parameters"]["class_names"]).index(source_class)
    one_hot = np.zeros((count, len(generator["parameters"]["class_names"])), np.float32)
    one_hot[:, source_label] = 1.0
    reconstructions = generation.decode_mixed(
        generator["decoder"], z_mean[sources], one_hot, grain_model=generator.get("grain")
    )
    rows = []
    for row, source in enumerate(sources):
        with Image.open(crops[source]) as crop:
            real = np.asarray(crop.convert("L"))
        edited = []
        for name in class_names:
            with Image.open(written[name][row]) as image:
                edited.append(np.asarray(image.convert("L")))
        rows.append([real, reconstructions[row], *edited])
    figures.image_grid(
        rows,
        [crops[source].name for source in sources],
        ["crop", "reconstruction", *(f"as {name}" for name in class_names)],
        path,
        f"{source_class} crops redrawn under each class (edit strength {edit_strength:g})",
    )


VARIATION_FIGURE_NAME = "variations.png"
VARIATIONS_PER_CLASS = 2  # source crops of each class shown in the variation figure


def variations(generator, processed_layout, written, class_names, path, *, seed, diffusion):
    """A row per class: for its first images, the real source crop in the drawn orientation, its
    reconstruction, and the written variation: what was kept (layout) and what was redrawn (detail)."""
    all_names = list(generator["parameters"]["class_names"])
    rows = []
    for name in class_names:
        label = all_names.index(name)
        count = min(VARIATIONS_PER_CLASS, len(written[name]))
        drawn = generation.edit_sources(generator, label, count, seed, diffusion)
        oriented = generation.source_latents(
            generator, name, drawn["sources"], drawn["orientations"], diffusion
        )
        one_hot = np.zeros((count, len(all_names)), np.float32)
        one_hot[:, label] = 1.0
        reconstructions = generation.decode_mixed(
            generator["decoder"], oriented, one_hot, grain_model=generator.get("grain")
        )
        crops = processed_layout.images("train", name)
        row = []
        for index in range(count):
            with Image.open(crops[drawn["sources"][index]]) as crop:
                real = np.asarray(crop.convert("L"))[None, :, :, None]
            with Image.open(written[name][index]) as image:
                variation = np.asarray(image.convert("L").resize(real.shape[1:3][::-1]))
            real = generation.orient_maps(real, drawn["orientations"][index : index + 1])[0, :, :, 0]
            row += [real, reconstructions[index], variation]
        rows.append(row)
    figures.image_grid(
        rows,
        list(class_names),
        ["crop", "reconstruction", "variation"] * VARIATIONS_PER_CLASS,
        path,
        f"Training crops redrawn under their own class (strength {diffusion['edit_strength']:g}"
        + (f", mixed {diffusion['mix']:g} with a second crop)" if diffusion.get("mix") else ")"),
    )
