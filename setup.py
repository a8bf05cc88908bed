"""Build the optional native relay pump (enforcer/dataplane/_pump.c and pump/*.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler
or Python headers the package still installs, and enforcer relays in Python (the log
says so at startup, and ``relay: native`` in the config then refuses to start).
"""

from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "enforcer.dataplane._pump",
            sources=["enforcer/dataplane/_pump.c", *sorted(glob("enforcer/dataplane/pump/*.c"))],
            depends=sorted(glob("enforcer/dataplane/pump/*.h")),
            extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall", "-Wextra",
                                "-Werror=incompatible-pointer-types",
                                "-Werror=implicit-function-declaration", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            libraries=["dl"],
            optional=True,
        )
    ]
)
