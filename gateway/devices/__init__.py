"""Devices: a device is a MAC address; addresses, names and fingerprints hang off it."""

from policy.model import normalise_mac


def device_key(text: str) -> str:
    """A device's key as the store writes it, however the MAC is typed (``AA-BB-...``, upper case, spaces
    around); any other key (``ip:...``) lower-cased."""
    try:
        return normalise_mac(text)
    except ValueError:
        return text.strip().lower()
