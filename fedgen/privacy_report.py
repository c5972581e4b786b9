"""The server's privacy ledger and the privacy statement written from it.

The server records, for every client, the accountant history the client itself reported
and recomputes epsilon from it with a fresh dp-accounting accountant. It also checks the
history: each trained reply must extend the last recorded one by exactly the round's
planned steps (plus rounds it was sampled for and never answered, which it may have trained
late). A sampled client that did not answer is carried as *provisional*: its epsilon counts
the round as spent until its own history says otherwise (a later reply, or the end-of-run
tally the server collects), so nothing trained is ever left out of the report.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

from fedgen.canaries import canary_statement
from fedgen.config import FedgenConfig
from fedgen.console import client_sort_key, plural
from fedgen.privacy import PLD_DISCRETIZATION, epsilon_of, recompute_recipe

__all__ = ["PrivacyLedger", "format_privacy_table", "load_privacy_report", "privacy_markdown"]

MECHANISMS = {
    "gan": "DP-SGD (Opacus per-example clipping, Gaussian noise from a ChaCha20 stream) on "
    "the discriminator's real-image gradient, Poisson sampling",
    "mmd": "the Gaussian mechanism on the client's per-class sums of unit-norm kernel "
    "features (one example moves them by 1 under add/remove, by at most sqrt(2) under "
    "replace-one, where the noise std is sigma / sqrt(2) so the accounted step covers it; "
    "noise from a ChaCha20 stream), released once per round and accounted as one step at "
    "sample rate 1; the generator fits the releases (post-processing)",
    "vqvae": "DP-SGD (Opacus per-example clipping, Gaussian noise from a ChaCha20 stream) on "
    "every VQ-VAE parameter (codebook included), then on the code prior trained on the "
    "client's own codes; both stages in one accountant history, Poisson sampling",
}

RELATIONS = {
    "replace_one": "replace-one: neighbouring datasets differ in the content of one example; "
    "the number of examples a client holds is treated as public (it is sent as the client's "
    "aggregation weight and sets its sample rate)",
    "add_remove": "add/remove-one: neighbouring datasets differ by one example more or "
    "less; a client's real number of examples is private and never leaves it (the sample "
    "rate and aggregation weight use the declared public size)",
}


def _steps(history: list[list[float]]) -> int:
    return sum(int(h[2]) for h in history)


def _extends(old: list[list[float]], new: list[list[float]]) -> bool:
    """Whether accountant history `new` continues `old` (equal consecutive entries are
    merged, so the last old entry may have grown)."""
    if len(new) < len(old):
        return False
    for i, (sigma, q, steps) in enumerate(old):
        ns, nq, nsteps = new[i]
        if (ns, nq) != (sigma, q):
            return False
        if nsteps != steps and not (i == len(old) - 1 and nsteps > steps):
            return False
    return True


def _subset_sums(values: list[int]) -> set[int]:
    return {sum(c) for k in range(len(values) + 1) for c in combinations(values, k)}


class PrivacyLedger:
    """The server's record of every client's privacy spending, as its clients reported it."""

    def __init__(self, cfg: FedgenConfig) -> None:
        self.cfg = cfg
        self.clients: dict[str, dict[str, Any]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.unidentified: dict[str, list[int]] = {}  # node -> rounds, never named itself

    def _epsilon(self, history: list[list[float]]) -> float | None:
        p = self.cfg.privacy
        if not p.enabled:
            return None
        return epsilon_of(history, p.delta, p.accountant, p.neighboring)

    def record_round(
        self,
        server_round: int,
        reports: list[dict[str, Any]],
        declined: list[dict[str, Any]] | None = None,
        failures: list[str] | None = None,
        missing: list[str] | None = None,
        nodes: int | None = None,
    ) -> None:
        """Record a round: `reports` of clients that trained, `declined` (each with its
        reason `code`), `failures` (one line per client without an update), `missing`:
        the sampled clients (ids, or `node N` when never named) that sent no update, and
        `nodes`: how many nodes were connected when it sampled."""
        entry: dict[str, Any] = {
            "round": server_round,
            **({"nodes": int(nodes)} if nodes is not None else {}),
            "epsilon": {},
            "declined": [
                {"client_id": str(d["client_id"]), "code": str(d["code"])} for d in declined or []
            ],
            "failures": list(failures or []),
        }
        # A non-private run accounts no steps: its clients' histories stay empty.
        steps = (
            self.cfg.local_steps_for(self.cfg.stage(server_round))
            if self.cfg.privacy.enabled
            else 0
        )
        for rep in reports:
            entry["epsilon"][str(rep["client_id"])] = self._update(rep, server_round, steps)
        for rep in declined or []:
            if rep.get("history") is not None:
                self._update(rep, server_round, 0, trained=False)
            client = self.clients.setdefault(str(rep["client_id"]), self._blank(rep))
            client["declined_rounds"].append(server_round)
        for who in missing or []:
            self._provisional(who, server_round, steps)
        self.rounds.append(entry)

    def _blank(self, rep: dict[str, Any]) -> dict[str, Any]:
        return {
            "epsilon": 0.0 if self.cfg.privacy.enabled else None,
            "num_examples": rep.get("num_examples"),
            "noise_multiplier": rep.get("noise_multiplier"),
            "sample_rate": rep.get("sample_rate"),
            "planned_steps": rep.get("planned_steps"),
            "steps": 0,
            "rounds_participated": 0,
            "declined_rounds": [],
            "history": [],
            "stage_steps": {},
            "provisional": [],
            "anomalies": [],
            "tally": "reported",
        }

    def _update(
        self, rep: dict[str, Any], server_round: int, round_steps: int, trained: bool = True
    ) -> float | None:
        """Take a client's reported history; `round_steps` is what this reply should add
        (0 for a decline, a tally or a non-private run); `trained`: the reply is an update."""
        cid = str(rep["client_id"])
        client = self.clients.get(cid) or self._blank(rep)
        reported = [[float(s), float(q), int(n)] for s, q, n in rep["history"]]
        lost = client.get("lost_history", [])
        own = client["history"][len(lost) :]  # what the client itself still holds
        if own and not _extends(own, reported):
            # The client lost its history (a new device, a lost ledger): what it spent
            # before still counts, so the two compose; the report flags it.
            lost = [*lost, *own]
            own = []
            client["anomalies"].append({"round": server_round, "kind": "history-restarted"})
        growth = _steps(reported) - _steps(own)
        pending = [int(p["steps"]) for p in client["provisional"]]
        late = growth - round_steps
        if late not in _subset_sums(pending):
            # Not this round's steps plus some rounds it may have trained late: say so.
            client["anomalies"].append(
                {
                    "round": server_round,
                    "kind": "unexpected-growth",
                    "expected": round_steps,
                    "provisional": sum(pending),
                    "got": growth,
                }
            )
            late = sum(pending) if late > sum(pending) else max(late, 0)
        # Rounds the history now covers are settled, oldest first; the others stay
        # provisional (the device may still train them) until its end-of-run tally.
        while client["provisional"] and late >= int(client["provisional"][0]["steps"]):
            late -= int(client["provisional"].pop(0)["steps"])
        history = [*lost, *reported]
        client.update(
            {
                "num_examples": rep.get("num_examples", client.get("num_examples")),
                "noise_multiplier": float(rep["noise_multiplier"]),
                "sample_rate": float(rep["sample_rate"]),
                "planned_steps": int(rep["planned_steps"]),
                "history": history,
                "steps": _steps(history),
                "stage_steps": dict(rep.get("stage_steps", {})),
                "reported_epsilon": rep.get("epsilon", client.get("reported_epsilon")),
            }
        )
        if trained:
            client["rounds_participated"] = client.get("rounds_participated", 0) + 1
        if lost:
            client["lost_history"] = lost
        self.clients[cid] = client
        return self._settle(client)

    def _provisional(self, who: str, server_round: int, steps: int) -> None:
        client = self.clients.get(who)
        if client is None or client.get("noise_multiplier") is None:
            self.unidentified.setdefault(who, []).append(server_round)
            return
        client["provisional"].append({"round": server_round, "steps": steps})
        self._settle(client)

    def _settle(self, client: dict[str, Any]) -> float | None:
        """The client's epsilon: its history, plus its provisional rounds counted as spent."""
        pending = sum(int(p["steps"]) for p in client["provisional"])
        extra = [[client["noise_multiplier"], client["sample_rate"], pending]] if pending else []
        settled = "collected" if client.get("tally") == "collected" else "reported"
        client["tally"] = "provisional" if pending else settled
        client["epsilon"] = self._epsilon([*client["history"], *extra])
        return client["epsilon"]

    def record_tally(self, label: str, rep: dict[str, Any]) -> None:
        """A client's final history, collected at the end of the run (`label`: how the
        ledger knew it, its id or `node N`)."""
        self.unidentified.pop(label, None)
        cid = str(rep["client_id"])
        if rep.get("history") is not None:
            self._update(rep, 0, 0, trained=False)
        client = self.clients.get(cid)
        if client is not None:
            # The device closed the run: what it did not train by now, it never will.
            client["provisional"] = []
            client["tally"] = "collected"
            self._settle(client)

    def outstanding(self) -> list[str]:
        """Clients (and unnamed nodes) whose spending is not settled by their own history."""
        return [c for c, v in self.clients.items() if v["provisional"]] + list(self.unidentified)

    def restore(self, saved: dict[str, Any], reported: dict[str, Any]) -> None:
        """Continue from the `clients` and `rounds` of a saved server state (resume);
        a client whose history in `reported` (a later report) is longer keeps that one."""
        self.clients = {str(k): dict(v) for k, v in saved["clients"].items()}
        for client in self.clients.values():  # state saved before these fields existed
            client.setdefault("provisional", [])
            client.setdefault("anomalies", [])
            client.setdefault("tally", "reported")
        self.rounds = [dict(r) for r in saved["rounds"]]
        self.unidentified = {str(k): list(v) for k, v in saved.get("unidentified", {}).items()}
        spending = ("epsilon", "reported_epsilon", "steps", "history", "lost_history",
                    "stage_steps", "noise_multiplier", "sample_rate", "planned_steps",
                    "num_examples", "provisional")  # fmt: skip
        for cid, client in reported.items():
            mine = self.clients.get(cid)
            if mine is None:
                # Trained only in the round that was cut short: counted, 0 rounds recorded.
                self.clients[cid] = {**client, "rounds_participated": 0, "declined_rounds": []}
            elif client.get("steps", 0) > mine.get("steps", 0):
                mine.update({k: client[k] for k in spending if k in client})

    def state(self) -> dict[str, Any]:
        return {"clients": self.clients, "rounds": self.rounds, "unidentified": self.unidentified}

    @property
    def max_epsilon(self) -> float:
        return max((c["epsilon"] or 0.0 for c in self.clients.values()), default=0.0)

    def population(self) -> dict[str, int] | None:
        """How many nodes were connected, and how many of them never took part: never
        sampled, so none of their examples was used (epsilon 0). None before any round
        recorded its node count."""
        nodes = max((int(r.get("nodes", 0)) for r in self.rounds), default=0)
        if not nodes:
            return None
        known = len(self.clients) + len(self.unidentified)
        return {"nodes": nodes, "in_report": known, "never_took_part": max(0, nodes - known)}

    def to_dict(self) -> dict[str, Any]:
        p = self.cfg.privacy
        return {
            "private": p.enabled,
            "neighboring": p.neighboring,
            "relation": RELATIONS[p.neighboring],
            "public": _public(self.cfg),
            "accountant": p.accountant,
            "accountant_library": "dp-accounting (Google)",
            "pld_value_discretization": PLD_DISCRETIZATION if p.accountant == "pld" else None,
            "delta": p.delta,
            "target_epsilon": p.target_epsilon if p.enabled else None,
            "max_epsilon": self.max_epsilon if p.enabled else None,
            "max_grad_norm": self.cfg.contribution_bound[1],
            "bound_kind": self.cfg.contribution_bound[0],
            "guarantee": (
                f"sample-level (epsilon, delta)-DP per client under {p.neighboring} "
                "neighbouring, for each client's own examples, cumulative over all rounds it "
                "took part in (provisional rounds counted as spent); max_epsilon is the "
                "largest over clients"
                if p.enabled
                else "none: privacy.enabled is false"
            ),
            "mechanism": MECHANISMS[self.cfg.model.type],
            "noise_source": "ChaCha20 stream keyed from OS entropy on each client"
            if not p.reproducible_noise
            else "SEEDED FROM THE CONFIG (privacy.reproducible_noise): the server can replay it",
            "rounds_planned": self.cfg.total_rounds,
            # DP steps (for `mmd`, releases) per round of the first stage.
            "local_steps_per_round": self.cfg.local_steps_for(self.cfg.stage(1)),
            "planned_steps": self.cfg.planned_steps,
            "sampling": self.cfg.federation.sampling,
            "rounds": self.rounds,
            "clients": dict(sorted(self.clients.items(), key=lambda kv: client_sort_key(kv[0]))),
            "unidentified_nodes": self.unidentified,
            "population": self.population(),
            "recompute": recompute_recipe(p.accountant, p.neighboring),
            "canaries": canary_statement(self.cfg),
        }


def _public(cfg: FedgenConfig) -> list[str]:
    """What the guarantee treats as public (known to the server, not protected)."""
    p = cfg.privacy
    size = (
        "each client's number of examples n"
        if p.neighboring == "replace_one"
        else f"the declared dataset size {p.public_num_examples} (the real n is private)"
    )
    return [
        size,
        "the model architecture, the config, and every released model update",
        "whether, when and for how long a client trained in a round",
        "each client's accountant history (noise multiplier, sample rate, steps)",
    ]


def format_privacy_table(report: dict[str, Any], max_rows: int | None = None) -> str:
    """The epsilon report as a plain-text table (what `fedgen report` prints); with
    `max_rows`, only that many clients, those with the largest epsilon, and a count of
    the rest."""
    lines = []
    if not report.get("private", True):
        lines.append("privacy: NONE (privacy.enabled is false); no epsilon guarantee")
    else:
        lines.append(
            f"{report.get('neighboring', 'add_remove')}  accountant {report['accountant']}  "
            f"delta {report['delta']:g}  target epsilon {report['target_epsilon']:g}  "
            f"max epsilon {report['max_epsilon']:.4f}"
        )
    header = ["client", "epsilon", "examples", "noise", "sample rate", "steps", "rounds", "tally"]
    rows = [
        [
            cid,
            f"{c['epsilon']:.4f}"
            if report.get("private", True) and c["epsilon"] is not None
            else "-",
            str(c.get("num_examples", "-")),
            f"{c['noise_multiplier']:.4f}" if c.get("noise_multiplier") is not None else "-",
            f"{c['sample_rate']:.5f}" if c.get("sample_rate") is not None else "-",
            f"{c['steps']}/{c.get('planned_steps', '-')}",
            str(c["rounds_participated"]),
            str(c.get("tally", "reported")),
        ]
        for cid, c in _shown_clients(report, max_rows)
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    hidden = len(report["clients"]) - len(rows)
    if hidden:
        epsilons = sorted(c["epsilon"] or 0.0 for c in report["clients"].values())
        lines.append(
            f"... and {plural(hidden, 'more client')} (the {len(rows)} with the largest epsilon "
            f"are shown; median epsilon {epsilons[len(epsilons) // 2]:.4f}); "
            "`fedgen report RUN_DIR` and privacy_report.md list every one"
        )
    if line := population_line(report):
        lines += ["", line]
    lines += _absences(report)
    return "\n".join(lines)


def _shown_clients(
    report: dict[str, Any], max_rows: int | None
) -> list[tuple[str, dict[str, Any]]]:
    clients = list(report["clients"].items())
    if max_rows is None or len(clients) <= max_rows:
        return clients
    top = sorted(clients, key=lambda kv: -(kv[1]["epsilon"] or 0.0))[:max_rows]
    return sorted(top, key=lambda kv: client_sort_key(kv[0]))


def population_line(report: dict[str, Any]) -> str | None:
    """One sentence on the nodes the table does not list: never sampled, so epsilon 0."""
    population = report.get("population")
    if not population:
        return None
    never = population["never_took_part"]
    return f"{plural(population['nodes'], 'node')} connected; " + (
        f"{plural(never, 'node')} never took part (never sampled): none of their "
        "examples was used, epsilon 0, and the table does not list them"
        if never
        else "every one is listed"
    )


def _absences(report: dict[str, Any]) -> list[str]:
    """One line per client that declined, failed, was provisional or looked wrong."""
    lines = []
    for entry in report.get("rounds", []):
        for d in entry.get("declined", []):
            lines.append(f"round {entry['round']}: {d['client_id']} declined ({d.get('code')})")
        for failure in entry.get("failures", []):
            lines.append(f"round {entry['round']}: failed: {failure}")
    for cid, c in report["clients"].items():
        for p in c.get("provisional", []):
            lines.append(
                f"round {p['round']}: {cid} sent no update; {plural(p['steps'], 'step')} "
                "counted as spent (provisional: its own history was not collected)"
            )
        for a in c.get("anomalies", []):
            lines.append(f"round {a['round']}: {cid} history anomaly: {json.dumps(a)}")
    for node, rounds in report.get("unidentified_nodes", {}).items():
        lines.append(
            f"rounds {rounds}: {node} was sampled, never answered and was never identified: "
            "what it spent, if anything, is not known to the server"
        )
    return ["", "clients that did not train, or need a look:", *lines] if lines else []


def load_privacy_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "privacy_report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is {run_dir} a fedgen run directory with at least one round done?"
        )
    return json.loads(path.read_text())


def privacy_markdown(report: dict[str, Any]) -> str:
    """The privacy statement of a run, in words an auditor can check and sign."""
    private = report["private"]
    lines = ["# Privacy statement", ""]
    if not private:
        lines += ["**No differential privacy**: `privacy.enabled` was false for this run.", ""]
    else:
        lines += [
            f"Each client's training examples are protected by **sample-level "
            f"({report['max_epsilon']:.4g}, {report['delta']:g})-differential privacy** (the "
            "largest epsilon over clients; each client's own is in the table), cumulative over "
            "every round the client trained in.",
            "",
            f"- **Neighbouring relation**: {report['relation']}.",
            f"- **Mechanism**: {report['mechanism']}; per-example "
            f"{report.get('bound_kind', 'clipping bound')} `{report['max_grad_norm']:g}`.",
            f"- **Noise source**: {report['noise_source']}.",
            f"- **Accountant**: `{report['accountant']}` from {report['accountant_library']}"
            + (
                f", value discretisation interval `{report['pld_value_discretization']:g}` "
                "(pessimistic)"
                if report.get("pld_value_discretization")
                else ""
            )
            + f"; delta `{report['delta']:g}`; target epsilon `{report['target_epsilon']}`.",
            f"- **Plan**: {plural(report['rounds_planned'], 'round')}, "
            f"{plural(report['local_steps_per_round'], 'DP step')} per round, "
            f"{plural(report['planned_steps'], 'DP step')} per client if trained in "
            + (
                "every round it can be (clients take turns: `federation.sampling` rotation)"
                if report.get("sampling") == "rotation"
                else "every round"
            )
            + "; each client calibrated its own noise for its own sample rate.",
            "- **Treated as public** (not protected): " + "; ".join(report["public"]) + ".",
            "- **Not covered**: anything a client's owner releases outside fedgen; "
            "user-level privacy (several examples of one person count as several examples); "
            "what the timing of a client's replies reveals (its speed and batch sizes); "
            "a device that runs ClientApp code other than fedgen's (the guarantee assumes "
            "each device runs fedgen's ClientApp, which enforces its own policy).",
            f"- **Recompute** any client's epsilon from its row: `{report['recompute']}`.",
            "",
        ]
    if report.get("canaries"):
        lines += [f"**Audit canaries**: {report['canaries']['text']}.", ""]
    lines += [
        "| client | epsilon | examples | noise multiplier | sample rate | steps (done/planned) | rounds | tally |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cid, c in report["clients"].items():
        eps = f"{c['epsilon']:.4f}" if private and c["epsilon"] is not None else "-"
        noise = f"{c['noise_multiplier']:.4f}" if c.get("noise_multiplier") is not None else "-"
        rate = f"{c['sample_rate']:.6g}" if c.get("sample_rate") is not None else "-"
        lines.append(
            f"| {cid} | {eps} | {c.get('num_examples', '-')} | {noise} | {rate} | "
            f"{c['steps']}/{c.get('planned_steps', '-')} | {c['rounds_participated']} | "
            f"{c.get('tally', 'reported')} |"
        )
    if line := population_line(report):
        lines += ["", line[0].upper() + line[1:] + "."]
    lines += [f"- {line}" if line.startswith("round") else line for line in _absences(report)]
    lines += [
        "",
        "History per client, `[noise_multiplier, sample_rate, steps]`, and steps per stage:",
        "",
    ]
    lines += [
        f"- {cid}: `{c['history']}`; stages `{json.dumps(c.get('stage_steps', {}))}`"
        for cid, c in report["clients"].items()
    ]
    return "\n".join(lines) + "\n"
