#!/bin/bash
# Build dist/iotgw_<version>_<arch>.deb: iotgw in its own virtualenv under /opt/iotgw, the systemd units,
# /etc/iotgw/iotgw.toml as a conffile, and the maintainer scripts in firmware/debian/.
#
#   firmware/build-deb.sh [--with-federation] [--python /usr/bin/python3] [--out DIR]
#
# The package is for the architecture and Python minor version of the machine that builds it (the venv holds
# compiled wheels): build on the Pi (or in its pi-gen chroot) for arm64/armhf. pip resolves everything through
# the package index configured for it (PyPI, or a local mirror/wheelhouse), with constraints.txt pinning torch.
set -euo pipefail

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=/usr/bin/python3
OUT="$REPO/dist"
FEDERATION=0
while [ $# -gt 0 ]; do
    case "$1" in
    --with-federation) FEDERATION=1 ;;
    --python) PYTHON=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) usage 0 ;;
    *) echo "build-deb.sh: unknown option $1" >&2; usage 2 ;;
    esac
    shift
done

for tool in dpkg-deb dpkg; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool is missing (apt-get install dpkg-dev)" >&2; exit 1; }
done
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || { echo "build-deb.sh: $PYTHON cannot make a venv (apt-get install python3-venv)" >&2; exit 1; }

VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")
ARCH=$(dpkg --print-architecture)
PYMINOR=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/iotgw-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
PKG="$STAGE/pkg"
VENV="$PKG/opt/iotgw"

# The venv is built inside the staging root and then moved in place by rewriting the staging prefix
# (script shebangs, activate scripts, pyvenv.cfg) and compiling the .pyc files with their final paths.
# bin/python stays a symlink to the system's python3: Debian's security updates of the interpreter apply,
# and Depends pins the minor version the venv was made for.
echo "build-deb.sh: venv in $VENV ($PYTHON, Python $PYMINOR)"
"$PYTHON" -m venv "$VENV"
EXTRAS=""
[ "$FEDERATION" = 1 ] && EXTRAS="[federation]"
"$VENV/bin/pip" install --quiet --no-compile --no-warn-script-location -c "$REPO/constraints.txt" \
    "$REPO$EXTRAS"
"$VENV/bin/pip" uninstall --quiet --yes pip setuptools  # an appliance installs nothing at run time
[ "$FEDERATION" = 1 ] && touch "$VENV/.federation"     # iotgw-federation.service's ConditionPathExists
rm -f "$VENV"/bin/Activate.ps1 "$VENV"/bin/activate.csh "$VENV"/bin/activate.fish

grep -rlI --null -F "$PKG" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s|$PKG||g"
find "$VENV" -name direct_url.json -delete  # records the build machine's checkout path, nothing else
"$PYTHON" -m compileall -q -j 0 -s "$PKG" -p / "$VENV/lib" >/dev/null
if leftover=$(grep -rlI -F "$PKG" "$VENV"); then
    echo "build-deb.sh: the staging path is still in:" >&2
    echo "$leftover" >&2
    exit 1
fi

install -d "$PKG/usr/bin"
ln -s /opt/iotgw/bin/iotgw "$PKG/usr/bin/iotgw"
install -d "$PKG/lib/systemd/system"
install -m 0644 "$REPO"/systemd/*.service "$REPO"/systemd/*.timer "$PKG/lib/systemd/system/"
install -D -m 0640 "$REPO/firmware/iotgw.toml" "$PKG/etc/iotgw/iotgw.toml"
install -d "$PKG/usr/share/doc/iotgw"
install -m 0644 "$REPO/firmware/README.md" "$PKG/usr/share/doc/iotgw/README.md"
install -m 0644 "$REPO/firmware/openwrt.md" "$PKG/usr/share/doc/iotgw/openwrt.md"
install -m 0644 "$REPO/systemd/README.md" "$PKG/usr/share/doc/iotgw/systemd.md"
cat > "$PKG/usr/share/doc/iotgw/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: iotgw

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
 The Python packages under /opt/iotgw/lib carry their own licences in their *.dist-info directories.
COPYRIGHT

install -d "$PKG/DEBIAN"
install -m 0755 "$REPO"/firmware/debian/postinst "$REPO"/firmware/debian/prerm "$REPO"/firmware/debian/postrm \
    "$PKG/DEBIAN/"
echo /etc/iotgw/iotgw.toml > "$PKG/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: iotgw
Version: $VERSION
Architecture: $ARCH
Maintainer: iotgw maintainers <maintainers@iotgw.invalid>
Installed-Size: $SIZE
Depends: python3 (>= $PYMINOR), python3 (<< $PYNEXT), systemd, passwd, init-system-helpers, libpcap0.8, iproute2
Recommends: nftables
Suggests: mosquitto
Section: net
Priority: optional
Description: IoT edge gateway: per-device DNS filtering, device identification, alerts
 iotgw answers the LAN's DNS, tells within seconds what each new device is (manufacturer, product,
 category), applies a filtering policy per device, alerts over MQTT (Home Assistant discovery) and can
 improve its identification model with other homes through federated learning with secure aggregation.
 .
 The application lives in its own virtual environment under /opt/iotgw.$([ "$FEDERATION" = 1 ] && printf '\n This build includes the federated-learning client (torch, flwr).')
CONTROL

mkdir -p "$OUT"
DEB="$OUT/iotgw_${VERSION}_${ARCH}.deb"
# --root-owner-group gives every file root:root without fakeroot (dpkg-deb >= 1.19).
dpkg-deb --root-owner-group --build "$PKG" "$DEB" >/dev/null
echo "$DEB"
