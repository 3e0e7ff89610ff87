"""Config loading: the conf/ examples, defaults, role detection and clear errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from tunneld.config import (
    AccessSection,
    AcmeSection,
    CtSection,
    DaemonSection,
    FleetSection,
    HomeConfig,
    HomeRelaySection,
    LanSection,
    RelayAcmeSection,
    RelayConfig,
    RelaySection,
    TlsSection,
    UpstreamSection,
    WatchdogSection,
    format_duration,
    load_config,
    load_home_config,
    load_relay_config,
    masked,
    parse_duration,
    parse_listen,
    redact_url,
)
from tunneld.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"
SECRET = "s3cr3t-T0KEN-value.abc"

HOME_MIN = f"""
[relay]
url = "wss://relay.example.com/v1/tunnel"
token = "{SECRET}"
[tls]
hostnames = ["home.example.com"]
"""

RELAY_MIN = """
[relay]
hostname = "relay.example.com"
listen = ["0.0.0.0:443"]
certificate = "relay.crt"
private_key = "relay.key"
token_public_key = "token.pub"
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def defaults(cls: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# --- the conf/ examples ------------------------------------------------------


def test_relay_example_loads_with_documented_defaults() -> None:
    config = load_config(CONF / "relay.toml")
    assert isinstance(config, RelayConfig)
    relay = config.relay
    assert relay.hostname == "relay.example.com"
    assert relay.certificate == CONF / "relay.crt"  # relative to the file, need not exist
    assert relay.token_public_key == (CONF / "token.pub",)
    assert relay.token_private_key is None
    assert relay.listen == (("0.0.0.0", 443),)
    assert relay.control_socket == Path("/run/tunneld-relay/control.sock")
    assert (relay.client_hello_timeout, relay.ping_interval, relay.drain_timeout) == (10, 20, 30)
    assert relay.max_streams_per_session == 1000
    assert relay.stream_window == 262144
    # Windows grow to 16 MiB per stream, 64 MiB per session (tunneld/wire/flow.py).
    assert (relay.max_stream_window, relay.session_buffer) == (16 << 20, 64 << 20)
    assert relay.max_connections_per_ip == 256
    for key, value in defaults(RelaySection).items():
        assert getattr(relay, key) == value, key


def test_home_example_loads_with_documented_defaults() -> None:
    config = load_config(CONF / "tunneld.toml")
    assert isinstance(config, HomeConfig)
    assert config.relay.token == "REPLACE-WITH-TOKEN"
    assert config.tls.hostnames == ("home.example.com",)
    assert config.relay.backoff_max == 300
    assert config.relay.blocked_retry == 3600
    assert config.acme.renew_before == 30 * 86400
    assert config.watchdog.ban_duration == 86400
    assert config.watchdog.ban_statuses == (401, 403)
    assert (config.upstream.host, config.upstream.port, config.upstream.scheme) == (
        "127.0.0.1",
        8123,
        "http",
    )
    sections = {
        "relay": HomeRelaySection,
        "tls": TlsSection,
        "acme": AcmeSection,
        "upstream": UpstreamSection,
        "watchdog": WatchdogSection,
        "daemon": DaemonSection,
        "access": AccessSection,
        "ct": CtSection,
    }
    for name, cls in sections.items():
        for key, value in defaults(cls).items():
            if (name, key) != ("relay", "token"):
                assert getattr(getattr(config, name), key) == value, (name, key)


@pytest.mark.parametrize(
    ("file", "classes"),
    [
        ("relay.toml", {"relay": RelaySection, "fleet": FleetSection}),
        (
            "tunneld.toml",
            {
                "relay": HomeRelaySection,
                "tls": TlsSection,
                "acme": AcmeSection,
                "upstream": UpstreamSection,
                "watchdog": WatchdogSection,
                "daemon": DaemonSection,
                "lan": LanSection,
                "access": AccessSection,
                "ct": CtSection,
            },
        ),
    ],
)
def test_examples_carry_every_key_with_a_comment(file: str, classes: dict[str, type]) -> None:
    text = (CONF / file).read_text()
    raw = tomllib.loads(text)
    assert set(raw) == set(classes)
    if file == "relay.toml":  # [relay.acme] is a table inside [relay]
        acme_keys = {f.name for f in dataclasses.fields(RelayAcmeSection) if f.init}
        assert set(raw["relay"].pop("acme")) == acme_keys
    for table, cls in classes.items():
        keys = {f.name for f in dataclasses.fields(cls) if f.init}
        assert set(raw[table]) == keys, table
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


# --- role detection and loading ----------------------------------------------


def test_role_detection(tmp_path: Path) -> None:
    assert isinstance(load_config(write(tmp_path, HOME_MIN, "h.toml")), HomeConfig)
    assert isinstance(load_config(write(tmp_path, RELAY_MIN, "r.toml")), RelayConfig)
    # A relay config may leave listen at its default: hostname tells the role too.
    no_listen = RELAY_MIN.replace('listen = ["0.0.0.0:443"]\n', "")
    config = load_config(write(tmp_path, no_listen, "r2.toml"))
    assert isinstance(config, RelayConfig) and config.relay.listen == (("0.0.0.0", 443),)
    msg = error_of(write(tmp_path, "[relay]\n", "x.toml"))
    assert "x.toml" in msg and "[relay]" in msg and "url" in msg and "listen" in msg


def test_typed_loaders_refuse_the_other_role(tmp_path: Path) -> None:
    home, relay = write(tmp_path, HOME_MIN, "h.toml"), write(tmp_path, RELAY_MIN, "r.toml")
    assert isinstance(load_home_config(home), HomeConfig)
    assert isinstance(load_relay_config(relay), RelayConfig)
    with pytest.raises(ConfigError, match=r"r\.toml: .*relay config"):
        load_home_config(relay)
    with pytest.raises(ConfigError, match=r"h\.toml: .*home config"):
        load_relay_config(home)


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "token").write_text(f"  {SECRET}\n")
    write(
        sub,
        """
[relay]
url = "ws://127.0.0.1:9/v1/tunnel"
token_file = "token"
ca_file = "../ca/relay-ca.pem"
[tls]
hostnames = ["home.example.com"]
certificate = "certs/home.crt"
private_key = "/abs/home.key"
[daemon]
state_directory = "state"
""",
        "home.toml",
    )
    monkeypatch.chdir(tmp_path)  # the file's folder counts, not the working directory
    config = load_home_config("etc/home.toml")
    assert config.path == sub / "home.toml"
    assert config.relay.token == SECRET  # read from token_file, whitespace stripped
    assert config.relay.token_file == sub / "token"
    assert config.relay.ca_file == sub / "../ca/relay-ca.pem"
    assert config.tls.certificate == sub / "certs/home.crt"
    assert config.tls.private_key == Path("/abs/home.key")
    assert config.daemon.state_directory == sub / "state"


def test_relay_values_are_normalized(tmp_path: Path) -> None:
    text = RELAY_MIN.replace("relay.example.com", "Relay.Example.COM.").replace(
        'listen = ["0.0.0.0:443"]',
        'listen = ["0.0.0.0:443", "[::]:443"]\nhttp_listen = "[::1]:8080"\n'
        'token_private_key = ""\nblocked_versions = ["<0.3", ">=0.4,<0.4.2"]\n'
        'revoked_tokens = ["abc"]\nlog_level = "DEBUG"\nping_interval = 5',
    )
    text = text.replace('token_public_key = "token.pub"', 'token_public_key = ["a.pub", "b.pub"]')
    relay = load_relay_config(write(tmp_path, text)).relay
    assert relay.hostname == "relay.example.com"
    assert relay.listen == (("0.0.0.0", 443), ("::", 443))
    assert relay.http_listen == (("::1", 8080),)
    assert relay.token_public_key == (tmp_path / "a.pub", tmp_path / "b.pub")
    assert relay.blocked_versions == ("<0.3", ">=0.4,<0.4.2")
    assert relay.revoked_tokens == ("abc",)
    assert relay.log_level == "debug"
    assert relay.ping_interval == 5.0


def test_home_values_are_normalized(tmp_path: Path) -> None:
    text = HOME_MIN.replace(
        '["home.example.com"]', '["Home.Example.com.", "home.example.com", "other.example.net"]'
    )
    text += """
[upstream]
url = "https://[::1]"
[watchdog]
never_ban = ["192.168.1.0/24", "10.0.0.7", "fd00::/8", "::1"]
ban_duration = "0"
[daemon]
metrics_listen = "127.0.0.1:9464"
"""
    config = load_home_config(write(tmp_path, text))
    assert config.tls.hostnames == ("home.example.com", "other.example.net")
    assert (config.upstream.scheme, config.upstream.host, config.upstream.port) == (
        "https",
        "::1",
        443,
    )
    assert config.watchdog.never_ban == (
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("10.0.0.7/32"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.watchdog.ban_duration == 0
    assert config.daemon.metrics_listen == ("127.0.0.1", 9464)
    assert config.relay.ping_interval is None


# --- errors -------------------------------------------------------------------


def test_missing_unreadable_and_bad_toml(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such file"
    assert "is a directory" in error_of(tmp_path)
    bad = write(tmp_path, 'x = 1\n[relay\nurl = "a"\n', "bad.toml")
    msg = error_of(bad)
    assert msg.startswith(f"{bad}: invalid TOML") and "line 2" in msg
    if os.geteuid() != 0:  # root reads anything
        locked = write(tmp_path, HOME_MIN, "locked.toml")
        locked.chmod(0)
        assert error_of(locked) == f"{locked}: permission denied"


@pytest.mark.parametrize(
    ("base", "table", "line", "key", "expected"),
    [
        # unknown key: named, with the known ones listed and a suggestion
        ("home", "relay", "tokn_file = 'x'", "tokn_file", 'did you mean "token_file"'),
        ("relay", "relay", "listn = []", "listn", "known: hostname, certificate"),
        # wrong types
        (
            "relay",
            "relay",
            "listen = 42",
            "listen",
            'expected a list of "host:port" strings, got 42',
        ),
        ("relay", "relay", "listen = []", "listen", "at least one"),
        ("relay", "relay", 'listen = ["::1:443"]', "listen", '"host:port"'),
        ("relay", "relay", 'listen = ["1.2.3.4:70000"]', "listen", "0-65535"),
        ("relay", "relay", "max_streams_per_session = '5'", "max_streams_per_session", "integer"),
        ("relay", "relay", "stream_window = 1024", "stream_window", "from 16384 to 16777216"),
        (
            "relay",
            "relay",
            "max_stream_window = 20000",
            "max_stream_window",
            "at least stream_window (262144), got 20000",
        ),
        (
            "relay",
            "relay",
            "session_buffer = 1048576",
            "session_buffer",
            "at least max_stream_window (16777216), got 1048576",
        ),
        ("home", "daemon", "max_stream_window = 1e6", "max_stream_window", "integer"),
        (
            "home",
            "daemon",
            "stream_window = 1048576\nmax_stream_window = 524288",
            "max_stream_window",
            "at least stream_window (1048576)",
        ),
        ("relay", "relay", "max_connections_per_ip = -1", "max_connections_per_ip", "at least 0"),
        ("relay", "relay", "certificate = ''", "certificate", "file path"),
        ("relay", "relay", "token_public_key = []", "token_public_key", "at least one"),
        ("relay", "relay", "blocked_versions = ['version 3']", "blocked_versions", "PEP 440"),
        ("relay", "relay", "blocked_versions = ['']", "blocked_versions", "PEP 440"),
        ("relay", "relay", "log_level = 'loud'", "log_level", '"debug", "info"'),
        ("relay", "relay", "hostname = 'bad_name.example.com'", "hostname", "DNS name"),
        ("relay", "relay", "ping_interval = '10 minutes'", "ping_interval", "duration"),
        ("relay", "relay", "drain_timeout = '0'", "drain_timeout", "longer than 0"),
        ("relay", "relay", "client_hello_timeout = true", "client_hello_timeout", "duration"),
        # bad URLs
        ("home", "relay", "url = 'https://relay.example.com'", "url", "wss://"),
        ("home", "relay", "url = 'wss:///v1/tunnel'", "url", "with a host"),
        ("home", "upstream", "url = 'ftp://127.0.0.1'", "url", "http://"),
        ("home", "upstream", "url = 'http://127.0.0.1:8123/api'", "url", "host and port only"),
        ("home", "acme", "directory = 'acme.example.com'", "directory", "https://"),
        # bad CIDRs
        ("home", "watchdog", "never_ban = ['10.0.0.300']", "never_ban", "CIDR"),
        ("home", "watchdog", "trusted_proxies = ['10.0.0.1/8']", "trusted_proxies", "10.0.0.0/8"),
        ("home", "watchdog", "trusted_proxies = '10.0.0.0/8'", "trusted_proxies", "list"),
        ("home", "access", "allow = ['10.0.0.300']", "allow", "CIDR"),
        ("home", "access", "deny = ['10.0.0.1/8']", "deny", 'did you mean "10.0.0.0/8"?'),
        ("home", "access", "deny = '10.0.0.0/8'", "deny", "list"),
        ("home", "access", "hostnames = 5", "hostnames", "table"),
        ("home", "watchdog", "home_assistant_bans = 5", "home_assistant_bans", "file path"),
        ("home", "ct", "url = 'ftp://crt.sh/'", "url", "http:// or https://"),
        ("home", "ct", "interval = '0'", "interval", "longer than 0"),
        ("home", "ct", "enabled = 'yes'", "enabled", "true or false"),
        # others
        ("home", "watchdog", "ban_statuses = [401, 700]", "ban_statuses", "100 to 599"),
        ("home", "watchdog", "ban_threshold = 0", "ban_threshold", "at least 1"),
        ("home", "watchdog", "preset = 'nginx'", "preset", '"home-assistant", "generic"'),
        ("home", "daemon", "log_level = 'verbose'", "log_level", '"warning", "error"'),
        ("home", "daemon", "metrics_listen = 9464", "metrics_listen", "host:port"),
        ("home", "acme", "enabled = 'yes'", "enabled", "true or false"),
        ("home", "acme", "key_type = 'rsa4096'", "key_type", '"ec256", "rsa2048"'),
        ("home", "acme", "renew_before = '-1d'", "renew_before", "duration"),
        ("home", "tls", "hostnames = []", "hostnames", "at least one"),
        ("home", "tls", "hostnames = ['1.2.3.4']", "hostnames", "IP address"),
        ("home", "tls", "certificate = 'home.crt'", "private_key", "both"),
        ("home", "relay", "backoff_max = '500ms'", "backoff_max", "backoff_initial"),
    ],
)
def test_bad_values_name_file_table_and_key(
    tmp_path: Path, base: str, table: str, line: str, key: str, expected: str
) -> None:
    text = HOME_MIN if base == "home" else RELAY_MIN
    header = f"[{table}]"
    if header in text:
        # Replace the key if the base sets it, else add the line to the table.
        lines = [ln for ln in text.splitlines() if not ln.startswith(line.split(" =")[0] + " =")]
        text = "\n".join(lines).replace(header, f"{header}\n{line}", 1)
    else:
        text += f"\n{header}\n{line}\n"
    path = write(tmp_path, text)
    msg = error_of(path)
    assert msg.startswith(f"{path}: [{table}] {key}: "), msg
    assert expected in msg, msg
    assert SECRET not in msg


def test_access_rules_per_hostname(tmp_path: Path) -> None:
    host = load_home_config(write(tmp_path, HOME_MIN)).tls.hostnames[0]
    text = HOME_MIN + (
        '\n[access]\nallow = ["192.0.2.0/24"]\ndeny = ["192.0.2.7", "2001:db8::/32"]\n'
        f'[access.hostnames."{host.upper()}"]\nallow = ["198.51.100.0/24"]\n'
    )
    twice = text + f'[access.hostnames."{host}"]\ndeny = ["203.0.113.9"]\n'
    assert "has a table already" in error_of(write(tmp_path, twice))
    config = load_home_config(write(tmp_path, text))
    assert [str(n) for n in config.access.deny] == ["192.0.2.7/32", "2001:db8::/32"]
    ((name, rule),) = config.access.hostnames
    assert name == host and [str(n) for n in rule.allow or ()] == ["198.51.100.0/24"]
    assert rule.deny == ()
    again = load_home_config(write(tmp_path, tomli_w.dumps(masked(config)), "again.toml"))
    assert again.access == config.access
    bad = HOME_MIN + '\n[access.hostnames."other.example.org"]\ndeny = []\n'
    msg = error_of(write(tmp_path, bad))
    assert msg.startswith(f'{tmp_path}/cfg.toml: [access.hostnames."other.example.org"]: ')
    assert "not one of [tls] hostnames" in msg
    bad = HOME_MIN + f'\n[access.hostnames."{host}"]\ndeny = ["300.1.1.1"]\n'
    assert f'[access.hostnames."{host}"] deny: expected an IP address or CIDR' in error_of(
        write(tmp_path, bad)
    )


def test_the_example_error_message_format(tmp_path: Path) -> None:
    path = write(tmp_path, RELAY_MIN.replace('["0.0.0.0:443"]', "42"), "relay.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'{path}: [relay] listen: expected a list of "host:port" strings, got 42'
    )


def test_missing_required_keys(tmp_path: Path) -> None:
    no_cert = RELAY_MIN.replace('certificate = "relay.crt"\n', "")
    assert error_of(write(tmp_path, no_cert)).endswith(
        "[relay] certificate: missing; this key is required"
    )
    no_tls = HOME_MIN.split("[tls]")[0]
    assert "[tls] hostnames: missing" in error_of(write(tmp_path, no_tls))


def test_unknown_tables_and_stray_keys(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, HOME_MIN + "\n[watchdgo]\n"))
    assert "[watchdgo]" in msg and "did you mean [watchdog]?" in msg and "[daemon]" in msg
    msg = error_of(write(tmp_path, RELAY_MIN + "\n[tls]\nhostnames = []\n"))
    assert "[tls]: unknown table" in msg and "known: [relay]" in msg
    msg = error_of(write(tmp_path, "log_level = 'info'\n" + RELAY_MIN))
    assert "log_level: key outside any table" in msg


# --- the token never leaks ------------------------------------------------------


def test_token_not_in_repr_or_masked(tmp_path: Path) -> None:
    config = load_home_config(write(tmp_path, HOME_MIN))
    assert config.relay.token == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config.relay)
    plain = masked(config)
    assert plain["relay"]["token"] == "***"
    assert SECRET not in tomli_w.dumps(plain)


@pytest.mark.parametrize(
    ("relay_lines", "token_file_text", "key", "expected"),
    [
        ([f'token = "{SECRET}"', 'token_file = "tok"'], SECRET, "token", "not both"),
        ([], None, "token", "missing; set token or token_file"),
        (['token = ""'], None, "token", "missing"),
        ([f'token = "{SECRET} extra"'], None, "token", "value not shown"),
        ([f'token = "{SECRET}\\u00e9"'], None, "token", "value not shown"),
        (["token = 12345"], None, "token", "integer (value not shown)"),
        (['token_file = "tok"'], None, "token_file", "no such file"),
        (['token_file = "tok"'], "   \n", "token_file", "empty"),
        (['token_file = "tok"'], f"{SECRET}\n{SECRET}\n", "token_file", "value not shown"),
    ],
)
def test_token_errors_never_show_the_token(
    tmp_path: Path,
    relay_lines: list[str],
    token_file_text: str | None,
    key: str,
    expected: str,
) -> None:
    if token_file_text is not None:
        (tmp_path / "tok").write_text(token_file_text)
    text = "\n".join(
        ["[relay]", 'url = "wss://relay.example.com/v1/tunnel"', *relay_lines, "[tls]"]
    )
    path = write(tmp_path, text + '\nhostnames = ["home.example.com"]\n')
    msg = error_of(path)
    assert msg.startswith(f"{path}: [relay] {key}: "), msg
    assert expected in msg, msg
    assert SECRET not in msg


def test_token_file_masked_shows_the_file_not_the_token(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(SECRET)
    text = HOME_MIN.replace(f'token = "{SECRET}"', 'token_file = "tok"')
    plain = masked(load_home_config(write(tmp_path, text)))
    assert "token" not in plain["relay"]
    assert plain["relay"]["token_file"] == str(tmp_path / "tok")


@pytest.mark.parametrize("file", ["relay.toml", "tunneld.toml"])
def test_masked_round_trips_through_toml(tmp_path: Path, file: str) -> None:
    config = load_config(CONF / file)
    again = load_config(write(tmp_path, tomli_w.dumps(masked(config)), file))
    if isinstance(config, HomeConfig):
        assert isinstance(again, HomeConfig) and again.relay.token == "***"
        again = dataclasses.replace(
            again, relay=dataclasses.replace(again.relay, token=config.relay.token)
        )
    assert dataclasses.replace(again, path=config.path) == config


# --- durations and listen addresses ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("24h", 86400),
        ("30d", 2592000),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("1h30m", 5400),
        ("0", 0),
        ("45", 45),
        (" 2m ", 120),
        (7, 7),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10x", "-5s", "1 h", "ten", "1e3s", "inf", "5m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("value", [True, -1, float("nan"), float("inf")])
def test_parse_duration_rejects_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30, "30s"), (600, "10m"), (86400, "1d"), (3600, "1h"), (90, "90s"), (0.25, "250ms"),
     (1.5, "1.5s"), (0, "0s")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(
    st.one_of(
        st.integers(min_value=0, max_value=10**9),
        st.integers(min_value=0, max_value=10**6).map(lambda ms: ms / 1000),
        st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
    )
)
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:443", ("::", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("localhost:8080", ("localhost", 8080)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["443", "0.0.0.0", ":443", "::1:443", "[::1]", "[nothost]:80", "a:65536", "a:-1"]
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


# --- [relay] proxy_protocol and [fleet] (issue 18) -----------------------------


def test_fleet_is_off_by_default_and_the_example_says_so() -> None:
    config = load_config(CONF / "relay.toml")
    assert isinstance(config, RelayConfig)
    assert config.fleet == FleetSection() and not config.fleet.enabled
    assert config.relay.proxy_protocol == ()


def test_fleet_and_proxy_protocol_load(tmp_path: Path) -> None:
    text = (
        RELAY_MIN
        + 'proxy_protocol = ["10.0.0.0/8", "fd00::/8"]\n'
        + (
            '[fleet]\nredis_url = "redis://10.0.0.5:6379/0"\nnode_id = "relay-a"\n'
            'advertise = "10.0.0.11:8443"\nlease_ttl = "5s"\n'
        )
    )
    config = load_config(write(tmp_path, text))
    assert isinstance(config, RelayConfig)
    assert [str(n) for n in config.relay.proxy_protocol] == ["10.0.0.0/8", "fd00::/8"]
    assert config.fleet == FleetSection("redis://10.0.0.5:6379/0", "relay-a", "10.0.0.11:8443", 5)
    assert config.fleet.enabled


@pytest.mark.parametrize(
    ("table", "line", "message"),
    [
        ("relay", 'proxy_protocol = ["10.0.0.1/8"]', "[relay] proxy_protocol: "),
        ("relay", 'proxy_protocol = "10.0.0.0/8"', "[relay] proxy_protocol: expected a list"),
        ("fleet", 'redis_url = "http://x:6379"', '[fleet] redis_url: expected "redis://'),
        ("fleet", 'redis_url = "redis://:6379"', "[fleet] redis_url: expected a host"),
        ("fleet", 'redis_url = "redis://h:99999"', "[fleet] redis_url: the URL's port"),
        ("fleet", 'node_id = "a b"', "[fleet] node_id: expected up to 63 letters"),
        ("fleet", 'advertise = "nowhere"', "[fleet] advertise: "),
        ("fleet", 'lease_ttl = "500ms"', "[fleet] lease_ttl: must be at least 1s"),
        ("fleet", "leas_ttl = 3", '[fleet] leas_ttl: unknown key (did you mean "lease_ttl"?)'),
        ("fleet", 'secret_file = "fleet.key"', "[fleet] forward_listen: needed for forwarding"),
        ("fleet", 'forward_listen = "10.0.0.1:8443"', "[fleet] secret_file: needed for"),
    ],
)
def test_fleet_and_proxy_protocol_errors_name_the_key(
    tmp_path: Path, table: str, line: str, message: str
) -> None:
    text = RELAY_MIN + line + "\n" if table == "relay" else RELAY_MIN + f"[fleet]\n{line}\n"
    assert message in error_of(write(tmp_path, text))


def test_the_redis_password_never_shows(tmp_path: Path) -> None:
    url = "redis://tunneld:s3cret-pass@10.0.0.5:6379/0"
    config = load_config(write(tmp_path, RELAY_MIN + f'[fleet]\nredis_url = "{url}"\n'))
    assert "s3cret-pass" not in repr(config)
    shown = masked(config)["fleet"]["redis_url"]
    assert shown == "redis://***@10.0.0.5:6379/0"
    assert redact_url("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"
    assert redact_url("rediss://:pw@[fd00::5]:6380/1") == "rediss://***@[fd00::5]:6380/1"
