"""The Python API for build frameworks: describe a job once, run it in its own VM on an HTCondor
pool or on this host.

::

    from glite_vm.api.local import run_local
    from glite_vm.api.pool import submit, wait
    from glite_vm.api.vmjob import VmJob

    job = VmJob("debian-12", script="tar xzf src.tar.gz && make -C src check > report.txt",
                inputs=["src.tar.gz"], outputs=["report.txt"])
    handles = submit([job], directory="runs/42")          # HTCondor: one cluster per job
    for result in wait(handles, timeout=3600):
        print(result.exit_code, result.stdout_path, result.snapshot_path, result.timings)

    local = run_local(job, directory="repro")             # same job, this host, no HTCondor

One module a job: :mod:`~glite_vm.api.vmjob` (the job, its validation, its submit description),
:mod:`~glite_vm.api.submit_language` (values written in HTCondor's submit language),
:mod:`~glite_vm.api.jobdir` (the files of a job's directory), :mod:`~glite_vm.api.results`
(what a job gives back), :mod:`~glite_vm.api.pool` (submit, wait, result; the schedd's errors),
:mod:`~glite_vm.api.local` (run_local) and :mod:`~glite_vm.api.matrix` (many images).

A bad value raises :class:`~glite_vm.errors.RequestError` whose ``field`` is the parameter's
name; everything else raises the library's errors (:mod:`glite_vm.errors`). Nothing here
prints, exits or keeps state between calls. Settings are passed in, or read once per call with
:meth:`~glite_vm.config.Settings.load`. The HTCondor bindings are imported only by the functions
that talk to HTCondor, so ``run_local`` works on a laptop without any HTCondor configuration.
See docs/api.md.
"""
