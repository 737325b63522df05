"""The package's ground rules: fresh stubs, a torch-free light path, working console scripts."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gen_protos


def test_committed_stubs_match_protos() -> None:
    stale = gen_protos.stale_files()
    assert stale == [], f"regenerate with `python scripts/gen_protos.py`: {stale}"


def test_stub_check_detects_drift(tmp_path, monkeypatch) -> None:
    # Guard against a check that can never fail: a stub edited by hand must be reported.
    copy = tmp_path / "proto"
    shutil.copytree(gen_protos.STUB_DIR, copy)
    (copy / "reward_pb2.py").write_text("# edited\n")
    monkeypatch.setattr(gen_protos, "STUB_DIR", copy)
    assert gen_protos.stale_files() == ["reward_pb2.py"]


_BLOCK_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
    "import importlib\n"
    "for name in {modules!r}:\n"
    "    importlib.import_module(name)\n"
    "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
    "print('ok')\n"
)


@pytest.mark.parametrize(
    "modules",
    [
        ["rpp_lightning.proto.reward_pb2", "rpp_lightning.proto.reward_pb2_grpc"],
        ["rpp_lightning.proto.generation_pb2", "rpp_lightning.proto.generation_pb2_grpc"],
        [
            "rpp_lightning.rpc.serving",
            "rpp_lightning.rpc.server_config",
            "rpp_lightning.rpc.channels",
            "reward_servers",
        ],
    ],
)
def test_light_path_never_imports_torch(modules: list[str]) -> None:
    code = _BLOCK_TORCH.format(modules=modules)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("script", ["rpp-train", "rpp-reward-server", "rpp-generation-server"])
def test_console_scripts_give_help(script: str) -> None:
    path = shutil.which(script)
    assert path, f"{script} is not installed: pip install -e ."
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_start_calls_runs_a_lone_call_here_and_several_in_parallel() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from rpp_lightning.rpc.channels import start_calls

    def fail() -> None:
        raise ValueError("bad call")

    with ThreadPoolExecutor(2) as pool:
        (lone,) = start_calls(pool, [threading.get_ident])
        assert lone.result() == threading.get_ident()  # no thread hop for a single call
        (failed,) = start_calls(pool, [fail])
        with pytest.raises(ValueError, match="bad call"):
            failed.result()
        barrier = threading.Barrier(2, timeout=10)  # both must run at once to pass it
        both = start_calls(pool, [barrier.wait, barrier.wait])
        assert sorted(call.result() for call in both) == [0, 1]
