from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "dicomnode.example.toml"


def test_embedded_defaults_are_valid():
    cfg = load_config()
    assert cfg.node.ae_title == "DICOMNODE"
    assert cfg.storage.database_url.startswith("sqlite:///")
    assert [(r.fixed, r.moving) for r in cfg.pairing] == [("CT", "PT"), ("MR", "NM"), ("CT", "NM")]


def test_example_file_is_valid_and_documents_every_key():
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, Config)
    text = EXAMPLE.read_text()
    # Every field of every section appears in the example with a comment line above it.
    for section_name, section in Config.model_fields.items():
        sub = getattr(cfg, section_name)
        models = sub if isinstance(sub, tuple) else (sub,)
        for model in models[:1]:
            for key in type(model).model_fields:
                assert f"{key} =" in text or f"{key}=" in text, f"{section_name}.{key} missing from example"


def test_errors_carry_key_paths(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[node]\nport = 70000\nae_title = "THIS-TITLE-IS-FAR-TOO-LONG"\n'
        '[[pairing]]\nfixed = "CT"\nmoving = "XX"\n'
        '[storage]\ndatabase_url = "mysql://x"\nspool_dirr = "typo"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    paths = {p.split(":")[0] for p in err.value.problems}
    assert {"node.port", "node.ae_title", "pairing.0.moving", "storage.database_url", "storage.spool_dirr"} <= paths


def test_rule_naming_unknown_destination_is_refused():
    with pytest.raises(ConfigError, match="unknown destinations"):
        load_config(overrides={"pairing": [{"fixed": "CT", "moving": "PT", "destinations": ["nowhere"]}]})


def test_fixed_equals_moving_is_refused():
    with pytest.raises(ConfigError, match="different modalities"):
        load_config(overrides={"pairing": [{"fixed": "CT", "moving": "CT"}]})


def test_check_config_command(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 0\n")
    assert main(["check-config", str(bad)]) == 1
    assert "node.port" in capsys.readouterr().out
    assert main(["check-config", str(EXAMPLE)]) == 0
