#!/bin/sh
# /init of the lab VM (busybox sh, from the initramfs tests/lab/vm.py builds).
#
# Makes the root the lab's tests run in: the host's root (9p, read-only) under
# an overlay whose upper layer is tmpfs, so everything is writable and nothing
# reaches the host; the checkout read-only at its own path; fresh /proc, /sys,
# /dev, /tmp, /run; the job directory (9p, read-write) at /run/lab. Then it
# loads KVM (nested, on QEMU's emulated SVM), device-mapper, loop and tun, and
# runs /run/lab/job.sh (written by the host) in that root, under busybox's init.
# Its exit status goes to /run/lab/exit-status; the VM powers off after it.
#
# /lab.conf (written with the initramfs) sets LAB_KERNEL_VERSION and
# LAB_MODULES (the kernel cache's modules directory, a path on the host).
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /lab.conf

say() { echo "lab-init: $*" > /dev/console; }
die() {
    say "$*"
    [ -d /newroot/run/lab ] && echo "lab-init: $*" >> /newroot/run/lab/boot-errors
    poweroff -f
}

while read -r module; do
    insmod "/lib/modules/$module" || die "cannot load $module"
done < /lib/modules/load-order

mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
    || die "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=755 lab-rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work lab /newroot \
    || die "cannot mount the overlay on the host's root"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=755 run $R/run
mkdir -p $R/run/lab
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 labjob $R/run/lab \
    || die "cannot mount the job directory (9p tag labjob)"
LAB_REPO=$(cat $R/run/lab/repo 2>/dev/null)   # the checkout's path, written by vm.run

# The checkout read-only, as the host has it (writes would vanish with the VM anyway).
# It may live under a directory that is fresh here (a clone in /tmp, as CI may
# make): its mount point is made in that fresh tmpfs.
if [ -n "$LAB_REPO" ]; then
    [ -d "/host$LAB_REPO" ] || die "the checkout $LAB_REPO is not visible through 9p"
    mkdir -p "$R$LAB_REPO"
    mount --bind "/host$LAB_REPO" "$R$LAB_REPO" || die "cannot bind the checkout $LAB_REPO"
    mount -o remount,bind,ro "$R$LAB_REPO"
fi

# modprobe for everyone (the kernel's own requests too): busybox's, even where the
# host has kmod's, because the cached kernel's modules are indexed in the text
# modules.dep busybox reads (made with the initramfs), not in kmod's binary one.
M=$R/lib/modules/$LAB_KERNEL_VERSION
mkdir -p "$M"
ln -s "$LAB_MODULES/kernel" "$M/kernel"
cp /lib/modules/modules.dep /lib/modules/modules.alias /lib/modules/modules.builtin "$M/"
for tool in modprobe insmod rmmod lsmod; do
    ln -sf /usr/bin/busybox "$R/usr/sbin/$tool"
done
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
for module in kvm_amd dm_crypt loop tun; do
    chroot $R /usr/sbin/modprobe "$module" || say "modprobe $module failed"
done

hostname lab
ip link set lo up

# busybox's init as PID 1, so that every orphan is reaped (a test that waits for
# a process to go must not see a zombie); it runs the job once, then powers off.
cat > $R/run/lab-stage2 <<'EOF2'
sh /run/lab/job.sh
echo $? > /run/lab/exit-status
sync
exec /usr/bin/busybox poweroff
EOF2
echo "::once:/bin/sh /run/lab-stage2" > $R/etc/inittab
say "root ready"
exec switch_root $R /usr/bin/busybox init
