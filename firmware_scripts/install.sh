#!/usr/bin/env bash
# Install the edugate gate daemon on Raspberry Pi OS (Bookworm) / Debian 12.
#
# Run as root from a checkout of the repository:
#     sudo ./firmware_scripts/install.sh [--prefix DIR] [--no-apt] [--dry-run]
#
# Safe to run again (e.g. after `git pull`): existing users, directories and the
# school's /etc/edugate/gate.toml are kept; the code and unit file are refreshed.
set -euo pipefail

readonly USER_NAME=edugate
readonly CONF_DIR=/etc/edugate
readonly CONF_FILE=$CONF_DIR/gate.toml
readonly STATE_DIR=/var/lib/edugate
readonly UDEV_RULES_DIR=/etc/udev/rules.d
readonly UNIT_DIR=/etc/systemd/system
readonly DEFAULT_PREFIX=/opt/edugate
# Debian's interpreter, so a --system-site-packages venv sees apt's python3-* packages
# even if root's PATH has another python3 first.
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=python3
# Overridable only so the Raspberry Pi branch can be exercised in tests.
MODEL_FILE=${EDUGATE_MODEL_FILE:-/proc/device-tree/model}

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$SCRIPT_DIR/.." && pwd -P)

PREFIX=$DEFAULT_PREFIX
DO_APT=1
DRY_RUN=0

usage() {
    cat <<EOF
Usage: sudo $0 [OPTIONS]

Install the edugate gate daemon from this checkout ($REPO).

Options:
  --prefix DIR   install the Python venv under DIR/venv (default: $DEFAULT_PREFIX)
  --no-apt       do not install Debian packages (apt-get) first
  --dry-run      print what would be done, change nothing
  -h, --help     show this help and exit

What it does:
  apt packages (pcscd, python3-venv, ...; picamera2/gpiozero on a Raspberry Pi),
  system user '$USER_NAME', $CONF_DIR and $STATE_DIR, the venv with edugate,
  $CONF_FILE (only if missing), udev rules for keyboard-wedge readers,
  and the systemd unit edugate.service (enabled and started).
EOF
}

die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }

# Run a command, or only show it with --dry-run.
run() {
    if (( DRY_RUN )); then
        printf '[dry-run] %s\n' "$(quote "$@")"
    else
        printf '+ %s\n' "$(quote "$@")"
        "$@"
    fi
}

quote() {
    local out="" arg
    for arg in "$@"; do
        out+="$(printf '%q' "$arg") "
    done
    printf '%s' "${out% }"
}

ORIG_ARGS=("$@")
while (( $# )); do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --prefix) (( $# >= 2 )) || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#--prefix=} ;;
        --no-apt) DO_APT=0 ;;
        --dry-run) DRY_RUN=1 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, got '$PREFIX'"
PREFIX=${PREFIX%/}
[[ -n $PREFIX ]] || die "--prefix must not be /"
readonly VENV=$PREFIX/venv
readonly EDUGATE_BIN=$VENV/bin/edugate

if (( EUID != 0 )); then
    if (( DRY_RUN )); then
        warn "not running as root; fine for --dry-run, a real install needs sudo"
    else
        die "must run as root: sudo $0 ${ORIG_ARGS[*]}"
    fi
fi

for f in pyproject.toml systemd/edugate.service firmware_scripts/99-edugate-readers.rules; do
    [[ -f $REPO/$f ]] || die "$REPO does not look like an edugate checkout (missing $f)"
done

# The venv and unit must be readable by the edugate user whatever root's umask is.
umask 022

IS_PI=0
if [[ -r $MODEL_FILE ]] && tr -d '\0' <"$MODEL_FILE" | grep -q 'Raspberry Pi'; then
    IS_PI=1
fi

SYSTEMD_PID1=0
if [[ -d /run/systemd/system && "$(cat /proc/1/comm 2>/dev/null || true)" == systemd ]]; then
    SYSTEMD_PID1=1
fi

HOST_KIND="generic Debian host"
(( IS_PI )) && HOST_KIND="Raspberry Pi"
MODE_NOTE=""
(( DRY_RUN )) && MODE_NOTE=", DRY RUN (nothing is changed)"
printf 'edugate installer: repo %s, prefix %s, %s%s\n' "$REPO" "$PREFIX" "$HOST_KIND" "$MODE_NOTE"

# ---------------------------------------------------------------------------
step "Debian packages (apt)"
APT_PACKAGES=(
    python3 python3-venv python3-dev gcc swig   # build pyscard in the venv
    libpcsclite-dev libpcsclite1 pcscd pcsc-tools libccid  # PC/SC readers (libccid: USB CCID driver)
    alsa-utils espeak-ng                         # sound feedback
)
if (( IS_PI )); then
    APT_PACKAGES+=(python3-picamera2 python3-gpiozero python3-lgpio)
fi
if (( DO_APT )); then
    command -v apt-get >/dev/null || (( DRY_RUN )) || die "apt-get not found; use --no-apt and install the packages by hand"
    run apt-get update
    # --no-install-recommends keeps picamera2 from pulling in a desktop stack on Pi OS Lite.
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
else
    note "skipped (--no-apt); needed: ${APT_PACKAGES[*]}"
fi

# ---------------------------------------------------------------------------
step "System user and group '$USER_NAME' (groupadd/useradd)"
if getent group "$USER_NAME" >/dev/null; then
    note "group $USER_NAME exists"
else
    run groupadd --system "$USER_NAME"
fi
if getent passwd "$USER_NAME" >/dev/null; then
    note "user $USER_NAME exists (skipping useradd)"
else
    run useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "edugate gate daemon" "$USER_NAME"
fi
for group in input audio video gpio; do
    if getent group "$group" >/dev/null; then
        run usermod --append --groups "$group" "$USER_NAME"
    else
        note "no group '$group' on this system, not adding $USER_NAME to it"
    fi
done

# ---------------------------------------------------------------------------
step "Directories"
run install -d -o root -g "$USER_NAME" -m 0750 "$CONF_DIR"
run install -d -o "$USER_NAME" -g "$USER_NAME" -m 0700 "$STATE_DIR"
run install -d -o root -g root -m 0755 "$PREFIX"

# ---------------------------------------------------------------------------
step "Python venv at $VENV"
if (( ! DRY_RUN )); then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "edugate needs Python >= 3.11, $("$PYTHON" --version 2>&1) found"
fi
VENV_ARGS=()
PIP_TARGET=$REPO
if (( IS_PI )); then
    # apt's picamera2/gpiozero/lgpio must be importable from the venv.
    VENV_ARGS+=(--system-site-packages)
    PIP_TARGET="${REPO}[pi]"
fi
# Re-running venv on an existing one is harmless and refreshes pyvenv.cfg.
run "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
run env PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --root-user-action=ignore "$PIP_TARGET"

# ---------------------------------------------------------------------------
step "Configuration $CONF_FILE"
EXAMPLE=$REPO/config/gate.example.toml
CONFIG_RESULT="not checked"
if [[ -e $CONF_FILE ]]; then
    note "keeping the existing $CONF_FILE (never overwritten)"
elif [[ -f $EXAMPLE ]]; then
    run install -o root -g "$USER_NAME" -m 0640 "$EXAMPLE" "$CONF_FILE"
    note "edit it for this school: sudoedit $CONF_FILE"
else
    warn "$EXAMPLE is missing; write $CONF_FILE by hand"
fi
if (( DRY_RUN )); then
    run "$EDUGATE_BIN" config check "$CONF_FILE"
    CONFIG_RESULT="not checked (dry run)"
elif [[ ! -e $CONF_FILE ]]; then
    CONFIG_RESULT="MISSING"
elif "$EDUGATE_BIN" config check "$CONF_FILE"; then
    CONFIG_RESULT="OK"
else
    CONFIG_RESULT="FAILED (exit $?): fix it, then run: $EDUGATE_BIN config check $CONF_FILE"
    warn "config check failed for $CONF_FILE"
fi
note "config check: $CONFIG_RESULT"

# ---------------------------------------------------------------------------
step "udev rules for keyboard-wedge card readers"
run install -D -o root -g root -m 0644 "$REPO/firmware_scripts/99-edugate-readers.rules" \
    "$UDEV_RULES_DIR/99-edugate-readers.rules"
if command -v udevadm >/dev/null; then
    if (( DRY_RUN )); then
        run udevadm control --reload-rules
        run udevadm trigger --subsystem-match=input --action=change
    elif udevadm control --reload-rules && udevadm trigger --subsystem-match=input --action=change; then
        note "udev rules reloaded"
    else
        warn "could not reload udev (no udevd running?); the rules apply after a reboot"
    fi
else
    note "udevadm not found; the rules apply once udev runs"
fi

# ---------------------------------------------------------------------------
step "systemd unit edugate.service"
UNIT_SRC=$REPO/systemd/edugate.service
if [[ $PREFIX == "$DEFAULT_PREFIX" ]]; then
    run install -D -o root -g root -m 0644 "$UNIT_SRC" "$UNIT_DIR/edugate.service"
elif (( DRY_RUN )); then
    printf '[dry-run] install %s to %s with ExecStart under %s\n' "$UNIT_SRC" "$UNIT_DIR/edugate.service" "$VENV"
else
    # Point ExecStart at the chosen prefix.
    UNIT_TMP=$(mktemp)
    trap 'rm -f "$UNIT_TMP"' EXIT
    sed "s#$DEFAULT_PREFIX/venv/#$VENV/#g" "$UNIT_SRC" >"$UNIT_TMP"
    run install -D -o root -g root -m 0644 "$UNIT_TMP" "$UNIT_DIR/edugate.service"
fi
SERVICE_STATE="not started (dry run)"
START_HINT="systemctl daemon-reload && systemctl enable --now pcscd edugate"
if (( SYSTEMD_PID1 )); then
    run systemctl daemon-reload
    if (( DRY_RUN )) || systemctl cat pcscd.service >/dev/null 2>&1; then
        run systemctl enable --now pcscd
    else
        warn "pcscd is not installed; PC/SC readers will not work until it is (apt-get install pcscd)"
    fi
    run systemctl enable edugate
    # restart, not just start: a re-run after an update must load the new code.
    if run systemctl restart edugate; then
        (( DRY_RUN )) || SERVICE_STATE="enabled and running"
    else
        SERVICE_STATE="FAILED to start: journalctl -u edugate -e"
        warn "edugate did not start; see: journalctl -u edugate -e"
    fi
else
    note "systemd is not PID 1 here (container/chroot?): the service was not started."
    note "On the gate itself, start it with: sudo sh -c '$START_HINT'"
    SERVICE_STATE="not started (systemd is not PID 1): $START_HINT"
fi

# ---------------------------------------------------------------------------
step "Done${MODE_NOTE:+ (dry run: nothing was changed)}"
cat <<EOF
    Service:       $SERVICE_STATE
    Config:        $CONF_FILE   (config check: $CONFIG_RESULT)
    Journal:       $STATE_DIR/journal.db
    Program:       $EDUGATE_BIN
    Logs:          journalctl -u edugate -f
    Status:        $EDUGATE_BIN status    (or: systemctl status edugate)
    Card readers:  ls -l /dev/input/edugate-wedge-*   (add ids in $UDEV_RULES_DIR/99-edugate-readers.rules)
EOF
