"""HTCondor integration: job-ad I/O, hook status lines, the execute-host config generator.

Pure modules (no daemons needed): :mod:`glite_vm.condor.jobad` turns a job ad into a
:class:`~glite_vm.request.VMRequest` and formats what the hooks print;
:mod:`glite_vm.condor.config` writes the condor_config.d snippet of an execute host.
The measured HTCondor facts these rely on are in docs/condor.md.
"""
