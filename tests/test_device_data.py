"""A device's own data (image folders, .npz) and its privacy ledger, without Flower."""

import numpy as np
import pytest
import torch
from PIL import Image

from fedgen.data import DataError, data_fingerprint, load_device_data, make_glyphs
from fedgen.ledger import DeviceLedger, LedgerError
from fedgen.privacy import ClientPrivacyState, epsilon_of


def write_folder(root, per_class=3, corrupt=0, rgb=False, size=28):
    glyphs = make_glyphs(per_class, seed=1)
    for i, (img, label) in enumerate(zip(glyphs.images, glyphs.labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pic = Image.fromarray(img).resize((size, size))
        if rgb:
            pic = pic.convert("RGB")
        pic.save(folder / f"{i}.{'jpg' if rgb else 'png'}")
    for i in range(corrupt):
        (root / "0" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return glyphs


def test_image_folder_loads_labels_from_subfolders(tmp_path):
    glyphs = write_folder(tmp_path, per_class=3)
    device = load_device_data(tmp_path)
    assert len(device.data) == len(glyphs) == 30
    assert device.data.images.shape == (30, 28, 28) and device.data.images.dtype == np.uint8
    assert sorted(np.bincount(device.data.labels).tolist()) == [3] * 10
    assert device.skipped == ()


def test_rgb_and_other_sizes_become_grey_28x28(tmp_path):
    write_folder(tmp_path, per_class=1, rgb=True, size=56)
    device = load_device_data(tmp_path, "folder")
    assert device.data.images.shape == (10, 28, 28)
    assert device.data.images.max() > 100  # the strokes survived the conversion


def test_corrupt_image_is_skipped_and_named(tmp_path):
    write_folder(tmp_path, per_class=2, corrupt=1)
    device = load_device_data(tmp_path)
    assert len(device.data) == 20
    assert len(device.skipped) == 1 and device.skipped[0][0].endswith("broken0.png")


def test_folder_of_only_corrupt_images_names_the_folder(tmp_path):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "a.png").write_bytes(b"garbage")
    (tmp_path / "3" / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=f"no usable images in {tmp_path}"):
        load_device_data(tmp_path)


def test_class_folders_must_be_labels(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match="named by label.*cats"):
        load_device_data(tmp_path, "folder")


def test_npz_loads_and_converts(tmp_path):
    glyphs = make_glyphs(2, seed=3)
    path = tmp_path / "mine.npz"
    np.savez(path, images=glyphs.images.astype(np.float32) / 255.0, labels=glyphs.labels)
    device = load_device_data(path)
    assert np.array_equal(device.data.labels, glyphs.labels)
    assert np.abs(device.data.images.astype(int) - glyphs.images).max() <= 1


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 28, 28)), "labels": np.zeros(2, int)}, "named 'images' and 'labels'"),
        (
            {"images": np.zeros((2, 28, 28)), "labels": np.array([0, 12])},
            r"labels must lie in 0..9",
        ),
        ({"images": np.zeros((3, 28, 28)), "labels": np.zeros(2, int)}, "one label each"),
    ],
)
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_device_data(path)


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data-path"):
        load_device_data(tmp_path / "nowhere")


def state(history):
    return ClientPrivacyState(1.1, 0.05, 300, history, {"gan": sum(h[2] for h in history)})


def _write(ledger, run_id, history, server_round=1, fingerprint="ab" * 32):
    state = ClientPrivacyState(1.0, 0.01, 300, history, {"gan": sum(h[2] for h in history)})
    policy = {"delta": 1e-5, "accountant": "pld", "neighboring": "replace_one"}
    return ledger.write_round(
        run_id, state, data_fingerprint=fingerprint, num_examples=100, policy=policy,
        epsilon=epsilon_of(history, 1e-5, "pld", "replace_one"), lifetime_epsilon=0.0,
        server_round=server_round, reply=({"w": torch.zeros(2)}, {"g_loss": 1.0}),
    )  # fmt: skip


def test_ledger_round_trips_and_keeps_the_last_reply(tmp_path):
    ledger = DeviceLedger(tmp_path, "a")
    _write(ledger, "run-1", [(1.0, 0.01, 100)])
    again = DeviceLedger(tmp_path, "a")
    run = again.run("run-1", "ab" * 32)
    assert run["history"] == [[1.0, 0.01, 100]] and run["rounds"] == [1]
    weights, metrics = again.cached_reply("run-1", 1)
    assert torch.equal(weights["w"], torch.zeros(2)) and metrics == {"g_loss": 1.0}
    assert again.cached_reply("run-1", 2) is None and again.cached_reply("run-2", 1) is None


def test_ledger_holds_every_run_and_composes_them(tmp_path):
    ledger = DeviceLedger(tmp_path, "a")
    _write(ledger, "run-1", [(1.0, 0.01, 100)])
    _write(ledger, "run-2", [(2.0, 0.01, 50)], fingerprint="cd" * 32)  # new data, new run
    assert set(ledger.read()["runs"]) == {"run-1", "run-2"}
    assert ledger.lifetime_history() == [(1.0, 0.01, 100), (2.0, 0.01, 50)]
    assert ledger.other_runs_history("run-2") == [(1.0, 0.01, 100)]
    # Data that changed mid-run is refused for that run.
    with pytest.raises(LedgerError, match="different data"):
        ledger.run("run-1", "cd" * 32)
    closed = ledger.close_run("run-1")
    assert closed["closed"] and ledger.run("run-1")["closed"]


def test_a_write_cut_short_leaves_no_file_behind_once_the_device_is_back(tmp_path):
    """A device killed between writing its ledger's temporary file and renaming it leaves
    that file; the next holder of its lock removes it, and only its own (device "1"
    never touches device "10"'s, which may be mid-write)."""
    ledger, other = DeviceLedger(tmp_path, "1"), DeviceLedger(tmp_path, "10")
    _write(ledger, "run-1", [(1.0, 0.01, 100)])
    before = ledger.path.read_text()
    cut_short = tmp_path / f".{ledger.path.name}.k1ll3d.tmp"
    cut_short.write_text('{"half": ')
    reply_cut_short = ledger.reply_path.with_name(f".{ledger.reply_path.name}.tmp")
    reply_cut_short.write_bytes(b"\x00")
    in_progress = tmp_path / f".{other.path.name}.wr1t1ng.tmp"
    in_progress.write_text("{")
    with ledger.locked():
        assert ledger.run("run-1")["history"] == [[1.0, 0.01, 100]]
    assert not cut_short.exists() and not reply_cut_short.exists() and in_progress.exists()
    assert ledger.path.read_text() == before
    # Its own writes leave nothing behind either.
    with ledger.locked():
        _write(ledger, "run-1", [(1.0, 0.01, 200)], server_round=2)
    assert sorted(p.name for p in tmp_path.glob(".*")) == [in_progress.name]


def test_unreadable_ledger_stops_training_instead_of_restarting_from_zero(tmp_path):
    ledger = DeviceLedger(tmp_path, "a")
    ledger.path.write_text("{ not json")
    with pytest.raises(LedgerError, match="cannot be read.*restart from zero"):
        ledger.read()


def test_fingerprint_changes_with_any_pixel():
    glyphs = make_glyphs(2, seed=0)
    changed = glyphs.images.copy()
    changed[0, 0, 0] ^= 1
    assert data_fingerprint(glyphs) != data_fingerprint(type(glyphs)(changed, glyphs.labels, "x"))


def test_server_report_never_lets_a_history_shrink():
    from fedgen.privacy_report import PrivacyLedger
    from tests.helpers import small_config

    report = PrivacyLedger(small_config())
    base = {"client_id": "a", "num_examples": 10, "noise_multiplier": 1.0, "sample_rate": 0.1,
            "planned_steps": 40}  # fmt: skip
    report.record_round(1, [{**base, "history": [[1.0, 0.1, 20]]}])
    # The client comes back with a history that starts again from zero (its ledger lost).
    report.record_round(2, [{**base, "history": [[1.0, 0.1, 10]]}])
    report.record_round(3, [{**base, "history": [[1.0, 0.1, 20]]}])
    client = report.clients["a"]
    assert client["steps"] == 40 and client["lost_history"] == [[1.0, 0.1, 20]]
    assert client["epsilon"] == pytest.approx(
        epsilon_of([(1.0, 0.1, 20), (1.0, 0.1, 20)], 1e-5, "pld", "replace_one")
    )


def test_sixteen_bit_and_broken_png_files(tmp_path):
    (tmp_path / "2").mkdir()
    wide = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "2" / "deep.png")  # a 16-bit grey PNG
    good = tmp_path / "2" / "deep.png"
    broken = tmp_path / "2" / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])  # header intact, data cut off
    device = load_device_data(tmp_path)
    assert len(device.data) == 1 and [s[0] for s in device.skipped] == [str(broken)]
    img = device.data.images[0]
    # Scaled by the 16-bit range (max 62640 of 65535 -> 244), not clipped at 255.
    assert img.max() == 244 and (img == 255).mean() == 0 and img.min() == 0


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((2, 28, 28)), np.zeros((2, 10), int), r"shape \(N,\)"),
        (np.full((2, 28, 28), 300, np.int32), np.zeros(2, int), "pixel values span"),
        (np.zeros((2, 28, 28, 2)), np.zeros(2, int), "2 channels"),
    ],
)
def test_npz_shapes_and_ranges_are_checked(tmp_path, images, labels, message):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(DataError, match=message):
        load_device_data(path)


def test_npz_floats_on_a_255_scale_are_kept(tmp_path):
    glyphs = make_glyphs(1, seed=5)
    path = tmp_path / "f.npz"
    np.savez(path, images=glyphs.images.astype(np.float32), labels=glyphs.labels)
    assert np.array_equal(load_device_data(path).data.images, glyphs.images)
