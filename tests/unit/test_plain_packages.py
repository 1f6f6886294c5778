"""Packages are plain: an ``__init__`` holds a docstring and nothing else, so importing one
module (a hook needs the job-ad parser, not HTTP or X.509) never pays for its siblings, and
every name is imported from the module that defines it.

The hooks' start-up time is measured against its target by bench/hooks.py; what decides it is
what they import, which this test pins: no HTTP, X.509, libvirt, file-lock or metrics
library, and no glite-vm module beyond the ones the hooks need.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import glite_vm

PACKAGE = Path(glite_vm.__file__).parent

#: What the hooks and the launcher may import of glite-vm (each one is there for a reason:
#: adding one to the hooks' path costs every job its import time).
HOOK_MODULES = {
    "glite_vm",
    "glite_vm.condor",
    "glite_vm.condor.config",  # the hook names and entry points
    "glite_vm.condor.hooks",
    "glite_vm.condor.jobad",  # job ad -> request
    "glite_vm.condor.launcher",
    "glite_vm.condor.payload",  # what the job runs, from its ad
    "glite_vm.condor.under_starter",  # what hooks and launcher share: service, chirp, signals
    "glite_vm.config",
    "glite_vm.knob_values",  # what settings are made of
    "glite_vm.one_line",  # messages made one printable line for the ad
    "glite_vm.errors",
    "glite_vm.identity",
    "glite_vm.identity.errors",
    "glite_vm.identity.hostname",  # a job's GliteVmHostname, checked before the service
    "glite_vm.images",
    "glite_vm.images.sources",  # a job's GliteVmImage, checked before the service
    "glite_vm.request",
    "glite_vm.service",
    "glite_vm.service.api",  # what the service's calls return
    "glite_vm.service.client",
    "glite_vm.service.protocol",
    "glite_vm.slots",
    "glite_vm.units",  # sizes and durations in settings and ads
    "glite_vm.vm",
    "glite_vm.vm.record",  # the job-ad attributes, defined once
}


def test_every_package_init_holds_only_its_docstring() -> None:
    for init in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        body = tree.body[1:] if tree.body and isinstance(tree.body[0], ast.Expr) else tree.body
        if init.parent == PACKAGE:  # glite_vm itself: its version string and nothing else
            assert [ast.unparse(n).split(" = ")[0] for n in body] == ["__version__"], init
            continue
        assert body == [], f"{init} does more than name its package: {ast.unparse(body[0])}"


def test_the_hooks_import_only_what_they_need() -> None:
    probe = (
        "import json, sys, glite_vm.condor.hooks, glite_vm.condor.launcher; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    loaded = set(json.loads(out))
    heavy = {
        "requests",
        "urllib3",
        "cryptography",
        "filelock",
        "libvirt",
        "htcondor2",
        "prometheus_client",
    }
    assert loaded & heavy == set()
    ours = {m for m in loaded if m == "glite_vm" or m.startswith("glite_vm.")}
    assert ours <= HOOK_MODULES, sorted(ours - HOOK_MODULES)
