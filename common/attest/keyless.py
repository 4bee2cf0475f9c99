"""Sigstore keyless signatures of model directories (where a network and an identity exist).

Keyless signing proves *who* signed (an OIDC identity, certified by Fulcio and logged in
Rekor) instead of *which key* signed. It needs the network and an identity token, so it is
an option next to the offline key and certificate-chain modes, never the default:

- signing is OpenSSF model-signing's own Sigstore signer
  (:func:`sign_model_keyless`), with the same file serialization as the other modes;
- verification checks the bundle with sigstore-python against Sigstore's trust root (the
  copy shipped with sigstore-python unless ``online``: no network needed) and an identity
  policy (signer identity *and* OIDC issuer must match), then hands the certified key to
  :func:`ztlab.common.attest.model.verify_model`, which compares every file with the
  same strict rules as for key-signed bundles (no signer-chosen ``ignore_paths``).
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

from ztlab.common.attest.dsse import SignatureError
from ztlab.common.errors import UsageError, ZtlabError
from ztlab.common.keys import PublicKey, key_id


class KeylessError(ZtlabError):
    """Keyless signing could not be done (no network, no identity, Sigstore refused)."""


def _trust_config(*, staging: bool, online: bool, path: Path | None) -> Any:
    models: Any = importlib.import_module("sigstore.models")
    # offline is the point, not news: keep sigstore's "loaded in offline mode" notice quiet
    logging.getLogger("sigstore._internal.tuf").setLevel(logging.ERROR)
    if path is not None:
        try:
            return models.ClientTrustConfig.from_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read the trust configuration {path}: {exc}") from exc
        except Exception as exc:  # sigstore raises several parser errors
            raise UsageError(
                f"{path}: not a Sigstore client trust configuration "
                "(application/vnd.dev.sigstore.clienttrustconfig.v0.1+json): "
                f"{exc}"
            ) from exc
    factory = models.ClientTrustConfig.staging if staging else models.ClientTrustConfig.production
    try:
        return factory(offline=not online)
    except Exception as exc:  # TUF errors have no common base
        raise KeylessError(f"cannot load Sigstore's trust root: {exc}") from exc


def keyless_signer(
    bundle_text: str,
    *,
    identity: str,
    issuer: str,
    staging: bool = False,
    online: bool = False,
    trust_config: Path | None = None,
) -> dict[str, PublicKey]:
    """The certified key of a Sigstore-signed bundle, if Sigstore and the policy accept it.

    Checks the Fulcio certificate chain, the signed certificate timestamp, the Rekor
    transparency-log entry, the DSSE signature, and that the certificate names
    ``identity`` (e.g. an e-mail address) issued by ``issuer`` (the OIDC issuer URL).
    Raises :class:`SignatureError` if anything does not verify.
    """
    models: Any = importlib.import_module("sigstore.models")
    verify: Any = importlib.import_module("sigstore.verify")
    errors: Any = importlib.import_module("sigstore.errors")
    config = _trust_config(staging=staging, online=online, path=trust_config)
    try:
        bundle = models.Bundle.from_json(bundle_text)
    except Exception as exc:  # parser errors have no common base
        raise SignatureError(
            f"not a Sigstore keyless bundle (a Fulcio certificate and a log entry): {exc}",
            hint="a bundle signed with a key verifies with --public-key instead",
        ) from exc
    verifier = verify.Verifier(trusted_root=config.trusted_root)
    try:
        verifier.verify_dsse(bundle, verify.policy.Identity(identity=identity, issuer=issuer))
    except errors.Error as exc:
        raise SignatureError(f"Sigstore verification failed: {exc}") from exc
    key = bundle.signing_certificate.public_key()
    return {key_id(key): key}


def sign_model_keyless(
    directory: Path,
    out: Path,
    *,
    identity_token: str | None,
    ambient: bool = False,
    staging: bool = False,
    trust_config: Path | None = None,
    algorithm: str = "sha256",
) -> dict[str, Any]:
    """Sign ``directory`` with Sigstore (model-signing's signer); write and return the bundle.

    ``identity_token``: an OIDC token for Sigstore (audience ``sigstore``); ``ambient``:
    take one from the environment (CI workload identity). Without either, model-signing
    would start an interactive browser flow, which a server cannot do: refused.
    """
    if not identity_token and not ambient:
        raise UsageError(
            "keyless signing needs an identity: --identity-token FILE, or --ambient on a "
            "machine with workload identity (e.g. CI)"
        )
    signing: Any = importlib.import_module("model_signing.signing")
    hashing: Any = importlib.import_module("model_signing.hashing")
    if trust_config is not None:
        _trust_config(staging=staging, online=False, path=trust_config)  # clear errors first
    files = hashing.Config().use_file_serialization(hashing_algorithm=algorithm)
    files.set_ignored_paths(paths=[out], ignore_git_paths=True)
    try:
        config = signing.Config().use_sigstore_signer(
            identity_token=identity_token,
            use_ambient_credentials=ambient,
            use_staging=staging,
            trust_config=trust_config,
        )
        config.set_hashing_config(files)
        config.sign(directory, out)
    except Exception as exc:  # network, OIDC and Fulcio errors differ
        detail = str(exc) or str(exc.__cause__ or "")
        raise KeylessError(
            f"Sigstore keyless signing failed: {type(exc).__name__}: {detail}",
            hint="keyless signing needs the network (Fulcio, Rekor) and a valid identity "
            "token; offline, sign with --key",
        ) from exc
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result
