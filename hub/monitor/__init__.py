"""The GPU activity monitor: sampling, attribution, accounting, metrics and alerts.

A control-plane service (:class:`~ztlab.hub.monitor.service.GpuMonitor`) that samples every
GPU and GPU process once per interval, attributes each process through its cgroup to a user
and to a server, pool-cluster process or scheduled run, checks it against the lease its GPU
is under, accounts GPU-seconds, energy and memory per user, serves Prometheus metrics with
DCGM-exporter names plus per-user series, raises alerts whose responses the policy decides,
and checks each GPU's hand-over between leases.

- :mod:`~ztlab.hub.monitor.telemetry`: the readings (typed) and the source protocol;
- :mod:`~ztlab.hub.monitor.sources`: real NVML, replayed traces, a watched trace file;
- :mod:`~ztlab.hub.monitor.procfacts`: what ``/proc`` says about a process (cached);
- :mod:`~ztlab.hub.monitor.attribution`: cgroup to holder, device to lease;
- :mod:`~ztlab.hub.monitor.accounting`: GPU-seconds, energy and memory per user;
- :mod:`~ztlab.hub.monitor.baseline` and :mod:`~ztlab.hub.monitor.detectors`: the alerts;
- :mod:`~ztlab.hub.monitor.findings`: holders, attributed processes and alerts;
- :mod:`~ztlab.hub.monitor.alerts` and :mod:`~ztlab.hub.monitor.responses`: the admins'
  record, the webhook, and the policy-decided responses;
- :mod:`~ztlab.hub.monitor.exporter`: the Prometheus exposition;
- :mod:`~ztlab.hub.monitor.service`: the sampler that runs them in order.
"""
