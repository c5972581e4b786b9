"""The quality metrics measure what they claim, on real MNIST, in seconds of CPU."""

import numpy as np
import pytest
import torch

from fedgen import quality
from fedgen.data import load_mnist, to_tensors

TRAIN, TEST = 8000, 2000


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    train = to_tensors(load_mnist(mnist_dir, "train", download=False).subset(np.arange(TRAIN)))
    test = to_tensors(load_mnist(mnist_dir, "test", download=False).subset(np.arange(TEST)))
    return train, test


@pytest.fixture(scope="module")
def evaluator(mnist, tmp_path_factory):
    train, test = mnist
    cache = tmp_path_factory.mktemp("evaluators")
    recipe = quality.ClassifierRecipe(epochs=2)
    model, info = quality.load_or_train_evaluator(train, test, recipe, cache)
    return model, info, cache, recipe


def test_evaluator_is_accurate_after_a_short_cpu_training(evaluator):
    _, info, _, _ = evaluator
    # Measured: 0.953-0.960 over seeds 0-1 (8000 images, 2 epochs, 2-core CPU); a broken
    # model, loss or data pipeline lands far below.
    assert info["test_accuracy"] >= 0.93
    assert info["train_examples"] == TRAIN and not info["cached"]


def test_evaluator_is_cached_by_data_fingerprint(evaluator, mnist):
    model, info, cache, recipe = evaluator
    train, test = mnist
    again, info2 = quality.load_or_train_evaluator(train, test, recipe, cache)
    assert info2["cached"] and info2["data_fingerprint"] == info["data_fingerprint"]
    x = test[0][:50]
    torch.testing.assert_close(again.features(x), model.features(x))
    # Other data (one label changed) is another fingerprint, hence another evaluator.
    labels = train[1].clone()
    labels[0] = (labels[0] + 1) % 10
    assert quality.data_fingerprint(train[0], labels) != info["data_fingerprint"]


def test_a_damaged_evaluator_cache_is_retrained_and_rewritten_whole(evaluator, mnist, tmp_path):
    _, info, cache, recipe = evaluator
    train, test = mnist
    # Only the two finished files: no temporary file of the atomic writes is left behind.
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".safetensors")
    damaged = tmp_path / "evaluators"
    damaged.mkdir()
    for p in cache.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    weights = damaged / names[1]
    weights.write_bytes(weights.read_bytes()[:100])  # a crash's half file, from older code
    _, again = quality.load_or_train_evaluator(train, test, recipe, damaged)
    assert not again["cached"] and again["data_fingerprint"] == info["data_fingerprint"]
    _, third = quality.load_or_train_evaluator(train, test, recipe, damaged)
    assert third["cached"]
    assert sorted(p.name for p in damaged.iterdir()) == names


def test_frechet_distance_is_zero_for_identical_sets_and_large_for_noise(evaluator, mnist):
    model, _, _, _ = evaluator
    _, (test_x, _) = mnist
    real = quality.features(model, test_x)
    assert quality.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    halves = quality.frechet_distance(real[: TEST // 2], real[TEST // 2 :])
    noise = torch.rand(TEST, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    to_noise = quality.frechet_distance(quality.features(model, noise), real)
    # Two halves of the real test set differ by sampling error only.
    assert halves < 0.05 * to_noise
    assert to_noise > 10 * max(halves, 1e-3)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal(1.0, 2.0, (20000, 3))
    # N(0, I) vs N(1, 4I) in 3-D: |mu|^2 = 3, traces 3 + 12, 2 tr((1*4)^(1/2) I) = 12.
    assert quality.frechet_distance(a, b) == pytest.approx(3 + 3 + 12 - 12, rel=0.05)
    with pytest.raises(ValueError, match="equal D"):
        quality.frechet_distance(a, b[:, :2])


def test_label_consistency_rewards_right_labels(evaluator, mnist):
    model, _, _, _ = evaluator
    _, (test_x, test_y) = mnist
    assert quality.label_consistency(model, test_x, test_y) > 0.93
    assert quality.label_consistency(model, test_x, (test_y + 1) % 10) < 0.05


def test_one_pass_gives_the_features_and_the_label_consistency_of_two(evaluator, mnist):
    model, _, _, _ = evaluator
    _, (test_x, test_y) = mnist
    labels = test_y.clone()
    labels[::3] = (labels[::3] + 1) % 10  # a third wrong: a consistency well inside (0, 1)
    feats, consistency = quality.features_and_label_consistency(model, test_x, labels)
    np.testing.assert_allclose(feats, quality.features(model, test_x), rtol=1e-6, atol=1e-6)
    assert consistency == pytest.approx(quality.label_consistency(model, test_x, labels))
    assert 0.5 < consistency < 0.7


def test_downstream_accuracy_of_real_images_is_high_and_of_random_labels_is_chance(mnist):
    (train_x, train_y), test = mnist
    recipe = quality.ClassifierRecipe(epochs=3)
    real = quality.downstream_accuracy(train_x[:4000], train_y[:4000], test, recipe)
    assert real["downstream_accuracy"] > 0.9  # measured 0.93-0.95
    assert 1 <= real["downstream_selected_epoch"] <= 3
    assert real["downstream_holdout_examples"] == 400
    shuffled = train_y[:4000][torch.randperm(4000, generator=torch.Generator().manual_seed(0))]
    chance = quality.downstream_accuracy(train_x[:4000], shuffled, test, recipe)
    assert 0.03 < chance["downstream_accuracy"] < 0.2


def test_downstream_accuracy_over_seeds_is_the_mean_of_each_seeds_own_classifier(mnist):
    (train_x, train_y), test = mnist
    images, labels = train_x[:1500], train_y[:1500]
    recipe = quality.ClassifierRecipe(epochs=1, seed=5)
    one = quality.downstream_accuracy_over_seeds(images, labels, test, recipe, seeds=1)
    assert one == quality.downstream_accuracy(images, labels, test, recipe)
    each = [
        quality.downstream_accuracy(images, labels, test, quality.ClassifierRecipe(1, seed=s))[
            "downstream_accuracy"
        ]
        for s in (5, 6, 7)
    ]
    # Different seeds train different classifiers: the figures differ, so a loop that
    # reused one seed would fail the next assertions.
    assert len(set(each)) > 1
    three = quality.downstream_accuracy_over_seeds(images, labels, test, recipe, seeds=3)
    assert three["downstream_seeds"] == 3
    assert three["downstream_accuracy"] == pytest.approx(sum(each) / 3)
    assert (three["downstream_accuracy_min"], three["downstream_accuracy_max"]) == (
        min(each),
        max(each),
    )
    assert three["downstream_train_examples"] == 1350


def test_balanced_labels_cover_every_class_equally():
    labels = quality.balanced_labels(1000, seed=3)
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert not torch.equal(labels, quality.balanced_labels(1000, seed=4))


class PoolFeatures(torch.nn.Module):
    """A stand-in with the FID network's calling convention (RGB in [0, 255],
    `return_features=True`), to check the plumbing; the real file is too big to ship."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[1] == 3 and float(x.min()) >= 0 and float(x.max()) <= 255
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def test_inception_fid_reads_a_local_torchscript_file(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(PoolFeatures()).save(str(path))
    images = torch.rand(64, 1, 28, 28) * 2 - 1
    feats = quality.inception_features(path, images)
    assert feats.shape == (64, 48)
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        quality.inception_features(tmp_path / "missing.pt", images)


def test_evaluator_adds_inception_fid_only_when_configured(tmp_path, capsys):
    from fedgen.evaluation import Evaluator
    from fedgen.models import build_model

    from .helpers import small_config

    path = tmp_path / "net.pt"
    torch.jit.script(PoolFeatures()).save(str(path))
    common = ["evaluation.samples=100", "evaluation.evaluator_epochs=1",
              f"evaluation.cache_dir={tmp_path}"]  # fmt: skip
    cfg = small_config(*common)
    model = build_model(cfg.model, seed=0)
    without = Evaluator(cfg).quality(model, downstream=False)
    assert without["inception_fid"] is None and "Inception FID skipped" in capsys.readouterr().out
    with_fid = Evaluator(small_config(*common, f"evaluation.inception_weights={path}"))
    assert with_fid.quality(model, downstream=False)["inception_fid"] > 0


def test_the_evaluation_table_shows_the_spread_over_several_downstream_classifiers():
    from fedgen.evaluation import format_evaluation_table

    result = {
        "model": "mmd", "dataset": "mnist", "round": 5, "clients": 10, "partition": "iid",
        "rounds": 5, "privacy": {"private": False},
        "metrics": {
            "downstream_accuracy": 0.95, "downstream_accuracy_min": 0.9412,
            "downstream_accuracy_max": 0.9587, "downstream_seeds": 3,
        },
    }  # fmt: skip
    table = format_evaluation_table(result)
    rows = {line.rsplit("  ", 1)[0].strip(): line.rsplit("  ", 1)[1] for line in table.split("\n")}
    assert rows["downstream accuracy on real test images"] == "0.9500"
    assert rows["classifiers averaged (one seed each)"] == "3"
    assert (rows["the lowest of them"], rows["the highest of them"]) == ("0.9412", "0.9587")
