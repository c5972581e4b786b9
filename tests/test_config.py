from pathlib import Path

import pytest
import yaml

from fedgen.config import FAMILY_DEFAULTS, ConfigError, config_reference_markdown, load_config

REPO = Path(__file__).resolve().parents[1]


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


def test_unknown_key_is_named_with_the_allowed_keys():
    msg = _error(["training.bach_size=32"])
    assert "training.bach_size" in msg
    assert "batch_size" in msg  # what is allowed instead


def test_unknown_section_is_named():
    assert "trainig" in _error(["trainig.batch_size=32"])


def test_wrong_type_names_key_and_value():
    msg = _error(["training.batch_size=many"])
    assert "training.batch_size" in msg and "many" in msg and "integer" in msg


def test_out_of_range_names_key_value_and_bound():
    msg = _error(["privacy.target_epsilon=-3"])
    assert "privacy.target_epsilon" in msg and "-3" in msg and "greater than 0" in msg


def test_choice_lists_what_is_allowed():
    msg = _error(["federation.strategy=fedfoo"])
    assert "federation.strategy" in msg and "fedavg" in msg


def test_cross_field_check_names_both_keys():
    msg = _error(["federation.num_clients=2", "federation.min_train_clients=3"])
    assert "federation.min_train_clients" in msg and "federation.num_clients" in msg


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("privacy:\n  delta: 1e-6\ntraining:\n  batch_size: 16\n")
    cfg = load_config(path, ["training.batch_size=8", "federation.partition=dirichlet"])
    assert cfg.privacy.delta == pytest.approx(1e-6)  # YAML 1.1 "1e-6" is a float here
    assert cfg.training.batch_size == 8
    assert cfg.federation.partition == "dirichlet"


def test_resolved_config_round_trips():
    cfg = load_config(
        None,
        [
            "seed=7",
            "privacy.neighboring=add_remove",
            "privacy.accountant=rdp",
            "privacy.public_num_examples=100",
        ],
    )
    again = type(cfg).model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("family", ["mmd", "gan", "vqvae"])
def test_settings_left_unset_take_the_family_defaults(family):
    """The quickstart is `mmd`; switching family with one setting brings that family's own
    measured recipe, and anything set explicitly wins over it."""
    cfg = load_config(None, [f"model.type={family}"])
    for key, value in FAMILY_DEFAULTS[family].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key
    chosen = load_config(None, [f"model.type={family}", "training.lr_generator=0.01"])
    assert chosen.training.lr_generator == 0.01
    # The saved config holds the numbers, so a later release cannot change a run's recipe.
    saved = yaml.safe_load(cfg.to_yaml())
    assert saved["training"]["local_steps"] == FAMILY_DEFAULTS[family]["training.local_steps"]


def test_the_quickstart_is_the_mmd_family():
    cfg = load_config(None)
    assert cfg.model.type == "mmd" and cfg.data.dataset == "glyphs"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_are_valid():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths, "no recipes under configs/"
    for path in paths:
        load_config(path)


def test_results_rows_are_valid_configs():
    # Each row of docs/RESULTS.md is a recipe plus overrides; a bad override would only
    # show up after a long simulation otherwise.
    rows = yaml.safe_load((REPO / "simulations" / "results.yaml").read_text())["rows"]
    assert rows
    for row in rows.values():
        load_config(REPO / row["config"], row.get("set", []))
        evaluate_sets = row.get("evaluate_set", [])[1::2]  # ["--set", "k=v", ...]
        load_config(REPO / row["config"], [*row.get("set", []), *evaluate_sets])


def test_config_reference_is_current():
    # docs/CONFIG.md is generated; regenerate with `fedgen config-reference --out docs/CONFIG.md`.
    assert (REPO / "docs" / "CONFIG.md").read_text() == config_reference_markdown()


def test_a_run_written_before_a_setting_existed_keeps_the_behaviour_it_was_trained_with(
    tmp_path,
):
    # An `mmd` run saved before 2026-11-24 has no embedding_wavelet_share: its releases
    # were made with the joint kernel alone, so resuming it with the new default (0.7)
    # would fit a generator to statistics of another kernel.
    from fedgen.config import ADDED_SETTINGS, load_run_config, resumable_config

    raw = yaml.safe_load(load_config(None, ["model.type=mmd"]).to_yaml())
    assert raw["model"]["embedding_wavelet_share"] == 0.7  # today's default, in the dump
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert load_run_config(tmp_path).model.embedding_wavelet_share == 0.7  # written: kept
    del raw["model"]["embedding_wavelet_share"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert load_run_config(tmp_path).model.embedding_wavelet_share == 0.0
    assert resumable_config(tmp_path, None).model.embedding_wavelet_share == 0.0
    assert load_run_config(tmp_path, ["run.eval_every=2"]).model.embedding_wavelet_share == 0.0
    cfg = load_config(None, [])
    for key in ADDED_SETTINGS:  # each names a real setting (a typo would do nothing)
        section, name = key.split(".")
        assert name in type(getattr(cfg, section)).model_fields, key


def test_a_directory_that_is_not_a_run_is_refused_with_a_hint(tmp_path):
    # Every command that reads a run (evaluate, sample, audit, verify, card) goes through
    # load_run_config: the one place that says what is wrong with the path.
    from fedgen.card import build_card
    from fedgen.config import load_run_config

    with pytest.raises(FileNotFoundError, match="is .* a fedgen run directory"):
        load_run_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="a fedgen run directory"):
        build_card(tmp_path)
