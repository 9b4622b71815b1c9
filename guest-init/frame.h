/* Frames on the guest -> host message channel, byte for byte as
   hostel.guest.channel.encode makes them: a 4-byte big-endian length, then
   compact JSON (json.dumps with separators=(",", ":") and ensure_ascii). */
#ifndef HOSTEL_GUEST_FRAME_H
#define HOSTEL_GUEST_FRAME_H

#define FRAME_MAX (1u << 20)

/* Each returns 0, or -1 with errno set (a frame that cannot be written is
   not worth dying for: the caller decides). A negative fd sends nothing. */
int frame_started(int fd, long pid);
int frame_exit(int fd, int code);
int frame_log(int fd, const char *level, const char *message);

#endif
