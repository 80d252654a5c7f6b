"""``iotgw policy ...`` against a policy file in a temporary state directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import cli, policies
from gateway.commands import policy as policy_cmd
from policy.engine import PolicyEngine
from policy.records import DeviceContext
from tests.test_policy_engine import _ts

ROOT = Path(__file__).resolve().parents[1]


def _run(state_dir, *argv: str) -> int:
    # Only the policy group: the other command modules are built elsewhere.
    parser = cli.Parser(prog="iotgw")  # the command line's own class: whole flag names only
    policy_cmd.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["policy", "--state-dir", str(state_dir), *argv])
    return args.func(args)


def _test(state_dir, capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert _run(state_dir, "test", *argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_edits_policy_file_and_decisions_follow(tmp_path, capsys):
    state = tmp_path / "state"
    lst = tmp_path / "ads.txt"
    lst.write_text("||ads.example^\nthis line is broken\n")
    mac = "aa:bb:cc:00:00:01"
    assert _run(state, "list-add", "ads", "--file", str(lst), "--category", "privacy") == 0
    assert f"{lst}:2: neither a hosts line" in capsys.readouterr().err
    assert _run(state, "block", "global", "category:privacy") == 0
    assert _run(state, "allow", f"device:{mac}", "ads.example") == 0
    assert _run(state, "block", "type:acme_cam", "video.example") == 0
    assert (
        _test(state, capsys, "aa:bb:cc:00:00:02", "x.ads.example")["rule"]
        == "global block category=privacy list=ads"
    )
    assert _test(state, capsys, mac, "x.ads.example")["action"] == "allowed"
    assert _test(state, capsys, mac, "video.example", "--type", "acme_cam")["action"] == "blocked"
    assert _run(state, "pause", f"device:{mac}") == 0
    assert _test(state, capsys, mac, "anything.example")["rule"] == f"device:{mac} paused"
    assert _run(state, "resume", f"device:{mac}") == 0
    assert _test(state, capsys, mac, "anything.example")["action"] == "allowed"
    assert _run(state, "quarantine", "on") == 0
    assert _test(state, capsys, mac, "anything.example", "--status", "new")["rule"] == "quarantine"
    data = json.loads((state / "policy.json").read_text())
    assert data["revision"] == 7
    assert data["categories"] == {"privacy": ["ads"]}


def test_cli_schedule_unrule_and_errors(tmp_path, capsys):
    state = tmp_path / "s"
    assert _run(state, "schedule", "night", "--tz", "Europe/Berlin", "--day", "mon=21:00-24:00") == 0
    assert _run(state, "block", "category:tv", "all", "--schedule", "night") == 0
    assert json.loads((state / "policy.json").read_text())["policies"]["tag:device_tv"]["rules"] == [
        {"action": "block", "kind": "all", "value": "", "schedule": "night"}
    ]
    assert _run(state, "block", "global", "x.example", "--schedule", "nope") == 2
    assert "unknown schedule" in capsys.readouterr().err
    assert _run(state, "unrule", "tag:device_tv", "5") == 2
    assert _run(state, "unrule", "tag:device_tv", "0") == 0
    assert _run(state, "schedule", "bad", "--day", "mon=22:00-22:00") == 2
    assert json.loads((state / "policy.json").read_text())["revision"] == 3  # failed edits change nothing
    with pytest.raises(SystemExit):
        _run(state, "strict", "global", "maybe")


def test_a_bedtime_on_school_nights_is_one_schedule_of_overnight_ranges(tmp_path, capsys):
    """--day mon=22:00-07:00 was refused ("crosses midnight: split it into 22:00-24:00 and 00:00-07:00 of the next
    day"), and a schedule holds one range a day: a bedtime every night took two schedules and two rules."""
    state, mac, tz = tmp_path / "s", "aa:bb:cc:00:00:07", "Europe/London"
    nights = [f"--day={day}=22:00-07:00" for day in ("sun", "mon", "tue", "wed", "thu")]
    assert _run(state, "schedule", "school-nights", "--tz", tz, *nights) == 0
    assert capsys.readouterr().out.startswith(
        "schedule school-nights set (Europe/London): mon 22:00-07:00 (next day), tue 22:00-07:00 (next day), "
        "wed 22:00-07:00 (next day), thu 22:00-07:00 (next day), sun 22:00-07:00 (next day) (revision 1)")
    assert _run(state, "block", f"device:{mac}", "all", "--schedule", "school-nights") == 0
    assert json.loads((state / "policy.json").read_text())["schedules"]["school-nights"]["mon"] == {
        "start": 79_200_000, "end": 25_200_000}  # AdGuard Home's shape, start > end for a night
    engine = PolicyEngine.build(policies.load(state), base_dir=state)
    cases = [  # 2024-01-15 is a Monday
        ((2024, 1, 14, 22, 30), True),  # Sunday night
        ((2024, 1, 15, 6, 59), True),  # Monday morning: Sunday's night
        ((2024, 1, 15, 7, 0), False),
        ((2024, 1, 15, 23, 0), True),  # Monday night
        ((2024, 1, 16, 6, 59), True),
        ((2024, 1, 16, 7, 0), False),
        ((2024, 1, 19, 6, 0), True),  # Friday morning: Thursday's night
        ((2024, 1, 19, 23, 0), False),  # Friday night: no school the next day
        ((2024, 1, 20, 6, 0), False),
        ((2024, 1, 21, 23, 0), True),
    ]
    ctx = DeviceContext(mac, None, None, "approved")
    got = [engine.decide(ctx, "x.example", _ts(tz, *when, 0)).blocked for when, _ in cases]
    assert got == [want for _, want in cases]


def test_a_schedule_giving_a_day_twice_is_refused_rather_than_keeping_only_its_last_hours(tmp_path, capsys):
    # mon=01:00-02:00 --day mon=03:00-04:00 reads as two windows; a schedule holds one range a day, and the first
    # was dropped without a word.
    state = tmp_path / "s"
    assert _run(state, "schedule", "night", "--day", "mon=01:00-02:00", "--day", "Mon=03:00-04:00") == 2
    assert "mon is given twice" in capsys.readouterr().err
    assert not (state / "policy.json").exists()


def test_cli_import_mud(tmp_path, capsys):
    from tests.test_policy_engine import MUD

    f = tmp_path / "cam.json"
    f.write_text(json.dumps(MUD))
    state = tmp_path / "s"
    assert _run(state, "import-mud", "acme_cam", str(f)) == 0
    assert _run(state, "strict", "type:acme_cam", "on") == 0
    assert (
        _test(state, capsys, "aa:bb:cc:00:00:01", "api.acme-cloud.com", "--type", "acme_cam")["action"]
        == "allowed"
    )
    v = _test(state, capsys, "aa:bb:cc:00:00:01", "other.example", "--type", "acme_cam")
    assert (v["action"], v["anomaly"]) == ("blocked", True)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_policy_change_from_a_shell_that_may_not_write_the_state_says_who_can_in_one_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # the daemon user's directory, as /var/lib/iotgw is iotgw's
    # root without the capabilities that let it write every file: as a user's shell would be
    no_dac = ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search")
    proc = subprocess.run(
        [*no_dac, sys.executable, "-m", "gateway.cli", "policy", "--state-dir", str(state),
         "block", "global", "ads.example.com"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"iotgw: permission denied: {state}/.policy.lock: run this as root (sudo) or as the iotgw user"
    ]
    assert os.listdir(state) == []


def test_cli_unrule_with_the_rule_label_removes_that_rule_after_another_writer_moved_it(tmp_path, capsys):
    """``unrule SCOPE INDEX`` removes by place: after the web UI removed an earlier rule between the owner's
    ``show`` and ``unrule``, the number named the rule below. The rule as ``block`` printed it removes that rule
    wherever it is now, and removes nothing once it is gone."""
    from gateway import policies

    state = tmp_path / "s"
    scope = "device:aa:bb:cc:00:00:01"
    for name in ("a.example", "b.example", "c.example"):
        assert _run(state, "block", scope, name) == 0
    printed = capsys.readouterr().out.splitlines()[1]  # what the owner saw for b.example
    assert printed.startswith(f"{scope}: block name=b.example (revision")
    policies.remove_rule(state, scope, 0, "block name=a.example")  # meanwhile, the web page's remove button
    assert _run(state, "unrule", scope, "block  name=b.example") == 0
    assert f"{scope}: removed block name=b.example" in capsys.readouterr().out
    rules = json.loads((state / "policy.json").read_text())["policies"][scope]["rules"]
    assert [r["value"] for r in rules] == ["c.example"]
    assert _run(state, "unrule", scope, "block name=b.example") == 2
    assert "no rule 'block name=b.example'" in capsys.readouterr().err
    assert _run(state, "unrule", scope, "0") == 0  # by number, as before
    assert json.loads((state / "policy.json").read_text())["policies"][scope]["rules"] == []


def _config(tmp_path: Path, name: str) -> Path:
    """A config file whose state directory is ``tmp_path/name``."""
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / name}"\n')
    return config


def _rules(state: Path) -> dict:
    return json.loads((state / "policy.json").read_text())["policies"]


@pytest.mark.parametrize("flag", ["--config", "--state-dir"])
def test_policy_takes_config_and_state_dir_before_or_after_its_action_alike(tmp_path, capsys, flag):
    # They went before the ACTION only (after it: "unrecognized arguments") while `iotgw user token ...` took
    # them after: a user had to know which.
    def where(name: str) -> str:
        return str(_config(tmp_path, name) if flag == "--config" else tmp_path / name)

    assert cli.main(["policy", flag, where("before"), "block", "global", "ads.example"]) == 0
    assert cli.main(["policy", "block", "global", "ads.example", flag, where("after")]) == 0
    assert _rules(tmp_path / "before") == _rules(tmp_path / "after")
    assert _rules(tmp_path / "after")["global"]["rules"] == [
        {"action": "block", "kind": "name", "value": "ads.example", "schedule": None}
    ]
    capsys.readouterr()
    assert cli.main(["policy", flag, where("before"), "test", "aa:bb:cc:00:00:01", "x.ads.example"]) == 0
    assert cli.main(["policy", "test", "aa:bb:cc:00:00:01", "x.ads.example", flag, where("before")]) == 0
    before, after = capsys.readouterr().out.splitlines()
    assert before == after and json.loads(after)["action"] == "blocked"


def test_policy_state_dir_given_before_and_after_the_action_the_later_one_wins(tmp_path):
    # as a flag given twice on one level does; and the ACTION's own parser must not put back the default
    assert cli.main(["policy", "--state-dir", str(tmp_path / "first"), "pause", "global",
                     "--state-dir", str(tmp_path / "later")]) == 0
    assert _rules(tmp_path / "later")["global"]["paused"] is True
    assert not (tmp_path / "first").exists()
    # --config before, --state-dir after: both count, the directory over the config's
    assert cli.main(["policy", "--config", str(_config(tmp_path, "configured")), "resume", "global",
                     "--state-dir", str(tmp_path / "later")]) == 0
    assert _rules(tmp_path / "later")["global"]["paused"] is None
    assert not (tmp_path / "configured").exists()


def test_policy_refuses_db_which_it_would_not_use(tmp_path, capsys):
    # The policy is a file in the state directory; a database URL was accepted and ignored, so a change meant
    # for another gateway's state went to the default one.
    db = ["--db", f"sqlite:///{tmp_path}/other.sqlite"]
    for argv in (["policy", *db, "pause", "global"], ["policy", "pause", "global", *db]):
        with pytest.raises(SystemExit) as refused:
            cli.main([*argv, "--state-dir", str(tmp_path / "s")])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "error: --db: the policy is a file in the state directory" in err, err
    assert list(tmp_path.iterdir()) == []


def _iotgw(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


def test_a_state_dir_that_is_a_file_is_refused_naming_the_flag_or_the_config_key(tmp_path):
    """The first write into it failed as "[Errno 17] File exists: 'X'", naming neither the flag nor the key."""
    not_a_dir = tmp_path / "policy.json"
    not_a_dir.write_text("{}\n")
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{not_a_dir}"\n')
    for argv, where in ((["--state-dir", str(not_a_dir)], "--state-dir"), (["--config", str(config)],
                                                                             f"{config}: gateway.state_dir")):
        for action in (["show"], ["block", "global", "ads.example"]):
            proc = _iotgw("policy", *argv, *action)
            assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
            assert proc.stderr.splitlines() == [f"iotgw: configuration error: {where}: {not_a_dir} is not a directory"]
    assert not_a_dir.read_text() == "{}\n"


def test_a_mud_file_that_cannot_be_read_is_one_line_naming_it_and_its_line(tmp_path):
    state = tmp_path / "state"
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{\n "ietf-mud:mud": {"systeminfo": "Caf\xe9 cam"}\n}\n')
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "ietf-mud:mud": {\n}\n')
    missing = tmp_path / "missing.json"
    for path, said in ((not_utf8, f"{not_utf8}:2: not UTF-8 (byte 38 is 0xe9)"),
                       (broken, f"{broken}:4: not JSON: Expecting ',' delimiter"),
                       (missing, f"{missing}: cannot read: No such file or directory"),
                       (tmp_path, f"{tmp_path}: cannot read: Is a directory")):
        proc = _iotgw("policy", "--state-dir", str(state), "import-mud", "acme_cam", str(path))
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr.splitlines() == [f"iotgw policy: {said}"]
    assert not (state / "policy.json").exists()


@pytest.mark.parametrize(("action", "flag"), [
    (["block", "global", "ads.example", "--schedule", ""], "--schedule"),  # was an always-on rule
    (["schedule", "night", "--tz", "", "--day", "mon=21:00-24:00"], "--tz"),  # was UTC
    (["list-add", "x", "--file", "{mud}", "--category", ""], "--category"),  # was no category
    (["import-mud", "", "{mud}"], "TYPE"),  # was a profile for the type ''
])
def test_an_empty_name_is_refused_naming_its_argument_and_the_policy_is_unchanged(tmp_path, action, flag):
    """``--schedule "$NIGHT"`` with NIGHT unset: the empty value read as the flag left out and made, silently,
    a different policy from the one asked for."""
    from tests.test_policy_engine import MUD

    mud = tmp_path / "cam.json"
    mud.write_text(json.dumps(MUD))
    state = tmp_path / "state"
    proc = _iotgw("policy", "--state-dir", str(state), *(a.format(mud=mud) for a in action))
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.splitlines()[-1].endswith(f"error: argument {flag}: must not be empty"), proc.stderr
    assert not state.exists()


def test_policy_test_at_a_given_time_shows_a_bedtime_from_the_shell(tmp_path, capsys):
    """``iotgw policy test`` decided at the current time only: an owner could not check a bedtime rule by day."""
    state, mac = tmp_path / "s", "aa:bb:cc:00:00:08"
    assert _run(state, "schedule", "bedtime", "--tz", "Europe/Berlin", "--day", "mon=22:00-07:00") == 0
    assert _run(state, "block", f"device:{mac}", "all", "--schedule", "bedtime") == 0
    # 2024-01-15 is a Monday; Berlin is UTC+1 in January
    assert _test(state, capsys, mac, "x.example", "--at", "2024-01-15T23:30+01:00")["action"] == "blocked"
    assert _test(state, capsys, mac, "x.example", "--at", "2024-01-16T05:59Z")["action"] == "blocked"
    assert _test(state, capsys, mac, "x.example", "--at", "2024-01-16T06:00Z")["action"] == "allowed"
    assert _test(state, capsys, mac, "x.example", "--at", "2024-01-16T23:30+01:00")["action"] == "allowed"
    with pytest.raises(SystemExit):
        _run(state, "test", mac, "x.example", "--at", "monday night")
    assert "'monday night' is not an ISO 8601 time" in capsys.readouterr().err
