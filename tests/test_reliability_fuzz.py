"""Hostile packets: a short run of the fuzz benchmark against the real server, and property tests saying the
wire parsers and the capture parser raise nothing but their documented error on any input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.capture.frames import MalformedPacket, parse_frame
from gateway.dns import wire
from gateway.dns.cache import AnswerCache
from tests.dns_helpers import needs_dnsmasq

ROOT = Path(__file__).resolve().parents[1]
PACKETS = 20_000


@needs_dnsmasq
def test_short_fuzz_run_crashes_nothing_and_counts_every_bad_packet() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_dns.py"), "--packets", str(PACKETS)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
    result = json.loads(out.stdout)
    assert result["packets_sent"] == PACKETS and result["tcp_sent"] > 0
    assert result["crashes"] == 0, result["capture"]["crash_samples"]
    assert not result["server_died"]
    # Answers kept flowing: every probe interleaved with the fuzz was answered.
    assert result["probes_answered"] == result["probes_sent"] > PACKETS // 250
    classes = result["by_class"]
    assert classes["broken"]["malformed_counted"] == classes["broken"]["sent"] > 0
    assert classes["valid"]["malformed_counted"] == 0 and classes["valid"]["sent"] > 0
    assert 0 < classes["fuzzed"]["malformed_counted"] < classes["fuzzed"]["sent"]
    # Every packet the server received was answered or counted (malformed, NOTIMP); none vanished.
    assert result["unaccounted"] == 0
    assert result["tcp"]["timeouts"] == 0
    assert result["capture"]["frames"] == PACKETS and result["capture"]["malformed"] > 0
    assert result["fds_end"] <= result["fds_start"] + 2  # no descriptor leak (a closing TCP socket may linger)



def _cmdline(proc) -> list[str]:  # noqa: ANN001 - a psutil.Process
    """A child's command line; none for one that has already exited (a zombie raises, as seen under load)."""
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@needs_dnsmasq
def test_fuzz_run_reports_a_server_that_died_instead_of_crashing() -> None:
    """``crashes`` counts the server dying: a run whose server is killed mid-run still prints its figures."""
    import psutil

    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "fuzz_dns.py"), "--packets", "50000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        bench = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        # The fuzz client's socket (127.0.0.2) is opened once the server has started and given its statistics.
        while not any(c.laddr and c.laddr.ip == "127.0.0.2" for c in bench.net_connections("udp4")):
            assert proc.poll() is None and time.monotonic() < deadline, "the fuzz run did not start"
            time.sleep(0.1)
        (server,) = [c for c in bench.children() if "--child" in _cmdline(c)]
        server.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["server_died"] and result["crashes"] >= 1, result
    assert result["packets_sent"] < 50_000

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

header = st.builds(lambda qid, flags, counts: struct.pack("!HH4H", qid, flags, *counts),
                   st.integers(0, 65535), st.integers(0, 0x7FFF), st.tuples(*[st.sampled_from([0, 1, 2, 65535])] * 4))
labelled = st.lists(st.one_of(st.integers(0, 255).map(lambda n: bytes([n])), st.binary(max_size=12)), max_size=20).map(
    b"".join)
message = st.one_of(st.binary(max_size=300), st.builds(bytes.__add__, header, labelled))


@FAST
@given(message)
def test_query_parsers_raise_only_malformed(data: bytes) -> None:
    for parse in (wire.question_end, wire.parse_question, wire.full_parse):
        try:
            parse(data)
        except wire.Malformed:
            pass


@FAST
@given(message, st.integers(0, 64))
def test_answer_parsing_and_caching_never_raise(data: bytes, question_len: int) -> None:
    found = wire.ttl_positions(data, question_len)
    assert found is None or len(found[0]) == len(found[1])
    cache = AnswerCache(4)
    if len(data) >= 4:
        cache.put(b"key", data, question_len, 0.0)
        cached = cache.get(b"key", 1.5)
        assert cached is None or len(cached) == len(data)


def udp_frame(payload: bytes, sport: int, dport: int, ethertype: bytes, ihl: int) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(udp), 0, 0, 64, 17, 0, b"\xc0\xa8\x01\x14",
                     b"\xc0\xa8\x01\x01")
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02" + ethertype + ip + udp


frames = st.one_of(
    st.binary(max_size=200),
    st.builds(udp_frame, message, st.sampled_from([53, 5353, 68, 40000]), st.sampled_from([53, 5353, 67, 9]),
              st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x08\x06"]), st.integers(0, 15)),
)


@FAST
@given(frames, st.booleans())
def test_parse_frame_raises_only_malformed_packet(frame: bytes, others: bool) -> None:
    try:
        events = parse_frame(frame, 0.0, others=others)
    except MalformedPacket:
        return
    assert isinstance(events, list)


@pytest.mark.parametrize("name", [b"\x01.\x03com\x00", b"\x02..\x00", b"\x03a.b\x00", b"\x01\x00\x00", b"\x00"])
def test_odd_but_legal_question_names_parse_as_text(name: bytes) -> None:
    """Dots and NULs inside labels are legal on the wire; they come out escaped, never as a crash."""
    q = wire.parse_question(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01")
    assert q.length == len(name) + 4
    payload = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"
    events = parse_frame(udp_frame(payload, 40000, 53, b"\x08\x00", 5), 0.0)
    assert len(events) == 1
