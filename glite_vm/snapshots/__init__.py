"""Kept snapshots: find, show, boot, export and prune what a job's teardown left behind.

Every VM directory is an entry (:mod:`.entry`, read by descriptor from a directory its owner
controls); :mod:`.store` lists, finds and prunes them. An entry belongs to the owner of its
directory; a caller sees and touches only their own entries, root sees everyone's. Nothing here
changes an entry except :meth:`~glite_vm.snapshots.store.SnapshotStore.prune`, which removes
whole entries.

The kept disk (:mod:`.disk`: usable or why not, opened without following a link) is what
:mod:`.export` flattens into one self-contained qcow2 and what :mod:`.boot` starts a throw-away
VM on, with the kernel the original booted (:mod:`.boot_files`) and, for a person at a
terminal, its serial console (:mod:`.console`).
"""
