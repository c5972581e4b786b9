"""`fedgen card`: one self-contained HTML page per run. The page is parsed with the
standard library's html.parser and checked section by section, for a GAN run with every
part done (evaluation, explain, audit with canaries) and a VQ-VAE run whose audit was
never run; every image must be an inline PNG, and nothing may reach the network."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from flwr.app import ArrayRecord
from PIL import Image

from clients.app import train as client_train
from fedgen.card import build_card, render_card
from fedgen.cli import main
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder
from server.strategy import build_strategy

from .helpers import small_config
from .test_training import _context, _train_message

ROUNDS = [
    "federation.min_train_clients=3",
    "evaluation.samples=100",
    "evaluation.evaluator_epochs=1",
    "evaluation.downstream=final",
    "evaluation.downstream_epochs=1",
    "training.local_steps=3",
]
GAN = ["federation.rounds=2", "privacy.canaries=20"]
VQ = [
    "model.type=vqvae", "model.vq_channels=8", "model.code_dim=4", "model.codebook_size=16",
    "model.prior_channels=16", "model.prior_layers=2", "federation.rounds=1",
    "federation.prior_rounds=1",
]  # fmt: skip
# Small audits: the card reads audit.json; its figures' sizes do not matter here.
AUDIT = ["--generated-per-class", "4", "--reference-per-class", "10", "--mia-examples", "40",
         "--reference-steps", "3"]  # fmt: skip
SECTIONS = ["summary", "privacy", "verification", "quality", "leakage", "explanations", "sources"]


def build_run(path: Path, overrides: list[str]) -> Path:
    """A run directory written by the server's own code in process: Flower's strategy and
    the ClientApp's train function on real messages (no Ray), the RoundRecorder writing
    checkpoints, samples, metrics, the privacy report, the audit log and, per simulated
    device, its ledger."""
    cfg = small_config(*ROUNDS, *overrides, f"evaluation.cache_dir={path / 'evaluators'}")
    run = RunDir.create(cfg, path / "run")
    run.write_manifest(cfg)
    ledgers = run.path / "client-ledgers"
    recorder = RoundRecorder(cfg, run)
    strategy = build_strategy(cfg, recorder)
    contexts = [_context(cfg, pid) for pid in range(cfg.federation.num_clients)]
    weights = recorder.initial_state()
    for server_round in range(1, cfg.total_rounds + 1):
        strategy._sent = ArrayRecord(weights)  # what configure_train records of what it sends
        msgs = [
            client_train(_train_message(cfg, weights, server_round, ledgers, run.run_id), c)
            for c in contexts
        ]
        arrays, _ = strategy.aggregate_train(server_round, msgs)
        weights = arrays.to_torch_state_dict()
    run.finish(cfg)
    return run.path


class _Page(HTMLParser):
    """What the test looks at: sections by id, images, links, scripts, text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}  # id -> text inside it
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.scripts = 0
        self.styles = 0
        self._open: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self._open.append(a.get("id", ""))
            self.sections.setdefault(a.get("id", ""), "")
        elif tag == "img":
            self.images.append({**a, "section": self._open[-1] if self._open else ""})
        elif tag == "script":
            self.scripts += 1
        elif tag == "style":
            self.styles += 1
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for sid in self._open:
            self.sections[sid] += data


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def _png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.width > 0 and img.height > 0
    return img


def _check_page(page: _Page) -> None:
    assert [s for s in SECTIONS if s not in page.sections] == []
    assert page.scripts == 0 and page.styles == 1
    # Self-contained: no link, stylesheet or image that would need the network.
    assert [x for x in page.links if not x.startswith("#")] == []
    for img in page.images:
        _png(img["src"])
        assert img.get("alt")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    path = build_run(tmp_path_factory.mktemp("gan"), GAN)
    assert main(["evaluate", str(path)]) == 0
    assert main(["explain", str(path), "--columns", "3"]) == 0
    assert main(["audit", str(path), *AUDIT]) == 0
    return path


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    path = build_run(tmp_path_factory.mktemp("vq"), VQ)
    assert main(["explain", str(path), "--columns", "3"]) == 0
    return path


def _card(path: Path, *extra: str, out: Path | None = None) -> tuple[_Page, str]:
    out = out or path / "card.html"
    assert main(["card", str(path), "--out", str(out), *extra]) == 0
    html = out.read_text()
    return _parse(html), html


def _section_images(page: _Page, section: str) -> list[dict[str, str]]:
    return [img for img in page.images if img["section"] == section]


def _embedded(page: _Page, section: str, folder: Path) -> set[str]:
    """The files of `folder` whose exact bytes are inline in `section`."""
    found = set()
    inline = {base64.b64decode(i["src"].split(",", 1)[1]) for i in _section_images(page, section)}
    for png in folder.glob("*.png"):
        if png.read_bytes() in inline:
            found.add(png.name)
    return found


def test_gan_card_holds_every_section_with_its_numbers_and_pictures(gan_run):
    page, html = _card(gan_run)
    _check_page(page)
    report = json.loads((gan_run / "privacy_report.json").read_text())
    privacy = page.sections["privacy"]
    assert f"ε = {report['max_epsilon']:.4g}" in privacy and "δ = 1e-05" in privacy
    assert "replace-one" in privacy and "pld" in privacy and "audit canaries" in privacy
    for client in report["clients"].values():
        assert f"{client['noise_multiplier']:.4g}" in privacy
        assert f"{client['sample_rate']:.4g}" in privacy
        assert f"{client['steps']} / {client['planned_steps']}" in privacy
    # Lifetime epsilon, from each simulated device's own ledger.
    ledger = json.loads((gan_run / "client-ledgers" / "1.json").read_text())
    assert f"{ledger['lifetime']['epsilon']:.4g}" in privacy and "own ledger" in privacy
    assert _embedded(page, "privacy", gan_run) == {"privacy_epsilon.png"}

    verification = page.sections["verification"]
    assert "PASS" in verification and "FAIL" not in verification
    assert "audit log chain" in verification and "devices agree with the server" in verification

    evaluation = json.loads((gan_run / "evaluation.json").read_text())["metrics"]
    quality = page.sections["quality"]
    assert f"{100 * evaluation['downstream_accuracy']:.1f}%" in quality
    assert f"{evaluation['frechet_distance']:.4g}" in quality
    assert f"{100 * evaluation['label_consistency']:.1f}%" in quality
    assert "fedgen evaluate on round 2" in quality
    # The generated grid next to the real one, and the quality plot.
    assert _embedded(page, "quality", gan_run / "evaluation") == {"round_002.png", "real.png"}
    assert _embedded(page, "quality", gan_run) == {"quality.png"}

    audit = json.loads((gan_run / "audit" / "audit.json").read_text())
    leakage = page.sections["leakage"]
    canaries = audit["canaries"]
    assert f"{canaries['epsilon_lower_bound']:.3f}" in leakage
    assert f"{canaries['epsilon_upper_bound']:.3f}" in leakage
    for attack in audit["membership_inference"]["attacks"].values():
        assert f"{attack['auc']:.3g}" in leakage
    pixel = audit["memorisation"]["pixel"]["share_closer_to_training"]
    assert f"{100 * pixel:.1f}%" in leakage
    assert (
        _embedded(page, "leakage", gan_run / "audit")
        == {f["file"] for f in audit["figures"]}
        == {"memorisation_ratio.png", "closest_pairs.png", "mia_roc.png", "canary_scores.png"}
    )
    assert "This card shows training images" in "".join(page.text)

    index = json.loads((gan_run / "explain" / "explain.json").read_text())
    explanations = page.sections["explanations"]
    assert "No privacy cost" in explanations
    for figure in index["figures"]:
        assert figure["title"] in explanations and figure["caption"] in explanations
    assert _embedded(page, "explanations", gan_run / "explain") == {
        f["file"] for f in index["figures"]
    }
    # The sources list every file read, with its SHA-256.
    digest = hashlib.sha256((gan_run / "privacy_report.json").read_bytes()).hexdigest()
    assert "privacy_report.json" in page.sections["sources"] and digest in html


def test_vq_card_says_the_audit_was_not_run_and_how_to_run_it(vq_run):
    page, _ = _card(vq_run)
    _check_page(page)
    leakage = page.sections["leakage"]
    assert "Not run." in leakage and f"fedgen audit {vq_run}" in leakage
    assert "--run-missing" in leakage
    assert _section_images(page, "leakage") == []
    glance = page.sections["summary"]
    assert "Leakage" in glance and "not run" in glance
    # Quality from the server's own evaluation (no fedgen evaluate was run).
    quality = page.sections["quality"]
    line = [json.loads(x) for x in (vq_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert "metrics.jsonl" in quality and f"{line['eval']['psnr']:.4g}" in quality
    assert "Codebook usage" in quality and "Fréchet distance" in quality
    # (The prior's round leaves the autoencoder as it was: rounds 1 and 2 reconstruct alike.)
    assert {"round_002.png", "real.png", "reconstructions_round_002.png"} <= _embedded(
        page, "quality", vq_run / "samples"
    )
    assert _embedded(page, "quality", vq_run) == {"quality.png"}
    assert len(_section_images(page, "quality")) == 4
    index = json.loads((vq_run / "explain" / "explain.json").read_text())
    assert _embedded(page, "explanations", vq_run / "explain") == {
        f["file"] for f in index["figures"]
    }
    assert len(index["figures"]) == 6
    assert "VQ-VAE" in "".join(page.text) and "PASS" in page.sections["verification"]


def test_a_card_without_explanations_says_so(vq_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(vq_run, copy)
    shutil.rmtree(copy / "explain")
    page, _ = _card(copy)
    _check_page(page)
    assert f"fedgen explain {copy}" in page.sections["explanations"]
    assert _section_images(page, "explanations") == []


def test_training_images_can_be_left_out(gan_run, tmp_path):
    page, _ = _card(gan_run, "--no-training-images", out=tmp_path / "public.html")
    _check_page(page)
    shown = _embedded(page, "leakage", gan_run / "audit")
    assert "closest_pairs.png" not in shown and "mia_roc.png" in shown
    assert "Closest pairs" in page.sections["leakage"]  # named as left out
    assert "This card shows training images" not in "".join(page.text)


def test_everything_is_escaped_and_a_failed_verification_shows(vq_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(vq_run, copy)
    index_path = copy / "explain" / "explain.json"
    index = json.loads(index_path.read_text())
    index["figures"][0]["caption"] = '<script>alert("x")</script> & <b>bold</b>.'
    index_path.write_text(json.dumps(index))
    report_path = copy / "privacy_report.json"
    report = json.loads(report_path.read_text())
    report["clients"]["1"]["steps"] += 1  # one number edited in a file the log covers
    report_path.write_text(json.dumps(report))
    page, html = _card(copy)
    _check_page(page)  # no script element, one style element
    assert '<script>alert("x")</script> & <b>bold</b>.' in page.sections["explanations"]
    assert "&lt;script&gt;" in html
    verification = page.sections["verification"]
    assert "FAIL" in verification and "privacy_report.json" in verification
    assert "FAIL" in page.sections["summary"]


def test_run_missing_runs_the_audit(vq_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(vq_run, copy)
    page, _ = _card(copy, "--run-missing")
    _check_page(page)
    assert "running fedgen audit" in capsys.readouterr().out
    audit = json.loads((copy / "audit" / "audit.json").read_text())
    assert audit["memorisation"]["status"] == "done"
    leakage = page.sections["leakage"]
    assert "Not run." not in leakage and "Membership inference" in leakage
    assert _embedded(page, "leakage", copy / "audit") == {f["file"] for f in audit["figures"]}


def test_bad_run_directory_is_one_line(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "run directory" in err
    assert build_card and render_card  # the library entry points exist
