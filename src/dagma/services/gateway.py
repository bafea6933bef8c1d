"""`dagma gateway cert`: a local CA and a certificate for `*.<domain>` that compose's Traefik
serves (deploy/traefik/dynamic.yaml). The CA is kept across runs, so a browser that trusts it
keeps trusting each new certificate; private keys are written with mode 600."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dagma.cli_errors import DagmaCommands
from dagma.errors import DagmaError
from dagma.services.config import PROJECT_ROOT

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CERTS_DIR = PROJECT_ROOT / "deploy" / "traefik" / "certs"
DOMAIN = "dagma.localhost"
CA_DAYS = 3650
# Apple platforms refuse server certificates valid for more than 825 days, even from a CA the
# user added; 397 is the limit browsers apply to public CAs.
LEAF_DAYS = 397
RENEW_BEFORE = datetime.timedelta(days=30)
DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")


class GatewayCertError(DagmaError):
    """The certificate folder holds something `dagma gateway cert` cannot use."""


@dataclass(frozen=True)
class CertFiles:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def cert(self) -> Path:
        return self.folder / "dagma.crt"

    @property
    def key(self) -> Path:
        return self.folder / "dagma.key"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` whole: a temporary file with its final mode, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(files: CertFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not files.ca_cert.exists() and not files.ca_key.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise GatewayCertError(
            f"The local CA in {files.folder} cannot be read ({exc}). Fix: delete ca.crt and "
            "ca.key there and run `dagma gateway cert` again, then trust the new ca.crt."
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc < _now():
        raise GatewayCertError(
            f"The local CA in {files.folder} is expired or not one `dagma gateway cert` made. "
            "Fix: delete ca.crt and ca.key there, run it again and trust the new ca.crt."
        )
    return cert, key


def _new_ca(domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Dagma local CA ({domain})")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # The CA can vouch only for names under the domain: its key, if stolen, cannot make a
        # certificate another site's name that a browser trusting the CA would accept.
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName(domain)], excluded_subtrees=None),
            critical=True,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_is_current(files: CertFiles, ca: x509.Certificate, domain: str) -> bool:
    """The certificate exists, covers `*.domain`, was signed by this CA and is not expiring."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    if not files.cert.exists() or not files.key.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    wanted = {domain, f"*.{domain}"}
    return wanted <= set(names.get_values_for_type(x509.DNSName)) and (
        cert.not_valid_after_utc - _now() > RENEW_BEFORE
    )


def _new_leaf(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, domain: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}"), x509.DNSName(domain)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def ensure_certificates(
    folder: Path = CERTS_DIR, domain: str = DOMAIN, renew: bool = False
) -> list[str]:
    """Create the CA once and a certificate for `domain` and `*.domain` when missing, for
    another domain, expiring within 30 days or `renew`; returns what was done."""
    from cryptography.hazmat.primitives import serialization

    domain = domain.strip().strip(".").lower()
    if not DOMAIN_RE.fullmatch(domain):
        raise GatewayCertError(
            f"{domain!r} is not a domain for the gateway. Fix: pass one like dagma.localhost."
        )
    files = CertFiles(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    loaded = _load_ca(files)
    if loaded is None:
        ca, ca_key = _new_ca(domain)
        _write(files.ca_key, _key_pem(ca_key), 0o600)
        _write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        done.append(f"created a local CA: {files.ca_cert} (trust it once, docs/production.md)")
    else:
        ca, ca_key = loaded
    if renew or not _leaf_is_current(files, ca, domain):
        cert, key = _new_leaf(ca, ca_key, domain)
        _write(files.key, _key_pem(key), 0o600)
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
            serialization.Encoding.PEM
        )
        _write(files.cert, chain, 0o644)
        done.append(
            f"issued {files.cert} for *.{domain}, valid {LEAF_DAYS} days "
            "(restart Traefik to load it: docker compose restart traefik)"
        )
    else:
        done.append(f"{files.cert} for *.{domain} is current; nothing to do")
    for path in (files.ca_key, files.key):
        os.chmod(path, 0o600)  # a key copied in with a wider mode is narrowed too
    return done


app = typer.Typer(
    cls=DagmaCommands,
    help="The compose gateway (Traefik) in front of the API and the UIs.",
    no_args_is_help=True,
)


@app.command()
def cert(
    folder: Annotated[
        Path, typer.Option("--dir", help="Where to write the CA and the certificate.")
    ] = CERTS_DIR,
    domain: Annotated[str, typer.Option(help="The gateway's parent domain.")] = DOMAIN,
    renew: Annotated[bool, typer.Option(help="Issue a new certificate even if current.")] = False,
) -> None:
    """A local CA (kept) and a certificate for DOMAIN and *.DOMAIN that Traefik serves."""
    for line in ensure_certificates(folder, domain, renew):
        typer.echo(line)
