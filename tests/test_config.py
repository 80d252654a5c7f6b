"""Configuration: defaults, overrides, and errors that name file, line and key."""

from __future__ import annotations

import re
import socket

import pytest

from gateway.cli import build_parser, config_from_args
from gateway.config import Config, ConfigError, DnsConfig, load, on_lan_link
from gateway.dns import DnsServer
from gateway.events import Counters
from gateway.store.db import Store
from tests.webui_seed import config
from webui.app import create_app


def write(tmp_path, text: str):
    path = tmp_path / "iotgw.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_defaults(tmp_path):
    cfg = load(write(tmp_path, ""))
    assert cfg.dns.rate_limit_per_minute == 1000 and "192.168.0.0/16" in cfg.dns.lan


def test_wrong_type_names_file_line_and_key(tmp_path):
    path = write(tmp_path, '[gateway]\nname = "x"\n\n[dns]\nupstreams = ["1.1.1.1"]\ntimeout_s = "fast"\n')
    with pytest.raises(ConfigError, match=r"iotgw\.toml:6: dns\.timeout_s: expected float"):
        load(path)


def test_unknown_key_and_section_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r":3: dns\.listne: unknown key"):
        load(write(tmp_path, "[dns]\nlan = []\nlistne = []\n"))
    with pytest.raises(ConfigError, match=r":1: unknown section \[dnss\]"):
        load(write(tmp_path, "[dnss]\n"))


def test_toml_syntax_error_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"iotgw\.toml:2: "):
        load(write(tmp_path, "[dns]\nlan = [\n"))
    with pytest.raises(ConfigError, match=r"iotgw\.toml:3: .*line 3"):
        load(write(tmp_path, "[dns]\nlan = []\nrate_limit_per_minute = = 5\n[store]\n"))


@pytest.mark.parametrize(("text", "message"), [
    ('[gateway]\nname = "x"\n[dns]\n"timeout_s" = 0\n', r":4: dns\.timeout_s: must be more than 0"),
    ("[gateway]\nname = 'x'\n[dns]\ntimeout_s.x = 1\n", r":4: dns\.timeout_s: expected float"),
    ('# before any [section]\n\n\ndns.timeout_s = 0\n[gateway]\n', r":4: dns\.timeout_s: must be more than 0"),
    ('[gateway]\nname = "x"\n[ "dns" ]\ncache_size = -1\n', r":4: dns\.cache_size: must be 0 or more"),
])
def test_quoted_and_dotted_keys_are_found_on_their_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=rf"iotgw\.toml{message}"):
        load(write(tmp_path, text))


def test_a_file_that_is_not_utf8_names_its_line_and_byte(tmp_path):
    path = tmp_path / "iotgw.toml"
    path.write_bytes(b'[gateway]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: not UTF-8 \(byte 18 is 0xff\): save the file as UTF-8$"):
        load(path)


def test_bad_prefix_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a network prefix"):
        load(write(tmp_path, '[dns]\nlan = ["10.0.0.0/33"]\n'))


def test_bad_addresses_name_file_and_line(tmp_path):
    head = '[gateway]\nname = "x"\n\n[dns]\ncache_size = 10\n'
    with pytest.raises(ConfigError, match=r"iotgw\.toml:6: dns\.lan: '10\.0\.0\.0/33' is not a network prefix"):
        load(write(tmp_path, head + 'lan = ["10.0.0.0/33"]\n'))
    with pytest.raises(ConfigError, match=r"iotgw\.toml:6: dns\.listen: 'a b' is not HOST\[:PORT\]"):
        load(write(tmp_path, head + 'listen = ["a b"]\n'))
    # A host name would be resolved through the system resolver, which may be this very server.
    with pytest.raises(ConfigError, match=r"iotgw\.toml:6: dns\.upstreams: 'dns\.google' is not an IP address"):
        load(write(tmp_path, head + 'upstreams = ["1.1.1.1", "dns.google"]\n'))


@pytest.mark.parametrize(("line", "message"), [
    ("cache_size = -1", r"dns\.cache_size: must be 0 or more"),
    ("rate_limit_per_minute = -5", r"dns\.rate_limit_per_minute: must be 0 or more"),
    ("timeout_s = 0", r"dns\.timeout_s: must be more than 0"),
    ("timeout_s = -1.5", r"dns\.timeout_s: must be more than 0"),
])
def test_out_of_range_dns_numbers_name_file_and_line(tmp_path, line, message):
    with pytest.raises(ConfigError, match=rf"iotgw\.toml:3: {message}"):
        load(write(tmp_path, f'[dns]\nupstreams = ["1.1.1.1"]\n{line}\n'))


@pytest.mark.parametrize(("section", "line", "message"), [
    # Each of these loaded and then deleted every logged query at the first prune, or failed only later.
    ("store", "querylog_days = 0", r"store\.querylog_days: must be 1 or more"),
    ("store", "querylog_days = -5", r"store\.querylog_days: must be 1 or more"),
    ("store", "querylog_max_rows = 0", r"store\.querylog_max_rows: must be 1000 or more"),
    ("store", "querylog_max_rows = -1", r"store\.querylog_max_rows: must be 1000 or more"),
    ("store", "flush_interval_s = 0", r"store\.flush_interval_s: must be more than 0"),
    ("store", "flush_interval_s = nan", r"store\.flush_interval_s: must be a finite number"),
    ("mqtt", "outbox_max = 1", r"mqtt\.outbox_max: must be 2 or more"),
    ("mqtt", "ha_devices_max = -1", r"mqtt\.ha_devices_max: must be 0 or more \(0 announces the gateway alone\)"),
    ("devices", "max = 0", r"devices\.max: must be 10 or more \(devices the gateway keeps\)"),
    ("devices", "max = 10000000", r"devices\.max: must be at most 1000000"),
    ("devices", 'max = "many"', r"devices\.max: expected int, got 'many'"),
    ("dns", "timeout_s = inf", r"dns\.timeout_s: must be a finite number, got inf"),
    ("dns", "cache_size = 99999999999999999", r"dns\.cache_size: must be at most"),
    ("web", 'listen = "0.0.0.0:80800"', r"web\.listen: '0\.0\.0\.0:80800': port out of range"),
    ("web", 'listen = "not a host:port:x"', r"web\.listen: 'not a host:port:x' is not HOST\[:PORT\]"),
    ("mqtt", 'url = "mqtt://127.0.0.1:99999"', r"mqtt\.url: MQTT URL 'mqtt://127\.0\.0\.1:99999': Port out of range"),
    ("mqtt", 'url = "mqtt://[::1"', r"mqtt\.url: MQTT URL 'mqtt://\[::1': Invalid IPv6 URL"),
    ("mqtt", 'url = "tcp://broker.lan:1883"', r"mqtt\.url: .*scheme must be mqtt:// or mqtts://"),
])
def test_out_of_range_numbers_and_bad_addresses_in_every_section_name_file_and_line(tmp_path, section, line, message):
    with pytest.raises(ConfigError, match=rf"iotgw\.toml:4: {message}"):
        load(write(tmp_path, f'[gateway]\nname = "x"\n[{section}]\n{line}\n'))


def test_numbers_at_the_edge_of_their_range_load(tmp_path):
    cfg = load(write(tmp_path, "[store]\nquerylog_days = 1\nquerylog_max_rows = 1000\nflush_interval_s = 0.1\n"
                               '[mqtt]\noutbox_max = 2\nurl = "mqtts://u:p@[::1]:8883"\n[web]\nlisten = "[::]:8080"\n'
                               "[devices]\nmax = 10\n"))
    assert (cfg.store.querylog_days, cfg.store.querylog_max_rows, cfg.mqtt.outbox_max) == (1, 1000, 2)
    assert cfg.devices.max == 10 and Config().devices.max == 1000


def test_a_bad_mqtt_url_never_shows_its_password(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, '[mqtt]\nurl = "mqtt://alerts:S3cretPw@127.0.0.1:18830x"\n'))
    assert "S3cretPw" not in str(err.value) and "mqtt://alerts:***@127.0.0.1:18830x" in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'iotgw.toml'}:2: mqtt.url: ")


@pytest.mark.parametrize(("prefix", "message"), [
    ("", "must not be empty"),
    ("home/+/ha", r"'home/\+/ha' is not an MQTT topic"),
    ("homeassistant/#", "is not an MQTT topic"),
    ("$SYS", "belong to the broker"),
])
def test_a_discovery_prefix_that_is_no_topic_names_file_and_line(tmp_path, prefix, message):
    path = write(tmp_path, f'[mqtt]\nurl = "mqtt://127.0.0.1"\ndiscovery_prefix = "{prefix}"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: mqtt\.discovery_prefix: .*{message}"):
        load(path)
    assert load(write(tmp_path, '[mqtt]\ndiscovery_prefix = "site/ha"\n')).mqtt.discovery_prefix == "site/ha"


def test_web_hosts_take_names_and_domains_and_a_url_names_file_and_line(tmp_path):
    cfg = load(write(tmp_path, '[web]\nhosts = ["iotgw.example.org", ".home.example.net"]\n'))
    assert cfg.web.hosts == ["iotgw.example.org", ".home.example.net"]
    with pytest.raises(ConfigError, match=r"iotgw\.toml:3: web\.hosts: 'http://iotgw\.example\.org' is not a host"):
        load(write(tmp_path, '[web]\nlisten = "0.0.0.0:8080"\nhosts = ["http://iotgw.example.org"]\n'))


def test_zero_switches_the_cache_and_the_rate_limit_off(tmp_path):
    cfg = load(write(tmp_path, "[dns]\ncache_size = 0\nrate_limit_per_minute = 0\n"))
    assert (cfg.dns.cache_size, cfg.dns.rate_limit_per_minute) == (0, 0)


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, '[dns]\nupstreams = ["1.1.1.1"]\n')
    args = build_parser().parse_args(["run", "--config", str(path), "--upstream", "9.9.9.9:5353",
                                      "--dns-listen", "[::1]:5300", "--db", "sqlite:///x.db", "--no-sniff"])
    cfg = config_from_args(args)
    assert cfg.dns.upstreams == ["9.9.9.9:5353"] and cfg.dns.listen == ["[::1]:5300"]
    assert cfg.db_url == "sqlite:///x.db" and cfg.capture.sniff is False


def test_an_upstream_flag_with_a_host_name_is_refused(tmp_path):
    args = build_parser().parse_args(["run", "--config", str(write(tmp_path, "")), "--upstream", "dns.google"])
    with pytest.raises(ConfigError, match=r"--upstream: 'dns\.google' is not an IP address"):
        config_from_args(args)


def test_a_lan_flag_that_is_not_a_prefix_is_refused_naming_the_flag(tmp_path):
    args = build_parser().parse_args(["run", "--config", str(write(tmp_path, "")), "--lan", "10.0.0.0/33"])
    with pytest.raises(ConfigError, match=r"--lan: '10\.0\.0\.0/33' is not a network prefix"):
        config_from_args(args)


@pytest.mark.parametrize(("flag", "value", "said"), [
    ("--db", "/var/lib/iotgw/iotgw.sqlite", "is not a database URL"),  # a path, not a URL
    ("--db", "postgres://u:secret@h/iotgw", "is not a database URL"),  # SQLAlchemy knows only postgresql://
    ("--mqtt", "http://broker:1883", "scheme must be mqtt:// or mqtts://"),
])
def test_a_malformed_db_or_mqtt_flag_is_refused_naming_the_flag(tmp_path, flag, value, said):
    args = build_parser().parse_args(["run", "--config", str(write(tmp_path, "")), flag, value])
    with pytest.raises(ConfigError, match=rf"^{flag}: .*{re.escape(said)}") as caught:
        config_from_args(args)
    assert "secret" not in str(caught.value)


def test_a_store_url_that_is_no_database_url_names_file_line_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"iotgw\.toml:3: store\.url: 'sqlite:/x' is not a database URL"):
        load(write(tmp_path, '[store]\nquerylog_days = 9\nurl = "sqlite:/x"\n'))


LO = socket.if_nametoindex("lo")
GONE = 2**31 - 1  # an interface index no interface has (a link-local peer's interface removed since it came in)


@pytest.mark.parametrize(("interface", "links", "expected"), [
    ("lo", ["lo"], True),  # the zone of a peer's text, an interface configured by name
    ("lo", [str(LO)], True),  # ... or by its index ([fe80::1%1]:53)
    (LO, ["lo"], True),  # a socket peer's scope id
    (LO, [str(LO)], True),
    ("lo", ["eth9"], False),  # another link: the WAN port's fe80::2 is not the LAN's
    (LO, ["eth9"], False),
    (GONE, ["lo"], False),  # an unknown index: no name to match
    (str(GONE), ["lo"], False),
    ("eth9", ["eth9x", "1"], False),  # an unknown name: no index to match
    ("", ["lo"], False),  # no zone, no scope id: no known link
    (0, ["lo"], False),
    ("lo", [], False),  # no LAN interface known: no link-local peer is trusted
    (GONE, [str(GONE)], True),  # configured by index: it matches though the interface has no name any more
    (str(GONE), [str(GONE)], True),
])
def test_a_link_local_peer_is_on_a_lan_link_by_its_interfaces_name_or_index(interface, links, expected):
    assert on_lan_link(interface, links) is expected


def test_the_dns_server_and_the_web_ui_trust_a_link_local_peer_alike(tmp_path):
    """Both ask config.on_lan_link. Each had its own copy of the rule, and they parted on an interface configured
    by index that is gone by the time its peer is checked: the web UI trusted fe80::7 from it, the DNS server
    (which looked the index's name up first, and gave up) refused it."""
    cfg = config(tmp_path)
    cfg.dns.listen = ["[::]:53", f"[fe80::1%{GONE}]:53"]
    dns = DnsServer(DnsConfig(listen=cfg.dns.listen, upstreams=["127.0.0.1"]), Counters())
    store = Store(cfg.db_url)
    try:
        web = create_app(store, cfg).test_client()
        for scope, trusted in ((GONE, True), (LO, False)):
            web.environ_base["REMOTE_ADDR"] = f"fe80::7%{scope}"  # as webui.server's fix_addr spells a peer
            assert (web.get("/login").status_code != 403) is trusted, scope  # 403: not from the LAN
            assert dns._client(("fe80::7", 5353, 0, scope)).allowed is trusted, scope
    finally:
        store.close()
