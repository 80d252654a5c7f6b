"""Devices: a device is a MAC address; addresses, names and fingerprints hang off it."""
