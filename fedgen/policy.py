"""A device's own privacy policy, and how it judges what a server asks of it.

The server sends a whole fedgen config with every train message. A data owner must not
have to trust it: the device pins its policy (DP on, delta, neighbouring relation,
accountant, epsilon per run and over its lifetime, optional floors on the noise and
ceilings on the sample rate), computes its own plan and epsilon from that policy and its
own ledger, and declines, with a fixed reason code and without releasing anything, any
request that differs from or would break the policy.

In a simulation the server and the clients belong to one person, so the policy is read
from the same config (`DevicePolicy.from_config`); the checks are the same code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from fedgen.config import FedgenConfig
from fedgen.privacy import (
    HistoryEntry,
    PlannedBudget,
    calibrate_noise,
    check_accounting,
    epsilon_of,
    sample_rate_for,
)

__all__ = [
    "DECLINE_CODES",
    "FAILURE_CODES",
    "Decline",
    "DevicePolicy",
    "PolicyError",
    "accounting_size",
    "check_request",
    "check_round",
    "plan_for",
]

# What a device may say when it does not train. Only these codes leave the device; the
# details (numbers, paths) stay in its own log.
DECLINE_CODES = {
    "dp-disabled": "the request turns DP-SGD off",
    "reproducible-noise": "the request asks for noise seeded from the server's config",
    "canaries": "the request asks the device to train on audit canaries (simulation only)",
    "delta-mismatch": "the request's delta differs from the device's",
    "delta-too-large": "delta is not below 1/n, which would permit leaking whole examples",
    "neighboring-mismatch": "the request's neighbouring relation differs from the device's",
    "accountant-mismatch": "the request's accountant differs from the device's",
    "public-size-mismatch": "the request's public dataset size differs from the device's",
    "batch-too-large": "the batch is larger than the dataset size the sample rate uses",
    "sample-rate-too-high": "the sample rate is above the device's ceiling",
    "noise-too-low": "the noise multiplier is below the device's floor",
    "plan-changed": "the run's batch, steps or noise differ from the plan the device made",
    "budget-run": "the round would take this run's epsilon past the device's maximum",
    "target-unreachable": "no noise reaches the run's epsilon over its planned steps",
    "budget-lifetime": "the round or run would take the device's lifetime epsilon past its maximum",
    "run-closed": "the server closed this run on the device (its final tally was collected)",
}
FAILURE_CODES = {
    "data-error": "the device's data could not be read or is unusable",
    "ledger-error": "the device's privacy ledger could not be read or written",
    "policy-error": "the device's own privacy policy is invalid (its owner must fix it)",
    "config-error": "the request's config is invalid",
    "internal-error": "training failed on the device",
}


class Decline(Exception):  # noqa: N818 (a decision, not an error)
    """The device will not train this round: `code` leaves the device, `detail` does not."""

    def __init__(self, code: str, detail: str) -> None:
        assert code in DECLINE_CODES, code
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class PolicyError(ValueError):
    """A policy file or node config that does not say a valid policy."""


@dataclass(frozen=True)
class DevicePolicy:
    """What a device will spend, whatever the server asks."""

    delta: float = 1e-5
    neighboring: str = "replace_one"
    accountant: str = "pld"
    max_epsilon: float = 10.0  # per run
    lifetime_max_epsilon: float = 10.0  # over every run on this device's ledger
    min_noise_multiplier: float | None = None
    max_sample_rate: float | None = None
    public_num_examples: int | None = None  # add_remove: the size the owner declares public
    require_dp: bool = True
    allow_reproducible_noise: bool = False
    allow_canaries: bool = False  # audit canaries: a simulated client only
    source: str = "defaults"

    def __post_init__(self) -> None:
        try:
            check_accounting(self.accountant, self.neighboring)
        except ValueError as err:
            raise PolicyError(f"privacy policy ({self.source}): {err}") from None
        if not 0.0 < self.delta < 1.0:
            raise PolicyError(f"privacy policy ({self.source}): delta {self.delta} not in (0, 1)")
        if self.max_epsilon <= 0 or self.lifetime_max_epsilon <= 0:
            raise PolicyError(f"privacy policy ({self.source}): epsilon maxima must be > 0")
        if self.neighboring == "add_remove" and self.public_num_examples is None:
            raise PolicyError(
                f"privacy policy ({self.source}): neighboring add_remove needs "
                "public-num-examples, the dataset size you declare public (the real n may "
                "not leave the device under add/remove)"
            )

    # Keys a node config or policy file may set, and their types.
    KEYS = {
        "delta": float,
        "neighboring": str,
        "accountant": str,
        "max-epsilon": float,
        "lifetime-max-epsilon": float,
        "min-noise-multiplier": float,
        "max-sample-rate": float,
        "public-num-examples": int,
    }

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> DevicePolicy:
        """The policy of a deployed device: a file named by `privacy-policy` (YAML or
        JSON, keys as below), then individual node-config keys, which win. A lifetime
        maximum left unset equals the per-run maximum: more runs on the same data need the
        owner's explicit consent."""
        values: dict[str, Any] = {}
        sources = []
        path = str(node.get("privacy-policy", "") or "")
        if path:
            values.update(_read_policy_file(Path(path).expanduser()))
            sources.append(f"policy file {path}")
        inline = {k: node[k] for k in cls.KEYS if k in node}
        if inline:
            sources.append("node config")
        values.update(inline)
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise PolicyError(
                f"privacy policy: unknown key(s) {unknown}; allowed: {sorted(cls.KEYS)}"
            )
        try:
            typed = {k.replace("-", "_"): cls.KEYS[k](v) for k, v in values.items()}
        except (TypeError, ValueError) as err:
            raise PolicyError(f"privacy policy: {err}") from None
        typed.setdefault("lifetime_max_epsilon", typed.get("max_epsilon", cls.max_epsilon))
        return cls(**typed, source=" + ".join(sources) or "defaults")

    @classmethod
    def from_config(cls, cfg: FedgenConfig) -> DevicePolicy:
        """A simulated client's policy: the experiment's own privacy settings."""
        p = cfg.privacy
        # With a fixed noise multiplier the config names no epsilon to stop at.
        cap = math.inf if p.noise_multiplier is not None else p.target_epsilon
        return cls(
            delta=p.delta,
            neighboring=p.neighboring,
            accountant=p.accountant,
            max_epsilon=cap,
            lifetime_max_epsilon=cap,
            public_num_examples=p.public_num_examples,
            require_dp=p.enabled,
            allow_reproducible_noise=p.reproducible_noise,
            allow_canaries=True,
            source="simulation config",
        )

    def to_plain(self) -> dict[str, Any]:
        return {
            k: v for k, v in asdict(self).items() if not (isinstance(v, float) and math.isinf(v))
        }

    def epsilon(self, history: list[HistoryEntry]) -> float:
        return epsilon_of(history, self.delta, self.accountant, self.neighboring)


def _read_policy_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PolicyError(f"privacy policy file {path} cannot be read: {err}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"privacy policy file {path} must hold a mapping of keys")
    return {str(k): v for k, v in raw.items()}


def accounting_size(policy: DevicePolicy, num_examples: int) -> int:
    """The n the sample rate is computed from: the real one under replace_one (public
    there), the declared public size under add_remove (the real one must not leak)."""
    if policy.neighboring == "add_remove":
        assert policy.public_num_examples is not None
        return policy.public_num_examples
    return num_examples


def planned_sample_rate(cfg: FedgenConfig, n: int) -> float:
    """The sample rate of every accounted step: batch_size / n for DP-SGD; 1 for the `mmd`
    model's release, which reads every example once."""
    if cfg.model.type == "mmd":
        return 1.0
    return sample_rate_for(cfg.training.batch_size, n)


def check_request(policy: DevicePolicy, cfg: FedgenConfig, num_examples: int) -> None:
    """Decline a request whose privacy settings differ from or break the policy."""
    p = cfg.privacy
    if policy.require_dp and not p.enabled:
        raise Decline("dp-disabled", "privacy.enabled=false")
    if p.canaries and not policy.allow_canaries:
        raise Decline("canaries", f"privacy.canaries={p.canaries}")
    if not p.enabled:
        return  # a simulation whose own config turns DP off (its report says so)
    if p.reproducible_noise and not policy.allow_reproducible_noise:
        raise Decline("reproducible-noise", "privacy.reproducible_noise=true")
    for key, code in (("delta", "delta-mismatch"), ("neighboring", "neighboring-mismatch"),
                      ("accountant", "accountant-mismatch")):  # fmt: skip
        if getattr(p, key) != getattr(policy, key):
            raise Decline(code, f"requested {key}={getattr(p, key)}, policy {getattr(policy, key)}")
    if policy.neighboring == "add_remove" and p.public_num_examples != policy.public_num_examples:
        raise Decline(
            "public-size-mismatch",
            f"requested public_num_examples={p.public_num_examples}, policy "
            f"{policy.public_num_examples}",
        )
    n = accounting_size(policy, num_examples)
    if policy.delta >= 1.0 / n:
        raise Decline("delta-too-large", f"delta {policy.delta:g} >= 1/n = {1.0 / n:.3g}")
    if cfg.model.type != "mmd" and cfg.training.batch_size > n:
        raise Decline("batch-too-large", f"batch {cfg.training.batch_size} > n {n}")
    rate = planned_sample_rate(cfg, n)
    if policy.max_sample_rate is not None and rate > policy.max_sample_rate:
        raise Decline(
            "sample-rate-too-high", f"sample rate {rate:.4g} > policy {policy.max_sample_rate:g}"
        )


def plan_inputs(policy: DevicePolicy, cfg: FedgenConfig, num_examples: int) -> dict[str, Any]:
    """Everything `plan_for`'s answer depends on, as plain values: a device that recorded
    these with its plan reuses the plan while they stay equal, instead of calibrating the
    noise again every round (a pure function of them, but seconds of accounting)."""
    p = cfg.privacy
    return {
        "enabled": p.enabled,
        "sample_rate": planned_sample_rate(cfg, accounting_size(policy, num_examples)),
        "steps": cfg.planned_steps,
        "noise_multiplier": p.noise_multiplier,
        "target_epsilon": min(p.target_epsilon, policy.max_epsilon),
        "delta": policy.delta,
        "accountant": policy.accountant,
        "neighboring": policy.neighboring,
        "min_noise_multiplier": policy.min_noise_multiplier,
    }


def plan_for(
    policy: DevicePolicy, cfg: FedgenConfig, num_examples: int
) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, planned steps) of a new run on this device: the
    noise calibrated so that every planned step together stays within both the request's
    target and the device's own maximum. Call `check_request` first."""
    inputs = plan_inputs(policy, cfg, num_examples)
    rate, steps = inputs["sample_rate"], inputs["steps"]
    if not inputs["enabled"]:
        return 0.0, rate, steps
    if inputs["noise_multiplier"] is not None:
        sigma = inputs["noise_multiplier"]
    else:
        budget = PlannedBudget(
            inputs["target_epsilon"], policy.delta, rate, steps, policy.accountant,
            policy.neighboring,
        )  # fmt: skip
        try:
            sigma = calibrate_noise(budget)
        except ValueError as err:
            raise Decline("target-unreachable", str(err)) from None
    if policy.min_noise_multiplier is not None and sigma < policy.min_noise_multiplier:
        raise Decline(
            "noise-too-low", f"noise {sigma:.4g} < policy floor {policy.min_noise_multiplier:g}"
        )
    return sigma, rate, steps


def check_round(
    policy: DevicePolicy,
    run_history: list[HistoryEntry],
    other_runs: list[HistoryEntry],
    entry: HistoryEntry,
    planned: HistoryEntry | None = None,
) -> None:
    """Decline a round (`entry`: its noise, rate and steps) that would pass the run's or
    the lifetime maximum. `planned`, for a run's first round: the whole run's plan, which
    must fit the lifetime budget before the run starts."""
    if not policy.require_dp:
        return
    after = policy.epsilon([*run_history, entry])
    if after > policy.max_epsilon:
        raise Decline(
            "budget-run", f"epsilon after this round {after:.4g} > {policy.max_epsilon:g}"
        )
    lifetime = policy.epsilon([*other_runs, *run_history, planned or entry])
    if lifetime > policy.lifetime_max_epsilon:
        raise Decline(
            "budget-lifetime",
            f"lifetime epsilon would reach {lifetime:.4g} > {policy.lifetime_max_epsilon:g}",
        )
