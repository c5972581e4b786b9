"""Checks that need CUDA; they skip cleanly on CPU-only machines (CI)."""

import pytest
import torch

from fedgen.data import client_partition
from fedgen.models import build_gan
from fedgen.privacy import epsilon_of
from fedgen.rounds import client_round, plan_privacy
from fedgen.training import resolve_device

from .helpers import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_device_picks_cuda():
    assert resolve_device("auto").type == "cuda"


def test_dp_round_on_cuda_matches_accounting():
    cfg = small_config("device=cuda")
    data = client_partition(cfg, 0, cfg.federation.num_clients)
    state = plan_privacy(cfg, len(data))
    result, state = client_round(cfg, build_gan(cfg.model, seed=0).state_dict(), data, state, 0)
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())
    eps = epsilon_of(state.history, cfg.privacy.delta, "pld", "replace_one")
    assert result.metrics["epsilon"] == pytest.approx(eps)
