"""Where a kernel gets signed manifests: the control plane's API, or a local directory.

:func:`default_registry` picks one from the environment:

``ZTLAB_LOCAL_REGISTRY=DIR``
    a directory of signed manifests ``NAME@VERSION.dsse.json`` (made with
    ``ztlab data sign``), trusted with ``ZTLAB_TRUSTED_KEYS`` or ``DIR/trusted-keys.pem``;
    for trying the kernel side without a hub (binder) and for offline work.
``JUPYTERHUB_API_URL`` + ``JUPYTERHUB_API_TOKEN``
    the hub's dataset API (``/hub/api/ztlab/datasets``), over the hub's internal TLS when
    the spawner set ``JUPYTERHUB_SSL_*``; the kernel inherits its server's token.

Either way the answer is only a candidate: :mod:`ztlab.extensions.datasets.verified` checks
its signature against the trusted keys before anything is read.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ztlab.common.attest import Envelope, PublicKey, key_id, public_key_from_pem
from ztlab.common.hubapi import HubAPI, HubAPIError, HubUnreachable
from ztlab.extensions.datasets.errors import DatasetError, RegistryUnavailable

_PEM_END = "-----END PUBLIC KEY-----"


def parse_pem_keys(text: str, *, source: str) -> dict[str, PublicKey]:
    """Every PEM public key in ``text`` (concatenated PEM blocks), by key id."""
    keys: dict[str, PublicKey] = {}
    for block in text.split(_PEM_END):
        if "-----BEGIN PUBLIC KEY-----" in block:
            key = public_key_from_pem(block.strip() + "\n" + _PEM_END + "\n", source=source)
            keys[key_id(key)] = key
    return keys


@dataclass(frozen=True)
class Candidate:
    """A registry's answer for one version: the envelope and where the data lies."""

    envelope: Envelope
    location: str
    url: str | None = None


class Registry(Protocol):
    """Something that hands out signed manifests and takes reports."""

    def fetch(self, ref: str) -> Candidate:
        """The signed manifest of ``ref`` and the directory holding its files."""
        ...

    def trusted_keys(self) -> dict[str, PublicKey]:
        """The keys whose signatures are accepted."""
        ...

    def report(self, ref: str, problem: dict[str, str]) -> None:
        """Tell the control plane that ``ref`` did not verify (best effort)."""
        ...


def _location(ref: str, source: str) -> str:
    """Inside a sandbox the data is mounted at ``$ZTLAB_DATASETS_MOUNT/NAME@VERSION``."""
    mount = os.environ.get("ZTLAB_DATASETS_MOUNT")
    if mount and (Path(mount) / ref).is_dir():
        return str(Path(mount) / ref)
    return source


def _env_keys() -> dict[str, PublicKey]:
    text = os.environ.get("ZTLAB_TRUSTED_KEYS", "")
    return parse_pem_keys(text, source="ZTLAB_TRUSTED_KEYS") if text.strip() else {}


class LocalRegistry:
    """Signed manifests in a directory; reports are only logged locally (no control plane)."""

    def __init__(self, directory: Path) -> None:
        """Use the signed manifests in ``directory``."""
        self.directory = directory
        self.reports: list[tuple[str, dict[str, str]]] = []

    def fetch(self, ref: str) -> Candidate:
        """Read ``DIR/NAME@VERSION.dsse.json``."""
        path = self.directory / f"{ref}.dsse.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DatasetError(
                f"dataset {ref} is not in the local registry {self.directory}",
                hint=f"sign its manifest into {path} with `ztlab data sign`",
            ) from exc
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc.strerror}") from exc
        envelope = Envelope.from_json(text, source=str(path))
        source = json.loads(envelope.payload).get("predicate", {}).get("source", "")
        return Candidate(envelope, _location(ref, str(source)), url=None)

    def trusted_keys(self) -> dict[str, PublicKey]:
        """``ZTLAB_TRUSTED_KEYS``, else ``DIR/trusted-keys.pem``."""
        keys = _env_keys()
        if keys:
            return keys
        path = self.directory / "trusted-keys.pem"
        try:
            return parse_pem_keys(path.read_text(encoding="ascii"), source=str(path))
        except OSError as exc:
            raise DatasetError(
                f"no trusted keys: ZTLAB_TRUSTED_KEYS is unset and {path} cannot be read",
            ) from exc

    def report(self, ref: str, problem: dict[str, str]) -> None:
        """Keep the report (there is no control plane to tell)."""
        self.reports.append((ref, problem))


class HubRegistry:
    """The hub's dataset API, authenticated with a hub token."""

    def __init__(self, api_url: str, token: str, *, context: ssl.SSLContext | None = None) -> None:
        """``api_url`` ends in ``/hub/api``."""
        self._api = HubAPI(api_url, token, context=context)
        self.api_url = self._api.api_url

    @classmethod
    def from_environment(cls) -> HubRegistry:
        """From ``JUPYTERHUB_API_URL``, ``JUPYTERHUB_API_TOKEN`` and ``JUPYTERHUB_SSL_*``."""
        registry = cls.__new__(cls)
        registry._api = HubAPI.from_environment()
        registry.api_url = registry._api.api_url
        return registry

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """``method`` ``API_URL + path`` with the hub token; the JSON answer."""
        try:
            return self._api.call(method, path, body)
        except HubAPIError as exc:
            raise DatasetError(exc.message, hint=exc.hint) from exc
        except HubUnreachable as exc:
            raise RegistryUnavailable(
                exc.message.replace("hub's API", "hub's dataset API")
            ) from exc

    def fetch(self, ref: str) -> Candidate:
        """``GET /ztlab/datasets/REF`` (a policy decision on the hub, audited there)."""
        answer = self.call("GET", f"/ztlab/datasets/{ref}")
        envelope = Envelope.from_dict(answer.get("envelope"), source=f"the hub's answer for {ref}")
        source = json.loads(envelope.payload).get("predicate", {}).get("source", "")
        return Candidate(
            envelope, _location(ref, str(source)), url=f"{self.api_url}/ztlab/datasets/{ref}"
        )

    def trusted_keys(self) -> dict[str, PublicKey]:
        """``ZTLAB_TRUSTED_KEYS`` (set by the spawner), else the hub's ``/ztlab/keys``."""
        keys = _env_keys()
        if keys:
            return keys
        answer = self.call("GET", "/ztlab/keys")
        return parse_pem_keys(
            "".join(k["pem"] for k in answer.get("keys", [])), source="the hub's keys"
        )

    def report(self, ref: str, problem: dict[str, str]) -> None:
        """``POST /ztlab/datasets/REF/reports``; recorded in the audit log as the kernel's user."""
        self.call("POST", f"/ztlab/datasets/{ref}/reports", problem)

    def register(self, ref: str, path: str) -> dict[str, Any]:
        """``POST /ztlab/datasets``: the control plane fingerprints ``path`` and signs it."""
        answer: dict[str, Any] = self.call("POST", "/ztlab/datasets", {"ref": ref, "path": path})
        return answer

    def list(self) -> list[dict[str, Any]]:
        """``GET /ztlab/datasets``: the versions this user may read."""
        answer = self.call("GET", "/ztlab/datasets")
        return list(answer.get("datasets", []))

    def show(self, ref: str) -> dict[str, Any]:
        """``GET /ztlab/datasets/REF``: the summary and the envelope."""
        answer: dict[str, Any] = self.call("GET", f"/ztlab/datasets/{ref}")
        return answer


def default_registry() -> Registry:
    """The registry the environment names (see the module docstring)."""
    local = os.environ.get("ZTLAB_LOCAL_REGISTRY")
    if local:
        return LocalRegistry(Path(local))
    if os.environ.get("JUPYTERHUB_API_URL") and os.environ.get("JUPYTERHUB_API_TOKEN"):
        return HubRegistry.from_environment()
    raise DatasetError(
        "no dataset registry: this kernel is not in a ztlab server",
        hint="start it from the hub, or set ZTLAB_LOCAL_REGISTRY to a directory of "
        "signed manifests",
    )


__all__ = [
    "Candidate",
    "HubRegistry",
    "LocalRegistry",
    "Registry",
    "default_registry",
    "parse_pem_keys",
]
