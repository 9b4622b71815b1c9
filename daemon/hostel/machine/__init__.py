"""Namespace containers in the manner of systemd-nspawn, tracked as machined does."""
