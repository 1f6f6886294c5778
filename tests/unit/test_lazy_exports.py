"""Packages export their names lazily: every exported name resolves, and the hooks' import
path stays clear of HTTP and X.509 (what kept the hooks' start-up above its 150 ms target)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ("glite_vm.images", "glite_vm.identity", "glite_vm.condor")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_resolves_and_is_listed(name: str) -> None:
    package = importlib.import_module(name)
    exports = package._EXPORTS
    listed = sorted(n for names in exports.values() for n in names)
    assert sorted(package.__all__) == listed
    for module, names in exports.items():
        for attr in names:
            assert getattr(package, attr) is getattr(importlib.import_module(module), attr)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        package.nonexistent  # noqa: B018


def test_the_hooks_do_not_import_http_or_x509() -> None:
    probe = (
        "import sys, glite_vm.condor.hooks, glite_vm.condor.launcher; "
        "print(sorted(m for m in ('requests', 'urllib3', 'cryptography', 'filelock', 'libvirt') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]", out
