"""A `guest run --image` container seen as a guest.

Such a container is a machine of the machine runtime (images_service.run_container
starts it there, and the registry is where it lives, is adopted after a restart
and ends). So that every guest is found the same way -- `guest list`, `guest
status`, `guest terminate`, whatever its isolation -- the guest service shows it
through the same org.hostel1.Guest properties a VM has; the facts are read from
the machine each time, so they cannot drift from it."""
from __future__ import annotations

import signal

from hostel.machine.registry import Machine, State

CLASS = "container"
BACKEND = "container"   # what runs it: namespaces, not a hypervisor
# The machine runtime's raw settings of an image run (images_service.machine_settings):
# a machine started otherwise (hostelctl run, machinectl start) has no Isolation.
ISOLATION_KEY, IMAGE_KEY = "Isolation", "Image"
STATUS_UNKNOWN = -1     # adoption's: the leader was not this hosteld's child


def _setting(machine: Machine, key: str) -> str:
    value = machine.settings.get(key)
    return str(getattr(value, "value", value) or "")


def is_image_run(machine: Machine) -> bool:
    """Whether a machine is a guest: started from an image by StartGuest."""
    return bool(_setting(machine, ISOLATION_KEY))


class ContainerGuest:
    """The Guest properties of an image run's machine (the attributes GuestInterface reads)."""

    klass = CLASS
    backend = BACKEND
    memory_mb = 0       # a container has no memory size of its own
    kernel = ""         # nor a kernel: it shares the host's
    console_log = None  # its output went to the client's descriptors

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def image(self) -> str:
        return _setting(self.machine, IMAGE_KEY)

    @property
    def state(self) -> str:
        return self.machine.state.value

    @property
    def pid(self) -> int:
        return self.machine.leader

    @property
    def exit_status(self) -> int:
        return self.machine.exit_status

    @property
    def exit_reason(self) -> str:
        """"exited" (with its status), "killed" (by a signal) or "unknown" (adopted)."""
        if self.machine.state is not State.EXITED:
            return ""
        if self.machine.exit_signal:
            return "killed"
        return "unknown" if self.machine.exit_status == STATUS_UNKNOWN else "exited"

    @property
    def exit_detail(self) -> str:
        reason = self.exit_reason
        if reason == "killed":
            number = self.machine.exit_signal
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            return f"its payload was killed by {name}"
        if reason == "exited":
            return f"its payload exited with status {self.machine.exit_status}"
        if reason == "unknown":
            return "it ended while no hosteld watched it: its exit status is unknown"
        return ""

    def devices(self) -> list[str]:
        return []
