"""`fedgen explain`: the figures exist, are readable images, are listed in explain.json,
and show what they claim (same latent per column, principal directions, one atlas tile
per code, integrated gradients that add up)."""

import json

import pytest
import torch
from PIL import Image

from fedgen import explain
from fedgen.cli import main
from fedgen.data import client_partition
from fedgen.models import build_model
from fedgen.reports import RunDir
from fedgen.rounds import client_round, plan_privacy

from .helpers import small_config

# The evaluator trains for one epoch on the 300 drawn glyphs of the config.
EVALUATION = ["evaluation.evaluator_epochs=1"]
VQ_SMALLEST = [
    "model.type=vqvae", "model.vq_channels=8", "model.code_dim=4", "model.codebook_size=16",
    "model.prior_channels=16", "model.prior_layers=2", "federation.rounds=1",
    "federation.prior_rounds=1",
]  # fmt: skip
GAN_FIGURES = {
    "gan_class_grid.png", "gan_interpolation_latent.png", "gan_interpolation_class.png",
    "gan_traversals.png", "saliency.png",
}  # fmt: skip
VQ_FIGURES = {
    "vq_samples.png", "vq_codebook_atlas.png", "vq_code_usage.png",
    "vq_code_usage_by_class.png", "vq_prior_class3.png", "saliency.png",
}  # fmt: skip


def _run_dir(path, overrides: list[str]) -> tuple:
    """A run directory whose checkpoints come from real DP client rounds (one client's
    update as the global model of each round), built with the library: what `fedgen
    explain` reads is the config and the checkpoints."""
    cfg = small_config(*overrides, f"evaluation.cache_dir={path / 'evaluators'}", *EVALUATION)
    run = RunDir.create(cfg, path / "run")
    data = client_partition(cfg, 0, cfg.federation.num_clients)
    state = plan_privacy(cfg, len(data))
    weights = build_model(cfg.model, seed=0).state_dict()
    for server_round in range(1, cfg.total_rounds + 1):
        result, state = client_round(
            cfg, weights, data, state, seed=server_round, server_round=server_round
        )
        weights = result.state_dict
        run.save_checkpoint(server_round, weights)
    return run.path, cfg


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    path, cfg = _run_dir(tmp_path_factory.mktemp("gan"), ["federation.rounds=1"])
    return path, cfg


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    return _run_dir(tmp_path_factory.mktemp("vq"), VQ_SMALLEST)


@pytest.fixture(scope="module")
def gan_explained(gan_run):
    path, _ = gan_run
    assert main(["explain", str(path), "--columns", "6"]) == 0
    return json.loads((path / "explain" / "explain.json").read_text())


def _check_figures(folder, index, expected: set[str]) -> None:
    listed = [f["file"] for f in index["figures"]]
    assert set(listed) == expected and len(listed) == len(expected)
    assert {p.name for p in folder.glob("*.png")} == expected  # nothing else, nothing missing
    for figure in index["figures"]:
        assert figure["title"] and figure["caption"].endswith(".")
        with Image.open(folder / figure["file"]) as img:
            img.verify()  # a complete, valid PNG
        with Image.open(folder / figure["file"]) as img:
            assert img.format == "PNG"
            assert img.size == (figure["width"], figure["height"])
            details = figure["details"]
            if "rows" in details:  # a grid of tiles: every tile at least 2 px per pixel
                assert img.width >= details["columns"] * 2 * 28
                assert img.height >= details["rows"] * 2 * 28


def test_gan_explain_writes_every_figure_and_says_it_costs_no_privacy(
    gan_run, gan_explained, capsys
):
    path, _ = gan_run
    index = gan_explained
    _check_figures(path / "explain", index, GAN_FIGURES)
    assert index["round"] == 1 and index["model"] == "gan"
    assert index["privacy_cost_epsilon"] == 0.0 and "No privacy cost" in index["privacy"]
    grid = next(f for f in index["figures"] if f["file"] == "gan_class_grid.png")
    assert grid["details"]["rows"] == 10 and grid["details"]["columns"] == 6
    # Both judges were explained, and their integrated gradients add up.
    saliency = index["measured"]["saliency"]
    assert len(saliency["discriminator_logit"]) == len(saliency["evaluator_probability"]) == 10
    assert all(gap < 0.05 for gap in saliency["completeness_gap_median"].values())
    shares = index["measured"]["traversal"]["variance_share"]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001


def test_explain_prints_the_privacy_statement(gan_run, tmp_path, capsys):
    path, _ = gan_run
    out = tmp_path / "elsewhere"
    assert main(["explain", str(path), "--out", str(out), "--no-evaluator"]) == 0
    printed = capsys.readouterr().out
    assert "No privacy cost" in printed and str(out) in printed
    index = json.loads((out / "explain.json").read_text())
    # Without the evaluator the saliency figure shows the discriminator only.
    assert "evaluator_probability" not in index["measured"]["saliency"]
    assert (out / "saliency.png").is_file()


def test_class_grid_uses_the_same_latent_in_every_row_of_a_column(gan_run):
    path, cfg = gan_run
    gan = build_model(cfg.model)
    gan.load_state_dict(RunDir(path).checkpoint()[1])
    g = gan.generator.eval()
    images, z = explain.class_latent_grid(g, 4, torch.Generator().manual_seed(3))
    assert images.shape == (10 * 4, 1, 28, 28) and z.shape == (4, g.latent_dim)
    with torch.no_grad():
        for c in range(10):
            for j in range(4):
                direct = g(z[j : j + 1], torch.tensor([c]))
                torch.testing.assert_close(images[c * 4 + j], direct[0])
    # and the columns really differ: four latents, not one
    assert not torch.allclose(images[0], images[1])


def test_principal_directions_recover_a_linear_maps_singular_vectors():
    torch.manual_seed(0)
    d, outputs = 6, 40
    u, _ = torch.linalg.qr(torch.randn(outputs, d))
    v, _ = torch.linalg.qr(torch.randn(d, d))
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    a = u @ torch.diag(s) @ v.T  # right singular vectors: the columns of v

    def linear(z, _labels):
        return z @ a.T

    directions, values = explain.principal_directions(
        linear, torch.randn(50, d), torch.zeros(50, dtype=torch.long), batch=16
    )
    torch.testing.assert_close(values, s**2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(directions @ directions.T, torch.eye(d), atol=1e-5, rtol=0)
    # Each direction is the matching singular vector, up to sign.
    torch.testing.assert_close((directions @ v).abs(), torch.eye(d), atol=1e-4, rtol=0)


def test_generator_directions_are_orthonormal_and_ordered_by_the_change_they_make(gan_run):
    path, cfg = gan_run
    gan = build_model(cfg.model)
    gan.load_state_dict(RunDir(path).checkpoint()[1])
    g = gan.generator.eval()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(40, g.latent_dim, generator=gen)
    labels = torch.arange(40) % 10
    directions, values = explain.principal_directions(g, latents, labels)
    d = g.latent_dim
    torch.testing.assert_close(directions @ directions.T, torch.eye(d), atol=1e-4, rtol=0)
    assert torch.all(values[:-1] >= values[1:]) and values[0] > 0
    # The eigenvalue is the mean squared change of the image per unit step (measured here
    # by finite differences, independently of the Jacobian).
    eps = 1e-2
    with torch.no_grad():
        for i in (0, d - 1):
            step = eps * directions[i]
            change = (g(latents + step, labels) - g(latents - step, labels)) / (2 * eps)
            measured = change.flatten(1).pow(2).sum(1).mean()
            assert measured == pytest.approx(float(values[i]), rel=0.05, abs=1e-4)


def test_integrated_gradients_add_up_to_the_change_of_the_score(gan_run):
    path, cfg = gan_run
    gan = build_model(cfg.model)
    gan.load_state_dict(RunDir(path).checkpoint()[1])
    labels = torch.arange(10)
    images = gan.sample(labels, generator=torch.Generator().manual_seed(0))
    baseline = torch.full_like(images, -1.0)

    def score(x):
        return gan.discriminator(x, labels)

    attr = explain.integrated_gradients(score, images, baseline, steps=64)
    with torch.no_grad():
        change = score(images) - score(baseline)
    torch.testing.assert_close(attr.flatten(1).sum(1), change, rtol=0.03, atol=1e-3)
    assert torch.all(attr[images == -1.0] == 0)  # background pixels equal the baseline


def test_slerp_keeps_the_ends_and_a_typical_norm():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    path = explain.slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), torch.full((5,), 3.0))


def test_vqvae_explain_writes_every_figure_with_one_atlas_tile_per_code(vq_run):
    path, cfg = vq_run
    assert main(["explain", str(path), "--label", "3"]) == 0
    folder = path / "explain"
    index = json.loads((folder / "explain.json").read_text())
    _check_figures(folder, index, VQ_FIGURES)
    assert index["round"] == 2 and index["model"] == "vqvae"
    atlas = next(f for f in index["figures"] if f["file"] == "vq_codebook_atlas.png")
    k = cfg.model.codebook_size
    assert atlas["details"]["tiles_per_panel"] == k and atlas["details"]["tiles"] == 3 * k
    assert 1 <= index["measured"]["codes_used"] <= k
    entropy = index["measured"]["prior_entropy_bits"]
    assert entropy["label"] == 3 and 0 <= entropy["mean"] <= entropy["uniform"] + 1e-6
    assert "evaluator_probability" in index["measured"]["saliency"]


def test_codebook_atlas_decodes_each_code_alone_and_in_context(vq_run):
    path, cfg = vq_run
    model = build_model(cfg.model)
    model.load_state_dict(RunDir(path).checkpoint()[1])
    model.eval()
    k = cfg.model.codebook_size
    codes = explain.prior_code_samples(model.prior, 4, torch.Generator().manual_seed(0))
    context = explain.typical_grid(codes[0])
    alone, placed = explain.codebook_atlas(model.vqvae, context)
    assert alone.shape == placed.shape == (k, 1, 28, 28)
    for code in (0, k - 1):
        full = torch.full((1, 7, 7), code)
        torch.testing.assert_close(alone[code], model.vqvae.decode_codes(full)[0])
        grid = context.clone()
        grid[3, 3] = code
        torch.testing.assert_close(placed[code], model.vqvae.decode_codes(grid[None])[0])
    # The prior's per-position distribution is a distribution at every position.
    marginal = explain.position_marginals(model.prior, codes[0], 0)
    assert marginal.shape == (k, 7, 7)
    torch.testing.assert_close(marginal.sum(0), torch.ones(7, 7))


def test_bad_requests_fail_with_one_line(vq_run, tmp_path, capsys):
    path, _ = vq_run
    assert main(["explain", str(path), "--checkpoint", "1"]) == 2
    err = capsys.readouterr().err
    assert "predates the prior" in err and "2..2" in err and err.count("\n") == 1
    assert main(["explain", str(path), "--label", "12"]) == 2
    assert "--label 12 is not a class" in capsys.readouterr().err
    # The evaluator's data missing: the error names it and the way around it.
    no_data = [
        "--set", "data.dataset=mnist", "--set", f"data.root={tmp_path}",
        "--set", "data.download=false", "--set", f"evaluation.cache_dir={tmp_path}",
    ]  # fmt: skip
    assert main(["explain", str(path), *no_data]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "--no-evaluator" in err and err.count("\n") == 1


def test_a_large_codebooks_atlas_shows_its_most_used_codes(tmp_path):
    cfg = small_config(*VQ_SMALLEST, "model.codebook_size=80")
    model = build_model(cfg.model, seed=0)
    settings = explain.ExplainSettings(prior_samples=4, seed=5)
    index = explain.explain_model(model, "vqvae", 2, tmp_path, settings, "glyphs")
    atlas = next(f for f in index["figures"] if f["file"] == "vq_codebook_atlas.png")
    shown = atlas["details"]["codes_shown"]
    assert len(shown) == explain.ATLAS_CODES and shown == sorted(shown)
    assert atlas["details"]["tiles"] == 3 * explain.ATLAS_CODES
    # The same draws as explain's own: no code left out is used more than one shown.
    codes = explain.prior_code_samples(model.prior, 4, torch.Generator().manual_seed(5))
    used = torch.bincount(codes.flatten(), minlength=80)
    left_out = [c for c in range(80) if c not in shown]
    assert used[left_out].max() <= used[shown].min()
    assert "saliency.png" not in {f["file"] for f in index["figures"]}  # no evaluator given
