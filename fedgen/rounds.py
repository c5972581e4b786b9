"""One federated round, without Flower: what a client does with the global weights, and
what the server records after aggregating. `clients/` and `server/` only move these
plain values in and out of Flower messages."""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedgen.audit_log import (
    LOG_NAME,
    AuditLog,
    config_digest,
    digest,
    file_digest,
    latest_clients,
    round_entry,
    state_entry,
)
from fedgen.config import FedgenConfig
from fedgen.console import plural, round_summary, say
from fedgen.data import NUM_CLASSES, Dataset, federated_partitions, load_dataset, to_tensors
from fedgen.embedding import train_mmd_locally
from fedgen.evaluation import Evaluator
from fedgen.killpoints import kill_point
from fedgen.models import build_model
from fedgen.plots import plot_quality
from fedgen.policy import DECLINE_CODES, Decline, DevicePolicy, check_request, plan_for
from fedgen.privacy import ClientPrivacyState, epsilon_of
from fedgen.privacy_report import PrivacyLedger
from fedgen.reports import RunDir
from fedgen.training import LocalResult, resolve_device, train_dp_locally, train_gan_locally

__all__ = [
    "ClientPrivacyState",
    "plan_privacy",
    "preflight",
    "client_round",
    "RoundRecorder",
    "client_seed",
    "finish_committed_round",
]

# Known, harmless warnings from Opacus/PyTorch that would otherwise repeat every round.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def plan_privacy(cfg: FedgenConfig, num_examples: int) -> ClientPrivacyState:
    """A simulated client's plan, made before its first round by the same code a device
    runs (`fedgen.policy.plan_for`), with the experiment's config as its policy: the noise
    planned for every round and local step, so the epsilon after all of them reaches the
    target and never exceeds it."""
    try:
        sigma, rate, steps = plan_for(DevicePolicy.from_config(cfg), cfg, num_examples)
    except Decline as decline:  # in a simulation the config's owner gets the detail
        raise ValueError(decline.detail) from None
    return ClientPrivacyState(sigma, rate, steps, [])


def preflight(cfg: FedgenConfig) -> tuple[list[int], ClientPrivacyState, list[str]]:
    """Check, before any process starts, that the data is there, every client can train
    and the privacy target is reachable: returns the client sizes, the smallest client's
    privacy plan (the noisiest one) and notices. Raises DataError or ValueError with the fix."""
    data = load_dataset(cfg.data, "train", seed=cfg.seed)
    sizes = [len(p) for p in federated_partitions(cfg, data.labels, cfg.federation.num_clients)]
    if cfg.privacy.canaries:
        from fedgen.canaries import CANARY_CLIENT, canary_slots

        sizes[CANARY_CLIENT] += canary_slots(cfg)  # the canary client trains on them too
    smallest = min(sizes)
    p = cfg.privacy
    try:  # the checks every device makes, run once here for the smallest client
        check_request(DevicePolicy.from_config(cfg), cfg, smallest)
    except Decline as decline:
        raise ValueError(
            f"{DECLINE_CODES[decline.code]} ({decline.detail}); every client would refuse "
            "this config: change it"
        ) from None
    plan = plan_privacy(cfg, smallest)
    notices = []
    if p.enabled and p.reproducible_noise:
        notices.append(
            "privacy.reproducible_noise is on: the DP noise is seeded from the config, which the "
            "server knows, so the epsilon holds only against outsiders (devices refuse it)"
        )
    if p.canaries:
        notices.append(
            f"privacy.canaries={p.canaries}: client 0 trains on audit canaries (simulation "
            "only); they count as its examples and cost its privacy; `fedgen audit RUN_DIR` "
            "turns them into a lower bound on epsilon"
        )
    return sizes, plan, notices


def client_seed(seed: int, client_index: int, server_round: int) -> int:
    return (seed * 1_000_003 + client_index * 10_007 + server_round) % (2**31)


def client_round(
    cfg: FedgenConfig,
    global_state: dict[str, torch.Tensor],
    data: Dataset,
    privacy: ClientPrivacyState,
    seed: int,
    proximal_mu: float = 0.0,
    server_round: int = 1,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    pooled: tuple[torch.Tensor, int] | None = None,
) -> tuple[LocalResult, ClientPrivacyState]:
    """Train the global model on one client's data for one round of its stage.
    `optimizer_state`: what this client kept from its previous round, when the config
    keeps client state. `pooled`: the `mmd` target the server summed from every client's
    earlier releases (`federation.pooled_target`), with how many it holds."""
    stage = cfg.stage(server_round)
    steps = cfg.local_steps_for(stage)
    spent = sum(h[2] for h in privacy.history)
    if cfg.privacy.enabled and spent + steps > privacy.planned_steps:
        raise RuntimeError(
            f"this client has done {spent} of its {privacy.planned_steps} planned DP steps; another "
            "round would exceed the budget its noise was calibrated for"
        )
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, NUM_CLASSES)
    model.load_state_dict(global_state)
    images, labels = to_tensors(data)
    if stage == "mmd":
        result = train_mmd_locally(
            model,
            images,
            labels,
            cfg.training,
            cfg.privacy,
            privacy.noise_multiplier,
            privacy.history,
            device,
            seed,
            privacy.sample_rate,
            optimizer_state if cfg.keeps_client_state else None,
            pooled if cfg.federation.pooled_target else None,
        )
    elif stage == "gan":
        result = train_gan_locally(
            model,
            images,
            labels,
            cfg.training,
            cfg.privacy,
            privacy.noise_multiplier,
            privacy.history,
            device,
            seed,
            proximal_mu,
            privacy.sample_rate,
            optimizer_state if cfg.keeps_client_state else None,
        )
    else:
        result = _train_vqvae_stage(
            cfg,
            model,
            stage,
            steps,
            images,
            labels,
            privacy,
            device,
            seed,
            proximal_mu,
            (optimizer_state or {}) if cfg.keeps_client_state else None,
        )
    stage_steps = dict(privacy.stage_steps)
    if cfg.privacy.enabled:
        # One sample rate everywhere: the rate the sampler used is the one the history
        # records, the one calibration assumed and the one the report will show.
        rates = {q for _, q, _ in result.history}
        if rates != {privacy.sample_rate}:
            raise RuntimeError(
                f"accounted sample rates {rates} differ from the planned {privacy.sample_rate}"
            )
        stage_steps[stage] = stage_steps.get(stage, 0) + steps
        p = cfg.privacy
        result.metrics["epsilon"] = epsilon_of(result.history, p.delta, p.accountant, p.neighboring)
    new_state = ClientPrivacyState(
        privacy.noise_multiplier,
        privacy.sample_rate,
        privacy.planned_steps,
        result.history,
        stage_steps,
    )
    return result, new_state


def _train_vqvae_stage(
    cfg: FedgenConfig,
    model: torch.nn.Module,
    stage: str,
    steps: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    privacy: ClientPrivacyState,
    device: torch.device,
    seed: int,
    proximal_mu: float,
    optimizer_state: dict[str, torch.Tensor] | None,
) -> LocalResult:
    """A VQ-VAE round trains the whole autoencoder with DP-SGD (every part of it touches
    private images); a prior round encodes the client's images with the global encoder,
    on the client, and trains the prior on those codes with DP-SGD. `optimizer_state`
    (None: not kept): the client's Adam state from its last round; a state kept for the
    other stage does not match (its prefix is the stage's) and Adam starts afresh."""
    # Here, not at the top: fedgen.vqvae registers an Opacus grad sampler on import, and
    # the other families' rounds need no Opacus (its import costs about 2 CPU-seconds).
    # A VQ-VAE model exists only once fedgen.models has imported it, registration included.
    from fedgen.vqvae import encode_codes, prior_loss, vqvae_loss

    tr = cfg.training
    if stage == "vqvae":
        module: torch.nn.Module = model.vqvae
        tensors: tuple[torch.Tensor, ...] = (images,)
        lr = tr.lr_vqvae

        def loss_fn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return vqvae_loss(m, x)[0]

    else:
        model.vqvae.to(device).eval()
        codes = encode_codes(model.vqvae, images.to(device)).cpu()  # private: never sent
        module, tensors, lr = model.prior, (codes, labels), tr.lr_prior
        loss_fn = prior_loss
    done = train_dp_locally(
        module,
        tensors,
        loss_fn,
        steps,
        tr.batch_size,
        lr,
        cfg.privacy,
        privacy.noise_multiplier,
        privacy.history,
        device,
        seed,
        proximal_mu,
        tr.physical_batch_size,
        privacy.sample_rate,
        optimizer_state,
        state_prefix=stage,
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return LocalResult(state, {"steps": float(steps)}, done.history, done.optimizer_state)


def logged_rounds(run_dir: RunDir) -> set[int]:
    """Rounds with a `round` entry in the run's audit log (a line a stop cut short is none)."""
    path = run_dir.path / LOG_NAME
    rounds = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
            if entry.get("kind") == "round":
                rounds.add(int(entry["round"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return rounds


def finish_committed_round(cfg: FedgenConfig, run_dir: RunDir) -> int:
    """The last round `run_dir` committed (0: none). When a stop came before that round's
    report, metrics line or log entry, they are written now, as a resumed federation
    would (`RoundRecorder.restore`): a run stopped in its last round finishes without
    starting one."""
    last, weights, state, _ = run_dir.resume_point()
    if last and last not in logged_rounds(run_dir):
        RoundRecorder(cfg, run_dir).restore(state, run_dir.saved_privacy_clients(), weights)
    return last


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


class RoundRecorder:
    """Server-side bookkeeping after each aggregation: metrics, checkpoint, samples and
    the privacy report, all in the run directory.

    A round is committed by its server state (`checkpoints/server_NNN.json`), written after
    its checkpoint and before anything that claims the round (privacy report, evaluation,
    metrics line, audit log entry). The state holds what those need (`pending`), so a run
    stopped at any moment resumes from its last committed round and writes what that
    round had not written yet; a round not committed is sent again, and the devices that
    trained it answer from their cache."""

    def __init__(self, cfg: FedgenConfig, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.ledger = PrivacyLedger(cfg)
        self.evaluator = Evaluator(cfg)
        self._round_start = time.perf_counter()
        self._quality: list[dict[str, Any]] = []  # metrics lines with quality figures
        if cfg.privacy.canaries:
            from fedgen.canaries import write_canary_record

            write_canary_record(cfg, run_dir.path)  # which canaries were in: for the audit
        self.audit = AuditLog(run_dir.path)
        self._audit_entry: dict[str, Any] | None = None  # the last round's sealed entry

    def server_state(self, pending: dict[str, Any] | None = None) -> dict[str, Any]:
        """The recorder's part of what a resumed run needs (see `RunDir.save_server_state`).
        `pending`: what the round's report, metrics line and log entry are made of."""
        return {
            "ledger": self.ledger.state(),
            # Flower samples clients with Python's `random`: its state, for the same draws.
            "random_state": _plain(random.getstate()),
            # The round's audit log entry, added once the log holds it (`seal_server_state`):
            # a resumed run re-appends it if the log lost it.
            "audit_entry": self._audit_entry,
            "pending": pending,
        }

    def restore(
        self,
        state: dict[str, Any],
        reported: dict[str, Any] | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Continue from a saved server state (`RunDir.resume_point`; empty: none was
        committed, the run starts again at round 1). `reported`: the clients of the privacy
        report on disk, which may already hold a round that was cut short: a client that
        trained then keeps that longer history even if it never answers again. A committed
        round whose outputs the stop cut short gets them now, its evaluation recomputed
        (`weights`: the round's, else read from its checkpoint)."""
        last_round = int(state.get("round", 0))
        self.run_dir.remove_partial_writes()
        self.ledger.restore(state.get("ledger", {"clients": {}, "rounds": []}), {})
        if "random_state" in state:
            random.setstate(_tuple(state["random_state"]))
        kept = self.audit.resume(last_round, state.get("audit_entry"))
        self._audit_entry = None
        logged = {int(e["round"]): e for e in kept if e.get("kind") == "round"}
        if last_round and last_round not in logged and state.get("pending"):
            self.run_dir.truncate_metrics(last_round - 1)
            self._quality = self._quality_lines()
            if weights is None:
                weights = self.run_dir.checkpoint(last_round)[1]
            say(
                f"[fedgen] round {last_round} was saved before the stop; writing its report, "
                "metrics and log entry now"
                + (" (its evaluation recomputed)" if self._evaluates(last_round) else "")
            )
            self.print_progress(self._write_outputs(last_round, weights, state["pending"]))
            kept.append(self._audit_entry or {})
        else:
            self.run_dir.truncate_metrics(last_round)
            self._audit_entry = logged.get(last_round)
            if self._audit_entry is not None:
                self.run_dir.seal_server_state(last_round, self._audit_entry)
        self._quality = self._quality_lines()
        self.ledger.restore(state.get("ledger", {"clients": {}, "rounds": []}), reported or {})
        self._resume_audit(last_round, kept)

    def _quality_lines(self) -> list[dict[str, Any]]:
        """The metrics lines with quality figures, as `metrics.jsonl` holds them."""
        path = self.run_dir.path / "metrics.jsonl"
        text = path.read_text() if path.is_file() else ""
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        return [line for line in lines if "frechet_distance" in line.get("eval", {})]

    def _resume_audit(self, last_round: int, kept: list[dict[str, Any]]) -> None:
        """Log what the restore changed in the server's record as the `kept` log entries
        leave it (a client's longer history from the report of a round cut short)."""
        logged = latest_clients(kept)
        changed = {
            cid: client
            for cid, client in self.ledger.clients.items()
            if json.loads(json.dumps(client)) != logged.get(cid)
        }
        if changed:
            self.audit.append(
                state_entry(
                    "resume",
                    run_id=self._run_id(),
                    after_round=last_round,
                    clients=changed,
                    unidentified=self.ledger.unidentified,
                )
            )

    def round_started(self) -> None:
        self._round_start = time.perf_counter()

    def frozen_prefixes(self, server_round: int) -> tuple[str, ...]:
        """Weights a round does not train, which the server must leave as they were."""
        return ("vqvae.",) if self.cfg.stage(server_round) == "prior" else ()

    def initial_state(self) -> dict[str, torch.Tensor]:
        return build_model(self.cfg.model, NUM_CLASSES, seed=self.cfg.seed).state_dict()

    def evaluate(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        model = build_model(self.cfg.model, NUM_CLASSES)
        model.load_state_dict(state)
        mode = self.cfg.evaluation.downstream
        downstream = mode == "every" or (mode == "final" and server_round == self.cfg.total_rounds)
        result = self.evaluator.evaluate(model, server_round, self.run_dir.samples, downstream)
        kill_point("evaluation", server_round)
        return result

    def _evaluates(self, server_round: int) -> bool:
        last = server_round in (self.cfg.federation.rounds, self.cfg.total_rounds)
        return server_round % self.cfg.run.eval_every == 0 or last

    def record(
        self,
        server_round: int,
        state: dict[str, torch.Tensor] | None,
        client_reports: list[dict[str, Any]],
        failures: list[str],
        declined: list[dict[str, Any]] | None = None,
        missing: list[str] | None = None,
        strategy: dict[str, torch.Tensor] | None = None,
        nodes: int | None = None,
    ) -> dict[str, Any]:
        """Write everything for a finished round; returns the metrics line. `missing`:
        sampled clients that sent no update (carried as provisional in the report);
        `strategy`: the server optimiser's state after the round (FedAdam's moments);
        `nodes`: how many nodes were connected when the round sampled.

        Order: checkpoint, then server state (the commit), then what claims the round:
        privacy report, evaluation, metrics line, audit log entry. A round without weights
        (it failed) commits nothing: resumed, it is sent again."""
        kill_point("replied", server_round)
        pending = {
            "reports": client_reports,
            "failures": failures,
            "declined": declined or [],
            "missing": missing or [],
            "round_seconds": time.perf_counter() - self._round_start,
        }
        self.ledger.record_round(
            server_round,
            client_reports,
            pending["declined"],
            failures,
            pending["missing"],
            nodes=nodes,
        )
        self._audit_entry = None  # this round's, once the log holds it
        if state is not None:
            self.run_dir.save_checkpoint(server_round, state)
            self.run_dir.save_server_state(server_round, self.server_state(pending), strategy or {})
            kill_point("committed", server_round)
        return self._write_outputs(server_round, state, pending)

    def _write_outputs(
        self, server_round: int, state: dict[str, torch.Tensor] | None, pending: dict[str, Any]
    ) -> dict[str, Any]:
        """What claims a round, from the ledger and `pending` (`record`): report,
        evaluation, metrics line and audit log entry; returns the metrics line."""
        client_reports, failures = pending["reports"], pending["failures"]
        declined, missing = pending["declined"], pending["missing"]
        self.run_dir.write_privacy_report(self.ledger)
        kill_point("report", server_round)
        evaluation: dict[str, Any] = {}
        checkpoint: Path | None = None
        if state is not None:
            checkpoint = self.run_dir.checkpoints / f"round_{server_round:03d}.safetensors"
            if self._evaluates(server_round):
                evaluation = self.evaluate(server_round, state)
        metrics_keys = ("d_loss_fake", "g_loss", "mmd_loss")
        line: dict[str, Any] = {
            "round": server_round,
            "stage": self.cfg.stage(server_round),
            "round_seconds": pending["round_seconds"],
            "clients": len(client_reports),
            "failures": len(failures),
            "failure_reasons": failures,
            "declined": {str(d["client_id"]): d["code"] for d in declined},
            "skipped_files": sum(int(r["metrics"].get("skipped-files", 0)) for r in client_reports),
            "max_epsilon": self.ledger.max_epsilon if self.cfg.privacy.enabled else None,
            "per_client": {
                str(r["client_id"]): {k: r["metrics"].get(k) for k in (*metrics_keys, "epsilon")}
                for r in client_reports
            },
        }
        for key in metrics_keys:
            values = [r["metrics"][key] for r in client_reports if key in r["metrics"]]
            line[key] = sum(values) / len(values) if values else None
        if evaluation:
            line["eval"] = evaluation
        self.run_dir.append_metrics(line)
        if "frechet_distance" in evaluation:
            self._quality.append(line)
            plot_quality(self._quality, self.run_dir.path / "quality.png")
        # After the checkpoint is on disk: the entry holds its digest.
        self.audit_round(server_round, client_reports, declined, missing, checkpoint, line)
        if state is not None and self._audit_entry is not None:
            self.run_dir.seal_server_state(server_round, self._audit_entry)
        return line

    def _run_id(self) -> str | None:
        try:
            return self.run_dir.run_id
        except (OSError, ValueError, KeyError):
            return None  # a run directory without a manifest (tests of the strategy)

    def audit_round(
        self,
        server_round: int,
        reports: list[dict[str, Any]],
        declined: list[dict[str, Any]],
        missing: list[str],
        checkpoint: Path | None,
        line: dict[str, Any],
    ) -> dict[str, Any]:
        """Append the round's entry to the audit log (`fedgen.audit_log.round_entry`):
        everything it names must already be on disk."""
        touched = [str(r["client_id"]) for r in [*reports, *declined]] + list(missing)
        root = self.run_dir.path
        written = None
        if checkpoint is not None:
            with safe_open(str(checkpoint), framework="pt") as fh:
                tensors_sha256 = (fh.metadata() or {}).get("sha256", "")
            written = {
                "path": checkpoint.relative_to(root).as_posix(),
                "sha256": file_digest(checkpoint),
                "tensors_sha256": tensors_sha256,
            }
        outputs = {
            path.relative_to(root).as_posix(): file_digest(path)
            for path in sorted(self.run_dir.samples.glob(f"*round_{server_round:03d}.png"))
            if "eval" in line
        }
        entry = round_entry(
            run_id=self._run_id(),
            server_round=server_round,
            stage=self.cfg.stage(server_round),
            config_sha256=config_digest(self.cfg.to_yaml()),
            privacy=self.cfg.privacy.model_dump(mode="json"),
            participants=[str(r["client_id"]) for r in reports],
            clients={
                c: self.ledger.clients[c]
                for c in dict.fromkeys(touched)
                if c in self.ledger.clients
            },
            updates={
                str(r["client_id"]): r["update_sha256"] for r in reports if r.get("update_sha256")
            },
            report_round=self.ledger.rounds[-1],
            missing=missing,
            unidentified=self.ledger.unidentified,
            checkpoint=written,
            outputs=outputs,
            metrics_sha256=digest(line),
        )
        self._audit_entry = self.audit.append(entry)
        return self._audit_entry

    def record_tallies(self, tallies: list[tuple[str, dict[str, Any]]]) -> None:
        """Settle provisional clients from their end-of-run tallies and rewrite the report."""
        for label, tally in tallies:
            self.ledger.record_tally(label, tally)
        self.run_dir.write_privacy_report(self.ledger)
        settled = [str(t["client_id"]) for _, t in tallies]
        self.audit.append(
            state_entry(
                "tally",
                run_id=self._run_id(),
                after_round=max((r["round"] for r in self.ledger.rounds), default=0),
                clients={c: self.ledger.clients[c] for c in settled if c in self.ledger.clients},
                unidentified=self.ledger.unidentified,
            )
        )

    def print_progress(self, line: dict[str, Any]) -> None:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        eps = "" if line["max_epsilon"] is None else f"  max epsilon {line['max_epsilon']:.3f}"
        fails = f"  failures {line['failures']}" if line["failures"] else ""
        if line.get("declined"):
            fails += f"  declined {len(line['declined'])}"
        if line["stage"] == "gan":
            losses = f"  d_loss_fake {fmt(line['d_loss_fake'])}  g_loss {fmt(line['g_loss'])}"
        elif line["stage"] == "mmd":
            losses = f"  mmd_loss {fmt(line.get('mmd_loss'))}"
        else:
            ev = line.get("eval", {})
            losses = f"  [{line['stage']}]" + (
                f"  test PSNR {ev['psnr']:.2f} dB  codebook usage {ev['codebook_usage']:.2f}"
                if ev
                else ""
            )
        ev = line.get("eval", {})
        if "frechet_distance" in ev:
            losses += (
                f"  FD {ev['frechet_distance']:.2f}  label consistency "
                f"{ev['label_consistency']:.3f}"
            )
        if "downstream_accuracy" in ev:
            losses += (
                f"  downstream accuracy {ev['downstream_accuracy']:.4f} (a classifier trained "
                "on generated images, tested on real ones)"
            )
        round_summary(
            f"[fedgen] round {line['round']}/{self.cfg.total_rounds}: "
            f"{plural(line['clients'], 'client')}{losses}{eps}{fails}  "
            f"({line['round_seconds']:.1f}s)",
            line["max_epsilon"],
        )
