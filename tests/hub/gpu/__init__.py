"""Tests of the control plane's GPU inventory, NVML boundary and leases."""
