#!/bin/bash -e
# Install iotgw into the image. Runs on the build host with ROOTFS_DIR set and pi-gen's on_chroot.
#
# Either put a package built for the image's architecture in files/ (firmware/build-deb.sh run on a
# Raspberry Pi or any arm64 Debian 12 machine), or set IOTGW_SRC to an iotgw checkout: the package is then
# built inside the image's chroot (emulated, slow, but it needs no arm64 machine).

deb=$(find files -maxdepth 1 -name 'iotgw_*.deb' | sort -V | tail -n 1)
if [ -n "${deb}" ]; then
	install -m 644 "${deb}" "${ROOTFS_DIR}/tmp/iotgw.deb"
elif [ -n "${IOTGW_SRC}" ]; then
	rm -rf "${ROOTFS_DIR}/tmp/iotgw-src"
	cp -a "${IOTGW_SRC}" "${ROOTFS_DIR}/tmp/iotgw-src"
	on_chroot <<-CHROOT
	apt-get install -y --no-install-recommends python3-venv dpkg-dev
	/tmp/iotgw-src/firmware/build-deb.sh --out /tmp/iotgw-dist
	mv /tmp/iotgw-dist/iotgw_*.deb /tmp/iotgw.deb
	rm -rf /tmp/iotgw-src /tmp/iotgw-dist
	CHROOT
else
	echo "stage-iotgw: put iotgw_<version>_<arch>.deb in $(pwd)/files or set IOTGW_SRC" >&2
	exit 1
fi

on_chroot <<-CHROOT
apt-get install -y /tmp/iotgw.deb
rm -f /tmp/iotgw.deb
CHROOT

# The owner is reminded at every login until setup has run (the script checks for its marker).
install -m 755 files/90-iotgw-setup "${ROOTFS_DIR}/etc/update-motd.d/90-iotgw-setup"
