"""Policy decisions: precedence, lists, categories, schedules, strict profiles, anomalies, quarantine, MUD."""

from __future__ import annotations

import datetime as dt
import json
from zoneinfo import ZoneInfo

import pytest

from policy.engine import PolicyEngine
from policy.model import ListSpec, PolicySet, Profile, Rule, category_tag, normalise_scope
from policy.mud import MudError, load_mud, profile_from_mud
from policy.records import DeviceContext
from policy.schedule import Schedule, parse_clock

CAM = DeviceContext("aa:bb:cc:00:00:01", "acme_cam_v2", "camera", "approved")
CAM2 = DeviceContext("aa:bb:cc:00:00:02", "acme_cam_v2", "camera", "approved")
PLUG = DeviceContext("aa:bb:cc:00:00:03", "tplink_plug", "plug", "approved")
NOW = 1_700_000_000.0


def _ts(zone: str, *args: int) -> float:
    return dt.datetime(*args, tzinfo=ZoneInfo(zone)).timestamp()


def test_precedence_device_over_type_over_tag_over_global():
    ps = PolicySet()
    ps.policy("global").rules.append(Rule("block", "name", "shared.example"))
    ps.policy("category:camera").rules.append(Rule("allow", "name", "shared.example"))
    ps.policy("type:acme_cam_v2").rules.append(Rule("block", "name", "shared.example"))
    ps.policy("device:AA-BB-CC-00-00-01").rules.append(Rule("allow", "name", "shared.example"))
    engine = PolicyEngine.build(ps)
    mine = engine.decide(CAM, "www.shared.example.", NOW)
    assert (mine.action, mine.rule) == ("allowed", "device:aa:bb:cc:00:00:01 allow name=shared.example")
    other = engine.decide(CAM2, "shared.example", NOW)
    assert (other.action, other.rule) == ("blocked", "type:acme_cam_v2 block name=shared.example")
    untyped = DeviceContext("aa:bb:cc:00:00:09", None, "camera")
    assert engine.decide(untyped, "shared.example", NOW).rule == "tag:device_camera allow name=shared.example"
    assert engine.decide(PLUG, "shared.example", NOW).rule == "global block name=shared.example"
    assert engine.decide(PLUG, "notshared.example", NOW).action == "allowed"
    assert engine.decide(PLUG, "example", NOW).action == "allowed"  # a parent is not blocked by its child


def test_category_tags_follow_adguard_home():
    assert category_tag("camera") == "device_camera"
    assert category_tag("tv") == "device_tv"
    assert category_tag("speaker") == "device_audio"
    assert category_tag("plug") == "device_plug"
    assert normalise_scope("tag:device_tv") == normalise_scope("category:tv") == "tag:device_tv"
    with pytest.raises(ValueError):
        normalise_scope("device:not-a-mac")


def test_lists_categories_exceptions_and_answer_mode(tmp_path):
    (tmp_path / "ads.txt").write_text("||ads.example^\n@@||good.ads.example^\n")
    (tmp_path / "trackers.txt").write_text("0.0.0.0 track.example\n")
    ps = PolicySet(answer="nxdomain")
    ps.lists = {"ads": ListSpec("ads.txt"), "trackers": ListSpec("trackers.txt")}
    ps.categories = {"privacy": ["ads", "trackers"]}
    ps.policy("global").rules.append(Rule("block", "category", "privacy"))
    ps.policy("type:tplink_plug").rules.append(Rule("allow", "list", "trackers"))
    ps.policy("device:aa:bb:cc:00:00:02").answer = "refused"
    engine = PolicyEngine.build(ps, base_dir=tmp_path)
    v = engine.decide(CAM, "x.ads.example", NOW)
    assert (v.action, v.answer, v.rule) == ("blocked", "nxdomain", "global block category=privacy list=ads")
    assert (
        engine.decide(CAM, "good.ads.example", NOW).rule == "global block category=privacy list=ads exception"
    )
    assert engine.decide(CAM, "track.example", NOW).blocked
    assert engine.decide(CAM2, "track.example", NOW).answer == "refused"
    assert engine.decide(PLUG, "track.example", NOW).rule == "type:tplink_plug allow list=trackers"
    assert engine.decide(PLUG, "ads.example", NOW).blocked
    assert engine.list_sizes == {"ads": 2, "trackers": 1}


def test_rebuild_reuses_unchanged_lists_and_reloads_changed(tmp_path):
    f = tmp_path / "ads.txt"
    f.write_text("ads.example\n")
    ps = PolicySet(lists={"ads": ListSpec("ads.txt")})
    ps.policy("global").rules.append(Rule("block", "list", "ads"))
    first = PolicyEngine.build(ps, base_dir=tmp_path)
    ps.policy("global").rules.append(Rule("block", "name", "more.example"))
    second = PolicyEngine.build(ps, base_dir=tmp_path, previous=first)
    assert second._index is first._index
    assert second.decide(CAM, "more.example", NOW).blocked
    f.write_text("ads.example\nnew.example\n")
    third = PolicyEngine.build(ps, base_dir=tmp_path, previous=second)
    assert third._index is not second._index
    assert third.decide(CAM, "new.example", NOW).blocked


def test_missing_list_file_is_reported_not_fatal(tmp_path):
    ps = PolicySet(lists={"gone": ListSpec("gone.txt")})
    ps.policy("global").rules += [Rule("block", "list", "gone"), Rule("block", "name", "x.example")]
    engine = PolicyEngine.build(ps, base_dir=tmp_path)
    assert "cannot read list 'gone'" in engine.list_errors[0].reason
    assert engine.decide(CAM, "x.example", NOW).blocked


def test_schedule_boundaries_in_a_time_zone():
    # Bedtime in Berlin as two ranges that meet at midnight: Monday 21:00-24:00 and Tuesday 00:00-07:00.
    bedtime = Schedule(
        "Europe/Berlin",
        {"mon": (parse_clock("21:00"), parse_clock("24:00")), "tue": (0, parse_clock("07:00"))},
    )
    ps = PolicySet(schedules={"bedtime": bedtime})
    ps.policy("device:aa:bb:cc:00:00:01").rules.append(Rule("block", "all", schedule="bedtime"))
    engine = PolicyEngine.build(ps)
    tz = "Europe/Berlin"
    cases = [  # 2024-01-15 is a Monday
        (_ts(tz, 2024, 1, 15, 20, 59, 59), False),
        (_ts(tz, 2024, 1, 15, 21, 0, 0), True),  # start is inclusive
        (_ts(tz, 2024, 1, 15, 23, 59, 59), True),
        (_ts(tz, 2024, 1, 16, 0, 0, 0), True),
        (_ts(tz, 2024, 1, 16, 6, 59, 59), True),
        (_ts(tz, 2024, 1, 16, 7, 0, 0), False),  # end is exclusive
        (_ts(tz, 2024, 1, 16, 21, 30, 0), False),  # Tuesday evening has no range
        (_ts(tz, 2024, 1, 22, 21, 0, 0), True),  # next Monday
        (_ts("UTC", 2024, 1, 15, 20, 30, 0), True),  # 20:30 UTC is 21:30 in Berlin (UTC+1)
    ]
    got = [engine.decide(CAM, "anything.example", t).blocked for t, _ in cases]
    assert got == [want for _, want in cases]
    # In order and back again: the cached answer never outlives an edge.
    assert [engine.decide(CAM, "x.example", t).blocked for t, _ in sorted(cases)] == [
        want for _, want in sorted(cases)
    ]
    assert (
        engine.decide(CAM, "x.example", _ts(tz, 2024, 1, 15, 22, 0, 0)).rule
        == "device:aa:bb:cc:00:00:01 block all schedule=bedtime"
    )
    assert not engine.decide(CAM2, "x.example", _ts(tz, 2024, 1, 15, 22, 0, 0)).blocked


def test_schedule_wall_clock_across_dst():
    # 2024-03-31: Berlin skips 02:00-03:00. "From 03:00" still means 03:00 on the clock.
    s = Schedule("Europe/Berlin", {"sun": (parse_clock("03:00"), parse_clock("04:00"))})
    assert not s.active(_ts("Europe/Berlin", 2024, 3, 31, 1, 59, 59))
    assert s.active(_ts("Europe/Berlin", 2024, 3, 31, 3, 0, 0))
    assert s.active(_ts("UTC", 2024, 3, 31, 1, 0, 0))  # 01:00 UTC is 03:00 CEST
    assert not s.active(_ts("UTC", 2024, 3, 31, 2, 0, 0))


def _night(start: str, end: str) -> tuple[int, int]:
    return parse_clock(start), parse_clock(end)


def test_a_bedtime_range_ends_the_next_morning():
    """A schedule held one range a day and refused 22:00-07:00 ("split it into 22:00-24:00 and 00:00-07:00 of the
    next day"): a bedtime every night took two schedules and two rules. mon 22:00-07:00 is Monday 22:00 to
    Tuesday 07:00, and only that: not the Sunday night before it, not Tuesday evening."""
    ps = PolicySet(schedules={"bedtime": Schedule("Europe/Berlin", {"mon": _night("22:00", "07:00")})})
    ps.policy("device:aa:bb:cc:00:00:01").rules.append(Rule("block", "all", schedule="bedtime"))
    engine = PolicyEngine.build(ps)
    tz = "Europe/Berlin"
    cases = [  # 2024-01-15 is a Monday
        (_ts(tz, 2024, 1, 14, 23, 0, 0), False),  # Sunday night: sun has no range
        (_ts(tz, 2024, 1, 15, 6, 59, 0), False),
        (_ts(tz, 2024, 1, 15, 21, 59, 59), False),
        (_ts(tz, 2024, 1, 15, 22, 0, 0), True),
        (_ts(tz, 2024, 1, 15, 23, 0, 0), True),
        (_ts(tz, 2024, 1, 16, 0, 0, 0), True),
        (_ts(tz, 2024, 1, 16, 6, 59, 59), True),
        (_ts(tz, 2024, 1, 16, 7, 0, 0), False),  # the end is exclusive, on Tuesday
        (_ts(tz, 2024, 1, 16, 23, 0, 0), False),  # tue has no range of its own
        (_ts(tz, 2024, 1, 23, 6, 0, 0), True),  # a week on
        (_ts("UTC", 2024, 1, 16, 5, 30, 0), True),  # 06:30 in Berlin
    ]
    assert [engine.decide(CAM, "x.example", t).blocked for t, _ in cases] == [want for _, want in cases]
    assert [engine.decide(CAM, "x.example", t).blocked for t, _ in sorted(cases)] == [
        want for _, want in sorted(cases)
    ]


def test_sunday_nights_range_runs_into_monday():
    s = Schedule("UTC", {"sun": _night("22:00", "07:00")})  # weekday() numbers Monday 0: Sunday is the last
    assert s.active(_ts("UTC", 2024, 1, 14, 23, 0, 0))
    assert s.active(_ts("UTC", 2024, 1, 15, 6, 59, 59))
    assert not s.active(_ts("UTC", 2024, 1, 15, 7, 0, 0))
    assert not s.active(_ts("UTC", 2024, 1, 13, 23, 0, 0))  # Saturday night
    assert not s.active(_ts("UTC", 2024, 1, 14, 6, 0, 0))  # Sunday morning: Saturday's night has no range


def test_a_day_has_its_own_range_and_the_previous_nights_tail():
    # Tuesday: 00:00-07:00 from Monday night, then its own 21:00-06:00 from the evening into Wednesday.
    s = Schedule("UTC", {"mon": _night("22:00", "07:00"), "tue": _night("21:00", "06:00")})
    assert [s.active(_ts("UTC", 2024, 1, 16, h, m, 0)) for h, m in ((6, 59), (7, 0), (20, 59), (21, 0), (23, 59))] == [
        True, False, False, True, True]
    assert s.active(_ts("UTC", 2024, 1, 17, 5, 59, 0)) and not s.active(_ts("UTC", 2024, 1, 17, 6, 0, 0))
    # A morning range of the day itself and the night's tail: active in either, not in the gap between them.
    s = Schedule("UTC", {"mon": _night("22:00", "07:00"), "tue": _night("08:00", "09:00")})
    assert [s.active(_ts("UTC", 2024, 1, 16, h, m, 0)) for h, m in ((6, 59), (7, 30), (8, 30), (9, 0))] == [
        True, False, True, False]
    # Overlapping: the tail ends inside the day's own range, which goes on.
    s = Schedule("UTC", {"mon": _night("22:00", "07:00"), "tue": _night("06:00", "09:00")})
    assert [s.active(_ts("UTC", 2024, 1, 16, h, 0, 0)) for h in (5, 6, 7, 8, 9)] == [True, True, True, True, False]


@pytest.mark.parametrize("zone, night, cases", [
    # 2024-03-31, a Sunday: London's clocks go from 01:00 GMT to 02:00 BST. Bedtime is an hour shorter.
    ("Europe/London", (2024, 3, 30), [((30, 21, 59, 59), False), ((30, 22, 0, 0), True), ((31, 0, 59, 59), True),
                                       ((31, 1, 0, 0), True), ((31, 5, 59, 59), True), ((31, 6, 0, 0), False)]),
    # 2024-10-27: from 02:00 BST back to 01:00 GMT. 22:00 BST is 21:00 UTC, 07:00 GMT is 07:00 UTC: 10 hours.
    ("Europe/London", (2024, 10, 26), [((26, 20, 59, 59), False), ((26, 21, 0, 0), True), ((27, 0, 30, 0), True),
                                        ((27, 1, 30, 0), True), ((27, 6, 59, 59), True), ((27, 7, 0, 0), False)]),
    # 2024-03-10: New York from 02:00 EST to 03:00 EDT. 22:00 EST is 03:00 UTC, 07:00 EDT is 11:00 UTC.
    ("America/New_York", (2024, 3, 9), [((10, 2, 59, 59), False), ((10, 3, 0, 0), True), ((10, 7, 0, 0), True),
                                         ((10, 10, 59, 59), True), ((10, 11, 0, 0), False)]),
])
def test_a_bedtime_across_a_dst_change_keeps_the_clock_times(zone, night, cases):
    year, month, day = night
    weekday = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[dt.date(year, month, day).weekday()]
    s = Schedule(zone, {weekday: _night("22:00", "07:00")})
    times = [(_ts("UTC", year, month, *when), want) for when, want in cases]  # in UTC: no local time is ambiguous
    assert [s.active(t) for t, _ in times] == [want for _, want in times]  # in order: the cache is in play
    assert [Schedule(zone, s.days).active(t) for t, _ in times] == [want for _, want in times]


def test_the_cached_answer_never_outlives_an_overnight_ranges_edges():
    # Edges off the quarter hour, which alone would have caught them: 22:05 on Monday, 07:05 on Tuesday.
    s = Schedule("UTC", {"mon": _night("22:05", "07:05")})
    assert [s.active(_ts("UTC", 2024, 1, 15, 22, m, sec)) for m, sec in ((0, 0), (4, 59), (5, 0))] == [
        False, False, True]
    assert [s.active(_ts("UTC", 2024, 1, 16, 7, m, sec)) for m, sec in ((0, 0), (4, 59), (5, 0))] == [
        True, True, False]
    # Minute by minute through a week with a DST change, against a schedule asked afresh each time.
    zone = "Europe/London"
    days = {"sat": _night("22:05", "07:05"), "sun": _night("23:55", "00:10"), "mon": _night("06:20", "06:40")}
    cached = Schedule(zone, days)
    start = _ts("UTC", 2024, 3, 29, 0, 0, 0)
    for t in range(int(start), int(start) + 7 * 86400, 60):
        assert cached.active(t) == Schedule(zone, days).active(t), dt.datetime.fromtimestamp(t, ZoneInfo(zone))


def test_schedule_validation_and_round_trip():
    with pytest.raises(ValueError, match=r"mon: 08:00-08:00 is empty.*the whole day is 00:00-24:00"):
        Schedule("UTC", {"mon": (parse_clock("08:00"), parse_clock("08:00"))})
    with pytest.raises(ValueError, match="mon: 24:00-07:00 starts at 24:00"):
        Schedule("UTC", {"mon": (parse_clock("24:00"), parse_clock("07:00"))})
    with pytest.raises(ValueError, match=r"0 to 24h \(86400000 ms\), got 0-90000000 ms"):  # no clock time: raw JSON
        Schedule("UTC", {"mon": (0, 90_000_000)})
    with pytest.raises(ValueError, match="got -1-3600000 ms"):
        Schedule("UTC", {"mon": (-1, 3_600_000)})
    until_midnight = Schedule("UTC", {"mon": _night("22:00", "00:00")})  # a tail of nothing: as 22:00-24:00
    assert until_midnight.active(_ts("UTC", 2024, 1, 15, 23, 59, 59))
    assert not until_midnight.active(_ts("UTC", 2024, 1, 16, 0, 0, 0))
    bedtime = Schedule("UTC", {"sat": _night("09:00", "12:00"), "mon": _night("22:00", "07:00")})
    assert bedtime.describe() == "mon 22:00-07:00 (next day), sat 09:00-12:00"
    assert until_midnight.describe() == "mon 22:00-00:00" and Schedule().describe() == "no times"
    # AdGuard Home's JSON shape, with start > end (which AdGuard Home itself refuses) for a night.
    assert bedtime.to_dict()["mon"] == {"start": 79_200_000, "end": 25_200_000}
    assert Schedule.from_dict(bedtime.to_dict()) == bedtime
    with pytest.raises(ValueError, match="time zone"):
        Schedule("Mars/Olympus", {})
    with pytest.raises(ValueError):
        parse_clock("24:30")
    s = Schedule("America/New_York", {"fri": (0, 3_600_000)})
    assert s.to_dict() == {"time_zone": "America/New_York", "fri": {"start": 0, "end": 3_600_000}}
    assert Schedule.from_dict(s.to_dict()) == s


def test_pause_internet_per_device():
    ps = PolicySet()
    ps.policy("device:aa:bb:cc:00:00:01").paused = True
    ps.policy("device:aa:bb:cc:00:00:01").rules.append(Rule("allow", "name", "allowed.example"))
    engine = PolicyEngine.build(ps)
    v = engine.decide(CAM, "allowed.example", NOW)
    assert (v.action, v.rule) == ("blocked", "device:aa:bb:cc:00:00:01 paused")
    assert not engine.decide(CAM2, "allowed.example", NOW).blocked


def test_strict_profile_and_anomaly():
    learned = {"acme_cam_v2": ["acme-cloud.com", "acme-ota.net"]}
    ps = PolicySet()
    ps.policy("type:acme_cam_v2").strict = True
    ps.policy("device:aa:bb:cc:00:00:02").strict = False  # the owner relaxes one camera
    ps.policy("global").rules.append(Rule("allow", "name", "pool.ntp.org"))
    engine = PolicyEngine.build(ps, learned)
    inside = engine.decide(CAM, "eu.api.acme-cloud.com", NOW)
    assert (inside.action, inside.anomaly) == ("allowed", False)
    outside = engine.decide(CAM, "exfil.example", NOW)
    assert (outside.action, outside.rule, outside.anomaly) == ("blocked", "type:acme_cam_v2 strict", True)
    ntp = engine.decide(
        CAM, "0.pool.ntp.org", NOW
    )  # an explicit allow beats strict; still outside the profile
    assert (ntp.action, ntp.anomaly) == ("allowed", True)
    relaxed = engine.decide(CAM2, "exfil.example", NOW)
    assert (relaxed.action, relaxed.anomaly) == ("allowed", True)
    assert engine.decide(PLUG, "exfil.example", NOW).anomaly is False  # no profile, no anomaly


def test_quarantine_allows_ntp_profile_and_vendor_cloud_until_approved():
    ps = PolicySet()
    ps.quarantine.enabled = True
    engine = PolicyEngine.build(ps, {"acme_cam_v2": ["acme-cloud.com"]})
    new = DeviceContext(
        "aa:bb:cc:00:00:07", "acme_cam_v2", "camera", "new", cloud_slds=frozenset({"acme-setup.io"})
    )
    assert engine.is_quarantined(new)
    assert engine.decide(new, "time.google.com", NOW).action == "allowed"
    assert engine.decide(new, "x.acme-cloud.com", NOW).action == "allowed"
    assert engine.decide(new, "setup.acme-setup.io", NOW).action == "allowed"
    v = engine.decide(new, "www.example.com", NOW)
    assert (v.action, v.rule) == ("blocked", "quarantine")
    approved = DeviceContext("aa:bb:cc:00:00:07", "acme_cam_v2", "camera", "approved")
    assert not engine.is_quarantined(approved)
    assert engine.decide(approved, "www.example.com", NOW).action == "allowed"
    forced = DeviceContext("aa:bb:cc:00:00:07", "acme_cam_v2", "camera", "approved", quarantined=True)
    assert engine.decide(forced, "www.example.com", NOW).blocked


def test_cname_chain_blocks_listed_target_only():
    ps = PolicySet()
    ps.policy("global").rules.append(Rule("block", "name", "tracker-cdn.example"))
    ps.policy("type:acme_cam_v2").strict = True
    engine = PolicyEngine.build(ps, {"acme_cam_v2": ["acme-cloud.com"]})
    v = engine.check_cname_chain(CAM, ["api.acme-cloud.com.", "edge.tracker-cdn.example."], NOW)
    assert (v.action, v.rule) == (
        "blocked",
        "cname edge.tracker-cdn.example: global block name=tracker-cdn.example",
    )
    # A CDN target outside the profile is not a strict-mode block: only listed names count here.
    assert engine.check_cname_chain(CAM, ["d1.cloudfront.net."], NOW).action == "allowed"


MUD = {
    "ietf-mud:mud": {
        "mud-version": 1,
        "mud-url": "https://acme.example/cam.json",
        "from-device-policy": {"access-lists": {"access-list": [{"name": "from-ipv4-cam"}]}},
        "to-device-policy": {"access-lists": {"access-list": [{"name": "to-ipv4-cam"}]}},
    },
    "ietf-access-control-list:acls": {
        "acl": [
            {
                "name": "from-ipv4-cam",
                "type": "ipv4-acl-type",
                "aces": {
                    "ace": [
                        {
                            "name": "cl0-frdev",
                            "matches": {
                                "ipv4": {"ietf-acldns:dst-dnsname": "api.acme-cloud.com", "protocol": 6}
                            },
                            "actions": {"forwarding": "accept"},
                        },
                        {
                            "name": "cl1-frdev",
                            "matches": {"ipv4": {"ietf-acldns:dst-dnsname": "bad.example"}},
                            "actions": {"forwarding": "drop"},
                        },
                    ]
                },
            },
            {
                "name": "to-ipv4-cam",
                "type": "ipv4-acl-type",
                "aces": {
                    "ace": [
                        {
                            "name": "cl0-todev",
                            "matches": {"ipv4": {"ietf-acldns:src-dnsname": "ota.acme-cloud.net"}},
                            "actions": {"forwarding": "accept"},
                        },
                    ]
                },
            },
        ]
    },
}


def test_mud_import_as_type_profile(tmp_path):
    f = tmp_path / "cam.json"
    f.write_text(json.dumps(MUD))
    profile = load_mud(f)
    assert profile.names == ["api.acme-cloud.com", "ota.acme-cloud.net"]
    assert profile.source == "mud:https://acme.example/cam.json"
    ps = PolicySet(profiles={"acme_cam_v2": profile})
    ps.policy("type:acme_cam_v2").strict = True
    engine = PolicyEngine.build(ps)
    assert engine.decide(CAM, "api.acme-cloud.com", NOW).action == "allowed"
    assert engine.decide(CAM, "bad.example", NOW).blocked
    assert engine.decide(CAM, "acme-cloud.com", NOW).blocked  # MUD names a host, not its whole domain
    broken = json.loads(json.dumps(MUD))
    broken["ietf-mud:mud"]["from-device-policy"]["access-lists"]["access-list"][0]["name"] = "nope"
    with pytest.raises(MudError, match="unknown ACL 'nope'"):
        profile_from_mud(broken, "x.json")
    with pytest.raises(MudError, match="not a MUD file"):
        profile_from_mud({}, "y.json")


def test_policy_set_round_trips_through_json_and_validates():
    ps = PolicySet(
        answer="nodata",
        lists={"ads": ListSpec("lists/ads.txt", url="https://l.example/ads.txt")},
        categories={"ads": ["ads"]},
        schedules={"night": Schedule("UTC", {"sun": (0, 60_000)})},
        profiles={"cam": Profile(["a.example"], "mud:x")},
    )
    ps.policy("tag:device_tv").rules.append(Rule("block", "category", "ads", schedule="night"))
    ps.policy("device:aa:bb:cc:00:00:01").paused = True
    again = PolicySet.from_dict(json.loads(json.dumps(ps.to_dict())))
    assert again.to_dict() == ps.to_dict()
    bad = ps.to_dict()
    bad["policies"]["global"] = {"rules": [{"action": "block", "kind": "list", "value": "missing"}]}
    with pytest.raises(ValueError, match="unknown list"):
        PolicySet.from_dict(bad)
    with pytest.raises(ValueError, match="malformed"):
        PolicySet.from_dict({"policies": {"global": {"rules": [{"verb": "x"}]}}})


def test_the_query_logs_words_for_a_rule_say_categories_and_tags_with_spaces(tmp_path):
    """The owner names a list category and labels a device's category freely ("social media", "smart speaker"):
    the engine's key for such a rule was shown as it is, where every other rule is said in words."""
    (tmp_path / "fb.txt").write_text("||facebook.example^\n")
    ps = PolicySet()
    ps.lists = {"fb": ListSpec("fb.txt")}
    ps.categories = {"social media": ["fb"]}
    ps.policy("category:smart speaker").rules.append(Rule("block", "category", "social media"))
    ps.policy("category:smart speaker").rules.append(Rule("block", "name", "ads.example"))
    engine = PolicyEngine.build(ps, base_dir=tmp_path)
    speaker = DeviceContext("aa:bb:cc:00:00:07", "EchoDot", "smart speaker", "approved")
    listed = engine.decide(speaker, "facebook.example", NOW)
    named = engine.decide(speaker, "ads.example", NOW)
    assert listed.rule == "tag:device_smart speaker block category=social media list=fb"
    assert listed.words == "category smart speaker rule: block category social media (list fb)"
    assert named.words == "category smart speaker rule: block ads.example"


_ALWAYS = Schedule("UTC", {day: (0, parse_clock("24:00")) for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")})


def _words_case(scope: str, rule: Rule | None, category: str | None = None, schedule: str | None = None) -> PolicySet:
    ps = PolicySet()
    ps.lists = {"fb": ListSpec("fb.txt")}
    ps.categories = {category or "social": ["fb"]}
    if schedule:
        ps.schedules[schedule] = _ALWAYS
    pol = ps.policy(scope)
    if rule is None:
        pol.paused = True
    else:
        pol.rules.append(rule)
    return ps


# (scope, rule (None: the scope is paused), list category, schedule, device type, device category, asked, words)
_HOSTILE_NAMES = {
    "a type with ' block ' in it": (
        "type:smart block speaker", Rule("block", "name", "ads.example"), None, None, "smart block speaker", None,
        "ads.example", "type smart block speaker rule: block ads.example"),
    "a type that reads as a rule": (
        "type:x block category=y", Rule("block", "name", "ads.example"), None, None, "x block category=y", None,
        "ads.example", "type x block category=y rule: block ads.example"),
    "a paused type ending in ' block'": (
        "type:cam block", None, None, None, "cam block", None, "anything.example",
        "type cam block mode: paused (internet off)"),
    "a type with colons": (
        "type:hub:v2: pro", Rule("block", "all"), None, None, "hub:v2: pro", None, "anything.example",
        "type hub:v2: pro rule: block everything"),
    "a tag with ' allow ' in it": (
        "category:stay allow listed", Rule("block", "name", "ads.example"), None, None, None, "stay allow listed",
        "ads.example", "category stay allow listed rule: block ads.example"),
    "a list category that reads as a schedule": (
        "global", Rule("block", "category", "ads schedule=night"), "ads schedule=night", None, None, None,
        "facebook.example", "global rule: block category ads schedule=night (list fb)"),
    "a list category that reads as an exception": (
        "global", Rule("block", "category", "trackers exception"), "trackers exception", None, None, None,
        "facebook.example", "global rule: block category trackers exception (list fb)"),
    "a schedule with a space": (
        "global", Rule("block", "name", "ads.example", schedule="school nights"), None, "school nights", None, None,
        "ads.example", "global rule: block ads.example during school nights"),
}


@pytest.mark.parametrize("case", list(_HOSTILE_NAMES.values()), ids=list(_HOSTILE_NAMES))
def test_the_query_logs_words_for_a_rule_keep_owner_given_names_whole(tmp_path, case):
    """An owner labels types and tags and names list categories freely (and schedules in policy.json): the words
    were parsed back from the engine's key with regular expressions, which read " block " in a type's name as
    where the rule begins (the key stayed raw), and "schedule=" or " exception" in a category's name as parts
    of the rule (wrong words)."""
    scope, rule, category, schedule, device_type, device_category, asked, words = case
    (tmp_path / "fb.txt").write_text("||facebook.example^\n")
    engine = PolicyEngine.build(_words_case(scope, rule, category, schedule), base_dir=tmp_path)
    verdict = engine.decide(DeviceContext("aa:bb:cc:00:00:08", device_type, device_category, "approved"), asked, NOW)
    assert verdict.blocked
    assert verdict.words == words


def test_the_words_of_a_cname_block_keep_the_owner_given_type_whole(tmp_path):
    """A CNAME chain's key nests the rule's: its words nest the rule's words, whatever the type is called."""
    ps = PolicySet()
    ps.policy("type:smart block speaker").rules.append(Rule("block", "name", "tracker-cdn.example"))
    engine = PolicyEngine.build(ps)
    speaker = DeviceContext("aa:bb:cc:00:00:08", "smart block speaker", None, "approved")
    verdict = engine.check_cname_chain(speaker, ["Edge.Tracker-CDN.example."], NOW)
    assert verdict.rule == "cname edge.tracker-cdn.example: type:smart block speaker block name=tracker-cdn.example"
    assert verdict.words == (
        "its alias edge.tracker-cdn.example: type smart block speaker rule: block tracker-cdn.example")


def test_the_words_of_quarantine_say_whether_the_name_is_on_its_allowed_list():
    ps = PolicySet()
    ps.quarantine.enabled = True
    engine = PolicyEngine.build(ps)
    new = DeviceContext("aa:bb:cc:00:00:08")
    assert engine.decide(new, "pool.ntp.org", NOW).words == "quarantine: on its allowed list"
    assert engine.decide(new, "ads.example", NOW).words == "quarantine: not on its allowed list"
