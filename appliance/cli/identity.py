"""`edugate identity`: the gate's public keys and fingerprint, to register it at the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from appliance.cli.common import config_option, fail, friendly_errors
from appliance.config import load_config
from appliance.journal.sealing import SealingError
from appliance.sync.gate_keys import fingerprint, signing_key_text
from appliance.sync.sealed_transport import gate_private_key, gate_signing_key, public_text


def _owned_like_its_folder(path: Path, existed: bool) -> None:
    """A key file this command made as root goes to the owner of its folder (the daemon's user), or the
    daemon could not read its own key."""
    if existed or os.geteuid() != 0:
        return
    folder = path.parent.stat()
    os.chown(path, folder.st_uid, folder.st_gid)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (for `edugate hub gates add --identity`).")
@friendly_errors
def identity(config_path: Path, as_json: bool) -> None:
    """Print this gate's public keys and fingerprint, and the hub command that registers it.

    The keys derive from the template key file (vision.key_file), made on first use; the private halves never
    leave the gate. Compare the fingerprint with what `edugate hub gates list` shows before approving a key.
    """
    config = load_config(config_path)
    key_file = config.vision.key_file
    existed = key_file.exists()
    try:
        template_key = public_text(gate_private_key(key_file))
        signing_key = signing_key_text(gate_signing_key(key_file))
        _owned_like_its_folder(key_file, existed)
    except (OSError, SealingError) as exc:
        fail(f"vision.key_file {key_file}: {getattr(exc, 'strerror', None) or exc}")
    device, school = config.device.id, config.device.school
    found = {
        "device": device,
        "school": school,
        "template_key": template_key,
        "signing_key": signing_key,
        "fingerprint": fingerprint(template_key, signing_key),
    }
    if as_json:
        click.echo(json.dumps(found))
        return
    click.echo(f"gate {device} of school {school}")
    click.echo(f"fingerprint:  {found['fingerprint']}")
    click.echo(f"template key: {template_key}")
    click.echo(f"signing key:  {signing_key}")
    click.echo("Register it on the hub's server:")
    click.echo(
        f"  edugate hub gates add {device} --school {school} --template-key {template_key} --signing-key {signing_key}"
    )
