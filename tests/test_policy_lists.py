"""Block list formats, malformed lines, and the hashed matcher."""

from __future__ import annotations

import pytest

from policy import lists
from policy.matcher import DomainIndex, hash_names, suffixes


def _index(path):
    parsed = lists.load(path)
    return parsed, DomainIndex([parsed.block, parsed.allow])


def test_hosts_file(tmp_path):
    f = tmp_path / "hosts"
    f.write_text(
        "# Steven Black style\n127.0.0.1 localhost\n0.0.0.0 ads.example.com tracker.example.net # two\n"
        ":: v6.ads.example\n"
    )
    parsed, index = _index(f)
    assert parsed.error_count == 0
    assert len(parsed.block) == 3
    assert index.mask(suffixes("x.ads.example.com")) == 0b01
    assert "v6.ads.example" in index and "tracker.example.net" in index
    assert "localhost" not in index and "example.com" not in index


def test_plain_domain_list(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("Ads.Example.COM.\n\n# comment\nmüller-werbung.de\n")
    parsed, index = _index(f)
    assert parsed.error_count == 0
    assert "deep.sub.ads.example.com" in index
    assert "xn--mller-werbung-wob.de" in index  # IDNA, as the name arrives in DNS


def test_adblock_syntax_with_exceptions(tmp_path):
    f = tmp_path / "adguard.txt"
    f.write_text(
        "[Adblock Plus 2.0]\n! Title: test\n||ads.example.com^\n||track.example.org^$important\n"
        "@@||ok.ads.example.com^\nexample.com##.banner\n"
    )
    parsed, index = _index(f)
    assert parsed.error_count == 0
    assert len(parsed.block) == 2 and len(parsed.allow) == 1
    assert index.mask(suffixes("a.ok.ads.example.com")) == 0b11  # in the block slot and the exception slot
    assert index.mask(suffixes("x.ads.example.com")) == 0b01


def test_malformed_list_reports_file_and_line_and_loads_good_lines(tmp_path):
    f = tmp_path / "broken.txt"
    f.write_text(
        "good-one.example\nthis is not a rule\n||bad..name^\n||x.example^$third-party\n"
        "*.wild.example\n0.0.0.0 good-two.example\n<script>alert(1)</script>\n"
    )
    parsed, index = _index(f)
    assert "good-one.example" in index and "good-two.example" in index
    assert [(e.line, e.reason) for e in parsed.errors] == [
        (2, "neither a hosts line, a domain nor an adblock rule"),
        (3, "not a domain name"),
        (4, "unsupported modifier"),
        (5, "wildcards are not supported"),
        (7, "not a domain name"),
    ]
    assert parsed.error_count == 5
    assert str(parsed.errors[0]).startswith(f"{f}:2: ")
    assert "'<script>alert(1)</script>'" in str(parsed.errors[-1])  # shown as quoted text
    assert str(parsed.errors[2]) == f"{f}:4: unsupported modifier: '||x.example^$third-party'"


def test_a_list_loaded_without_quoting_names_line_and_reason_but_not_the_text(tmp_path):
    f = tmp_path / "fetched.txt"
    f.write_text("ok.example\nrouter password hunter2\n||x.example^$secret-modifier\n")
    parsed = lists.load(f, quote=False)
    assert [str(e) for e in parsed.errors] == [
        f"{f}:2: neither a hosts line, a domain nor an adblock rule", f"{f}:3: unsupported modifier"]


def test_a_list_saved_with_a_utf8_bom_keeps_its_first_entry(tmp_path):
    hosts, adblock = tmp_path / "hosts", tmp_path / "adblock"
    hosts.write_bytes("0.0.0.0 first.example\n0.0.0.0 second.example\n".encode("utf-8-sig"))  # as Notepad saves
    adblock.write_bytes("||first.example.net^\n||second.example.net^\n".encode("utf-8-sig"))
    for path, first in ((hosts, "first.example"), (adblock, "first.example.net")):
        parsed, index = _index(path)
        assert parsed.error_count == 0
        assert first in index and len(parsed.block) == 2


def test_fetch_refuses_non_http(tmp_path):
    with pytest.raises(ValueError, match="only http and https"):
        lists.fetch("file:///etc/passwd", tmp_path / "x")


def test_matcher_slots_and_misses():
    a = hash_names(f"host{i}.example{i % 7}.com" for i in range(5000))
    b = hash_names(["example3.com", "only-b.net"])
    index = DomainIndex([a, b])
    assert len(index) == 5002
    assert index.mask(suffixes("host3.example3.com")) == 0b11
    assert index.mask(suffixes("zzz.example3.com")) == 0b10
    assert index.mask(suffixes("host5000.example3.org")) == 0
    assert all(f"w.host{i}.example{i % 7}.com" in index for i in range(0, 5000, 97))
    assert sum(f"host{i}.example{i % 7}.org" in index for i in range(5000)) == 0


def test_matcher_slot_limit():
    with pytest.raises(ValueError, match="at most 64"):
        DomainIndex([hash_names([])] * 65)
