"""The full distribution's package list (metadata is in pyproject.toml).

Everything is ``lorayard.*`` under ``lorayard/``, except ``lorayard.client``, whose source lives in
``client/`` because that folder is also the light, torch-free distribution (``pip install ./client``).
pyproject.toml alone cannot map one subpackage to another folder and still find the rest.
"""

from setuptools import find_namespace_packages, find_packages, setup

CLIENT = find_namespace_packages("client", include=["lorayard.client", "lorayard.client.*"])

setup(
    packages=[*find_packages(include=["lorayard", "lorayard.*"]), *CLIENT],
    package_dir={package: "client/" + package.replace(".", "/") for package in CLIENT},
)
