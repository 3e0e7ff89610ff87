"""[lan] and [[route]]: what the loader accepts, and the errors it names (`file: [table] key`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tunneld.config import HomeConfig, RouteSection, load_config, masked
from tunneld.errors import ConfigError
from tunneld.pki import generate_private_key, self_signed_certificate, write_certificate
from tunneld.tokens import issue_token

CONF = Path(__file__).resolve().parent.parent / "conf"
KEY = Ed25519PrivateKey.generate()


def token(*names: str) -> str:
    return issue_token(KEY, hostnames=list(names), subject="t", ttl=3600)


def home(tmp_path: Path, extra: str, names: tuple[str, ...] = ("home.test", "cams.test")) -> Path:
    path = tmp_path / "tunneld.toml"
    path.write_text(
        f"""
[relay]
url = "wss://relay.test/v1/tunnel"
token = "{token(*names)}"
[tls]
hostnames = ["home.test"]
{extra}
"""
    )
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_routes_are_claimed_and_certified_with_the_tls_names(tmp_path: Path) -> None:
    config = load_config(
        home(
            tmp_path,
            """
[lan]
listen = ["127.0.0.1:8443", "[::1]:8443"]
[[route]]
hostname = "Cams.Test."
upstream = "http://192.168.1.20:5000"
response_timeout = "5s"
preset = "generic"
trusted_proxies = ["10.0.0.0/8"]
""",
        )
    )
    assert isinstance(config, HomeConfig)
    assert config.lan.listen == (("127.0.0.1", 8443), ("::1", 8443))
    (route,) = config.route
    assert route.hostname == "cams.test"
    # The relay session claims it, ACME and the bootstrap certificate cover it.
    assert config.tls.hostnames == ("home.test", "cams.test")
    up = route.upstream_section(config.upstream)
    assert (up.host, up.port, up.response_timeout) == ("192.168.1.20", 5000, 5.0)
    assert up.connect_timeout == config.upstream.connect_timeout  # inherited
    wd = route.watchdog_section(config.watchdog)
    assert wd.preset == "generic" and [str(n) for n in wd.trusted_proxies] == ["10.0.0.0/8"]
    # check-config's view writes back as TOML that loads to the same config.
    shown = masked(config)
    assert shown["route"][0]["hostname"] == "cams.test"
    assert "connect_timeout" not in shown["route"][0]


def test_no_route_no_lan_is_todays_config(tmp_path: Path) -> None:
    config = load_config(home(tmp_path, ""))
    assert isinstance(config, HomeConfig)
    assert config.route == () and config.lan.listen == ()
    assert config.tls.hostnames == ("home.test",)


@pytest.mark.parametrize(
    ("extra", "where", "words"),
    [
        (
            '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\n'
            '[[route]]\nhostname = "CAMS.test"\nupstream = "http://b:2"\n',
            "[route 2] hostname",
            "already the hostname of [route 1]",
        ),
        (
            '[[route]]\nhostname = "nvr.test"\nupstream = "http://a:1"\n',
            "[route 1] hostname",
            "not among the token's hostnames",
        ),
        ('[[route]]\nhostname = "cams.test"\n', "[route 1] upstream", "required"),
        (
            '[[route]]\nhostname = "cams.test"\nupstream = "ftp://a"\n',
            "[route 1] upstream",
            "",
        ),
        (
            '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\nbogus = 1\n',
            "[route 1] bogus",
            "unknown key",
        ),
        (
            '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\n'
            'client_certificate = "required"\nclient_ca = "missing-ca.pem"\n',
            "[route 1] client_ca",
            "cannot read",
        ),
        (
            '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\n'
            'client_certificate = "always"\n',
            "[route 1] client_certificate",
            "expected one of",
        ),
        ('[route]\nhostname = "cams.test"\n', "[route]", "[[route]]"),
        ('[lan]\nlisten = ["nope"]\n', "[lan] listen", ""),
    ],
)
def test_bad_routes_name_file_table_and_key(
    tmp_path: Path, extra: str, where: str, words: str
) -> None:
    msg = error(home(tmp_path, extra))
    assert msg.startswith(f"{tmp_path / 'tunneld.toml'}: {where}"), msg
    assert words in msg
    assert "\n" not in msg


def test_a_client_ca_that_is_not_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    msg = error(
        home(
            tmp_path,
            '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\n'
            'client_certificate = "optional"\nclient_ca = "ca.pem"\n',
        )
    )
    assert "[route 1] client_ca" in msg and "no PEM certificate" in msg


def test_a_route_outside_the_configured_certificate(tmp_path: Path) -> None:
    key = generate_private_key()
    write_certificate(self_signed_certificate(key, ["home.test"]), tmp_path / "c.pem")
    (tmp_path / "k.pem").write_text("")
    path = home(
        tmp_path,
        'certificate = "c.pem"\nprivate_key = "k.pem"\n'
        '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\n',
    )
    text = path.read_text().replace('hostnames = ["home.test"]\n', "")
    text = text.replace("[tls]\n", '[tls]\nhostnames = ["home.test"]\n')
    path.write_text(text)
    msg = error(path)
    assert "[route 1] hostname" in msg and "not among the names of [tls] certificate" in msg
    # A wildcard certificate covers it.
    write_certificate(self_signed_certificate(key, ["home.test", "*.test"]), tmp_path / "c.pem")
    assert isinstance(load_config(path), HomeConfig)


def test_the_commented_route_example_carries_every_key() -> None:
    text = (CONF / "tunneld.toml").read_text()
    block = text[text.index("# [[route]]") :]
    lines = [re.sub(r"^# ?", "", line) for line in block.splitlines()]
    raw = tomllib.loads("\n".join(lines))
    (route,) = raw["route"]
    keys = {f for f in RouteSection.__dataclass_fields__}
    assert set(route) == keys


def test_init_writes_lan_and_routes_that_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunneld.cli import main

    path = tmp_path / "tunneld.toml"
    code = main(
        [
            "init",
            "-o",
            str(path),
            "--token",
            token("home.example.com", "cams.example.com"),
            "--lan-listen",
            "0.0.0.0:443",
            "--lan-listen",
            "[::]:443",
            "--route",
            "cams.example.com=http://192.168.1.20:5000",
        ]
    )
    assert code == 0, capsys.readouterr()
    text = path.read_text()
    assert "[[route]]" in text and "# Where its requests go." in text
    config = load_config(path)
    assert isinstance(config, HomeConfig)
    assert config.lan.listen == (("0.0.0.0", 443), ("::", 443))
    assert [(r.hostname, r.upstream) for r in config.route] == [
        ("cams.example.com", "http://192.168.1.20:5000")
    ]
    assert config.tls.hostnames == ("home.example.com", "cams.example.com")
    # check-config prints the effective config with the route, and exits 0.
    capsys.readouterr()
    assert main(["check-config", "-c", str(path)]) in (0, 1)  # 1: ACME consent warning
    shown = capsys.readouterr().out
    assert '"route": [' in shown and '"hostname": "cams.example.com"' in shown
    assert main(["init", "-o", str(tmp_path / "x.toml"), "--route", "nope"]) == 2
    assert "--route" in capsys.readouterr().err


def test_check_config_says_when_no_client_certificate_was_issued(tmp_path: Path) -> None:
    from tunneld.checks import check_home

    path = home(
        tmp_path,
        f'[daemon]\nstate_directory = "{tmp_path / "state"}"\n'
        '[[route]]\nhostname = "cams.test"\nupstream = "http://a:1"\n'
        'client_certificate = "required"\n',
    )
    config = load_config(path)
    assert isinstance(config, HomeConfig)
    warnings = check_home(config).warnings
    assert any("[route 1] client_certificate" in w and "client issue" in w for w in warnings)
    (tmp_path / "state" / "clients").mkdir(parents=True)
    (tmp_path / "state" / "clients" / "ca.pem").write_text("x")
    assert not any("client_certificate" in w for w in check_home(config).warnings)
