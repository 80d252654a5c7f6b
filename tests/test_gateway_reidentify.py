"""A model bundle installed (a federated round's, or a rollback) re-identifies the devices the home already has
from their stored observation windows, on the whole daemon: real DNS sockets to a real dnsmasq, real DHCP frames
through the parser, the store, the policy file, and two real bundles: the shipped one and the same net with the
open-set bars lowered (what a round that learnt a home's unknown products changes), installed as ``ModelStore``
installs one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from dataclasses import replace
from pathlib import Path

import gateway.daemon
from gateway.alerts import recent_alerts
from gateway.alerts.homeassistant import device_id
from gateway.daemon import IDENTIFIED_BY_SETTING, Gateway, window_identity
from gateway.devices.service import get_device, label
from gateway.policyfile import load_policy, save_policy
from gateway.store.schema import Device, Identification, ObservationWindow
from identifier.bundle import Bundle
from identifier.stream import Identifier
from policy.model import Policy, Rule
from tests.broker import Mosquitto, Recorder
from tests.dns_helpers import needs_dnsmasq
from tests.test_gateway import RunningGateway, answers, eventually, kettle_asks_for_a_lease

pytestmark = needs_dnsmasq

KETTLE, THING, LABELLED, BARE, LATE = (
    "5c:cf:7f:99:a0:11", "02:aa:bb:cc:dd:51", "02:aa:bb:cc:dd:52", "02:aa:bb:cc:dd:53", "02:aa:bb:cc:dd:54")


def learnt(shipped: Bundle, version: str) -> Bundle:
    """The shipped net with every open-set bar down: a device the shipped model calls unknown is named its
    closest type, and a device it names keeps its name."""
    th = replace(shipped.thresholds, known=0.0, known_unvoted=0.0, known_without_specific=0.0, max_new_words=1.0)
    return replace(shipped, version=version, thresholds=th)


def install(model_dir: Path, bundle: Bundle) -> None:
    """What ``ModelStore.install`` (and a rollback) does: a complete bundle beside the link, a new link over it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    bundle.save(model_dir / f"bundle-{bundle.version}")
    os.symlink(f"bundle-{bundle.version}", model_dir / ".current.tmp")
    os.replace(model_dir / ".current.tmp", model_dir / "current")


def window(gw: RunningGateway, mac: str) -> ObservationWindow | None:
    with gw.store.session() as s:
        return s.get(ObservationWindow, mac)


def identified(gw: RunningGateway, mac: str, count: int, timeout: float = 10.0) -> list:
    """``mac``'s identifications, oldest first, once there are ``count`` of them and its window is stored."""
    def stored():
        detail = get_device(gw.store, mac)
        assert window(gw, mac) is not None
        assert len(detail.identifications) == count
        return detail.identifications
    return eventually(stored, timeout)


def joins(gw: RunningGateway, mac: str, ip: str) -> None:
    """A device the shipped model cannot name: a DHCP request with a hostname and a DNS query."""
    gw.dhcp(mac, ip, "thing")
    assert answers(gw.ask("www.example.test", ip)) == {"192.0.2.10"}


def test_an_installed_model_re_identifies_the_devices_already_known_from_their_windows(tmp_path, upstream,
                                                                                     monkeypatch):
    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)  # the first devices' windows close while the test waits
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:
        reidentified_live(tmp_path, upstream, monkeypatch, broker)
    finally:
        broker.stop()


def reidentified_live(tmp_path, upstream, monkeypatch, broker: Mosquitto) -> None:  # noqa: ANN001
    shipped = Bundle.load()
    gw = RunningGateway(tmp_path, upstream)
    gw.cfg.mqtt.url = broker.url  # Home Assistant's view of the devices, through a real broker
    gw.gateway = Gateway(gw.cfg, gw.store)
    with gw.store.transaction() as s:  # identified before the store kept windows: nothing to re-identify from
        s.add(Device(mac=BARE, first_seen=1.0, last_seen=2.0, status="new", manufacturer="unknown",
                     device_type="unknown", category="unknown", confidence=0.3, known=False))
    with gw, contextlib.closing(Recorder(broker, ["homeassistant/#"])) as ha:
        kettle_asks_for_a_lease(gw, KETTLE, "127.0.0.91")
        joins(gw, THING, "127.0.0.92")
        joins(gw, LABELLED, "127.0.0.93")
        kettle = identified(gw, KETTLE, 1)[0]
        thing = identified(gw, THING, 1)[0]
        identified(gw, LABELLED, 1)
        assert kettle.known and kettle.model_version == shipped.version
        assert not thing.known and thing.device_type == "unknown"
        closest = thing.alternatives[0][0]  # what the lowered bars will name it
        label(gw.store, LABELLED, manufacturer="Acme", device_type="AcmeSensor", category="sensor")
        # The owner blocks a name for the type the device will turn out to be.
        policy = load_policy(gw.cfg.state_dir)
        policy.policies[f"type:{closest}"] = Policy(rules=[Rule("block", "name", "example.test")])
        save_policy(gw.cfg.state_dir, policy)
        # A device still in its first minute when the model comes: it finishes on the model it began with.
        monkeypatch.setattr(gateway.daemon, "WINDOW_S", 3600.0)
        joins(gw, LATE, "127.0.0.94")
        eventually(lambda: window(gw, LATE) is not None)  # its open window is stored too, as it grows

        install(gw.cfg.federation_dir / "model", learnt(shipped, "fed-r2"))
        old, new = identified(gw, THING, 2, timeout=30)
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r2")  # the whole home is done
        assert old.id == thing.id
        assert (new.known, new.device_type, new.model_version) == (True, closest, "fed-r2")
        device = get_device(gw.store, THING).device
        assert (device.known, device.device_type, device.manufacturer) == (True, closest, new.manufacturer)
        alerts = recent_alerts(gw.store, kind="device_identified", mac=THING)
        assert len(alerts) == 1, "the type changed: one alert, as a fresh identification raises"
        assert alerts[0].data["device_type"] == closest and alerts[0].data["previous_device_type"] == "unknown"
        assert alerts[0].data["model_version"] == "fed-r2"
        # Home Assistant's device says the new type ...
        node = device_id(gw.cfg.gateway.name, THING)
        ha.wait(lambda m: m.topic.endswith(f"/{node}/config") and m.json()["device"].get("model") == closest)
        # ... and the type's policy applies to it from now on.
        assert gw.gateway.filtering.contexts[THING].device_type == closest
        eventually(lambda: answers(gw.ask("www.example.test", "127.0.0.92")) == {"0.0.0.0"})

        # Same answer under the new model: no row, no alert.
        assert [i.id for i in identified(gw, KETTLE, 1)] == [kettle.id]
        assert len(recent_alerts(gw.store, kind="device_identified", mac=KETTLE)) == 1
        # The owner's label is the device's identity: the model's answer is left as it was.
        labelled = get_device(gw.store, LABELLED)
        assert len(labelled.identifications) == 1 and labelled.device.device_type == "unknown"
        assert labelled.device.label_device_type == "AcmeSensor"
        assert not recent_alerts(gw.store, kind="device_identified", mac=LABELLED)
        # No window, nothing to go on.
        bare = get_device(gw.store, BARE)
        assert not bare.identifications and bare.device.device_type == "unknown"
        # The device in its first minute: no answer yet, its session on the model it began with.
        assert not get_device(gw.store, LATE).identifications
        assert gw.gateway._sessions[LATE].ident.version == shipped.version
        # ... and, its window over (a packet past it, the minute shortened again), the model now running names it.
        monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)

        def closed():
            gw.ask("www.example.test", "127.0.0.94")
            return identified(gw, LATE, 1, timeout=1)
        (only,) = eventually(closed)  # the old model never decided: its guess is not the device's answer
        assert (only.known, only.model_version) == (True, "fed-r2")
        alert = eventually(lambda: recent_alerts(gw.store, kind="device_identified", mac=LATE)[0])
        assert alert.data["device_type"] == only.device_type and "previous_device_type" not in alert.data


def test_a_model_installed_or_rolled_back_while_the_daemon_was_stopped_re_identifies_at_start(tmp_path, upstream,
                                                                                            monkeypatch):
    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    shipped = Bundle.load()
    with RunningGateway(tmp_path, upstream) as gw:
        model_dir = gw.cfg.federation_dir / "model"
        joins(gw, THING, "127.0.0.95")
        first = identified(gw, THING, 1)[0]
        assert not first.known and first.model_version == shipped.version
        closest = first.alternatives[0][0]

    install(model_dir, learnt(shipped, "fed-r2"))
    with RunningGateway(tmp_path, upstream) as gw:
        new = identified(gw, THING, 2, timeout=30)[1]
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r2")
        assert (new.known, new.device_type, new.model_version) == (True, closest, "fed-r2")

    # The round is rolled back: its previous bundle is the current one again.
    install(model_dir, replace(shipped, version="fed-r1"))
    with RunningGateway(tmp_path, upstream) as gw:
        back = identified(gw, THING, 3, timeout=30)[2]
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r1")
        assert (back.known, back.device_type, back.model_version) == (False, "unknown", "fed-r1")
        alert = recent_alerts(gw.store, kind="unknown_device", mac=THING)[0]
        assert alert.data["previous_device_type"] == closest and alert.data["model_version"] == "fed-r1"
        assert get_device(gw.store, THING).device.device_type == "unknown"


def test_an_answer_the_old_model_gave_just_before_the_install_and_not_yet_written_is_re_identified(
        tmp_path, upstream, monkeypatch):
    """A window that closed on the old model just before the new one came holds an answer the next flush writes:
    the pass must not skip its device for good as 'still being decided', or the old model's answer stays."""
    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    shipped = Bundle.load()
    rounds = threading.Event()
    batch = Gateway._reidentify_batch

    def noted(self, *args, **kwargs):  # noqa: ANN001, ANN202 - the real round, and a note that it ran
        try:
            return batch(self, *args, **kwargs)
        finally:
            rounds.set()

    monkeypatch.setattr(Gateway, "_reidentify_batch", noted)
    gw = RunningGateway(tmp_path, upstream)
    gw.cfg.store.flush_interval_s = 3600  # written only by gw.flush(): the test says when
    gw.gateway = Gateway(gw.cfg, gw.store)
    with gw:
        rounds.wait(30)  # the start-up pass, over an empty home
        joins(gw, THING, "127.0.0.96")
        # its window closed: the old model's answer waits for the next flush
        eventually(lambda: THING in {key for key, _, _ in list(gw.gateway._pending_identities)})
        rounds.clear()
        install(gw.cfg.federation_dir / "model", learnt(shipped, "fed-r2"))
        assert rounds.wait(30), "the new model's pass ran a round"
        gw.flush()  # the old model's answer is written after the pass's round skipped the device
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r2", 30)
        old, new = identified(gw, THING, 2)
        assert (old.known, old.model_version) == (False, shipped.version)
        assert (new.known, new.model_version) == (True, "fed-r2")


def test_a_pass_is_not_started_for_a_model_replaced_while_its_call_read_the_setting(tmp_path, upstream):
    """start()'s call for the model it began with reads the setting in a worker thread; a bundle installed as the
    daemon started is loaded by the refresh loop meanwhile. Each call started its pass: the older one's was out of
    reach of stop() (its task and stop event replaced by the newer's) and went on writing the older model's answers.
    """
    shipped = Bundle.load()
    with RunningGateway(tmp_path, upstream) as gw:
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == shipped.version)  # start's pass is over
        gw.store.set_setting(IDENTIFIED_BY_SETTING, "fed-r1")  # as if the home was last identified by another
        older = gw.gateway.identifier
        gw.gateway.identifier = Identifier(learnt(shipped, "fed-r2"))

        async def call_for_the_older():
            await gw.gateway._reidentify_if_new(older)
            return gw.gateway._reidentifying

        assert asyncio.run_coroutine_threadsafe(call_for_the_older(), gw._loop).result(30) is None


def test_a_pass_outlives_a_caller_cancelled_while_it_waited_for_the_pass_to_end(tmp_path, upstream, monkeypatch):
    """stop() cancels the refresh loop, which may be waiting in _end_reidentifying for the pass of the model it is
    replacing: the cancel reached the pass, and stop() then found it over while its worker thread could still be
    writing to the store it goes on to close."""
    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    gw = RunningGateway(tmp_path, upstream)
    gw.cfg.store.flush_interval_s = 3600  # the pass waits for a flush that does not come: it is under way
    gw.gateway = Gateway(gw.cfg, gw.store)
    with gw:
        joins(gw, THING, "127.0.0.97")
        eventually(lambda: THING in {key for key, _, _ in list(gw.gateway._pending_identities)})

        async def cancelled_while_ending():
            daemon = gw.gateway
            daemon.identifier = Identifier(learnt(Bundle.load(), "fed-r2"))
            await daemon._reidentify_if_new(daemon.identifier)
            under_way = daemon._reidentifying
            ending = asyncio.create_task(daemon._end_reidentifying())
            await asyncio.sleep(0)  # it is waiting for the pass
            ending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ending
            await asyncio.wait([under_way])
            return under_way.cancelled()

        assert asyncio.run_coroutine_threadsafe(cancelled_while_ending(), gw._loop).result(30) is False


def test_a_pass_that_failed_is_tried_again_without_a_restart(tmp_path, upstream, monkeypatch):
    """A pass that failed (a full disk, an error) was tried again only at the daemon's next start: until then the
    home kept the old model's answers. The fault is injected: the first round raises."""
    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    monkeypatch.setattr(gateway.daemon, "REIDENTIFY_RETRY_S", 1.0, raising=False)  # new with the retry
    shipped = Bundle.load()
    batch = Gateway._reidentify_batch
    failed = []

    def fails_once(self, identifier, *args, **kwargs):  # noqa: ANN001, ANN202 - the real round after one failure
        if identifier.version == "fed-r2" and not failed:
            failed.append(True)
            raise RuntimeError("injected: the round failed")
        return batch(self, identifier, *args, **kwargs)

    monkeypatch.setattr(Gateway, "_reidentify_batch", fails_once)
    with RunningGateway(tmp_path, upstream) as gw:
        joins(gw, THING, "127.0.0.98")
        assert not identified(gw, THING, 1)[0].known
        install(gw.cfg.federation_dir / "model", learnt(shipped, "fed-r2"))
        new = identified(gw, THING, 2, timeout=30)[1]
        assert failed and gw.gateway.counters.get("reidentify_errors") == 1
        assert (new.known, new.model_version) == (True, "fed-r2")
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r2")


def test_a_start_reads_only_the_windows_of_devices_the_running_model_has_not_identified(tmp_path, upstream,
                                                                                       monkeypatch):
    """A pass cut short, then a start: the devices the model re-identified already were read, a round of 16 windows
    at a time with a rest after each, only to be skipped; a home of 1,000 devices cost the start 1.2 s of work for
    the few left. Now the store is asked only for the others: one round here, where the skipping took seven."""
    shipped = Bundle.load()
    ident = Identifier(shipped)
    prototypes = sorted(shipped.prototypes.items())
    rounds = []
    batch = Gateway._reidentify_batch

    def noted(self, *args, **kwargs):  # noqa: ANN001, ANN202 - the real round, and what it did
        result = batch(self, *args, **kwargs)
        rounds.append(result)
        return result

    monkeypatch.setattr(Gateway, "_reidentify_batch", noted)
    left = {7, 50, 99}  # devices the pass cut short had not reached: their newest answer is the older model's
    gw = RunningGateway(tmp_path, upstream)
    with gw.store.transaction() as s:
        for i in range(100):
            mac, start = f"02:00:00:00:01:{i:02x}", 1_000.0 + i
            observations = [{**obs, "t": obs["t"] + start} for obs in prototypes[i % len(prototypes)][1]]
            identity = window_identity(ident, mac, start, observations)
            s.add(Device(mac=mac, first_seen=start, last_seen=start + 60, status="new",
                         manufacturer=identity.manufacturer, device_type=identity.device_type,
                         category=identity.category, confidence=float(identity.confidence), known=identity.known))
            s.add(ObservationWindow(mac=mac, started_at=start, observations=observations))
            s.add(Identification(mac=mac, ts=start + 60, manufacturer=identity.manufacturer,
                                 device_type=identity.device_type, category=identity.category,
                                 confidence=float(identity.confidence), known=identity.known, alternatives=[],
                                 signals=[], model_version="fed-r1" if i in left else shipped.version))
        # Left alone as before, on the older model too: a device its owner labelled, and one without a window.
        s.add(Device(mac=LABELLED, first_seen=1.0, last_seen=2.0, status="new", label_device_type="AcmeSensor"))
        s.add(ObservationWindow(mac=LABELLED, started_at=1.0, observations=prototypes[0][1]))
        s.add(Device(mac=BARE, first_seen=1.0, last_seen=2.0, status="new"))
        for mac in (LABELLED, BARE):
            s.add(Identification(mac=mac, ts=2.0, manufacturer="unknown", device_type="unknown", category="unknown",
                                 confidence=0.3, known=False, alternatives=[], signals=[], model_version="fed-r1"))
    gw.store.set_setting(IDENTIFIED_BY_SETTING, "fed-r1")
    gw.gateway = Gateway(gw.cfg, gw.store)
    with gw:
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == shipped.version, 30)
    assert sum(count for _, count, _ in rounds) == len(left)
    assert len(rounds) == 1, "the windows already identified by this model were read"


def test_a_device_whose_window_spans_an_install_and_never_decided_is_announced_once(tmp_path, upstream, monkeypatch):
    """A device in its first minute when a model came, on which the old model never decided: its window's close
    stored and announced the old model's best guess ("unknown"), then the new model's answer with "type before:
    unknown", two alerts at once for one new device. Its first answer is the model's now running, announced once."""
    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 3600.0)
    shipped = Bundle.load()
    with RunningGateway(tmp_path, upstream) as gw:
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == shipped.version)
        joins(gw, THING, "127.0.0.99")
        eventually(lambda: window(gw, THING) is not None)
        install(gw.cfg.federation_dir / "model", learnt(shipped, "fed-r2"))
        eventually(lambda: gw.store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r2", 30)
        assert gw.gateway._sessions[THING].ident.version == shipped.version
        assert gw.gateway._sessions[THING].committed is None  # the old model never decided on it
        monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)  # a packet past its window closes it

        def closed():
            gw.ask("www.example.test", "127.0.0.99")
            return identified(gw, THING, 1, timeout=1)
        (only,) = eventually(closed)
        assert (only.known, only.model_version) == (True, "fed-r2")
        alerts = eventually(lambda: recent_alerts(gw.store, kind="device_identified", mac=THING) or None)
        assert not recent_alerts(gw.store, kind="unknown_device", mac=THING)
        assert len(alerts) == 1 and alerts[0].data["device_type"] == only.device_type
        assert "previous_device_type" not in alerts[0].data  # nothing was said of it before
