"""org.freedesktop.machine1.Image objects, and the pool operations machine1's Manager
and the image objects share (machine/pool_images.py does the work, in a thread).

An image object at /org/freedesktop/machine1/image/NAME exists for every image
the pool had when last listed or looked up (machinectl always calls ListImages
or GetImage first); its properties are what that look-up read. Removing or
renaming an image used by a running machine is refused, naming the machine."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from hostel.bus import Dispatcher, InvalidArgs, escape_path_label, mutating
from hostel.machine import pool_images
from hostel.machine.pool_images import Image

IMAGE_PREFIX = "/org/freedesktop/machine1/image"
T = TypeVar("T")
# Clones, removals and copies can take minutes: they get threads of their own, so
# that a few of them never hold up the short blocking calls (os-release reads,
# spawns) that share asyncio's default executor.
_LONG_WORK = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hostel-image-work")


async def run_long(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on a thread for long file work; the event loop keeps serving."""
    return await asyncio.get_running_loop().run_in_executor(_LONG_WORK, work, *args)


def image_path(name: str) -> str:
    return f"{IMAGE_PREFIX}/{escape_path_label(name)}"


class Machine1Image(ServiceInterface):
    def __init__(self, image: Image, images: "ImagePool") -> None:
        super().__init__("org.freedesktop.machine1.Image")
        self.image = image
        self.images = images

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.image.name

    @dbus_property(access=PropertyAccess.READ)
    def Path(self) -> "s":
        return self.image.path

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":
        return self.image.type

    @dbus_property(access=PropertyAccess.READ)
    def ReadOnly(self) -> "b":
        return self.image.read_only

    @dbus_property(access=PropertyAccess.READ)
    def CreationTimestamp(self) -> "t":
        return self.image.crtime_us

    @dbus_property(access=PropertyAccess.READ)
    def ModificationTimestamp(self) -> "t":
        return self.image.mtime_us

    @dbus_property(access=PropertyAccess.READ)
    def Usage(self) -> "t":
        return self.image.usage

    @dbus_property(access=PropertyAccess.READ)
    def Limit(self) -> "t":
        return self.image.limit

    @dbus_property(access=PropertyAccess.READ)
    def UsageExclusive(self) -> "t":
        return self.image.usage_exclusive

    @dbus_property(access=PropertyAccess.READ)
    def LimitExclusive(self) -> "t":
        return self.image.limit_exclusive

    @dbus_method()
    @mutating
    async def Remove(self):
        await self.images.remove(self.image.name)

    @dbus_method()
    @mutating
    async def Rename(self, new_name: "s"):
        await self.images.rename(self.image.name, new_name)

    @dbus_method()
    @mutating
    async def Clone(self, new_name: "s", read_only: "b"):
        await self.images.clone(self.image.name, new_name, read_only)

    @dbus_method()
    @mutating
    async def MarkReadOnly(self, read_only: "b"):
        await self.images.mark_read_only(self.image.name, read_only)

    @dbus_method()
    @mutating
    async def SetLimit(self, limit: "t"):
        await self.images.set_limit(self.image.name, limit)


class ImagePool:
    """The pool's images on the bus: look-ups export their objects, changes re-sync."""

    def __init__(self, dispatcher: Dispatcher, dirs: Callable[[], list[str]],
                 machines_using: Callable[[Image], list[str]]) -> None:
        self.dispatcher = dispatcher
        self.dirs = dirs
        self.machines_using = machines_using  # names of running machines on an image
        self.objects: dict[str, Machine1Image] = {}

    def _export(self, image: Image) -> None:
        known = self.objects.get(image.name)
        if known is None:
            self.objects[image.name] = Machine1Image(image, self)
            self.dispatcher.export(image_path(image.name), self.objects[image.name])
        else:
            known.image = image

    def _unexport(self, name: str) -> None:
        known = self.objects.pop(name, None)
        if known is not None:
            self.dispatcher.unexport(image_path(name), known)

    async def discover(self) -> list[Image]:
        images = await asyncio.to_thread(pool_images.discover, self.dirs())
        for gone in set(self.objects) - {i.name for i in images}:
            self._unexport(gone)
        for image in images:
            self._export(image)
        return images

    async def get(self, name: str) -> Image:
        try:
            image = await asyncio.to_thread(pool_images.find, name, self.dirs())
        except pool_images.NoSuchImage:
            self._unexport(name)
            raise
        self._export(image)
        return image

    @staticmethod
    def list_entry(image: Image) -> list[Any]:
        """ListImages' (ssbttto)."""
        return [image.name, image.type, image.read_only, image.crtime_us, image.mtime_us,
                image.usage, image_path(image.name)]

    async def metadata(self, name: str, read: Callable[[Image], T]) -> T:
        """One of GetImageHostname/MachineID/MachineInfo/OSRelease (`read` reads it)."""
        return await asyncio.to_thread(read, await self.get(name))

    async def clone(self, name: str, new_name: str, read_only: bool) -> None:
        image = await self.get(name)
        await run_long(pool_images.clone, image, new_name, read_only, self.dirs())
        await self.get(new_name)

    async def rename(self, name: str, new_name: str) -> None:
        image = await self.get(name)
        pool_images.refuse_if_busy(image, self.machines_using(image), "rename")
        await run_long(pool_images.rename, image, new_name, self.dirs())
        self._unexport(name)
        await self.get(new_name)

    async def mark_read_only(self, name: str, read_only: bool) -> None:
        image = await self.get(name)
        await asyncio.to_thread(pool_images.mark_read_only, image, read_only)
        await self.get(name)

    async def remove(self, name: str) -> None:
        image = await self.get(name)
        pool_images.refuse_if_busy(image, self.machines_using(image), "remove")
        await run_long(pool_images.remove, image)
        self._unexport(name)

    async def clean(self, mode: str) -> list[list[Any]]:
        """machinectl clean: "all" removes every image no running machine uses and says
        which with their usage; "hidden" finds none, as the pool keeps no hidden images
        (names starting with '.' are never images here)."""
        if mode not in ("hidden", "all"):
            raise InvalidArgs(f"Unknown mode '{mode}': use 'hidden' or 'all'")
        removed: list[list[Any]] = []
        for image in await self.discover() if mode == "all" else []:
            if self.machines_using(image):
                continue  # kept, as machined keeps a busy image
            await run_long(pool_images.remove, image)
            self._unexport(image.name)
            removed.append([image.name, image.usage])
        return removed

    async def set_limit(self, name: str | None, limit: int) -> None:
        pool_images.set_limit(None if name is None else await self.get(name), limit)
