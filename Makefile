# hostel: `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).

SHELL := /bin/bash
# A real interpreter binary, not a shim: every hostelctl start pays for it.
PYTHON := $(shell readlink -f /usr/bin/python3)
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

# DESIGN.md's system packages, plus the toolchain the cffi extension needs and
# the peers the benchmarks compare against.
APT_PACKAGES := dbus busybox-static squashfs-tools libseccomp-dev python3-seccomp \
	libcryptsetup-dev cryptsetup-bin systemd-container strace iproute2 util-linux \
	gcc python3-dev python3-venv hyperfine crun runc \
	fdisk e2fsprogs dosfstools xfsprogs btrfs-progs attr libcap2-bin

NATIVE_SOURCES := $(wildcard bindings/*.c bindings/*.h) bindings/build_native.py

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc

.PHONY: setup apt venv bytecode busybox-tree test demo install bench clean

BUSYBOX_TREE ?= /var/lib/hostel/machines/busybox

setup: apt venv bytecode busybox-tree

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
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

test: setup
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(VPY) scripts/demo.py

bench: setup
	$(VPY) bench/run.py

# Console scripts link to the venv; bus policy, activation, unit and tmpfiles
# go where dbus-daemon and systemd look for local additions.
install: setup
	install -d $(DESTDIR)$(PREFIX)/bin
	for tool in hosteld hostelctl; do \
		ln -sf $(CURDIR)/$(VENV)/bin/$$tool $(DESTDIR)$(PREFIX)/bin/$$tool; done
	# The generator runs at every boot: a lean launcher (python -I -S), not pip's wrapper.
	sed -e 's|@PYTHON@|$(PYTHON)|' -e 's|@PKGDIR@|$(CURDIR)/daemon|' \
		bin/hostel-cryptsetup-generator.in > $(DESTDIR)$(PREFIX)/bin/hostel-cryptsetup-generator
	chmod 755 $(DESTDIR)$(PREFIX)/bin/hostel-cryptsetup-generator
	install -D -m 644 dbus/org.hostel1.conf $(DESTDIR)/usr/share/dbus-1/system.d/org.hostel1.conf
	install -D -m 644 dbus/org.hostel1.service $(DESTDIR)/usr/share/dbus-1/system-services/org.hostel1.service
	install -D -m 644 systemd/hosteld.service $(DESTDIR)$(SYSCONFDIR)/systemd/system/hosteld.service
	install -D -m 644 systemd/hostel.tmpfiles.conf $(DESTDIR)/usr/lib/tmpfiles.d/hostel.conf
	install -d $(DESTDIR)$(SYSCONFDIR)/systemd/system-generators
	ln -sf $(PREFIX)/bin/hostel-cryptsetup-generator \
		$(DESTDIR)$(SYSCONFDIR)/systemd/system-generators/systemd-cryptsetup-generator

clean:
	rm -rf $(VENV) build daemon/*.egg-info daemon/hostel/_native*.so
