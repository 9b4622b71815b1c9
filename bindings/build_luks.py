"""cffi API-mode build of hostel._luks: libcryptsetup for LUKS volumes, libblkid to find them.

A module of its own, apart from hostel._native, so that the machine side of
hosteld never loads libcryptsetup (and its OpenSSL, json-c, devmapper) and a
host without libcryptsetup-dev can still build the rest. libblkid rides along
because resolving UUID=/LABEL= sources is half of finding a LUKS volume, and
libcryptsetup already links it."""
from cffi import FFI

CDEF = """
struct crypt_device;

/* logging: one process-wide callback, messages collected per calling thread */
#define CRYPT_LOG_NORMAL ...
#define CRYPT_LOG_ERROR ...
void crypt_set_log_callback(struct crypt_device *cd,
                            void (*log)(int level, const char *msg, void *usrptr), void *usrptr);
extern "Python" void hostel_luks_log(int level, const char *msg, void *usrptr);

/* contexts */
int crypt_init(struct crypt_device **cd, const char *device);
int crypt_init_data_device(struct crypt_device **cd, const char *device, const char *data_device);
int crypt_init_by_name(struct crypt_device **cd, const char *name);
void crypt_free(struct crypt_device *cd);
int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);

/* header facts */
const char *crypt_get_type(struct crypt_device *cd);
const char *crypt_get_uuid(struct crypt_device *cd);
const char *crypt_get_cipher(struct crypt_device *cd);
const char *crypt_get_cipher_mode(struct crypt_device *cd);
const char *crypt_get_label(struct crypt_device *cd);
int crypt_keyslot_max(const char *type);
typedef enum { CRYPT_SLOT_INVALID, CRYPT_SLOT_INACTIVE, CRYPT_SLOT_ACTIVE,
               CRYPT_SLOT_ACTIVE_LAST, CRYPT_SLOT_UNBOUND, ... } crypt_keyslot_info;
crypt_keyslot_info crypt_keyslot_status(struct crypt_device *cd, int keyslot);

/* formatting (tests, and a future format verb) */
struct crypt_pbkdf_type {
    const char *type; const char *hash; uint32_t time_ms; uint32_t iterations;
    uint32_t max_memory_kb; uint32_t parallel_threads; uint32_t flags;
};
#define CRYPT_PBKDF_NO_BENCHMARK ...
struct crypt_params_luks1 { const char *hash; size_t data_alignment; const char *data_device; };
struct crypt_params_luks2 {
    const struct crypt_pbkdf_type *pbkdf; const char *integrity;
    const void *integrity_params; size_t data_alignment; const char *data_device;
    uint32_t sector_size; const char *label; const char *subsystem;
};
int crypt_set_pbkdf_type(struct crypt_device *cd, const struct crypt_pbkdf_type *pbkdf);
int crypt_format(struct crypt_device *cd, const char *type, const char *cipher,
                 const char *cipher_mode, const char *uuid, const char *volume_key,
                 size_t volume_key_size, void *params);
int crypt_keyslot_add_by_volume_key(struct crypt_device *cd, int keyslot, const char *volume_key,
                                    size_t volume_key_size, const char *passphrase,
                                    size_t passphrase_size);

/* activation; a NULL name only checks the key */
#define CRYPT_ANY_SLOT ...
#define CRYPT_ACTIVATE_READONLY ...
#define CRYPT_ACTIVATE_ALLOW_DISCARDS ...
int crypt_activate_by_passphrase(struct crypt_device *cd, const char *name, int keyslot,
                                 const char *passphrase, size_t passphrase_size, uint32_t flags);
int crypt_activate_by_keyfile_device_offset(struct crypt_device *cd, const char *name,
                                            int keyslot, const char *keyfile, size_t keyfile_size,
                                            uint64_t keyfile_offset, uint32_t flags);
int crypt_deactivate(struct crypt_device *cd, const char *name);

/* libblkid: "UUID=...", "LABEL=..." (quoted or not) to a device node: udev's links, else a scan */
char *blkid_evaluate_spec(const char *spec, void *cache);
void free(void *ptr);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "hostel._luks",
    "#include <stdlib.h>\n#include <libcryptsetup.h>\n#include <blkid/blkid.h>\n",
    libraries=["cryptsetup", "blkid"],
    extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
