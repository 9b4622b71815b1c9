/* Opening paths inside a directory tree that belongs to someone else.
 *
 * A container's tree is the guest's: its symlinks and ".." must resolve as
 * if the tree were "/", never to the host's files. openat2(RESOLVE_IN_ROOT)
 * makes the kernel do that (absolute links and ".." stop at the tree's root),
 * and RESOLVE_NO_MAGICLINKS refuses /proc-style links that would jump out.
 * Only system calls: the spawn trampoline uses these in its child. */
#ifndef HOSTEL_BENEATH_H
#define HOSTEL_BENEATH_H

/* openat2(rootfd, path, flags, mode) confined to rootfd; returns an fd or -errno. */
int hostel_openat_beneath(int rootfd, const char *path, int flags, int mode);

/* The same with the root named by a (trusted) path; returns an fd or -errno. */
int hostel_open_beneath(const char *root, const char *path, int flags, int mode);

/* The f_type (statfs(2)) of the file system fd is on, or -errno: kernel
 * interfaces such as /proc/kmsg pass as regular files and block readers. */
long hostel_fs_type(int fd);

#endif
