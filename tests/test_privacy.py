import pytest
import torch

from fedgen.data import client_partition
from fedgen.models import build_gan
from fedgen.privacy import PlannedBudget, calibrate_noise, epsilon_of, sample_rate_for
from fedgen.rounds import client_round, plan_privacy

from .helpers import small_config


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 10.0])
def test_calibrated_noise_reaches_target_within_two_percent(accountant, target):
    plan = PlannedBudget(target, 1e-5, 1 / 94, 2000, accountant)
    sigma = calibrate_noise(plan)
    eps = epsilon_of([(sigma, plan.sample_rate, plan.steps)], plan.delta, accountant)
    assert 0.98 * target <= eps <= target


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_training_all_planned_rounds_spends_the_target(accountant):
    """Through the real training path: the accountant Opacus drives during training ends,
    after every planned round, within 2% below the target (never above)."""
    cfg = small_config(f"privacy.accountant={accountant}")
    data = client_partition(cfg, 0, cfg.federation.num_clients)
    state = plan_privacy(cfg, len(data))
    weights = build_gan(cfg.model, seed=0).state_dict()
    for r in range(cfg.federation.rounds):
        result, state = client_round(cfg, weights, data, state, seed=r)
        weights = result.state_dict
    assert sum(h[2] for h in state.history) == state.planned_steps
    # Opacus's Poisson sampler and our calibration use the same sample rate.
    assert {h[1] for h in state.history} == {sample_rate_for(16, len(data))}
    eps = epsilon_of(state.history, cfg.privacy.delta, accountant)
    assert 0.98 * cfg.privacy.target_epsilon <= eps <= cfg.privacy.target_epsilon
    assert result.metrics["epsilon"] == pytest.approx(eps)
    # A further round would overspend the calibrated budget: the client refuses.
    with pytest.raises(RuntimeError, match="exceed"):
        client_round(cfg, weights, data, state, seed=99)


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot reach target_epsilon"):
        calibrate_noise(PlannedBudget(1e-4, 1e-5, 0.5, 100_000, "rdp"))


def test_batch_larger_than_client_data_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size=64 exceeds"):
        sample_rate_for(64, 10)


def _one_round(cfg):
    data = client_partition(cfg, 0, cfg.federation.num_clients)
    result, _ = client_round(
        cfg, build_gan(cfg.model, seed=0).state_dict(), data, plan_privacy(cfg, len(data)), seed=5
    )
    return result.state_dict["discriminator.head.weight"]


def test_dp_noise_is_secret_unless_reproducibility_is_asked_for():
    # Default: the noise comes from OS entropy, so the server (which knows the seed and
    # the config) cannot replay it; same seed, different noise.
    cfg = small_config()
    assert not torch.equal(_one_round(cfg), _one_round(cfg))
    seeded = small_config("privacy.reproducible_noise=true")
    assert torch.equal(_one_round(seeded), _one_round(seeded))
