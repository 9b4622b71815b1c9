#!/bin/sh
# What a container looks like from the inside, one section per aspect, for
# test_machine_nspawn_compare: the same script runs under systemd-nspawn 252
# and under `hostelctl run`, and the two outputs are compared line by line.
# It prints only what does not change from one run to the next (no times,
# inode numbers, pids other than the container's own, random ids), and it
# changes nothing in the tree it runs on (whatever it writes, it removes).
# Busybox sh and applets only; systemd-detect-virt runs through the dynamic
# loader when the test has copied it (and its libraries) into /usr.

section() { echo "@@ $1"; }
try() {  # try NAME COMMAND...: what the operation does, with busybox's own error text
    name=$1; shift
    if out=$("$@" 2>&1); then echo "$name: ok"; else echo "$name: failed: $out" | head -n 1; fi
}

section ID
echo "pid=$$ uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "user=$(id -un 2>&1) hostname=$(hostname) cwd=$(pwd) umask=$(umask)"
echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline)"
echo "arch=$(uname -m)"
echo "tty=$(tty 2>&1)"
echo "machine-id=$(sed 's/^[0-9a-f]\{32\}$/<32 hex digits>/' /etc/machine-id 2>&1)"
echo "oom_score_adj=$(cat /proc/self/oom_score_adj)"
grep -E '^(Cpus_allowed_list|NoNewPrivs|Seccomp|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status
echo "uid_map=$(tr -s ' ' < /proc/self/uid_map | sed 's/^ //')"
echo "gid_map=$(tr -s ' ' < /proc/self/gid_map | sed 's/^ //')"

section ENVIRONMENT  # the shell's own variables (PWD, SHLVL) are left out
env | grep -vE '^(PWD|SHLVL|OLDPWD|_)=' | sed 's/^\(container_uuid\)=[0-9a-f-]\{36\}$/\1=<uuid>/' | sort

section MOUNTS  # mount point, per-mount flags, type, the super block options that say something
awk '{
    for (i = 7; $i != "-"; i++) ;
    n = split($(i + 3), sb, ","); keep = ""
    for (j = 1; j <= n; j++)
        if (sb[j] ~ /^(ro|rw|mode=|size=|nr_inodes=|uid=|gid=|subset=|hidepid=|nsdelegate|ptmxmode=|newinstance)/)
            keep = keep (keep == "" ? "" : ",") sb[j]
    print $5, $6, $(i + 1), keep
}' /proc/self/mountinfo

section DEV  # every node and link in /dev (not the pty numbers of /dev/pts)
for f in /dev/* /dev/*/*; do
    case $f in /dev/pts/[0-9]*|/dev/fd/*) continue ;; esac
    [ -e "$f" ] || [ -L "$f" ] || continue
    stat -c '%n %F %a %u:%g %t:%T' "$f"
    [ -L "$f" ] && echo "  -> $(readlink "$f")"
done

section NETWORK  # interfaces with flags and MTU, and their IPv4 addresses
ip -o link | sed 's/^[0-9]*: //; s/@if[0-9]*//; s/ link\/ether [0-9a-f:]*/ link\/ether <mac>/; s/ brd [0-9a-f:]*//; s/ qdisc [a-z_]*//; s/ qlen [0-9]*//; s/ group [a-z]*//' | tr -s ' '
ip -o -4 addr | awk '{print $2, $3, $4}'

section CGROUP
cat /proc/self/cgroup
ls -1 /sys/fs/cgroup

section LIMITS
cat /proc/self/limits

section BLOCKED  # what operations a container may not, or may, do
mkdir -p /tmp/.probe
try "write /" touch /.probe-root
rm -f /.probe-root
try "write /usr" touch /usr/.probe-usr
rm -f /usr/.probe-usr
try "write /tmp" touch /tmp/.probe/file
try "mknod /dev/null-like" mknod /tmp/.probe/null c 1 3
try "mknod /dev/sda-like" mknod /tmp/.probe/sda b 8 0
try "open mknod'd null" sh -c 'echo x > /tmp/.probe/null'
try "mount tmpfs" mount -t tmpfs probe /tmp/.probe
umount /tmp/.probe 2>/dev/null
try "write /proc/sys" sh -c 'echo 1 > /proc/sys/kernel/domainname'
try "remount /proc/sys rw" mount -o remount,bind,rw /proc/sys
try "write /sys" sh -c 'echo 1 > /sys/kernel/profiling'
try "sethostname" hostname probe-renamed
hostname "$(cat /proc/sys/kernel/hostname)" 2>/dev/null
try "add a link" ip link add probe0 type dummy
ip link del probe0 2>/dev/null
try "chown" chown 1:1 /tmp/.probe/file
try "chroot" chroot / true
try "kill PID 1" kill -0 1
try "read /dev/kmsg" head -c 1 /dev/kmsg
try "swapon" swapon /tmp/.probe/file
try "su to user" su -s /bin/true user
rm -rf /tmp/.probe

section DETECT  # what systemd-detect-virt (and so a systemd inside) decides from
echo "run/systemd/container=$(cat /run/systemd/container 2>&1)"
echo "run/host/container-manager=$(cat /run/host/container-manager 2>&1)"
if [ -x /usr/lib64/ld-linux-x86-64.so.2 ]; then
    echo "systemd-detect-virt=$(/usr/lib64/ld-linux-x86-64.so.2 /usr/bin/systemd-detect-virt 2>&1)"
fi
echo "@@ END"
