"""Every command that reads a configuration answers an unusable one the same way.

Each problem on stderr as ``FILE: key.path: what is wrong``, nothing on stdout, exit status 2;
the command does nothing else (no database opened, no port bound).
"""

from __future__ import annotations

import pytest

from dicomnode.cli import main

# command line after the command name; {config} is the bad file.
COMMANDS = {
    "serve": ["--config", "{config}"],
    "worker": ["--config", "{config}"],
    "check-config": ["{config}"],
    "audit": ["--config", "{config}"],
    "resend": ["--config", "{config}", "--all-failed"],
    "register": ["fixed.nii", "moving.nii", "--out", "t.h5", "--config", "{config}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_configuration_gets_one_answer_from_every_command(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = 0\n\n[completion]\nstable_age_s = -1\n\n[storage]\ndatabase_url = "sqlite:///{}"\n'
                   .format(tmp_path / "audit.db"))
    args = [a.format(config=bad) for a in COMMANDS[command]]
    assert main([command, *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    # One line per problem, each naming the file and the key.
    assert [line.split(": ", 2)[:2] for line in lines] == [[str(bad), "node.port"], [str(bad), "completion.stable_age_s"]]
    assert not (tmp_path / "audit.db").exists()  # refused before anything was opened


def test_a_configuration_file_that_is_not_toml_gets_the_same_answer(tmp_path, capsys):
    bad = tmp_path / "broken.toml"
    bad.write_text("[node\n")
    assert main(["serve", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"{bad}: ")
