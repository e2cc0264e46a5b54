"""Train the conditional VAE on the processed 224 x 224 images.

Reads   Processed Input Images/224x224/train/<Class>/*.png and its preprocessing.json
        (class names, resize mode, data fingerprint); the test split is never read.
Writes  Models/224x224/: cvae_encoder.keras, cvae_decoder.keras, cvae_parameters.json,
        training_history.csv, loss_plot.png, samples_epoch_<N>.png, checkpoints/, logs/ (TensorBoard)
        Latent Space Tensors/224x224/: z_mean_<Class>.npy, z_log_var_<Class>.npy
        with --prior_epochs: latent_prior.keras, prior_history.csv and class_filter.keras (the second stage)

Example:
    python Scripts/cvae_training_224x224.py --epochs=40
    python Scripts/cvae_training_224x224.py --architecture=original --augment=False --class_balanced=False --kl_warmup_epochs=0 --fresh=True

Expected run time on a 2-core CPU: about 1-3 minutes per epoch of 4,000 images for the
default model (the original architecture is 2.5x slower). A killed run resumes from its
last finished epoch when started again with the same command. See the README for several
GPUs or hosts (TF_CONFIG).
"""

from cilia_cvae import config
from cilia_cvae.config import configure
from cilia_cvae.preprocessing import read_processed_facts
from cilia_cvae.training_settings import check_prior_settings, check_settings

IMAGE_SIZE = 224  # side of the square images; that size must have been preprocessed
ARCHITECTURE = "default"  # "default" (ours) or "original" (the first implementation, ported to Keras 3)
LATENT_DIM = 128  # length of the latent vector (the original architecture, or LATENT_MAP_STRIDE=0)
BASE_CHANNELS = 12  # default architecture: channels at half resolution, doubled at each further halving
MAX_CHANNELS = 128  # default architecture: cap on the channels of the low-resolution layers
LATENT_MAP_STRIDE = 8  # default architecture: the latent is a map at 1/stride of the image side (28 x 28 at 224), each cell describing its own patch; 0: one latent vector of LATENT_DIM numbers
LATENT_MAP_CHANNELS = 4  # default architecture: numbers per cell of the latent map
EPOCHS = 40  # passes over the training images
BATCH_SIZE = 32  # images per step, over all replicas together
LEARNING_RATE = 1e-3  # Adam step size
RECONSTRUCTION_LOSS = "auto"  # "auto" (the architecture's own), "calibrated_gaussian" (a Gaussian whose variance is learnt per image: ours) or "sum_squared_error" (a fixed variance: the original's)
STRUCTURAL_WEIGHT = 0.0  # weight of a structural-similarity (SSIM) term beside the reconstruction loss (0: none; 1: as much say as the pixel values); the history's reconstruction_loss then includes it
ADVERSARIAL_WEIGHT = 0.0  # weight of the patch discriminator's hinge loss on the decoder (adversarial.py), relative to the pixels' pull at the decoder's last layer (VQGAN's adaptive weight); 0: none
ADVERSARIAL_START_EPOCH = 6  # the first epoch the adversarial loss trains the decoder (after the KL warm-up); only epochs from it on can be the saved best epoch
KL_WEIGHT = 1.0  # weight of the KL term once warmed up (1: the ELBO, the original's; above 1 a beta-VAE, whose latent keeps less detail and is easier for the latent prior to learn)
KL_WARMUP_EPOCHS = (
    5  # the KL weight rises linearly to KL_WEIGHT over this many epochs (0: no warm-up, as the original)
)
SEED = 123  # seeds the validation split, shuffling, augmentation and initial weights
VALIDATION_FRACTION = 0.1  # share of the train split held out to choose the best epoch
CLASS_BALANCED = True  # draw every class equally often, so rare classes are learnt as well as Normal
AUGMENT = True  # random rotation by any angle and flips (labels are unchanged by both)
EARLY_STOPPING_PATIENCE = 0  # stop after this many epochs without validation improvement (0: never)
MAX_MINUTES = 0.0  # do not start an epoch that would end after this many minutes of this run (0: no limit); a killed run, resumed, gets it afresh
FRESH = False  # move an earlier run in the output folders aside and start again
CONTINUE_FINISHED = False  # train a finished run on from its last epoch, up to a raised --epochs or for --max_minutes more (same settings only); its models are replaced when it finishes again
SAMPLE_EVERY = 5  # write samples_epoch_<N>.png every this many epochs
PRIOR_EPOCHS = 0  # second stage: epochs of the latent diffusion prior over every training crop's latent map in 8 orientations (0: none; inference's --sampling=diffusion needs it); with --continue_finished=True on a finished run, only the prior is trained
PRIOR_BATCH_SIZE = 64  # latent maps per prior step, over all replicas together
PRIOR_LEARNING_RATE = (
    1e-3  # Adam step size of the prior (2e-4 left the loss at 0.69 after 2 epochs at 224, 1e-3 at 0.62)
)
PRIOR_LEARNING_RATE_SCHEDULE = "constant"  # "constant" (PRIOR_LEARNING_RATE throughout) or "cosine" (from PRIOR_LEARNING_RATE down to 0 along a half cosine over PRIOR_EPOCHS, so the last steps settle instead of jitter; raising --prior_epochs later stretches the curve)
PRIOR_CLASS_BALANCED = False  # draw every class's latent maps equally often in the prior's batches (False: as often as the training crops have them, Normal the most)
PRIOR_WIDTH = 32  # channels of the prior's U-Net at the map's resolution (doubled at the lower levels)
PRIOR_ATTENTION_SIDE = 0  # self-attention after each residual block of the prior's levels whose map side is at most this (14: the 14 x 14 level too, where the ring of doublets can agree with itself), besides the one at its lowest map (0: that one only)
PRIOR_POSITION_CHANNEL = False  # give the prior's network each cell's distance from the crop's centre, where the ring and the central pair sit, as one more input channel
PRIOR_LABEL_DROPOUT = 0.1  # share of prior training examples shown no class, for classifier-free guidance
PRIOR_MAX_NOISE_LEVEL = 1.0  # the highest noise level the prior trains on, a share of its schedule: 1 all (full draws, --sampling=diffusion); e.g. 0.7 only what variations and counterfactuals up to strength 0.7 use, learnt on the same budget by more steps each
PRIOR_PREDICTION = "v"  # what the prior's network predicts: "v" (velocity) or "noise"
PRIOR_LOSS_WEIGHTING = (
    "uniform"  # weight of each noise level's error: "min_snr" (min-SNR-5, Hang et al. 2023) or "uniform"
)
PRIOR_SAMPLE_EVERY = 2  # write prior_samples_epoch_<N>.png every this many prior epochs (and after the last)
CLASS_FILTER_EPOCHS = 5  # second stage, after the prior: epochs of the class filter, a small CNN of the train split's crops at 64 px that inference's --class_filter=True uses to keep only images of the requested class (0: none); a finished prior without one gets one with --continue_finished=True
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # read: the preprocessed images
MODELS_DIR = config.MODELS_DIR  # written: <S>x<S>/ with the models, history and checkpoints
LATENT_TENSORS_DIR = config.LATENT_TENSORS_DIR  # written: <S>x<S>/ with the latents of the training images
settings = configure(globals())

# The preprocessing stage recorded class names, resize mode and a fingerprint of the data;
# a size it never made is refused here with one line.
facts = read_processed_facts(PROCESSED_IMAGES_DIR, IMAGE_SIZE)
# Every setting is checked before TensorFlow loads (seconds), so a mistyped value is answered
# at once, and a bad prior setting before the CVAE trains for hours.
check_settings(settings, len(facts["class_names"]))
check_prior_settings(settings)
from cilia_cvae import prior_training, training  # noqa: E402 (TensorFlow loads here)

# Train or resume, keep the best validation epoch, save the encoder, decoder and latents.
parameters = training.train(settings, facts)
# The second stage: the latent prior of the finished run (skipped with a note when PRIOR_EPOCHS is 0).
if parameters:
    parameters = prior_training.train_prior(settings, facts, parameters)
if parameters:
    losses = parameters["final_losses"]["best_epoch"]
    print(
        f"done: best epoch {parameters['best_epoch']} of {parameters['epochs_done']}, "
        f"validation loss {losses.get('val_loss', losses['loss']):.1f}"
    )
