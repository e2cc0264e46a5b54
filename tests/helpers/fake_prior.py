"""Give a finished tiny run the latent prior the second training stage would leave.

    add_latent_prior(models_dir, latent_tensors_dir, image_size)

saves a small denoiser at RunLayout.latent_prior and records it under "latent_prior" in the
run's cvae_parameters.json, exactly as prior_training.py records a trained one (its file's
sha256, the run's fingerprint, the PriorConfig with the latents' measured standardisation).
With train_steps=0 the network is untrained but its weights are jittered: a fresh denoiser's
zero output layer would predict nothing, so neither class nor guidance would change a sample,
and tests of either would pass vacuously. With train_steps above 0 it is trained that many
steps on the run's stored latent means instead.
"""

import json

import numpy as np

from cilia_cvae import latent_prior
from cilia_cvae.files import sha256_of_file
from cilia_cvae.layout import RunLayout

WEIGHT_JITTER = 0.2


def stored_latents(layout, class_names):
    """Every class's stored latent means and their class indices, in class order."""
    means = [np.load(layout.latent("z_mean", name), allow_pickle=False) for name in class_names]
    labels = np.concatenate([np.full(len(values), label) for label, values in enumerate(means)])
    return np.concatenate(means).astype(np.float32), labels.astype(np.int32)


def jitter_weights(denoiser, seed):
    rng = np.random.default_rng(seed)
    denoiser.set_weights(
        [weight + WEIGHT_JITTER * rng.standard_normal(weight.shape) for weight in denoiser.get_weights()]
    )


def trained_denoiser(prior_config, latents, labels, train_steps, seed):
    prior = latent_prior.build_latent_prior(prior_config, learning_rate=1e-3, seed=seed)
    standardised = latent_prior.from_model_latents(latents, prior_config)
    batch = min(32, len(standardised))
    for step in range(train_steps):
        chosen = np.random.default_rng([seed, step]).integers(0, len(standardised), batch)
        prior.train_step((standardised[chosen], labels[chosen]))
    return prior.ema_denoiser


def add_latent_prior(
    models_dir, latent_tensors_dir, image_size, *, width=8, train_steps=0, seed=0, max_noise_level=1.0
):
    """Save a denoiser for this run and record it; returns (denoiser, prior_config)."""
    layout = RunLayout(models_dir, latent_tensors_dir, image_size)
    parameters = json.loads(layout.parameters.read_text(encoding="utf-8"))
    class_names, side = parameters["class_names"], int(parameters["latent_map_side"])
    latents, labels = stored_latents(layout, class_names)
    shift, scale = latent_prior.measure_standardisation(latents)
    prior_config = latent_prior.PriorConfig(
        map_side=side,
        latent_channels=int(parameters["latent_dim"]) // (side * side),
        num_classes=len(class_names),
        width=width,
        max_noise_level=max_noise_level,
        latent_shift=shift,
        latent_scale=scale,
    )
    if train_steps:
        denoiser = trained_denoiser(prior_config, latents, labels, train_steps, seed)
    else:
        denoiser = latent_prior.build_denoiser(prior_config, name="ema_denoiser")
        jitter_weights(denoiser, seed)
    denoiser.save(layout.latent_prior)
    parameters["latent_prior"] = {
        "prior_config": prior_config.to_json(),
        "epochs_done": 1 if train_steps else 0,
        "sha256": sha256_of_file(layout.latent_prior),
        "run_fingerprint": parameters["run_fingerprint"],
        "final_loss": 1.0,
        "training_seconds": 0.0,
        "training_latents": int(len(latents)),
        "settings": {"PRIOR_EPOCHS": 1 if train_steps else 0, "PRIOR_WIDTH": width},
    }
    layout.parameters.write_text(json.dumps(parameters, indent=2), encoding="utf-8")
    return denoiser, prior_config
