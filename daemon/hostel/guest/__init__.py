"""Virtual-machine guests: launcher, virtio devices, OCI images, guest init."""
