#!/usr/bin/env bash
# Build the pydstack guest image (run by `make image`), cached outside the repo.
#
#   image/build.sh [--force]
#   env: PYDSTACK_IMAGE_CACHE (default ~/.cache/pydstack/images), IMAGE_NAME (pydstack-dev),
#        IMAGE_SUITE (bookworm), PYTHON (.venv/bin/python, for pip)
#
# Layout of $PYDSTACK_IMAGE_CACHE/$IMAGE_NAME (a symlink to .store/$IMAGE_NAME-<digest>), like
# dstack's image directory:
#   metadata.json  kernel/initrd/hda/cmdline/version (dstack's ImageInfo fields)
#   bzImage        the host's Debian kernel (linux-image-amd64); dm-crypt etc. are modules
#                  in the root filesystem, loaded by the boot flow for the LUKS2 data disk
#   initramfs.cpio.gz  a small busybox initramfs: loads virtio + ext4, mounts /dev/vda, switches
#                  root (Debian's own initrd is 30 MB and costs ~15 s to unpack under TCG)
#   rootfs.qcow2   ext4 root disk; a VM boots from a qcow2 overlay on it ("hda" in dstack)
#   sha256sum.txt  sha256 of the files above;  digest.txt = sha256(sha256sum.txt) = os_image_hash
#   inputs.sha256  hash of everything the build read; a build with the same inputs is skipped
#
# Three cached layers make a rebuild after a code change cost only the last step:
#   1. Debian root filesystem (mmdebstrap directory, keyed by suite + package list)
#   2. Python dependencies of pydstack (pip --target, keyed by pyproject.toml)
#   3. this repo's pydstack + pydstack_guest, kernel modules, our units -> ext4 -> qcow2
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${PYDSTACK_IMAGE_CACHE:-$HOME/.cache/pydstack/images}
NAME=${IMAGE_NAME:-pydstack-dev}
SUITE=${IMAGE_SUITE:-bookworm}
VERSION=0.1.0
PY=${PYTHON:-$REPO/.venv/bin/python}
OUT=$CACHE/$NAME
LAYERS=$CACHE/.layers
FORCE=${1:-}
# cryptsetup-bin + dmsetup (its udev rules: without them libdevmapper waits for udev forever)
# + e2fsprogs: the LUKS2 data disk (pydstack_guest.data_disk).
PACKAGES=systemd-sysv,udev,dbus,kmod,iproute2,python3,docker.io,ca-certificates,procps,wireguard-go,wireguard-tools
PACKAGES+=,cryptsetup-bin,dmsetup,e2fsprogs
# docker-compose (1.29, Debian's): runs the app's compose file as written (pydstack_guest.compose_cli)
PACKAGES+=,docker-compose
ROOT_SIZE=4G
CMDLINE="console=ttyS0 root=/dev/vda rw apparmor=0 net.ifnames=0 loglevel=4 cryptomgr.notests"
CMDLINE+=" random.trust_cpu=on systemd.show_status=auto"

# Bytecode made here (the host's python is the guest's 3.11), unchecked: under TCG compiling
# the boot flow's imports at first boot costs a minute.
pyc() { "$PY" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$1" >/dev/null || true; }
log() { printf '[image %s] %s\n' "$(date +%T)" "$*" >&2; }
sha() { sha256sum | cut -c1-16; }

# The kernel is the host's linux-image-amd64 (virtio_blk and ext4 are modules: see initramfs).
KVER=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[^ ,]*' \
       | head -1 | sed 's/^linux-image-//')
[ -f "/boot/vmlinuz-$KVER" ] && [ -d "/lib/modules/$KVER" ] && [ -x /bin/busybox ] \
  || { echo "need linux-image-amd64 ($KVER) and busybox-static: run make sysdeps" >&2; exit 1; }

mkdir -p "$CACHE" "$LAYERS"
exec 9>"$CACHE/.build.lock"
flock 9  # one build at a time (parallel test workers may ask together)

BASE_KEY=$(echo "$SUITE $PACKAGES" | sha)
DEPS_KEY=$( { echo pyc1; cat "$REPO/pyproject.toml"; } | sha)
INPUTS=$( { echo "$BASE_KEY $DEPS_KEY $KVER $CMDLINE $VERSION";
            cat "$HERE/build.sh";
            find "$HERE/rootfs" "$REPO/pydstack" "$REPO/pydstack_guest" -type f -name '*' \
              ! -name '*.pyc' 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum; } | sha256sum \
          | cut -d' ' -f1)
if [ "$FORCE" != "--force" ] && [ -f "$OUT/inputs.sha256" ] \
   && [ "$(cat "$OUT/inputs.sha256")" = "$INPUTS" ] && [ -f "$OUT/digest.txt" ]; then
  log "up to date: $OUT"
  exit 0
fi
T0=$(date +%s)

# ---- layer 1: Debian root filesystem -------------------------------------------------------
BASE=$LAYERS/base-$BASE_KEY
if [ ! -d "$BASE" ]; then
  log "mmdebstrap $SUITE ($PACKAGES)"
  rm -rf "$BASE.tmp"
  mmdebstrap --variant=minbase --format=directory --include="$PACKAGES" --components=main \
    "$SUITE" "$BASE.tmp" http://deb.debian.org/debian
  mv "$BASE.tmp" "$BASE"
fi

# ---- layer 2: Python dependencies of pydstack (the guest agent imports pydstack.adapters) --
DEPS=$LAYERS/pydeps-$DEPS_KEY
if [ ! -d "$DEPS" ]; then
  log "pip install --target (pydstack dependencies)"
  mapfile -t reqs < <("$PY" -c 'import tomllib,sys; [print(d) for d in
    tomllib.load(open(sys.argv[1],"rb"))["project"]["dependencies"]]' "$REPO/pyproject.toml")
  rm -rf "$DEPS.tmp"
  "$PY" -m pip install -q --no-compile --target "$DEPS.tmp" "${reqs[@]}"
  pyc "$DEPS.tmp"
  mv "$DEPS.tmp" "$DEPS"
fi

# ---- layer 3: assemble ---------------------------------------------------------------------
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
R=$WORK/rootfs
mkdir -p "$R"
cp -a "$BASE"/. "$R"/

log "kernel modules $KVER (storage, network, filesystems, virtio, input)"
M=/lib/modules/$KVER
mkdir -p "$R$M/kernel/drivers"
cp -a "$M"/modules.order "$M"/modules.builtin* "$R$M/"
for d in arch block crypto fs lib mm net; do cp -a "$M/kernel/$d" "$R$M/kernel/"; done
for d in net virtio block char input acpi md vhost hid; do
  [ -d "$M/kernel/drivers/$d" ] && cp -a "$M/kernel/drivers/$d" "$R$M/kernel/drivers/"
done
# udev would load these for CPU flags or buses a CVM never has; each costs seconds under TCG.
rm -rf "$R$M/kernel/arch/x86/kvm" "$R$M/kernel/drivers/net/wireless" "$R$M/kernel/net/wireless" \
       "$R$M/kernel/net/mac80211" "$R$M/kernel/net/bluetooth" "$R$M/kernel/drivers/net/usb"
depmod -b "$R" "$KVER"
# The data disk (LUKS2, aes-xts-plain64) needs device-mapper + dm-crypt, xts and the kernel's
# userspace crypto API (cryptsetup's keyslot cipher); modprobe loads them in the booted system.
for m in dm_mod dm_crypt xts algif_skcipher; do
  modprobe -d "$R" -S "$KVER" --show-depends "$m" >/dev/null \
    || { echo "module $m missing from the image (needed for the LUKS2 data disk)" >&2; exit 1; }
done

log "initramfs (busybox + virtio/ext4 modules)"
I=$WORK/initramfs
mkdir -p "$I/bin" "$I/dev" "$I/proc" "$I/sys" "$I/root" "$I/modules"
cp /bin/busybox "$I/bin/busybox"
modprobe -S "$KVER" -a --show-depends virtio_pci virtio_blk ext4 \
  | awk '$1 == "insmod" && !seen[$2]++ {print $2}' > "$WORK/initramfs.modules"
while read -r ko; do cp "$ko" "$I/modules/"; basename "$ko"; done \
  < "$WORK/initramfs.modules" > "$I/modules/order"
cat > "$I/init" <<'INIT'
#!/bin/busybox sh
# Load virtio + ext4 (crc32c-intel may fail on CPUs without SSE4.2: the generic one serves),
# mount the root disk and hand over to systemd.
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
while read -r m; do $B insmod "/modules/$m" 2>/dev/null; done < /modules/order
for _ in $($B seq 1 200); do [ -b /dev/vda ] && break; $B sleep 0.05; done
$B mount -t ext4 -o rw /dev/vda /root || { echo "initramfs: cannot mount /dev/vda"; exec $B sh; }
$B umount /proc /sys; $B mount --move /dev /root/dev
exec $B switch_root /root /sbin/init
INIT
chmod 0755 "$I/init"

log "pydstack + guest package"
L=$R/opt/pydstack/lib
mkdir -p "$L"
cp -a "$DEPS"/. "$L"/
for pkg in pydstack pydstack_guest; do
  if [ -d "$REPO/$pkg" ]; then
    (cd "$REPO" && find "$pkg" -name '*.py' -o -name 'py.typed') | (cd "$REPO" && cpio -pdm "$L" 2>/dev/null)
  else
    log "no $pkg/ in the repo: the image runs without it"
  fi
done
for pkg in pydstack pydstack_guest; do [ -d "$L/$pkg" ] && pyc "$L/$pkg"; done

cp -a "$HERE/rootfs"/. "$R"/
chmod 0755 "$R/usr/local/lib/pydstack/"*
echo pydstack-guest > "$R/etc/hostname"
printf '/dev/vda / ext4 rw,x-systemd.growfs 0 1\n' > "$R/etc/fstab"
printf 'pydstack guest image %s (%s)\n' "$VERSION" "$SUITE" > "$R/etc/pydstack-release"
passwd -R "$R" -d root >/dev/null  # console login for debugging; the image is a dev image
W=$R/etc/systemd/system
mkdir -p "$W/multi-user.target.wants" "$W/sockets.target.wants"
for u in pydstack-boot.service pydstack-guest-agent.service; do
  ln -sf "/etc/systemd/system/$u" "$W/multi-user.target.wants/$u"
done
ln -sf /lib/systemd/system/systemd-networkd.service "$W/multi-user.target.wants/"
ln -sf /lib/systemd/system/systemd-networkd.socket "$W/sockets.target.wants/"
rm -f "$R/etc/machine-id"; : > "$R/etc/machine-id"  # systemd makes one per boot
# Units a CVM does not need, each a few seconds of emulated CPU at boot.
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
         fstrim.timer e2scrub_reap.service getty@tty1.service systemd-binfmt.service; do
  ln -sf /dev/null "$W/$u"
done
rm -rf "$R/var/cache/apt/archives/"*.deb "$R/var/lib/apt/lists/"*

log "ext4 ($ROOT_SIZE sparse) -> qcow2"
truncate -s "$ROOT_SIZE" "$WORK/root.raw"
mkfs.ext4 -q -F -L pydstack-root -d "$R" "$WORK/root.raw"
STAGE=$WORK/out
mkdir -p "$STAGE"
qemu-img convert -O qcow2 "$WORK/root.raw" "$STAGE/rootfs.qcow2"
cp "/boot/vmlinuz-$KVER" "$STAGE/bzImage"
(cd "$I" && find . | cpio -o -H newc --quiet | gzip -1) > "$STAGE/initramfs.cpio.gz"
cat > "$STAGE/metadata.json" <<EOF
{
  "bios": null,
  "cmdline": "$CMDLINE",
  "hda": "rootfs.qcow2",
  "initrd": "initramfs.cpio.gz",
  "is_dev": true,
  "kernel": "bzImage",
  "rootfs": null,
  "shared_ro": true,
  "version": "$VERSION",
  "kernel_version": "$KVER",
  "guest_events_port": "org.pydstack.events",
  "guest_http_port": 8080
}
EOF
# dstack's rule: sha256sum.txt lists the boot artifacts, os_image_hash = sha256(sha256sum.txt)
(cd "$STAGE" && sha256sum bzImage initramfs.cpio.gz rootfs.qcow2 metadata.json > sha256sum.txt \
  && sha256sum sha256sum.txt | cut -d' ' -f1 > digest.txt)
echo "$INPUTS" > "$STAGE/inputs.sha256"

# $OUT is a symlink to an immutable build: a VM disk created on an older build keeps its
# backing file (Image.load resolves the link) while new VMs get the new one. The last
# $KEEP builds of a name are kept; VMs on an older one need their image rebuilt or recreated.
STORE=$CACHE/.store
KEEP=3
mkdir -p "$STORE"
FINAL=$STORE/$NAME-$(cut -c1-16 "$STAGE/digest.txt")
rm -rf "$FINAL"
mv "$STAGE" "$FINAL"
[ -L "$OUT" ] || rm -rf "$OUT"  # a plain directory from an earlier layout
ln -sfn ".store/$(basename "$FINAL")" "$OUT.link"
mv -T "$OUT.link" "$OUT"
# shellcheck disable=SC2012  # names are ours: no spaces
ls -1dt "$STORE/$NAME"-* | tail -n +$((KEEP + 1)) | xargs -r rm -rf
log "built $OUT in $(( $(date +%s) - T0 )) s: digest $(cat "$OUT/digest.txt")"
