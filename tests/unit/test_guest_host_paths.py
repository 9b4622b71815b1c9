"""User-given host paths (disks, kernel, initrd) are opened without blocking,
and only files of a type that makes sense are taken: a FIFO disk used to block
the launcher's open(2) for ever, a directory or character device was taken as
an empty disk, /dev/zero as a kernel was read until memory ran out, and a
huge sparse kernel was read whole before its size was looked at."""
from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel.guest import boot, devices, loader
from hostel.guest.errors import BadKernel, GuestError
from hostel.guest.memory import GuestMemory

OPEN_TIMEOUT = 5.0  # seconds; a refusal takes microseconds, a blocked open for ever


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    yield path
    # a test that failed left a thread blocked opening it for reading: free it
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # ENXIO: no reader is waiting
    os.close(fd)


def refusal(action: Callable[[], object]) -> BaseException:
    """The exception `action` raises, within OPEN_TIMEOUT (a hang fails the test;
    the fifo fixture frees the thread left blocked)."""
    pool = ThreadPoolExecutor(1)
    try:
        future = pool.submit(action)
        try:
            future.exception(OPEN_TIMEOUT)
        except FutureTimeout:
            pytest.fail(f"still blocked after {OPEN_TIMEOUT} s")
        error = future.exception()
        assert error is not None, "accepted, not refused"
        return error
    finally:
        pool.shutdown(wait=False)


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_a_fifo_disk_is_refused_at_once(fifo: Path, read_only: bool) -> None:
    error = refusal(lambda: devices.block_device(fifo, read_only, 0))
    assert isinstance(error, GuestError)
    assert str(error) == (f"the disk image {fifo} is a FIFO: pass a regular file (a disk "
                          "image) or a block device")


def test_a_directory_disk_is_refused(tmp_path: Path) -> None:
    error = refusal(lambda: devices.block_device(tmp_path, True, 0))
    assert isinstance(error, GuestError)
    assert f"the disk image {tmp_path} is a directory" in str(error)


def test_a_character_device_disk_is_refused() -> None:
    error = refusal(lambda: devices.block_device(Path("/dev/null"), False, 0))
    assert isinstance(error, GuestError)
    assert "the disk image /dev/null is a character device: pass a regular file" in str(error)


def test_a_refused_disk_leaves_no_descriptor_open(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(GuestError):
        devices.block_device(tmp_path, True, 0)
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_regular_file_disk_is_blocking_with_its_capacity(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * 512))
    device = devices.block_device(image, False, 0)
    try:
        fd = device.queues[0][1]
        assert os.get_blocking(fd)
        assert device.capacity == 8
    finally:
        device.close()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(3 << 20)
    name = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        yield Path(name)
    finally:
        subprocess.run(["losetup", "--detach", name], check=True)


def test_a_block_device_disk_is_taken_with_its_real_size(loop_device: Path) -> None:
    """st_size of a block device is 0: the capacity comes from its end."""
    device = devices.block_device(loop_device, True, 0)
    try:
        assert device.capacity == (3 << 20) // 512
        assert os.get_blocking(device.queues[0][1])
    finally:
        device.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(64 << 20) as mem:
        yield mem


def test_a_fifo_kernel_is_refused_at_once(memory: GuestMemory, fifo: Path) -> None:
    error = refusal(lambda: loader.load_kernel(memory, fifo))
    assert isinstance(error, BadKernel)
    assert str(error) == f"the kernel {fifo} is a FIFO: pass the kernel as a regular file"


def test_dev_zero_as_kernel_is_refused_unread(memory: GuestMemory) -> None:
    """It never ends: read whole, it filled memory until MemoryError."""
    error = refusal(lambda: loader.load_kernel(memory, Path("/dev/zero")))
    assert isinstance(error, BadKernel)
    assert "the kernel /dev/zero is a character device" in str(error)


def test_a_directory_kernel_is_refused(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(BadKernel, match=f"the kernel {tmp_path} is a directory"):
        loader.load_kernel(memory, tmp_path)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_vast_sparse_kernel_is_refused_by_its_size_unread(memory: GuestMemory,
                                                            tmp_path: Path) -> None:
    """15 TiB: read whole, this was a MemoryError (or the host's memory, filled)."""
    kernel = sparse(tmp_path / "vast", 15 << 40)
    started = time.monotonic()
    with pytest.raises(BadKernel) as info:
        loader.load_kernel(memory, kernel)
    assert time.monotonic() - started < 1.0
    assert str(info.value) == (
        f"the kernel {kernel} is 16492674416640 bytes (15728640.0 MiB); guest memory is 64 MiB "
        "(67108864 bytes (64.0 MiB)): give the guest more memory or pass a smaller kernel")


def test_a_kernel_larger_than_guest_memory_is_refused_before_reading(memory: GuestMemory,
                                                                     tmp_path: Path) -> None:
    """Just over the guest's 64 MiB: refused by its size, not read and then found
    to be no kernel (which is all the loader could say before)."""
    kernel = sparse(tmp_path / "big", (64 << 20) + 1)
    with pytest.raises(BadKernel, match=r"is 67108865 bytes .*guest memory is 64 MiB"):
        loader.load_kernel(memory, kernel)


def test_an_initrd_larger_than_its_room_is_refused_before_reading(memory: GuestMemory,
                                                                  tmp_path: Path) -> None:
    kernel = loader.LoadedKernel("elf", boot.KERNEL_GPA, boot.ZERO_PAGE_GPA,
                                 (loader.Segment(boot.KERNEL_GPA, 4096, 4096),))
    initrd = sparse(tmp_path / "initrd", 1 << 40)
    with pytest.raises(BadKernel, match=r"the initrd .* is 1099511627776 bytes .*has room for"):
        loader.load_initrd(memory, kernel, initrd)


def test_a_fifo_initrd_is_refused_at_once(memory: GuestMemory, fifo: Path) -> None:
    kernel = loader.LoadedKernel("elf", boot.KERNEL_GPA, boot.ZERO_PAGE_GPA,
                                 (loader.Segment(boot.KERNEL_GPA, 4096, 4096),))
    error = refusal(lambda: loader.load_initrd(memory, kernel, fifo))
    assert isinstance(error, BadKernel) and "is a FIFO" in str(error)
