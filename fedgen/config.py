"""One typed, validated schema for every fedgen setting.

YAML files, `--set key.sub=value` overrides and the config a server ships to its clients
all pass through `load_config` / `config_from_dict`, so a setting has one definition, one
default and one check. Errors name the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "FedgenConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_reference_markdown",
]


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range."""


class _Section(BaseModel):
    # Unknown keys are errors (typos must not silently fall back to defaults);
    # assignment is validated so code cannot put a config into an invalid state.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("run", min_length=1, description="Run name; prefix of the run directory.")
    out_dir: str = Field(
        "runs", description="Parent folder of run directories (the CLI's --out picks one exactly)."
    )
    eval_every: int = Field(
        5,
        ge=1,
        description="Evaluate on the real test set every this many rounds (and after the "
        "last): sample grids, Frechet distance, label consistency, reconstruction metrics; "
        "downstream accuracy as `evaluation.downstream` says.",
    )
    eval_examples: int = Field(
        1000, ge=10, description="Test images used by the per-round evaluation."
    )
    samples_per_class: int = Field(8, ge=1, le=32, description="Columns of the sample grid.")


class EvaluationConfig(_Section):
    samples: int = Field(
        10_000,
        ge=100,
        le=1_000_000,
        description="Generated images (and real test images, at most the test set) compared "
        "by the Frechet distance and label consistency.",
    )
    downstream: Literal["never", "final", "every"] = Field(
        "final",
        description="When the server measures downstream accuracy (costly: it trains a CNN): "
        "`final` after the last round, `every` at each evaluation, `never` not at all "
        "(not `off`: YAML reads that as false). `fedgen evaluate` always does unless `never`.",
    )
    downstream_examples: int | None = Field(
        None,
        ge=20,
        description="Generated, labelled images the downstream CNN learns from (unset: as "
        "many as the real training set).",
    )
    downstream_epochs: int = Field(
        5, ge=1, le=1000, description="Epochs of the downstream CNN (best one kept)."
    )
    downstream_seeds: int = Field(
        1,
        ge=1,
        le=20,
        description="Downstream CNNs trained on the same generated images, each with its own "
        "seed (initial weights, order, held-out split); the reported accuracy is their mean, "
        "with their lowest and highest. One CNN's figure moves by about a point between "
        "seeds on MNIST (docs/RESULTS.md), so comparisons finer than that need several.",
    )
    holdout_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=0.9,
        description="Share of the generated images held out to choose the downstream epoch "
        "(the real test set is never used for that).",
    )
    evaluator_epochs: int = Field(
        4, ge=1, le=1000, description="Epochs of the evaluator CNN on the real training split."
    )
    cache_dir: str | None = Field(
        None,
        description="Where trained evaluators are cached by data fingerprint (unset: "
        "$FEDGEN_CACHE_DIR/evaluators, else ~/.cache/fedgen/evaluators).",
    )
    inception_weights: str | None = Field(
        None,
        description="Local TorchScript FID Inception file (inception-2015-12-05.pt) for "
        "Inception FID; unset: skipped with a notice.",
    )


class DataConfig(_Section):
    dataset: Literal["glyphs", "mnist"] = Field(
        "glyphs",
        description="`glyphs`: built-in procedurally drawn shapes (no download); "
        "`mnist`: MNIST in IDX format.",
    )
    root: str | None = Field(
        None,
        description="Folder with the MNIST IDX files (gzip or raw). Unset: $FEDGEN_DATA_DIR, "
        "else ~/.cache/fedgen/mnist.",
    )
    download: bool = Field(True, description="Download MNIST (checksum-verified) when absent.")
    num_examples: int | None = Field(
        None, ge=1, description="Use only the first N training examples (quick runs, tests)."
    )
    glyphs_per_class: int = Field(
        2000,
        ge=10,
        le=100_000,
        description="Training images per class of the built-in dataset (drawn, so free: "
        "more examples per client lower the noise per example at the same epsilon).",
    )


class FederationConfig(_Section):
    num_clients: int = Field(4, ge=1, le=10_000, description="Simulated clients (SuperNodes).")
    rounds: int = Field(
        5, ge=1, le=100_000, description="Federated rounds (VQ-VAE: rounds of the autoencoder)."
    )
    prior_rounds: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="VQ-VAE only: rounds training the code prior, after `rounds` (without "
        "them it cannot generate). Unset: a third of `rounds`, rounded up, for the VQ-VAE "
        "(the ratio of configs/mnist_vqvae.yaml); 0 for the GAN.",
    )
    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of clients sampled for each round."
    )
    min_train_clients: int = Field(
        2, ge=1, description="Fewest clients trained per round (and needed online)."
    )
    sampling: Literal["random", "rotation"] = Field(
        "random",
        description="Which clients a round trains, when it trains fewer than all. random: "
        "Flower's uniform sample, so a client may be picked in every round and its privacy "
        "plan (its noise) covers every round. rotation: the clients take turns in a fixed "
        "order, each trained in at most ceil(rounds x per round / num_clients) rounds, and "
        "its plan covers only those: less noise for the same epsilon.",
    )
    partition: Literal["iid", "dirichlet", "shards"] = Field(
        "iid", description="How simulated clients split the training data."
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0.0, description="Label skew of `dirichlet` (smaller: more skewed)."
    )
    shards_per_client: int = Field(
        2, ge=1, description="Label-sorted shards per client (`shards`)."
    )
    strategy: Literal[
        "fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"
    ] = Field(
        "fedavg",
        description="Server strategy from flwr.serverapp.strategy. Where hostile clients "
        "are expected: fedmedian, fedtrimmedavg, krum or multikrum.",
    )
    pooled_target: bool = Field(
        False,
        description="`mmd` only: each client sends its noised release with its update, the "
        "server sums every client's releases, and from the second round on each client "
        "fits that pooled sum plus its new release instead of its own releases alone. The "
        "release is the client's DP output, so epsilon is unchanged; the pooled target has "
        "the noise of one release over all clients' data (docs/PRIVACY.md). Not with a "
        "robust strategy: a sum is not robust to a hostile client.",
    )
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal term weight.")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam server learning rate (eta).")
    server_tau: float = Field(1e-3, gt=0.0, description="FedAdam adaptivity (tau).")
    trimmed_beta: float = Field(
        0.2, gt=0.0, lt=0.5, description="FedTrimmedAvg fraction cut from each end."
    )
    malicious_clients: int = Field(
        0,
        ge=0,
        description="Krum/MultiKrum: how many hostile clients to tolerate per round (needs "
        "min_train_clients > 2 x this + 2; a round with fewer valid updates than 2 x this + 3 "
        "stops the run with an error rather than aggregate without that tolerance).",
    )
    client_cpus: float = Field(
        1.0,
        gt=0.0,
        description="CPU cores reserved per simulated client; a simulation starts no more Ray "
        "actors than a round trains clients, nor more than the cores hold at this share.",
    )
    client_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Torch threads a client trains with. Unset: client_cpus rounded down (at "
        "least 1). Fewer threads than cores reserved, e.g. client_cpus 2 with 1 thread on a "
        "2-core machine, runs a round's clients one after another in a single Ray actor: one "
        "process to start instead of two, and no thread waiting on a busy core.",
    )
    client_gpus: float = Field(
        0.0, ge=0.0, le=1.0, description="GPU share per simulated client (0.25: four share one)."
    )
    round_timeout: float = Field(
        3600.0, gt=0.0, description="Seconds the server waits for replies in a round."
    )
    first_round_timeout: float | None = Field(
        None,
        gt=0.0,
        description="Seconds the server waits in the first round it runs, when every client "
        "also starts up (processes, imports, data, noise calibration); on a busy machine "
        "that can take far longer than a later round. Unset: round_timeout.",
    )
    min_replies: int = Field(
        1,
        ge=1,
        description="Fewest clients whose update a round needs; clients that fail, time out "
        "or decline (privacy budget) are reported and left out, and a round with fewer "
        "updates stops the run with an error.",
    )

    @property
    def torch_threads(self) -> int:
        """Torch threads per client: `client_threads`, else whole `client_cpus`."""
        return self.client_threads or max(1, int(self.client_cpus))

    @property
    def clients_per_round(self) -> int:
        """How many clients a round samples (Flower's rule for `fraction_train`)."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_clients)

    def rounds_per_client(self, rounds: int) -> int:
        """The most of `rounds` consecutive rounds one client can be trained in: all of
        them under random sampling; under rotation, ceil(rounds x per round / clients)
        (any window of consecutive rounds hands out its turns evenly)."""
        per_round = min(self.clients_per_round, self.num_clients)
        if self.sampling == "random" or per_round >= self.num_clients:
            return rounds
        return math.ceil(rounds * per_round / self.num_clients)


class ModelConfig(_Section):
    type: Literal["gan", "vqvae", "mmd"] = Field(
        "mmd",
        description="Model family: `mmd` (the quickstart's), a class-conditional generator "
        "fitted to each client's privately released per-class mean embedding (a kernel mean "
        "of fixed random features, as in DP-MERF; the Gaussian release is the only step that "
        "reads data); `gan`, a class-conditional GAN whose discriminator trains with "
        "DP-SGD; or `vqvae`, a VQ-VAE with a code prior. Settings left unset take the "
        "family's own default (`FAMILY_DEFAULTS`).",
    )
    latent_dim: int = Field(64, ge=1, le=4096, description="Generator noise dimension.")
    generator_channels: int | None = Field(
        None,
        ge=4,
        le=1024,
        description="Generator width (channels of its 14x14 layer). Unset: 32 for `gan`, "
        "16 for `mmd` (the same images there for a quarter of the convolutions' cost).",
    )
    discriminator_channels: int = Field(
        32, ge=4, le=1024, description="Discriminator width (channels of its first layer)."
    )
    groups: int = Field(
        8, ge=1, description="GroupNorm groups (must divide both widths' larger layers)."
    )
    discriminator: Literal["conv", "scatter"] = Field(
        "scatter",
        description="GAN discriminator. `conv`: two trainable strided convolutions, the label "
        "as an input plane. `scatter`: fixed (untrained, so privacy-free) oriented wavelet "
        "features, as in Tramer and Boneh's ScatterNet, under a small trainable head with a "
        "projection on the label: far fewer DP-trained parameters, cheap per-example "
        "gradients.",
    )
    discriminator_head: Literal["mlp", "cnn"] = Field(
        "mlp",
        description="`scatter` only: the trainable head on the 7x7 feature maps, fully "
        "connected (`mlp`) or a small 3x3 convolution stack (`cnn`).",
    )
    discriminator_hidden: int = Field(
        64,
        ge=4,
        le=4096,
        description="`scatter` only: width of the trainable head (units, or channels).",
    )
    latent_code_dims: int = Field(
        0,
        ge=0,
        le=64,
        description="GAN: how many latent values the generator must make readable from its "
        "image (InfoGAN's continuous codes, read back by a small head trained on generated "
        "images only: no privacy cost), against a generator that ignores its latent. "
        "Weighted by training.latent_code_weight. 0: off.",
    )
    scatter_stride: Literal[1, 2] = Field(
        2,
        description="`scatter` only: compute the wavelet responses every `scatter_stride` "
        "pixels before pooling them to 7x7. 2 is about 3x cheaper (the wavelet modulus "
        "is smooth, so little is lost); it is the discriminator's largest cost on a CPU.",
    )
    embedding_frequencies: int = Field(
        1000,
        ge=8,
        le=100_000,
        description="`mmd` only: random Fourier frequencies of the mean embedding (its "
        "width is twice this, plus a count). More resolve finer differences; each adds "
        "noise to the release.",
    )
    embedding_bandwidth: float = Field(
        12.0,
        gt=0.0,
        description="`mmd` only: the Gaussian kernel's length scale on the embedding's "
        "joint input (wavelet features and pixels in [0, 1] of a 28x28 image). A fixed constant "
        "of the config, public like every setting; clients never compute it from their "
        "data. The default was chosen once from the median distance between training "
        "images, 11-13 for both MNIST and the glyphs; `configs/mnist_mmd.yaml` takes a "
        "sharper 7, measured better on MNIST with and without DP (docs/RESULTS.md).",
    )
    embedding_wavelet_share: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="`mmd` only: the share of the random frequencies that read the wavelet "
        "features alone (the rest read wavelets and pixels). The kernel is then a mixture: "
        "the wavelet part pins each class's shape, the pixel part its spread of positions "
        "and sizes. 0.7 was measured best on glyphs (docs/RESULTS.md).",
    )
    embedding_wavelet_bandwidth: float = Field(
        6.0,
        gt=0.0,
        description="`mmd` only: the length scale of the wavelet-only frequencies. A public "
        "constant like `embedding_bandwidth`; the default was chosen once near the median "
        "distance between training images' wavelet features (5-6 for MNIST and the "
        "glyphs); `configs/mnist_mmd.yaml` takes a sharper 3.",
    )
    embedding_seed: int = Field(
        0, ge=0, description="`mmd` only: seed of the random frequencies (public)."
    )
    vq_channels: int = Field(
        32, ge=4, le=1024, description="VQ-VAE encoder/decoder width (channels at 14x14)."
    )
    codebook_size: int = Field(64, ge=2, le=65536, description="VQ-VAE codebook entries K.")
    code_dim: int = Field(16, ge=1, le=1024, description="VQ-VAE code vector dimension.")
    commitment: float = Field(0.25, ge=0.0, description="VQ-VAE commitment loss weight (beta).")
    prior_channels: int = Field(
        64, ge=4, le=1024, description="Code prior (masked PixelCNN) width."
    )
    prior_layers: int = Field(4, ge=2, le=32, description="Code prior masked convolution layers.")
    prior_temperature: float = Field(
        1.0,
        gt=0.0,
        le=2.0,
        description="Code prior: sampling temperature (below 1: each code closer to the "
        "prior's most likely one; post-processing, no privacy cost).",
    )
    prior_guidance: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Code prior: sampling guidance towards the label, each code drawn "
        "from p(code | label)^(1+g) / p(code)^g with p(code) the prior's average over the "
        "classes (post-processing, no privacy cost; sampling then runs the prior's layers "
        "after the first once per class).",
    )
    prior_class_map: bool = Field(
        True,
        description="Code prior: the label enters as a map over the code grid (one vector "
        "per class and position) instead of one vector per class.",
    )
    prior_label_scale: float = Field(
        1.0,
        gt=0.0,
        le=1000.0,
        description="Code prior: the label's tables (its map or vector, and its code logits) "
        "enter multiplied by this, their weights divided by it, so the prior starts as the "
        "same function. Above 1 their per-example gradients take a larger share of the "
        "clipping norm under DP-SGD (an example touches only its own class's rows, so "
        "they get a small one) and move further per Adam step.",
    )

    @model_validator(mode="after")
    def _codes_fit_the_latent(self) -> ModelConfig:
        if self.latent_code_dims > self.latent_dim:
            raise ValueError(
                f"model.latent_code_dims={self.latent_code_dims} exceeds model.latent_dim="
                f"{self.latent_dim}: the codes are the latent's first values; lower it"
            )
        return self


class TrainingConfig(_Section):
    local_steps: int | None = Field(
        None,
        ge=1,
        description="Steps per client per round: DP-SGD steps (`gan`: discriminator steps), "
        "or for `mmd` generator steps after the round's release (they read no data). Unset: "
        "50 for `gan` and `vqvae`, 150 for `mmd`.",
    )
    prior_local_steps: int | None = Field(
        None, ge=1, description="VQ-VAE: DP-SGD steps per prior round (unset: local_steps)."
    )
    d_steps_per_g_step: int = Field(
        1, ge=1, description="Discriminator steps between two generator steps."
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Expected (Poisson) batch size; sample rate = batch_size / n, with n the "
        "client's size (replace_one) or privacy.public_num_examples (add_remove). Noise and "
        "accounting depend on it.",
    )
    physical_batch_size: int | None = Field(
        None,
        ge=1,
        description="Largest batch put through the network at once; a larger logical batch "
        "is processed in chunks and stepped once, as Opacus's BatchMemoryManager does "
        "(same result, less memory). Unset: the whole batch at once.",
    )
    lr_discriminator: float = Field(1e-3, gt=0.0, le=1.0, description="Adam lr of D.")
    lr_generator: float | None = Field(
        None, gt=0.0, le=1.0, description="Adam lr of G. Unset: 5e-4 for `gan`, 4e-3 for `mmd`."
    )
    beta1: float = Field(0.5, ge=0.0, lt=1.0, description="Adam beta1 of the GAN's networks.")
    mode_seeking_weight: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="GAN: weight of the mode-seeking term in the generator's loss, which "
        "rewards different images for different latents of one class (against collapse "
        "within a class). It reads generated images only, so it costs no privacy. 0: off.",
    )
    latent_code_weight: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="GAN: weight of the latent-code term (mean squared error of the codes "
        "read back) in the generator's loss; used when model.latent_code_dims > 0.",
    )
    g_steps_per_d_step: int = Field(
        2,
        ge=1,
        le=16,
        description="GAN: generator steps each time the generator trains. Generator steps "
        "read no real image, so they cost no privacy, only CPU.",
    )
    gan_loss: Literal["nonsaturating", "hinge"] = Field(
        "nonsaturating",
        description="GAN loss: `nonsaturating` (logistic) or `hinge` (Lim and Ye, 2017; the "
        "discriminator stops pushing on examples it already separates by a margin).",
    )
    instance_noise: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="GAN: std of Gaussian noise added to every image the discriminator sees "
        "(real and generated), which smooths its decision (Sonderby et al., 2017). 0: off.",
    )
    generator_ema: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="GAN and `mmd`: decay of an exponential moving average of the generator's "
        "weights over its local steps; the client sends the average instead of the last weights. "
        "Post-processing of DP outputs: no privacy cost. 0: off. Unset: 0.99 for `gan`, 0 "
        "for `mmd` (measured worse there).",
    )
    keep_optimizer_state: bool | None = Field(
        None,
        description="Each client keeps its Adam state (built from noised or "
        "post-processing gradients only) from one round to the next instead of restarting "
        "it; the state never leaves the client. A VQ-VAE keeps one per stage. Unset: false "
        "for `gan` and `vqvae`, true for `mmd`.",
    )
    mmd_samples_per_class: int = Field(
        10,
        ge=2,  # the unbiased estimate needs pairs
        le=4096,
        description="`mmd`: generated images per class in each generator step (the "
        "generator's batch; costs CPU, not privacy).",
    )
    lr_vqvae: float = Field(1e-3, gt=0.0, le=1.0, description="Adam lr of the VQ-VAE.")
    lr_prior: float = Field(1e-3, gt=0.0, le=1.0, description="Adam lr of the code prior.")


class PrivacyConfig(_Section):
    enabled: bool = Field(
        True,
        description="Train with DP-SGD (GAN: the discriminator; VQ-VAE: autoencoder and prior).",
    )
    target_epsilon: float = Field(
        10.0, gt=0.0, le=1000.0, description="Epsilon per client after all planned rounds."
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="Delta of (epsilon, delta)-DP.")
    noise_multiplier: float | None = Field(
        None,
        ge=0.0,
        description="Fix the noise instead of calibrating it to target_epsilon (unset: calibrate).",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-example clipping bound C.")
    accountant: Literal["rdp", "pld"] = Field(
        "pld",
        description="dp-accounting accountant: `pld` (privacy loss distributions, tight; "
        "both relations) or `rdp` (Renyi DP; add_remove only).",
    )
    neighboring: Literal["replace_one", "add_remove"] = Field(
        "replace_one",
        description="Neighbouring relation of the guarantee. `replace_one`: datasets that "
        "differ in one example's content; a client's n is public (it weights aggregation). "
        "`add_remove`: one example more or less; n stays private, so the sample rate and the "
        "aggregation weight come from `public_num_examples`. See docs/PRIVACY.md.",
    )
    public_num_examples: int | None = Field(
        None,
        ge=1,
        description="add_remove only: the dataset size every client declares public; the "
        "sample rate is batch_size / this and each reply's weight is this, never the real n.",
    )
    reproducible_noise: bool = Field(
        False,
        description="Seed DP noise and Poisson sampling from `seed` (simulation research "
        "only). The server knows the seed, so this voids the guarantee against it; devices "
        "refuse it. Off: a ChaCha20 stream keyed from OS entropy.",
    )
    canaries: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Audit canaries (simulation only; devices decline them): simulated "
        "client 0 trains on this many out-of-distribution canaries, each included with "
        "probability 1/2, and `fedgen audit` turns its guesses of which were included into "
        "an empirical lower bound on epsilon (Steinke, Nasr and Jagielski, 2023). They are "
        "training examples: they raise client 0's n and cost privacy. 0: off.",
    )

    @model_validator(mode="after")
    def _relation(self) -> PrivacyConfig:
        if self.neighboring == "replace_one" and self.accountant != "pld":
            raise ValueError(
                "privacy.accountant=rdp cannot account for Poisson sampling under "
                "privacy.neighboring=replace_one; use accountant pld, or neighboring add_remove"
            )
        if self.neighboring == "add_remove" and self.public_num_examples is None:
            raise ValueError(
                "privacy.neighboring=add_remove needs privacy.public_num_examples: under "
                "add/remove a client's real n may not leave it, so the sample rate and "
                "aggregation weight use a size declared public; set it (e.g. the smallest "
                "client's size), or use neighboring replace_one"
            )
        n = self.public_num_examples
        if self.enabled and n is not None and self.delta >= 1.0 / n:
            raise ValueError(
                f"privacy.delta={self.delta:g} is not below 1/public_num_examples={1.0 / n:.2g}: "
                "such a delta permits leaking whole examples, and every device refuses it; "
                "lower the delta"
            )
        return self


# Settings whose best value depends on the model family (measured in docs/RESULTS.md):
# left unset, each takes its family's value. The quickstart is `mmd` with these.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gan": {
        "model.generator_channels": 32,
        "training.local_steps": 50,
        "training.lr_generator": 5e-4,
        "training.generator_ema": 0.99,
        "training.keep_optimizer_state": False,
    },
    "mmd": {
        "model.generator_channels": 16,
        "training.local_steps": 150,
        "training.lr_generator": 4e-3,
        "training.generator_ema": 0.0,
        "training.keep_optimizer_state": True,
    },
}
FAMILY_DEFAULTS["vqvae"] = FAMILY_DEFAULTS["gan"]


class FedgenConfig(_Section):
    seed: int = Field(0, ge=0, description="Seed of partitions, models and sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when present."
    )
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> FedgenConfig:
        fed, model, tr = self.federation, self.model, self.training
        # Resolved here, like prior_rounds below, so the saved config and the clients'
        # copy hold the numbers and every reader sees a plain value.
        for key, value in FAMILY_DEFAULTS[model.type].items():
            section_name, name = key.split(".")
            section = getattr(self, section_name)
            if getattr(section, name) is None:
                setattr(section, name, value)
        if fed.prior_rounds is None:
            # Resolved here, so the saved config and the clients' copy hold the number.
            fed.prior_rounds = -(-fed.rounds // 3) if model.type == "vqvae" else 0
        if model.type != "vqvae" and fed.prior_rounds:
            raise ValueError(
                f"federation.prior_rounds={fed.prior_rounds} applies to model.type=vqvae only; "
                f"set it to 0 for model.type={model.type}"
            )
        if model.type == "mmd" and fed.strategy == "fedprox":
            raise ValueError(
                "federation.strategy=fedprox has no proximal term for model.type=mmd (its "
                "generator steps fit a released target, not the data); use fedavg"
            )
        if fed.pooled_target and model.type != "mmd":
            raise ValueError(
                f"federation.pooled_target sums the releases of model.type=mmd; "
                f"model.type={model.type} releases noised gradients, not a target: set it "
                "to false"
            )
        if fed.pooled_target and fed.strategy not in ("fedavg", "fedadam"):
            raise ValueError(
                f"federation.pooled_target sums every client's release, which "
                f"federation.strategy={fed.strategy} would not make robust to a hostile "
                "client; use fedavg or fedadam, or set pooled_target to false"
            )
        if model.type == "gan" and tr.d_steps_per_g_step > tr.local_steps:
            raise ValueError(
                f"training.d_steps_per_g_step={tr.d_steps_per_g_step} exceeds "
                f"training.local_steps={tr.local_steps}: the generator would never train; "
                "lower it or raise local_steps"
            )
        if fed.min_train_clients > fed.num_clients:
            raise ValueError(
                f"federation.min_train_clients={fed.min_train_clients} exceeds "
                f"federation.num_clients={fed.num_clients}; lower it or add clients"
            )
        if fed.strategy in ("krum", "multikrum") and fed.min_train_clients <= (
            2 * fed.malicious_clients + 2
        ):
            raise ValueError(
                f"federation.strategy={fed.strategy} with malicious_clients="
                f"{fed.malicious_clients} needs min_train_clients > "
                f"{2 * fed.malicious_clients + 2}; raise min_train_clients or lower "
                "malicious_clients"
            )
        sampled = fed.clients_per_round
        if fed.min_replies > sampled:
            raise ValueError(
                f"federation.min_replies={fed.min_replies} exceeds the {sampled} clients a "
                "round samples (num_clients x fraction_train, at least min_train_clients); "
                "no round could complete: lower it"
            )
        if model.type == "vqvae" and model.vq_channels % model.groups:
            raise ValueError(
                f"model.groups={model.groups} must divide model.vq_channels={model.vq_channels}; "
                "pick groups among its divisors"
            )
        for key in ("generator_channels", "discriminator_channels"):
            width = getattr(model, key)
            used = model.type == "gan" or (model.type == "mmd" and key == "generator_channels")
            if used and (2 * width) % model.groups:
                raise ValueError(
                    f"model.groups={model.groups} must divide 2*model.{key}={2 * width}; "
                    "pick groups among its divisors"
                )
        return self

    @property
    def prior_rounds(self) -> int:
        """`federation.prior_rounds`, resolved (never None once validated)."""
        return self.federation.prior_rounds or 0

    @property
    def total_rounds(self) -> int:
        return self.federation.rounds + self.prior_rounds

    @property
    def planned_steps(self) -> int:
        """DP steps a client takes if it joins every round it can be trained in (every
        round, unless `federation.sampling` is rotation): what the noise is planned for."""
        first = "mmd" if self.model.type == "mmd" else "vqvae"
        fed = self.federation
        return fed.rounds_per_client(fed.rounds) * self.local_steps_for(
            first
        ) + fed.rounds_per_client(self.prior_rounds) * self.local_steps_for("prior")

    @property
    def keeps_client_state(self) -> bool:
        """Whether a client keeps state of its own from one round to the next (never sent):
        its optimizer's moments, and for `mmd` the running mean of its releases."""
        return self.training.keep_optimizer_state or self.model.type == "mmd"

    @property
    def contribution_bound(self) -> tuple[str, float]:
        """What bounds one example's effect on a DP step, and its value: `mmd`'s
        per-example features have norm exactly 1; DP-SGD clips each example's gradient to
        `privacy.max_grad_norm`."""
        if self.model.type == "mmd":
            return "contribution norm", 1.0
        return "clipping bound", self.privacy.max_grad_norm

    def local_steps_for(self, stage: str) -> int:
        """DP steps a client takes in one round of `stage` (`mmd`: one release; its
        `training.local_steps` are generator steps, which read no data)."""
        if stage == "mmd":
            return 1
        if stage == "prior":
            return self.training.prior_local_steps or self.training.local_steps
        return self.training.local_steps

    def stage(self, server_round: int) -> str:
        """What a round trains: `gan`, `mmd`, or `vqvae` then `prior`."""
        if self.model.type in ("gan", "mmd"):
            return self.model.type
        return "vqvae" if server_round <= self.federation.rounds else "prior"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = FedgenConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-"))
        key = ".".join(str(p) for p in loc) or "(config)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(loc))
            lines.append(f"unknown key '{key}' (value {e['input']!r}); allowed here: {allowed}")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: got {e['input']!r}; {e['msg'].lower()}")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(raw: dict[str, Any] | None) -> FedgenConfig:
    """Validate a plain dict (from YAML, JSON or a message) into settings."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"invalid config: expected a mapping of sections, got {type(raw).__name__}"
        )
    try:
        return FedgenConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _number_or_text(text: str) -> Any:
    # YAML scalars (`3`, `true`, `null`); PyYAML reads `1e-5` as text, so try float too.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw config dict (copy)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = _number_or_text(text.strip())
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file from configs/")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at the top level")
    # PyYAML's YAML 1.1 reads 1e-5 as a string: turn numeric-looking strings into floats.
    return _coerce_numeric_strings(raw)


def _coerce_numeric_strings(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _coerce_numeric_strings(v) for k, v in node.items()}
    if isinstance(node, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", node):
        return float(node)
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FedgenConfig:
    """Read a YAML file (or the built-in quickstart defaults) and apply overrides."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []))


# Settings added after runs were written: a run's saved config.yaml (a complete dump of
# every setting) that lacks one was made by a fedgen that behaved as this value does, so
# resuming, evaluating or verifying the run keeps what it was trained with.
ADDED_SETTINGS: dict[str, Any] = {
    "model.embedding_wavelet_share": 0.0,  # 2026-11-24: `mmd`'s kernel was joint only
    "model.prior_class_map": False,  # 2026-11-25: the prior's label was one vector per class
}


def load_run_config(run_path: str | Path, overrides: list[str] | None = None) -> FedgenConfig:
    """A run directory's own config (`RUN/config.yaml`), with `overrides` applied; the
    settings fedgen added since the run was written take their `ADDED_SETTINGS` value."""
    path = Path(run_path) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_path} a fedgen run directory?")
    raw = _read_yaml(path)
    for key, value in ADDED_SETTINGS.items():
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and name not in raw[section]:
            raw[section][name] = value
    return config_from_dict(apply_overrides(raw, overrides or []))


def config_reference_markdown() -> str:
    """The generated reference of every key (docs/CONFIG.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `fedgen/config.py` by `fedgen config-reference`; do not edit by hand.",
        "Every key can be set in YAML or overridden with `--set section.key=value`.",
        "",
    ]
    top = FedgenConfig.model_fields
    scalars = [(n, f) for n, f in top.items() if not _is_section(f.annotation)]
    lines += ["## top level", "", "| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | `{_default(f)}` | {f.description} |" for n, f in scalars]
    for name, field in top.items():
        if not _is_section(field.annotation):
            continue
        lines += ["", f"## {name}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for sub, sf in field.annotation.model_fields.items():
            lines.append(f"| `{name}.{sub}` | `{_default(sf)}` | {sf.description} |")
    return "\n".join(lines) + "\n"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    return "null" if value is None else str(value)


# Settings a resumed run may change: they do not touch the model, the data, how it is split
# or the privacy plan (changing any of those would make the saved weights or the
# clients' accounting wrong for the rest of the run).
RESUME_SAFE = ("run.", "evaluation.", "device", "federation.round_timeout",
               "federation.first_round_timeout",
               "federation.client_cpus", "federation.client_threads", "federation.client_gpus",
               "federation.min_replies")  # fmt: skip


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resumable_config(run_path: str | Path, requested: FedgenConfig | None) -> FedgenConfig:
    """The config to resume `run_path` with: its own, or `requested` when that changes only
    settings in RESUME_SAFE; otherwise a ConfigError that lists what changed."""
    saved_path = Path(run_path) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_path} is not a fedgen run directory (no config.yaml)")
    saved = load_run_config(run_path)
    if requested is None:
        return saved
    before, after = _flat(saved.model_dump(mode="json")), _flat(requested.model_dump(mode="json"))
    unsafe = [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and not key.startswith(RESUME_SAFE)
    ]
    if unsafe:
        raise ConfigError(
            f"cannot resume {run_path}: these settings differ from the run's own config, and "
            "changing them mid-run would make its weights or privacy accounting unsound: "
            + "; ".join(unsafe)
            + ". Resume without them, or start a new run"
        )
    return requested
