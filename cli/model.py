"""``ztlab model``: sign and verify model directories offline (OpenSSF model-signing format).

Bundles made here verify with the upstream ``model_signing verify key`` command (SHA-256,
the default) and upstream bundles verify here. Exit statuses: 0 signed / verified, 1 the
signature or the files do not verify (every difference listed), 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ztlab.cli._errors import handle_errors
from ztlab.cli.data import hub_client, hub_options
from ztlab.common.errors import UsageError

DIR_ARGUMENT = click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
#: Sigstore keyless (sign --sigstore, verify --sigstore-identity): which instance
STAGING_OPTION = click.option(
    "--sigstore-staging",
    "staging",
    is_flag=True,
    help="Keyless: Sigstore's staging instance instead of the public one.",
)
TRUST_CONFIG_OPTION = click.option(
    "--trust-config",
    "trust_config",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keyless: a Sigstore client trust configuration (JSON) to use instead of the "
    "public instance's.",
)


@click.group("model", short_help="Sign and verify model directories (model-signing format).")
def model_group() -> None:
    """Sign and verify model directories offline, in the OpenSSF model-signing format."""


def _private_key(path: Path) -> Any:
    from ztlab.common.errors import UsageError
    from ztlab.hub.keys import load_private_key

    # model-signing accepts EC keys only
    return load_private_key(path, accept=("p256", "p384"), error=UsageError)


@model_group.command("sign", short_help="Sign every file of a model directory.")
@DIR_ARGUMENT
@click.option(
    "--key",
    "key_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM private key, ECDSA P-256 or P-384, mode 0600 (or --sigstore).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the bundle (Sigstore bundle JSON).",
)
@click.option(
    "--certificate",
    "certificate_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sign as this certificate (PEM) of an organisation chain; KEY must be its key.",
)
@click.option(
    "--certificate-chain",
    "chain_paths",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --certificate: intermediate certificates (PEM) to include; repeatable.",
)
@click.option(
    "--hash",
    "algorithm",
    type=click.Choice(["sha256", "blake3"]),
    default="sha256",
    show_default=True,
    help="File digest; sha256 is what the upstream model_signing CLI verifies, blake3 is "
    "faster (verified by ztlab and by model-signing's Python API).",
)
@click.option(
    "--sigstore",
    is_flag=True,
    help="Sign keyless with Sigstore (needs the network and an identity) instead of a key.",
)
@click.option(
    "--identity-token",
    "token_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --sigstore: a file holding an OIDC identity token (audience sigstore).",
)
@click.option(
    "--ambient", is_flag=True, help="With --sigstore: take the identity from the environment."
)
@STAGING_OPTION
@TRUST_CONFIG_OPTION
@handle_errors
def sign_command(
    directory: Path,
    key_path: Path | None,
    out: Path,
    certificate_path: Path | None,
    chain_paths: tuple[Path, ...],
    algorithm: str,
    sigstore: bool,
    token_path: Path | None,
    ambient: bool,
    staging: bool,
    trust_config: Path | None,
) -> None:
    """Sign every regular file under DIRECTORY into a bundle (git files left out).

    Offline with --key (optionally as --certificate of an organisation chain), or keyless
    with --sigstore where a network and an OIDC identity exist.
    """
    from ztlab.common.attest.model import sign_model

    if sigstore:
        if key_path is not None or certificate_path is not None or chain_paths:
            raise UsageError("--sigstore signs without a key: leave out --key and --certificate")
        _sign_keyless(directory, out, token_path, ambient, staging, trust_config, algorithm)
        return
    if key_path is None:
        raise UsageError("give --key KEY (offline) or --sigstore (keyless)")
    if token_path is not None or ambient or staging or trust_config is not None:
        raise UsageError(
            "--identity-token, --ambient, --sigstore-staging, --trust-config go with --sigstore"
        )
    key = _private_key(key_path)
    certificates = None
    if certificate_path is not None:
        certificates = _certificates(certificate_path, key) + [
            der for path in chain_paths for der in _certificates(path)
        ]
    elif chain_paths:
        raise UsageError("--certificate-chain needs --certificate")
    bundle = sign_model(
        directory,
        key,
        algorithm=algorithm,  # type: ignore[arg-type]
        bundle_path=out,
        certificates=certificates,
    )
    out.write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
    _wrote(out, bundle, algorithm)


def _sign_keyless(
    directory: Path,
    out: Path,
    token_path: Path | None,
    ambient: bool,
    staging: bool,
    trust_config: Path | None,
    algorithm: str,
) -> None:
    from ztlab.common.attest.keyless import sign_model_keyless

    token = None
    if token_path is not None:
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the identity token {token_path}: {exc}") from exc
        if not token:
            raise UsageError(f"{token_path}: the identity token file is empty")
    bundle = sign_model_keyless(
        directory,
        out,
        identity_token=token,
        ambient=ambient,
        staging=staging,
        trust_config=trust_config,
        algorithm=algorithm,
    )
    _wrote(out, bundle, f"{algorithm}, Sigstore keyless")


def _wrote(out: Path, bundle: dict[str, Any], how: str) -> None:
    files = len(json.loads(bundle_payload(bundle))["predicate"]["resources"])
    click.echo(f"wrote {out}: {files} files signed ({how})")


def _certificates(path: Path, key: object = None) -> list[bytes]:
    """The DER certificates in a PEM file; with ``key``, the first must be that key's."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable PEM certificates: {exc}") from exc
    if key is not None:
        spki = (
            certificates[0]
            .public_key()
            .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        )
        ours = key.public_key().public_bytes(  # type: ignore[attr-defined]
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        if spki != ours:
            raise UsageError(f"{path}: the certificate is not for the key given with --key")
    return [c.public_bytes(Encoding.DER) for c in certificates]


def bundle_payload(bundle: dict[str, object]) -> bytes:
    """The statement bytes inside a bundle dict."""
    import base64

    envelope = bundle["dsseEnvelope"]
    assert isinstance(envelope, dict)
    return base64.b64decode(envelope["payload"])


@model_group.command("verify", short_help="Verify a model directory against a bundle.")
@DIR_ARGUMENT
@click.option(
    "--bundle",
    "bundle_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bundle from `ztlab model sign` or `model_signing sign key`.",
)
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted public key (PEM); repeat for several.",
)
@click.option(
    "--certificate-chain",
    "roots_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted root certificate(s) (PEM) for a bundle signed with a certificate chain.",
)
@click.option(
    "--sigstore-identity",
    "identity",
    default=None,
    help="For a Sigstore keyless bundle: the signer's identity (e.g. an e-mail address).",
)
@click.option(
    "--sigstore-issuer",
    "issuer",
    default=None,
    help="With --sigstore-identity: the OIDC issuer that vouched for it (URL).",
)
@STAGING_OPTION
@click.option(
    "--online",
    is_flag=True,
    help="Refresh Sigstore's trust root over the network first (default: the copy shipped "
    "with sigstore-python).",
)
@TRUST_CONFIG_OPTION
@handle_errors
def verify_command(
    directory: Path,
    bundle_path: Path,
    public_keys: tuple[Path, ...],
    roots_path: Path | None,
    identity: str | None,
    issuer: str | None,
    staging: bool,
    online: bool,
    trust_config: Path | None,
) -> None:
    """Check the bundle's signature, then every file of DIRECTORY; exit 1 listing changes.

    Give the trusted key(s) with --public-key, the trusted root(s) with
    --certificate-chain for a bundle signed with an organisation's certificate, or the
    expected signer with --sigstore-identity and --sigstore-issuer for a Sigstore keyless
    bundle (checked offline against Sigstore's shipped trust root unless --online).
    """
    from ztlab.common.attest import load_public_keys
    from ztlab.common.attest.model import (
        bundle_certificates,
        chain_signer,
        parse_bundle,
        verify_model,
    )

    modes = [bool(public_keys), roots_path is not None, identity is not None]
    if sum(modes) != 1:
        raise UsageError("give one of --public-key, --certificate-chain, --sigstore-identity")
    if (identity is None) != (issuer is None):
        raise UsageError("--sigstore-identity and --sigstore-issuer go together")
    try:
        text = bundle_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the bundle {bundle_path}: {exc}") from exc
    envelope = parse_bundle(text, source=str(bundle_path))
    if identity is not None and issuer is not None:
        from ztlab.common.attest.keyless import keyless_signer

        trusted = keyless_signer(
            text,
            identity=identity,
            issuer=issuer,
            staging=staging,
            online=online,
            trust_config=trust_config,
        )
    elif roots_path is not None:
        try:
            roots = roots_path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {roots_path}: {exc.strerror}") from exc
        trusted = chain_signer(bundle_certificates(text), roots)
    else:
        trusted = load_public_keys(list(public_keys))
    check = verify_model(directory, envelope, trusted, bundle_path=bundle_path)
    signature = check.signature
    if check.ok:
        click.echo(
            f"OK: {len(signature.resources)} files match the signature "
            f"({signature.algorithm}, key {signature.keyid[:16]}…)"
        )
        return
    for name, expected, actual in check.modified:
        click.echo(f"modified: {name}\n  expected {expected}\n  actual   {actual}")
    for name in check.missing:
        click.echo(f"missing: {name}")
    for name in check.extra:
        click.echo(f"extra: {name}")
    for refusal in check.refused:
        click.echo(f"refused: {refusal.path}: {refusal.reason}")
    click.echo(
        f"FAILED: {len(check.modified)} modified, {len(check.missing)} missing, "
        f"{len(check.extra)} extra, {len(check.refused)} refused"
    )
    sys.exit(1)


# -- approvals through the hub ---------------------------------------------------------------


def _call(
    hub: tuple[str | None, Path | None, Path],
    method: str,
    path: str,
    body: dict[str, object] | None = None,
) -> Any:
    return hub_client(*hub).call(method, path, body)


def provenance_lines(provenance: Any) -> list[str]:
    """What ``ztlab model status`` says of a version's run provenance (the API's
    ``provenance``: ``run``, ``verified``, ``problem``, ``statement``); none without one."""
    if not isinstance(provenance, dict):
        return []
    run = provenance.get("run") or {}
    if not provenance.get("verified"):
        return [
            f"  provenance: DOES NOT VERIFY: {provenance.get('problem') or 'unknown problem'}",
            f"    run {run.get('id')} by {run.get('owner')}",
        ]
    predicate = (provenance.get("statement") or {}).get("predicate") or {}
    definition = predicate.get("buildDefinition") or {}
    external = definition.get("externalParameters") or {}
    notebook = external.get("notebook") or run.get("notebook") or {}
    sha256 = (notebook.get("digest") or {}).get("sha256") or notebook.get("sha256") or ""
    schedule = external.get("schedule") or run.get("schedule")
    how = f"schedule {schedule}" if schedule else "by hand"
    lines = [
        f"  provenance: verified (run {run.get('id')} by {run.get('owner')}, {how}, "
        f"notebook {notebook.get('name')} sha256:{sha256[:12]}…)"
    ]
    parameters = external.get("parameters") or {}
    if parameters:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(parameters.items()))
        lines.append(f"    parameters: {shown}")
    for item in definition.get("resolvedDependencies") or []:
        dependency = str(item.get("name", ""))
        if dependency.startswith("dataset:"):
            algorithm, digest = next(iter((item.get("digest") or {"?": ""}).items()))
            dataset = dependency.removeprefix("dataset:")
            lines.append(f"    dataset {dataset} {algorithm}:{digest[:16]}…")
    return lines


@model_group.command("status", short_help="Show a version's signature and approvals.")
@click.argument("name")
@click.argument("version")
@hub_options
@handle_errors
def status_command(
    name: str, version: str, hub_url: str | None, token_file: Path | None, config_path: Path
) -> None:
    """Show NAME VERSION: signed or not, trainer, datasets, the provenance of the notebook
    run that trained it (verified by the hub), and every approval decision."""
    answer = _call((hub_url, token_file, config_path), "GET", f"/ztlab/models/{name}/{version}")
    if not answer["signed"]:
        click.echo(f"{name} {version}: not signed")
    else:
        statement = json.loads(bundle_payload(answer["bundle"]))
        datasets = statement["predicate"].get("ztlab", {}).get("datasets", [])
        click.echo(f"{name} {version}: signed; trained by {answer['trainer']}")
        for item in datasets:
            click.echo(f"  dataset {item['dataset']} root {item['root'][:16]}…")
    for line in provenance_lines(answer.get("provenance")):
        click.echo(line)
    for event in answer["history"]:
        alias = f" {event['alias']}" if event["alias"] else ""
        click.echo(f"  {event['action']}{alias} by {event['actor']}: {event['reason']}")


@model_group.command(
    "approve", short_help="Approve a signed version (two-person rule) and set the alias."
)
@click.argument("name")
@click.argument("version")
@click.option("--reason", required=True, help="Why (recorded in the audit log).")
@click.option("--alias", default=None, help="The protected alias to set. Default: the first.")
@hub_options
@handle_errors
def approve_command(
    name: str,
    version: str,
    reason: str,
    alias: str | None,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Approve NAME VERSION: the hub re-verifies the signature against the artifacts as they
    are now, re-checks lineage, asks the policy (an approver who is not the trainer) and sets
    the protected alias."""
    body: dict[str, object] = {"reason": reason}
    if alias:
        body["alias"] = alias
    _call(
        (hub_url, token_file, config_path), "POST", f"/ztlab/models/{name}/{version}/approve", body
    )
    click.echo(f"approved {name} version {version}")


@model_group.command("reject", short_help="Reject a version, with a reason.")
@click.argument("name")
@click.argument("version")
@click.option("--reason", required=True, help="Why (recorded in the audit log).")
@hub_options
@handle_errors
def reject_command(
    name: str,
    version: str,
    reason: str,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Record that NAME VERSION is rejected (an approver who is not the trainer)."""
    _call(
        (hub_url, token_file, config_path),
        "POST",
        f"/ztlab/models/{name}/{version}/reject",
        {"reason": reason},
    )
    click.echo(f"rejected {name} version {version}")


@model_group.command("revoke", short_help="Remove a protected alias, with a reason.")
@click.argument("name")
@click.argument("alias")
@click.option("--reason", required=True, help="Why (recorded in the audit log).")
@hub_options
@handle_errors
def revoke_command(
    name: str,
    alias: str,
    reason: str,
    hub_url: str | None,
    token_file: Path | None,
    config_path: Path,
) -> None:
    """Remove the protected ALIAS of NAME (an approver); loading it fails from then on."""
    _call(
        (hub_url, token_file, config_path),
        "POST",
        f"/ztlab/models/{name}/aliases/{alias}/revoke",
        {"reason": reason},
    )
    click.echo(f"revoked {name}@{alias}")
