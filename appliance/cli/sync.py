"""`edugate sync ...`: keys and checks for the link between gates and the school hub."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import fail, friendly_errors


@click.group()
def sync() -> None:
    """Sync to the school hub: signing keys."""


@sync.command("keygen")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the hub's private signing key (PEM, mode 0600). Keep it on the hub only.",
)
@friendly_errors
def keygen(out: Path) -> None:
    """Make the hub's Ed25519 signing key; prints the public key that every gate's config needs."""
    from appliance.sync.signing import generate_private_key, public_key_text

    if out.exists():
        fail(f"{out} exists; refusing to overwrite a signing key (gates trust its public half)")
    try:
        key = generate_private_key(out)
    except OSError as exc:
        fail(f"{out}: cannot write: {exc.strerror}")
    public = public_key_text(key.public_key())
    pub_file = out.with_name(out.name + ".pub")
    pub_file.write_text(public + "\n")
    click.echo(f"private key: {out} (keep on the hub, mode 0600)")
    click.echo(f"public key:  {pub_file}  (copy to each gate as sync.hub_public_key_file)")
    click.echo(f'or in gate.toml: hub_public_key = "{public}"')
