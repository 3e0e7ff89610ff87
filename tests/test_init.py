"""`tunneld init`: a complete, commented, valid config, written safely."""

from __future__ import annotations

import dataclasses
import re
import stat
from pathlib import Path

import pytest

from tunneld.cli import main
from tunneld.config import HomeConfig, RelayConfig, load_config, masked
from tunneld.initconfig import HOME_COMMENTS, PLACEHOLDER_TOKEN, RELAY_COMMENTS

CONF = Path(__file__).resolve().parent.parent / "conf"
TOKEN = "tunneld1.c2VjcmV0LWNsYWltcw.c2lnbmF0dXJl"


def comments(text: str) -> dict[tuple[str, str], str]:
    """(table, key) -> the comment lines above it, joined."""
    out: dict[tuple[str, str], str] = {}
    table = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"\[([\w.]+)\]", line):
            table = m.group(1)
        elif "=" in line and not line.startswith("#"):
            above: list[str] = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                above.insert(0, lines[j][2:])
                j -= 1
            out[(table, line.split("=", 1)[0].strip())] = " ".join(above)
    return out


def run_init(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["init", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_home_init_writes_a_valid_private_config_with_the_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tunneld.toml"
    code, output = run_init(
        tmp_path,
        capsys,
        "-o",
        str(path),
        "--relay",
        "wss://relay.example.net/v1/tunnel",
        "--token",
        TOKEN,
        "--hostname",
        "Home.Example.NET",
        "--hostname",
        "ha.example.net",
        "--upstream",
        "http://127.0.0.1:8124",
    )
    assert code == 0, output
    assert TOKEN not in output  # the token goes in the file, not on the terminal
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_config(path)
    assert isinstance(config, HomeConfig)
    assert config.relay.url == "wss://relay.example.net/v1/tunnel"
    assert config.relay.token == TOKEN
    assert config.tls.hostnames == ("home.example.net", "ha.example.net")
    assert (config.upstream.host, config.upstream.port) == ("127.0.0.1", 8124)
    # Everything else is the default, exactly as the conf/ example has it.
    example = load_config(CONF / "tunneld.toml")
    assert isinstance(example, HomeConfig)
    same = dataclasses.replace(
        config, path=example.path, relay=example.relay, tls=example.tls, upstream=example.upstream
    )
    assert same == example
    assert dataclasses.replace(config.relay, url=example.relay.url, token="") == (
        dataclasses.replace(example.relay, token="")
    )


def test_init_output_carries_every_key_with_the_conf_examples_comments(tmp_path: Path) -> None:
    home, relay = tmp_path / "home.toml", tmp_path / "relay.toml"
    assert main(["init", "-o", str(home)]) == 0
    assert main(["init", "--role", "relay", "-o", str(relay)]) == 0
    for written, example, table in (
        (home, CONF / "tunneld.toml", HOME_COMMENTS),
        (relay, CONF / "relay.toml", RELAY_COMMENTS),
    ):
        got, want = comments(written.read_text()), comments(example.read_text())
        assert set(got) == set(want), written.name  # every key, no more
        for key, text in got.items():
            assert text, f"no comment above {key}"
            assert text == want[key], key  # the same words as conf/
        # Every key of the loaded config is in the file.
        # A dict with comments of its own is a sub-table ([relay.acme]), any other an
        # inline-table value ([access] hostnames = {}).
        keys = {
            (f"{t}.{k}", sk) if f"{t}.{k}" in table else (t, k)
            for t, values in masked(load_config(written)).items()
            for k, v in values.items()
            for sk in (v if f"{t}.{k}" in table else [None])
        }
        assert keys == set(got)
        assert set(table) == {t for t, _ in got}


def test_home_init_without_a_token_writes_a_placeholder_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tunneld.toml"
    code, output = run_init(tmp_path, capsys, "-o", str(path))
    assert code == 0
    assert PLACEHOLDER_TOKEN in output
    config = load_config(path)
    assert isinstance(config, HomeConfig)
    assert config.relay.token == PLACEHOLDER_TOKEN


def test_home_init_leaves_acme_off_until_the_terms_are_agreed_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    terms = "https://letsencrypt.org/repository/"
    path = tmp_path / "tunneld.toml"
    code, output = run_init(tmp_path, capsys, "-o", str(path))
    assert code == 0 and "--agree-tos" in output
    text = path.read_text()
    assert "\nagree_tos = false\n" in text
    assert terms in comments(text)[("acme", "agree_tos")]
    config = load_config(path)
    assert isinstance(config, HomeConfig)
    assert config.acme.enabled and not config.acme.agree_tos

    agreed = tmp_path / "agreed.toml"
    code, output = run_init(tmp_path, capsys, "-o", str(agreed), "--agree-tos")
    assert code == 0 and "agree_tos" not in output
    config = load_config(agreed)
    assert isinstance(config, HomeConfig)
    assert config.acme.enabled and config.acme.agree_tos
    assert "\nagree_tos = true\n" in agreed.read_text()


def test_token_file_is_written_as_an_absolute_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "etc").mkdir()
    code, output = run_init(tmp_path, capsys, "-o", "etc/tunneld.toml", "--token-file", "token")
    assert code == 0, output
    config = load_config(tmp_path / "etc" / "tunneld.toml")
    assert isinstance(config, HomeConfig)
    assert config.relay.token_file == tmp_path / "token"
    assert config.relay.token == TOKEN
    assert TOKEN not in (tmp_path / "etc" / "tunneld.toml").read_text()


def test_relay_init(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    assert (
        main(["init", "--role", "relay", "-o", str(path), "--hostname", "Relay.Example.NET"]) == 0
    )
    config = load_config(path)
    assert isinstance(config, RelayConfig)
    assert config.relay.hostname == "relay.example.net"
    assert config.relay.certificate == tmp_path / "relay.crt"
    assert config.relay.token_public_key == (tmp_path / "token.pub",)
    assert config.relay.listen == (("0.0.0.0", 443),)


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tunneld.toml"
    path.write_text("# mine\n")
    code, output = run_init(tmp_path, capsys, "-o", str(path), "--token", TOKEN)
    assert code == 2
    assert "already exists" in output and "--force" in output
    assert path.read_text() == "# mine\n"
    code, output = run_init(tmp_path, capsys, "-o", str(path), "--token", TOKEN, "--force")
    assert code == 0, output
    assert isinstance(load_config(path), HomeConfig)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hostname", "not a name"], r": \[tls\] hostnames: not a valid DNS name"),
        (["--relay", "https://relay.example.net"], r": \[relay\] url: expected"),
        (["--upstream", "ftp://x"], r"--upstream: expected"),
        (["--token", "has space"], r": \[relay\] token: the token holds spaces"),
        (["--token", TOKEN, "--token-file", "/nonexistent"], r"give one, not both"),
        (["--role", "relay", "--token", TOKEN], r"--role relay takes only --hostname"),
    ],
)
def test_bad_answers_name_the_key_and_leave_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    path = tmp_path / "out.toml"
    code, output = run_init(tmp_path, capsys, "-o", str(path), *args)
    assert code == 2
    assert re.search(message, output), output
    assert "has space" not in output  # a bad token is never echoed
    assert list(tmp_path.iterdir()) == []  # no config, no scratch file
    if ": [" in output:
        assert f"{path}: [" in output  # the file the user named, not a scratch file
