import re
import tomllib
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from dicomnode.cli import main
from dicomnode.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "dicomnode.example.toml"


def test_embedded_defaults_are_valid():
    cfg = load_config()
    assert cfg.node.ae_title == "DICOMNODE"
    assert cfg.storage.database_url.startswith("sqlite:///")
    assert [(r.fixed, r.moving) for r in cfg.pairing] == [("CT", "PT"), ("MR", "NM"), ("CT", "NM")]


def _model_of(annotation):
    """The pydantic model a field holds, alone or as tuple[Model, ...]; None for plain values."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _walk(model: type[BaseModel], path: str):
    """(dotted path, field name, field info, nested model or None) for every field, nested models included."""
    for name, info in model.model_fields.items():
        nested = _model_of(info.annotation)
        yield f"{path}.{name}".lstrip("."), name, info, nested
        if nested is not None:
            yield from _walk(nested, f"{path}.{name}".lstrip("."))


def _paragraphs(text: str) -> dict[str, list[list[str]]]:
    """Section name -> its blocks of consecutive non-blank lines; commented headers (# [[x]]) count too."""
    out: dict[str, list[list[str]]] = {}
    section, block = "", []
    for line in [*text.splitlines(), ""]:
        header = re.match(r"^#?\s*\[\[?([a-z_]+)\]\]?\s*$", line)
        if header or not line.strip():
            if block:
                out.setdefault(section, []).append(block)
            block = []
            if header:
                section = header.group(1)
            continue
        block.append(line)
    return out


def _mentions(key: str, line: str) -> bool:
    return re.search(rf"(^|[\s{{,#]){re.escape(key)}\s*=", line) is not None


def test_example_file_shows_the_real_defaults():
    """Loading the example gives exactly the defaults of config.py, field by field (nested models too)."""
    example, default = load_config(EXAMPLE).model_dump(), Config().model_dump()
    differences = [(k, example[k], default[k]) for k in default if example[k] != default[k]]
    assert not differences, differences
    data = tomllib.loads(EXAMPLE.read_text())
    for section, info in Config.model_fields.items():
        nested = _model_of(info.annotation)
        if nested is None or section not in data or isinstance(data[section], list):
            continue
        # A key written in a section table must equal its default (not merely validate).
        defaults = getattr(Config(), section)
        for key, value in data[section].items():
            parsed = type(defaults).model_validate({**defaults.model_dump(), key: value})
            assert getattr(parsed, key) == getattr(defaults, key), f"{section}.{key} = {value!r} is not the default"


def test_example_file_documents_every_key_with_a_comment():
    """Every field of every model appears in its section, active or as a `# key =` example, under a comment;
    a key left out of a section table is one whose default is "not set" (None), and its comment says so."""
    text = EXAMPLE.read_text()
    blocks = _paragraphs(text)
    data = tomllib.loads(text)
    sections = {name: _model_of(info.annotation) for name, info in Config.model_fields.items()}
    for section, model in sections.items():
        assert model is not None and section in blocks, f"[{section}] missing from the example"
        for path, key, info, _nested in _walk(model, section):
            found = [(block, line) for block in blocks[section] for line in block if _mentions(key, line)]
            assert found, f"{path} missing from the example"
            for block, line in found:
                assert block[0].lstrip().startswith("#"), f"{path}: no comment line above {line!r}"
            table = data.get(section)
            if path.count(".") == 1 and isinstance(table, dict) and key not in table:
                assert info.default is None, f"{path} is left out, but its default {info.default!r} is not 'not set'"
                assert all(line.lstrip().startswith("#") for _, line in found)
                assert any("not set" in " ".join(block).lower() for block, _ in found), f"{path}: say 'not set'"


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
    assert main(["check-config", str(bad)]) == 2
    assert f"{bad}: node.port" in capsys.readouterr().err
    assert main(["check-config", str(EXAMPLE)]) == 0
