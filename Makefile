# hostel: `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).

SHELL := /bin/bash
# A real interpreter binary, not a shim: every hostelctl start pays for it.
# Expanded where used: on a fresh machine python3 arrives with the `apt` step.
PYTHON = $(shell readlink -f /usr/bin/python3)
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

# DESIGN.md's system packages, plus the toolchain the cffi extension needs and
# the peers the benchmarks compare against; systemd ships the cryptsetup
# generator the oracle tests compare ours with.
APT_PACKAGES := dbus busybox-static squashfs-tools libseccomp-dev python3-seccomp \
	libcryptsetup-dev cryptsetup-bin systemd-container strace iproute2 util-linux \
	gcc python3-dev python3-venv hyperfine crun runc \
	fdisk e2fsprogs dosfstools xfsprogs btrfs-progs attr libcap2-bin \
	qemu-system-x86 skopeo docker-registry mmdebstrap acpica-tools \
	systemd musl-tools kmod groff-base man-db iptables

NATIVE_SOURCES := $(wildcard bindings/*.c bindings/*.h bindings/build_*.py)

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc

.PHONY: setup apt venv bytecode busybox-tree kernels guest-init docs test lab-shell demo lint install uninstall bench clean

BUSYBOX_TREE ?= /var/lib/hostel/machines/busybox

setup: apt venv bytecode busybox-tree kernels guest-init docs

# Man pages and bash completion, written from the option tables the code parses with.
docs: venv
	$(VPY) -m hostel.docs build/docs

# Debian's stock kernels, unpacked into a cache (never into /boot): the lab boots
# the generic one, guests the cloud one.
kernels: | apt
	@scripts/fetch-kernels

# The static PID 1 of hostel's VMs (build/guest-init/init), built with musl.
guest-init: | apt
	@$(MAKE) -s -C guest-init

busybox-tree: | apt
	@scripts/make-busybox-tree $(BUSYBOX_TREE)

apt:
	@scripts/ensure-apt-packages $(APT_PACKAGES)

venv: $(VENV)/.installed $(VENV)/bin/hostelctl

# hostelctl's start-up is its speed: a lean launcher replaces pip's wrapper.
$(VENV)/bin/hostelctl: bin/hostelctl.in scripts/write-launcher $(VENV)/.installed
	$(VPY) scripts/write-launcher bin/hostelctl.in $@

# An editable install compiles nothing: without this every hostelctl start
# would compile its modules afresh where bytecode is not written (read-only
# trees, PYTHONDONTWRITEBYTECODE). Only changed files are compiled.
bytecode: venv
	@$(VPY) -m compileall -q daemon/hostel

$(VENV)/.installed: pyproject.toml setup.py $(NATIVE_SOURCES) | apt
	@test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test,lint]'
	@touch $@

test: setup
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The lab VM by hand (tests/lab/README.md): a root shell with the checkout, KVM and
# device-mapper; the lab initramfs is built into /var/cache/hostel/lab on first use.
lab-shell: setup
	PYTHONPATH=tests $(VPY) -m lab.shell

# The demo needs no stock kernels: on a fresh machine it skips their download.
demo: apt venv bytecode busybox-tree
	$(VPY) scripts/demo.py

# The quality gates CI runs: ruff and mypy (the venv's [lint] extra), zero findings.
lint: venv
	$(VENV)/bin/ruff check daemon
	$(VENV)/bin/mypy daemon/hostel

bench: setup
	$(VPY) bench/run.py

# A self-contained install (scripts/install-hostel says how): its own venv in
# $(PREFIX)/lib/hostel built from the project's wheel, launchers in
# $(PREFIX)/bin, bus policy and activation file, unit, tmpfiles snippet, the
# generator in /etc/systemd/system-generators (where it masks systemd's).
install: venv
	@DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' SYSCONFDIR='$(SYSCONFDIR)' PYTHON='$(PYTHON)' \
		VPY='$(VPY)' scripts/install-hostel

uninstall:
	@DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' SYSCONFDIR='$(SYSCONFDIR)' scripts/uninstall-hostel

clean:
	rm -rf $(VENV) build daemon/*.egg-info daemon/hostel/_native*.so
