"""Write deploy/locks/<image>.txt: the exact versions each image's `pip install` resolves.

The Dockerfiles install with `-c deploy/locks/<image>.txt`, so an image built today and one built
next month hold the same packages. Run after changing the project's dependencies (needs PyPI):

    python deploy/lock.py                 # all three images
    python deploy/lock.py math            # one

It asks pip to resolve (`pip install --dry-run --report`, nothing installed) for the images'
interpreter and platform (CPython 3.12, manylinux x86_64, wheels only), against PyPI alone: the pip
configuration of this machine (local indexes, constraints) is not read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "deploy" / "locks"
PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64"]

IMAGES = {
    # image: (extras, extra requirements, CUDA-only packages left out)
    "math": ("math", [], False),
    # the image installs torch's CPU build from the PyTorch CPU index: resolve against the same
    # version and leave out what only PyPI's CUDA build of torch needs
    "preference": ("preference", ["torch==2.13.0"], True),
    "trainer": ("train,vllm", ["vllm==0.32.0"], False),
}
CUDA_ONLY_PREFIXES = ("nvidia-", "cuda-", "triton")


def resolve(wheel: Path, extras: str, extra: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every package pip would install, the project itself excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--report", str(report), "--python-version", PYTHON, *platforms,
               "--only-binary=:all:", "--target", str(Path(tmp) / "target"),
               f"{wheel}[{extras}]", *extra]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        items = json.loads(report.read_text())["install"]
    pins = [(i["metadata"]["name"], i["metadata"]["version"]) for i in items]
    return sorted((n, v) for n, v in pins if n != "rpp-lightning")


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp, str(ROOT)],
            check=True,
        )
        wheel = next(Path(tmp).glob("rpp_lightning-*.whl"))
        for name in names or list(IMAGES):
            extras, extra, cpu_torch = IMAGES[name]
            pins = resolve(wheel, extras, extra)
            if cpu_torch:
                pins = [(n, v) for n, v in pins if not n.lower().startswith(CUDA_ONLY_PREFIXES)]
            header = (
                f"# The {name} image: what `pip install .[{extras}]` resolves for CPython {PYTHON}"
                f" on manylinux x86_64\n# (wheels only). Written by `python deploy/lock.py`; "
                "the Dockerfile installs with -c this file.\n"
            )
            body = "".join(f"{n}=={v}\n" for n, v in pins)
            (LOCKS / f"{name}.txt").write_text(header + body)
            print(f"{name}: {len(pins)} packages")


if __name__ == "__main__":
    main(sys.argv[1:])
