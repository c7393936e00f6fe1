"""The daemon's persistent Ed25519 identity: its peer id is derived from this key, so it must
survive restarts (other peers' routing tables and records refer to it) and must stay private.
Entry point: `load_or_create_identity(path)`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key


def default_identity_path() -> Path:
    """`$XDG_DATA_HOME/petald/identity.key` (the systemd unit passes its StateDirectory)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "petald" / "identity.key"


def load_or_create_identity(path: Path) -> tuple[KeyPair, bool]:
    """The key pair stored at `path`, created (mode 0600) on first use. Returns (key, created).

    Refuses a key file others can read, like ssh does: a leaked key lets anyone impersonate the
    peer and sign records in its name."""
    path = Path(path)
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ValueError(
                f"identity file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            )
        try:
            private = deserialize_private_key(path.read_bytes())
        except Exception as e:  # the libp2p decoder raises several unrelated types
            raise ValueError(f"identity file {path} is not a libp2p private key: {e}") from e
        return KeyPair(private, private.get_public_key()), False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pair = create_new_key_pair()
    data = key_pair.private_key.serialize()
    # O_EXCL: two daemons starting at once must not silently end up with different identities.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return key_pair, True
