"""A separate process that acquires an image, for the multi-process tests.

    python images_worker.py REF JOB_ID [--hold S] [--sha256 D] [--allow-local] [--announce]

Settings come from GLITE_VM_* in the environment. Prints one JSON line with the result (or the
error's class and disposition), then holds the lease for --hold seconds before releasing it, so
a test can kill it while it holds a lease.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from glite_vm.config import Settings
from glite_vm.errors import GliteVmError
from glite_vm.images.acquire import acquire_image


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ref")
    parser.add_argument("job_id")
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--sha256")
    parser.add_argument("--allow-local", action="store_true")
    parser.add_argument("--announce", action="store_true", help="print a line before acquiring")
    args = parser.parse_args()
    settings = Settings.load(config_file=Path("/nonexistent/glite-vm.toml"))
    if args.announce:
        print(json.dumps({"started": True}), flush=True)
    try:
        lease = acquire_image(
            settings,
            args.ref,
            sha256=args.sha256,
            job_id=args.job_id,
            allow_local=args.allow_local,
        )
    except GliteVmError as exc:
        print(json.dumps({"error": type(exc).__name__, "hold": exc.is_user_error}), flush=True)
        return 1
    with lease:
        image = lease.image
        print(
            json.dumps(
                {
                    "path": str(image.path),
                    "sha256": image.sha256,
                    "format": image.format,
                    "cache_hit": image.cache_hit,
                    "lease_ids": list(lease.lease_ids),
                }
            ),
            flush=True,
        )
        time.sleep(args.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
