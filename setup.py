"""setuptools needs this file only to hand the cffi extension to the build."""
from setuptools import setup

setup(cffi_modules=["bindings/build_native.py:ffibuilder", "bindings/build_luks.py:ffibuilder",
                    "bindings/build_vmm.py:ffibuilder"])
