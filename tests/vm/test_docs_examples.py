"""Every code block of README.md and docs/*.md runs as written, or says why it cannot.

A block is preceded by a marker line: ``<!-- example: run -->`` (the test runs the whole block:
``sh`` with ``bash -e -o pipefail``, ``python`` with this Python) or ``<!-- example: not run:
REASON -->``. A block without a marker fails the test, so no example can rot unseen.

The runnable blocks run in a fresh working directory holding what they name (``my.qcow2``,
``src/``) against a real libvirtd, with a catalogue whose ``debian-12`` is the direct-kernel test
guest (the docs' image name; the guest is a Debian kernel with a busybox userland).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import domains_under, guest_catalogue

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- example: (?:(?P<run>run)|not run: (?P<reason>\S.*\S)) -->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")
RUNNERS = {"sh": ["bash", "-e", "-o", "pipefail", "-c"], "python": [sys.executable, "-c"]}
BLOCK_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class Block:
    document: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: re.Match[str] | None

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def code_blocks(document: Path) -> list[Block]:
    lines = document.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{document}:{i + 1}: a code block that never ends"
        before = [line for line in lines[:i] if line.strip()]
        marker = MARKER.match(before[-1].strip()) if before else None
        indent = len(opening.group("indent"))
        text = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        blocks.append(Block(document, i + 1, opening.group("lang"), text, marker))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for document in DOCUMENTS for block in code_blocks(document)]
RUNNABLE = [b for b in ALL_BLOCKS if b.marker is not None and b.marker.group("run")]


def test_every_block_is_run_or_says_why_not() -> None:
    assert len(ALL_BLOCKS) > 30  # the parser found the docs' blocks
    unmarked = [b.where for b in ALL_BLOCKS if b.marker is None]
    assert not unmarked, (
        "code blocks without '<!-- example: run -->' or '<!-- example: not run: REASON -->' "
        f"on the line before: {unmarked}"
    )
    for block in RUNNABLE:
        assert block.lang in RUNNERS, f"{block.where}: cannot run a '{block.lang}' block"
    for block in ALL_BLOCKS:
        reason = block.marker.group("reason") if block.marker else None
        assert reason is None or len(reason.split()) >= 2, f"{block.where}: say why not"
    assert len(RUNNABLE) >= 3


# --- running them --------------------------------------------------------------------------

INSTALL_TEST = "#!/bin/sh\nid -u > installed-as.txt\necho install test passed\n"
BUILD = "#!/bin/sh\necho built > artifact.txt\necho build done\n"
CHECK = "echo all checks passed\n"
#: What a block that runs one of these scripts in a VM must have brought back (proof of work).
BROUGHT_BACK = {
    "./install-test.sh": ("out/installed-as.txt", "0\n"),  # --root
    "./build.sh": ("out/artifact.txt", "built\n"),
    "src/check.sh": ("repro/report.txt", "all checks passed\n"),
}


@pytest.fixture(scope="module")
def example_env(state_dir: Path, guest_dir: Path) -> dict[str, str]:
    root = state_dir / "docs-examples"
    root.mkdir(mode=0o711)
    catalogue = guest_catalogue(guest_dir, root / "repo", direct={"debian-12": ""})
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "GLITE_VM_CONFIG": str(root / "no-config.toml"),
        "GLITE_VM_STATE_DIR": str(root / "state"),
        "GLITE_VM_CATALOGUE": catalogue.as_uri(),
        "GLITE_VM_DEFAULT_MEMORY_MIB": "512MiB",
        "GLITE_VM_DEFAULT_DISK_BYTES": "2GiB",
        "GLITE_VM_BOOT_TIMEOUT": "180",
    }


def working_directory(base: Path, guest_dir: Path) -> Path:
    """What the examples name: a local image and a source tree with the scripts they run."""
    base.mkdir()
    shutil.copyfile(guest_dir / "disk-boot.qcow2", base / "my.qcow2")
    src = base / "src"
    src.mkdir()
    for name, text in (("install-test.sh", INSTALL_TEST), ("build.sh", BUILD)):
        (src / name).write_text(text)
        (src / name).chmod(0o755)
    (src / "check.sh").write_text(CHECK)
    return base


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_the_example_runs_as_written(
    block: Block, example_env: dict[str, str], guest_dir: Path, tmp_path: Path
) -> None:
    cwd = working_directory(tmp_path / "work", guest_dir)
    proc = subprocess.run(
        [*RUNNERS[block.lang], block.text],
        cwd=cwd,
        env=example_env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    shown = f"{block.where} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, shown
    assert "Traceback" not in proc.stderr, shown
    assert not domains_under(Path(example_env["GLITE_VM_STATE_DIR"])), "a VM was left behind"
    for script, (path, content) in BROUGHT_BACK.items():
        if script in block.text:
            assert (cwd / path).read_text() == content, shown
