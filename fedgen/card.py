"""`fedgen card`: one self-contained HTML page that a data owner or an auditor reads top
to bottom, from what a run directory already holds.

Sections, in reading order: at a glance; the privacy statement in plain words with its
numbers (per client, with the device's lifetime epsilon where its ledger is at hand); the
verification (`fedgen.verify.verify_path`, run afresh every time: it is cheap); quality
(`evaluation.json` of `fedgen evaluate`, else the server's last evaluation in
`metrics.jsonl`, with the generated grid next to the real one); leakage
(`audit/audit.json` of `fedgen audit`); the explanations (`explain/explain.json` of
`fedgen explain`); and the sources, every file the card read with its SHA-256.

A part whose output is missing is shown as "not run" with the command that makes it;
`run_missing` runs those commands first. The page is rendered with Jinja2 (autoescaped)
from `fedgen/templates/card.html.j2`; its images are inline PNG data URIs and its CSS is
inline, so it opens without a network and needs no JavaScript.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["build_card", "render_card", "write_card", "CARD_NAME"]

CARD_NAME = "card.html"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Audit figures that show training images (audit.json's `contains_training_images`).
TRAINING_IMAGE_FIGURES = {"closest_pairs.png"}


class _Sources:
    """Every file the card read, with its digest, so a reader can check the card against
    the run directory it claims to show."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, str] = {}

    def read(self, path: Path) -> bytes:
        data = path.read_bytes()
        self.files[self._name(path)] = hashlib.sha256(data).hexdigest()
        return data

    def json(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            return json.loads(self.read(path))
        except ValueError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); write it again with the command that "
                "made it, or delete it"
            ) from None

    def image(self, path: Path) -> str | None:
        """`path` as a data URI, or None when it is absent or not a PNG."""
        if not path.is_file():
            return None
        data = self.read(path)
        if not data.startswith(PNG_MAGIC):
            return None
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    def _name(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


# ----------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 4) -> str:
    """A figure as text: None as a dash, floats to `digits` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _fixed(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _count(n: int | None, noun: str) -> str:
    return "?" if n is None else f"{n} {noun}" + ("" if n == 1 else "s")


def _span(values: list[float], fmt: str) -> str:
    """One value, or the range of several (clients calibrate their own noise)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo)
        if fmt.format(lo) == fmt.format(hi)
        else f"{fmt.format(lo)} to {fmt.format(hi)}"
    )


def _round_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=_round_of)
    return found[-1] if found else None


def _stale(round_: int | None, latest: int | None) -> str | None:
    if round_ is None or latest is None or round_ == latest:
        return None
    return f"made from round {round_}; the latest checkpoint is round {latest}"


# ----------------------------------------------------------------------------- sections


def _privacy(run: Path, src: _Sources, ledgers: Path | None) -> dict[str, Any]:
    from fedgen.privacy_report import _absences

    report = src.json(run / "privacy_report.json")
    if report is None:
        return {
            "status": "missing",
            "reason": "privacy_report.json is not there: no round has finished yet",
        }
    private = bool(report.get("private"))
    lifetimes = _lifetimes(ledgers, src) if ledgers else {}
    clients = []
    for cid, c in report.get("clients", {}).items():
        life = lifetimes.get(cid, {})
        clients.append(
            {
                "id": cid,
                "epsilon": _num(c.get("epsilon")) if private else "—",
                "examples": _num(c.get("num_examples")),
                "noise": _num(c.get("noise_multiplier")),
                "sample_rate": _num(c.get("sample_rate")),
                "steps": f"{_num(c.get('steps'))} / {_num(c.get('planned_steps'))}",
                "rounds": _num(c.get("rounds_participated")),
                "tally": c.get("tally", "reported"),
                "lifetime": _num(life.get("epsilon")) if life else "—",
                "lifetime_cap": _num(life.get("cap")) if life else "—",
                "lifetime_runs": life.get("runs"),
            }
        )
    all_clients = list(report.get("clients", {}).values())
    eps = report.get("max_epsilon")
    delta = report.get("delta")
    facts = [
        ("Neighbouring relation", report.get("relation", report.get("neighboring"))),
        ("ε (largest over clients)", _num(eps) if private else "none"),
        ("ε target", _num(report.get("target_epsilon")) if private else "none"),
        ("δ", _num(delta)),
        (
            "Accountant",
            f"{report.get('accountant')} ({report.get('accountant_library')})"
            + (
                f", value discretisation {_num(report['pld_value_discretization'])} (pessimistic)"
                if report.get("pld_value_discretization")
                else ""
            ),
        ),
        ("Mechanism", report.get("mechanism")),
        ("Per-example clipping bound", _num(report.get("max_grad_norm"))),
        ("Noise multiplier", _span([c.get("noise_multiplier") for c in all_clients], "{:.4g}")),
        ("Noise source", report.get("noise_source")),
        ("Sampling rate (Poisson)", _span([c.get("sample_rate") for c in all_clients], "{:.4g}")),
        (
            "Steps",
            (
                f"{_num(report.get('rounds_planned'))} rounds, clients taking turns "
                f"(federation.sampling: rotation), {_num(report.get('local_steps_per_round'))} "
                f"DP steps per round trained: {_num(report.get('planned_steps'))} steps per "
                "client at most; "
                if report.get("sampling") == "rotation"
                else f"{_num(report.get('rounds_planned'))} rounds x "
                f"{_num(report.get('local_steps_per_round'))} DP steps per round = "
                f"{_num(report.get('planned_steps'))} steps per client if sampled every round; "
            )
            + f"done: {_span([c.get('steps') for c in all_clients], '{:d}')}",
        ),
        ("Guarantee", report.get("guarantee")),
        ("Treated as public", "; ".join(report.get("public", []))),
        ("Recompute a client's ε", report.get("recompute")),
    ]
    if not private:
        # No accountant, noise or clipping promised anything: show only what still holds.
        keep = {"Steps", "Guarantee", "Treated as public"}
        facts = [(k, v) for k, v in facts if k in keep]
    if private and eps is not None and delta is not None:
        factor = math.exp(eps)
        plain = (
            f"Each client's training examples are protected by sample-level differential "
            f"privacy with ε = {_num(eps)} and δ = {_num(delta)} (ε is the largest over the "
            f"{len(all_clients)} clients; each client's own is in the table). In words: "
            "whatever this run released (every round's model, every figure made from them) "
            f"becomes at most e^ε = {_num(factor, 3)} times more or less likely because of "
            "any one training example of a client, except with probability δ. The smaller ε, "
            "the less any single example can show through."
        )
    else:
        plain = (
            "This run was trained WITHOUT differential privacy (privacy.enabled was false): "
            "nothing bounds what its released models reveal about any training example."
        )
    return {
        "status": "done",
        "private": private,
        "plain": plain,
        "facts": [(k, v) for k, v in facts if v not in (None, "")],
        "clients": clients,
        "lifetime_known": bool(lifetimes),
        "lifetime_note": (
            "from each simulated device's own ledger (client-ledgers/): every run it "
            "trained in, composed"
            if lifetimes
            else "not known to the server: each device's ledger holds it (fedgen report "
            "LEDGER_DIR on the device)"
        ),
        "canaries": (report.get("canaries") or {}).get("text"),
        "absences": [line for line in _absences(report) if line],
        "figure": _figure(
            src,
            run / "privacy_epsilon.png",
            "ε spent per round",
            "Each client's cumulative ε after every round (accountant above); the dashed line "
            "is the target.",
        ),
    }


def _lifetimes(folder: Path, src: _Sources) -> dict[str, dict[str, Any]]:
    """Each device's lifetime ε, as its ledger records it (fedgen verify checks that
    figure against the ledger's histories)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            content = src.json(path)
        except ValueError:
            continue  # verify names the broken ledger; the card leaves it out
        if not content or not str(content.get("format", "")).startswith("fedgen-device-ledger"):
            continue
        life = content.get("lifetime", {})
        if "epsilon" not in life:
            continue
        found[str(content.get("client_id", path.stem))] = {
            "epsilon": life["epsilon"],
            "cap": life.get("policy", {}).get("lifetime_max_epsilon"),
            "runs": len(content.get("runs", {})),
        }
    return found


def _verification(run: Path, ledgers: Path | None) -> dict[str, Any]:
    from fedgen.verify import verify_path

    result = verify_path(run, ledgers)
    checks = [
        {
            "name": c["name"],
            "status": c["status"],
            "summary": c["summary"],
            "problems": c["problems"][:20],
            "more": max(0, len(c["problems"]) - 20),
        }
        for c in result["checks"]
    ]
    failed = sum(c["status"] == "FAIL" for c in checks)
    return {
        "status": "done",
        "passed": result["passed"],
        "verdict": "PASS" if result["passed"] else "FAIL",
        "headline": (
            f"all {len(checks)} checks passed or did not apply"
            if result["passed"]
            else f"{failed} of {len(checks)} checks FAILED: do not trust this run's records "
            "until the files named below are explained"
        ),
        "checks": checks,
        "checked_at": result.get("checked_at"),
        "tolerances": result.get("tolerances", {}),
    }


QUALITY_ROWS = (
    # key, label, format, what it means
    ("downstream_accuracy", "Downstream accuracy", "pct",
     "a fresh classifier trained only on generated, labelled images, tested on the real test "
     "set (higher is better)"),
    ("frechet_distance", "Fréchet distance", "num",
     "between generated and real test images in the evaluator's feature space (lower is "
     "better; 0 for identical distributions)"),
    ("label_consistency", "Label consistency", "pct",
     "share of generated images the evaluator classifies as the class they were asked for"),
    ("evaluator_test_accuracy", "Evaluator's accuracy", "pct",
     "the evaluator's own accuracy on real test images: the scale the two figures above "
     "are measured with"),
    ("inception_fid", "Inception FID", "num", "only with a local Inception weights file"),
    ("recon_mse", "Reconstruction MSE", "num", "VQ-VAE: test images through the autoencoder"),
    ("psnr", "Reconstruction PSNR (dB)", "num", "VQ-VAE: higher is better"),
    ("codebook_usage", "Codebook usage", "pct", "VQ-VAE: share of codes the test images use"),
    ("codebook_perplexity", "Codebook perplexity", "num", "VQ-VAE: effective number of codes"),
)  # fmt: skip


def _quality(run: Path, src: _Sources, latest: int | None) -> dict[str, Any]:
    evaluation = src.json(run / "evaluation.json")
    lines = []
    metrics_path = run / "metrics.jsonl"
    if metrics_path.is_file():
        text = src.read(metrics_path).decode()
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    evaluated = [x for x in lines if x.get("eval")]
    if evaluation is not None:
        metrics, round_ = evaluation.get("metrics", {}), evaluation.get("round")
        source = (
            f"fedgen evaluate on round {round_} ({evaluation.get('date', 'date unknown')}, "
            f"{evaluation.get('machine', 'machine unknown')})"
        )
        privacy = evaluation.get("privacy", {})
        eps_then = privacy.get("max_epsilon")
        grids = run / "evaluation"
    elif evaluated:
        metrics, round_ = evaluated[-1]["eval"], evaluated[-1]["round"]
        source = f"the server's evaluation after round {round_} (metrics.jsonl)"
        eps_then = evaluated[-1].get("max_epsilon")
        grids = run / "samples"
    else:
        return {
            "status": "not run",
            "reason": "no evaluation.json and no evaluated round in metrics.jsonl",
            "command": f"fedgen evaluate {run}",
        }
    rows = []
    for key, label, kind, meaning in QUALITY_ROWS:
        if key not in metrics:
            continue
        value = metrics[key]
        text = "skipped" if value is None else (_pct(value) if kind == "pct" else _num(value))
        rows.append({"label": label, "value": text, "meaning": meaning})
    if "downstream_accuracy" not in metrics and "frechet_distance" in metrics:
        rows.insert(
            0,
            {
                "label": "Downstream accuracy",
                "value": "not measured",
                "meaning": f"fedgen evaluate {run} measures it (evaluation.downstream)",
            },
        )
    name = f"round_{round_:03d}.png" if isinstance(round_, int) else ""
    generated = grids / name if (grids / name).is_file() else run / "samples" / name
    real = next(
        (p for p in (grids / "real.png", run / "samples" / "real.png") if p.is_file()), None
    )
    recon = _latest(run / "samples", "reconstructions_round_*.png")
    pair = []
    if generated.is_file():
        pair.append(
            _figure(
                src,
                generated,
                f"Generated, round {round_}",
                "One row per class, the same noise every time (rows of successive rounds "
                "are comparable).",
            )
        )
    if real is not None:
        pair.append(
            _figure(
                src,
                real,
                "Real test images",
                "Real test images laid out the same way (public evaluation data, not a client's).",
            )
        )
    figures = []
    if recon is not None:
        figures.append(
            _figure(
                src,
                recon,
                f"Reconstructions, round {_round_of(recon)}",
                "Top: real test images; bottom: the same images through the VQ-VAE.",
            )
        )
    figures.append(
        _figure(
            src,
            run / "quality.png",
            "Quality over rounds",
            "The server's quality figures after each evaluated round, against the round and "
            "the ε spent.",
        )
    )
    return {
        "status": "done",
        "source": source,
        "epsilon_then": _num(eps_then),
        "stale": _stale(round_, latest),
        "rows": rows,
        "pair": [f for f in pair if f],
        "figures": [f for f in figures if f],
    }


def _figure(src: _Sources, path: Path, title: str, caption: str) -> dict[str, str] | None:
    uri = src.image(path)
    if uri is None:
        return None
    return {"file": path.name, "title": title, "caption": caption, "src": uri}


def _attack_rows(mia: dict[str, Any]) -> list[dict[str, str]]:
    names = {"model_score": "released model's score", "calibrated": "calibrated (reference model)"}
    rows = []
    for attack, s in mia.get("attacks", {}).items():
        at = s.get("tpr_at_fpr", {})

        def tpr(key: str, at: dict[str, Any] = at) -> str:
            if key not in at:
                return "—"
            e = at[key]
            found, wrong = e.get("true_positives"), e.get("false_positives")
            shown = f"{_pct(e['tpr'])} ({_count(found, 'member')} at "
            shown += f"{_count(wrong, 'false positive')})"
            return shown if e.get("resolvable", True) else shown + ", too few non-members"

        rows.append(
            {
                "attack": names.get(attack, attack)
                + (" — strongest" if attack == mia.get("strongest") else ""),
                "auc": _num(s.get("auc"), 3),
                "tpr_1": tpr("0.01"),
                "tpr_01": tpr("0.001"),
                "sizes": f"{_num(s.get('members'))} members, {_num(s.get('non_members'))} "
                "non-members",
            }
        )
    return rows


def _leakage(run: Path, src: _Sources, latest: int | None, training_images: bool) -> dict[str, Any]:
    audit = src.json(run / "audit" / "audit.json")
    if audit is None:
        return {
            "status": "not run",
            "reason": "audit/audit.json is not there",
            "command": f"fedgen audit {run}",
        }
    memo = audit.get("memorisation", {})
    memorisation: dict[str, Any] = {"status": memo.get("status"), "reason": memo.get("reason")}
    if memo.get("status") == "done":
        spaces = []
        for space, label in (("pixel", "pixel space"), ("features", "evaluator features")):
            s = memo.get(space)
            if s:
                spaces.append(
                    {
                        "space": label,
                        "closer": _pct(s.get("share_closer_to_training")),
                        "median_ratio": _fixed(s.get("median_ratio")),
                        "near_copies": _pct(s.get("share_near_copies")),
                    }
                )
        copying = memo.get("data_copying") or {}
        memorisation |= {
            "spaces": spaces,
            "generated": _num(memo.get("generated")),
            "copying": (
                f"{_pct(copying['share_generated_below'])} of generated images lie nearer to a "
                f"training image than {_pct(1 - copying.get('expected_without_copying', 0.05), 0)} "
                f"of held-out real images do ({_pct(copying.get('expected_without_copying'))} "
                "expected without copying)"
                if "share_generated_below" in copying
                else None
            ),
        }
    mia = audit.get("membership_inference", {})
    membership: dict[str, Any] = {"status": mia.get("status"), "reason": mia.get("reason")}
    if mia.get("status") == "done":
        membership |= {
            "score": mia.get("score"),
            "rows": _attack_rows(mia),
            "members": (mia.get("settings") or {}).get("members"),
        }
    can = audit.get("canaries", {})
    canaries: dict[str, Any] = {"status": can.get("status"), "reason": can.get("reason")}
    if can.get("status") == "done":
        lower, upper = can.get("epsilon_lower_bound"), can.get("epsilon_upper_bound")
        scale = max(lower or 0.0, upper or 0.0) or 1.0
        best = can.get("best") or {}
        canaries |= {
            "lower": f"{lower:.3f}" if lower is not None else "—",
            "upper": f"{upper:.3f}" if upper is not None else "none (no DP)",
            # Bar widths on one scale, so the two bounds are seen side by side.
            "lower_width": round(100 * (lower or 0.0) / scale, 1),
            "upper_width": round(100 * (upper or 0.0) / scale, 1) if upper is not None else None,
            "confidence": _pct(can.get("confidence"), 0),
            "count": _num(can.get("canaries")),
            "included": _num(can.get("included")),
            "best": f"{best.get('correct', 0)} of {best.get('guesses', 0)} guesses correct",
            "consistent": bool(can.get("consistent", True)),
            "method": can.get("method"),
        }
    figures = []
    omitted = []
    for fig in audit.get("figures", []):
        if not training_images and fig["file"] in TRAINING_IMAGE_FIGURES:
            omitted.append(fig["title"])
            continue
        entry = _figure(src, run / "audit" / fig["file"], fig["title"], fig["caption"])
        if entry:
            entry["training_images"] = fig["file"] in TRAINING_IMAGE_FIGURES
            figures.append(entry)
    # Each check's figures beside its figures in the text; anything else after them.
    placed = {
        "memorisation": ("memorisation_ratio.png", "closest_pairs.png", "compare_memorisation.png"),
        "membership": ("mia_roc.png", "compare_roc.png"),
        "canaries": ("canary_scores.png",),
    }
    for key, part in (("memorisation", memorisation), ("membership", membership),
                      ("canaries", canaries)):  # fmt: skip
        part["figures"] = [f for f in figures if f["file"] in placed[key]]
    other = [f for f in figures if not any(f["file"] in names for names in placed.values())]
    compare = audit.get("compare")
    return {
        "status": "done",
        "round": audit.get("round"),
        "date": audit.get("date"),
        "stale": _stale(audit.get("round"), latest),
        "deployed": audit.get("deployed"),
        "verdict": audit.get("verdict"),
        "consistent": audit.get("verdict") == "consistent",
        "data": audit.get("data", {}),
        "memorisation": memorisation,
        "membership": membership,
        "canaries": canaries,
        "figures": other,
        "omitted": omitted,
        "shows_training_images": any(f["training_images"] for f in figures),
        "compare": (
            {
                "label": compare.get("label"),
                "run_dir": compare.get("run_dir"),
                "rows": [(k, _num(v, 3)) for k, v in compare.get("summary", {}).items()],
            }
            if compare
            else None
        ),
    }


def _explanations(run: Path, src: _Sources, latest: int | None) -> dict[str, Any]:
    index = src.json(run / "explain" / "explain.json")
    if index is None:
        return {
            "status": "not run",
            "reason": "explain/explain.json is not there",
            "command": f"fedgen explain {run}",
        }
    figures = []
    missing = []
    for fig in index.get("figures", []):
        entry = _figure(src, run / "explain" / fig["file"], fig["title"], fig["caption"])
        if entry:
            figures.append(entry)
        else:
            missing.append(fig["file"])
    return {
        "status": "done",
        "round": index.get("round"),
        "date": index.get("date"),
        "stale": _stale(index.get("round"), latest),
        "privacy": index.get("privacy"),
        "reads": index.get("reads"),
        "figures": figures,
        "missing": missing,
    }


def _about(run: Path, src: _Sources) -> dict[str, Any]:
    from fedgen.config import load_run_config
    from fedgen.console import plural

    cfg = load_run_config(run)
    src.read(run / "config.yaml")
    manifest = src.json(run / "manifest.json") or {}
    fed = cfg.federation
    rounds = plural(fed.rounds, "round") + (
        f" + {plural(fed.prior_rounds, 'prior round')}" if cfg.model.type == "vqvae" else ""
    )
    return {
        "name": run.name,
        "path": str(run),
        "model": {
            "gan": "class-conditional GAN",
            "vqvae": "VQ-VAE with a code prior",
            "mmd": "class-conditional generator fitted to a private mean embedding",
        }.get(cfg.model.type, cfg.model.type),
        "dataset": cfg.data.dataset,
        "federation": f"{plural(fed.num_clients, 'client')}, {fed.partition} split"
        + (f" (Dirichlet α {fed.dirichlet_alpha:g})" if fed.partition == "dirichlet" else "")
        + f", {fed.strategy}, {rounds}",
        "run_id": manifest.get("run_id", "—"),
        "started": manifest.get("start_time", "—"),
        "ended": manifest.get("end_time") or "—",
        "status": manifest.get("status", "unknown (no end recorded)"),
        "versions": ", ".join(
            f"{k} {manifest[k]}" for k in ("fedgen", "torch", "opacus", "flwr") if manifest.get(k)
        ),
    }


def _glance(card: dict[str, Any]) -> list[dict[str, str]]:
    """The headline figures, each linking to its section."""
    p, v, q, leak = card["privacy"], card["verification"], card["quality"], card["leakage"]
    items = []
    if p["status"] == "done":
        eps = next((val for key, val in p["facts"] if key.startswith("ε (")), "—")
        delta = next((val for key, val in p["facts"] if key == "δ"), "—")
        items.append(
            {
                "label": "Privacy",
                "value": f"ε = {eps}, δ = {delta}" if p["private"] else "NO DP",
                "tone": "good" if p["private"] else "bad",
                "anchor": "privacy",
            }
        )
    items.append(
        {
            "label": "Verification",
            "value": v["verdict"],
            "tone": "good" if v["passed"] else "bad",
            "anchor": "verification",
        }
    )
    if q["status"] == "done":
        row = q["rows"][0] if q["rows"] else {"label": "Quality", "value": "—"}
        items.append(
            {"label": row["label"], "value": row["value"], "tone": "", "anchor": "quality"}
        )
    else:
        items.append({"label": "Quality", "value": "not run", "tone": "warn", "anchor": "quality"})
    if leak["status"] == "done":
        mia = leak["membership"]
        if mia["status"] == "done" and mia["rows"]:
            strongest = next((r for r in mia["rows"] if "strongest" in r["attack"]), mia["rows"][0])
            items.append(
                {
                    "label": "Membership AUC",
                    "value": strongest["auc"],
                    "tone": "",
                    "anchor": "leakage",
                }
            )
        can = leak["canaries"]
        if mia["status"] != "done" and can["status"] != "done":
            status = mia["status"] or "not run"
            shown = "needs the data owner" if status == "needs-data" else status
            items.append({"label": "Leakage", "value": shown, "tone": "warn", "anchor": "leakage"})
        if can["status"] == "done":
            items.append(
                {
                    "label": "ε lower bound (audit)",
                    "value": f"{can['lower']} ≤ {can['upper']}"
                    if can["consistent"]
                    else f"{can['lower']} > {can['upper']}",
                    "tone": "good" if can["consistent"] else "bad",
                    "anchor": "leakage",
                }
            )
    else:
        items.append({"label": "Leakage", "value": "not run", "tone": "warn", "anchor": "leakage"})
    return items


# ----------------------------------------------------------------------------- assembly


def build_card(
    run_path: str | Path,
    ledgers: str | Path | None = None,
    training_images: bool = True,
) -> dict[str, Any]:
    """Everything the card shows, as plain data (what the template renders).
    `ledgers`: the devices' ledger folder (default: RUN_DIR/client-ledgers when there);
    `training_images`: False leaves out the audit figures that show training images."""
    run = Path(run_path).resolve()
    if not run.is_dir():
        raise FileNotFoundError(
            f"{run} is not a directory: give a run directory of fedgen simulate"
        )
    src = _Sources(run)
    about = _about(run, src)
    folder = Path(ledgers).resolve() if ledgers else run / "client-ledgers"
    folder_or_none = folder if folder.is_dir() else None
    checkpoint = _latest(run / "checkpoints", "round_*.safetensors")
    latest = _round_of(checkpoint) if checkpoint else None
    card: dict[str, Any] = {
        "about": about,
        "latest_round": latest,
        "privacy": _privacy(run, src, folder_or_none),
        "verification": _verification(run, ledgers),
        "quality": _quality(run, src, latest),
        "leakage": _leakage(run, src, latest, training_images),
        "explanations": _explanations(run, src, latest),
    }
    card["glance"] = _glance(card)
    card["problems"] = []  # what --run-missing could not run (write_card)
    card["sources"] = sorted(src.files.items())
    card["generated"] = datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        card["fedgen"] = metadata.version("fedgen")
    except metadata.PackageNotFoundError:
        card["fedgen"] = "unknown"
    return card


def render_card(card: dict[str, Any]) -> str:
    """The card as one HTML page (Jinja2, every value escaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fedgen", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a key the template expects and the card lacks fails
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("card.html.j2").render(card=card)


def _missing_commands(run: Path) -> list[list[str]]:
    """The commands that make the card's missing parts (quality, explain, audit)."""
    commands = []
    metrics = run / "metrics.jsonl"
    evaluated = metrics.is_file() and any(
        json.loads(x).get("eval") for x in metrics.read_text().splitlines() if x.strip()
    )
    if not (run / "evaluation.json").is_file() and not evaluated:
        commands.append(["evaluate", str(run)])
    if not (run / "explain" / "explain.json").is_file():
        commands.append(["explain", str(run)])
    if not (run / "audit" / "audit.json").is_file():
        commands.append(["audit", str(run)])
    return commands


def run_missing(run_path: str | Path) -> list[str]:
    """Run `fedgen evaluate`, `explain` and `audit` where their output is missing; returns
    one line per command that could not run, saying why (the card then shows it not run)."""
    from fedgen.cli import _user_errors, build_parser

    problems = []
    for argv in _missing_commands(Path(run_path).resolve()):
        print(f"[fedgen] card: running fedgen {argv[0]} (its output is missing)", flush=True)
        args = build_parser().parse_args(argv)
        try:
            code = int(args.func(args))
        except _user_errors() as err:
            problems.append(f"fedgen {argv[0]} could not run: {err}")
            continue
        # The audit exits 3 when its bounds contradict; it still wrote audit.json.
        if code not in (0, 3):
            problems.append(f"fedgen {argv[0]} exited with code {code}")
    return problems


def write_card(
    run_path: str | Path,
    out: str | Path | None = None,
    ledgers: str | Path | None = None,
    training_images: bool = True,
    missing: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Build and write the card (default RUN_DIR/card.html); `missing`: run what is
    missing first. Returns the path and the card's data."""
    from fedgen.files import write_atomic

    problems = run_missing(run_path) if missing else []
    card = build_card(run_path, ledgers, training_images)
    card["problems"] = problems
    path = Path(out) if out else Path(run_path).resolve() / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_card(card))
    return path, card
