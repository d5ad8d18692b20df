"""Package discovery for the one thing pyproject.toml cannot say: three source folders, one namespace.

``subgrad/`` installs as ``subgrad``, ``kernels/`` as ``subgrad.kernels`` and ``export/`` as
``subgrad.export``.  Every folder with an ``__init__.py`` below those three roots is found here, so a new
subpackage ships without editing a list (a hand-written list once left out ``subgrad.optim``).  No
top-level ``kernels`` or ``export`` package is ever installed.  All other metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

#: installed package name -> source folder
ROOTS = {"subgrad": "subgrad", "subgrad.kernels": "kernels", "subgrad.export": "export"}

packages = []
for name, folder in ROOTS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

# Subpackages need no entries of their own: setuptools resolves subgrad.export.x to export/x via the
# nearest mapped parent.
setup(packages=packages, package_dir=ROOTS)
