"""The ``ztlab.toml`` configuration: one file, validated completely when it is loaded.

>>> config = load_config("/etc/ztlab/ztlab.toml")   # doctest: +SKIP
>>> config.audit_log_path, config.audit_signing_key_path, config.policy_directory
... # doctest: +SKIP

:func:`load_config` returns a frozen :class:`ZtlabConfig` or raises one
:class:`~ztlab.common.errors.ConfigError` naming the file, the key path of each problem
and what was expected. Secrets are never in the file: a :class:`SecretRef` points at an
environment variable or a file and is read by :meth:`SecretRef.resolve` when needed.
"""

from ztlab.common.config._units import format_size, parse_size
from ztlab.common.config.load import (
    dump_json,
    dump_toml,
    load_config,
    parse_config,
    problems_from_validation_error,
)
from ztlab.common.config.model import (
    DEFAULT_ROLE_NAMES,
    AuditConfig,
    ComputeConfig,
    DatasetsConfig,
    GpuConfig,
    GpuMonitorConfig,
    GpuPool,
    HubConfig,
    InvalidConfigError,
    LoginConfig,
    ModelsConfig,
    PolicyConfig,
    Problem,
    RoleConfig,
    RunsConfig,
    SandboxConfig,
    ScheduleConfig,
    SecretRef,
    SecretsConfig,
    ZtlabConfig,
    default_roles,
)

__all__ = [
    "DEFAULT_ROLE_NAMES",
    "AuditConfig",
    "ComputeConfig",
    "DatasetsConfig",
    "GpuConfig",
    "GpuMonitorConfig",
    "GpuPool",
    "HubConfig",
    "InvalidConfigError",
    "LoginConfig",
    "ModelsConfig",
    "PolicyConfig",
    "Problem",
    "RoleConfig",
    "RunsConfig",
    "SandboxConfig",
    "ScheduleConfig",
    "SecretRef",
    "SecretsConfig",
    "ZtlabConfig",
    "default_roles",
    "dump_json",
    "dump_toml",
    "format_size",
    "load_config",
    "parse_config",
    "parse_size",
    "problems_from_validation_error",
]
