/* The guest's file systems, in init.py's order: early API mounts, the image
   and config squashfs devices read-only, an overlay with a tmpfs upper, the
   API file systems moved into the new root, and the chroot. Every function
   returns 0, or -1 with a message naming the step and object in `error`. */
#ifndef HOSTEL_GUEST_MOUNTS_H
#define HOSTEL_GUEST_MOUNTS_H

#include <stddef.h>
#include <sys/types.h>

/* DIR/NAME without a doubled slash, as os.path.join makes it ("/" + "x" is "/x"). */
void join_path(char *out, size_t size, const char *dir, const char *name);

/* mkdir -p; `mode` (if not -1) is applied only to a directory made here. */
int make_dirs(const char *path, mode_t mode);

int mounts_early(char *error, size_t error_size);
int mounts_squashfs(const char *device, const char *where, char *error, size_t error_size);
/* Builds WORK/overlay and WORK/newroot over WORK/image; leaves cwd in the new root. */
int mounts_new_root(const char *work, char *error, size_t error_size);
/* Moves /sys, /proc, /dev into the new root (cwd) and chroots into it. */
int mounts_enter_new_root(char *error, size_t error_size);

#endif
