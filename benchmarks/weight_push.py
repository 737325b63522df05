"""Weight push speed per transport, against a raw in-process copy, measured in one run.

    python benchmarks/weight_push.py                    # CPU: grpc, shm, collective (gloo)
    python benchmarks/weight_push.py --transports grpc shm --repeats 9

The ~100 MB model of `generation_throughput.py` (tiny Llama architecture, hidden 640, 4
layers, fp32) is pushed with `GenerationClient.push_weights` to a `rpp-generation-server` child
process on loopback, once per transport, each push validated, committed and swapped in (what a
trainer waits for). The raw figure is a `copy_` of the same tensors into a model-shaped state
dict in this process. Figures are the best of `--repeats` pushes (after one warm-up push, which
maps the shared memory or joins the collective group); ratios are to the raw copy and to grpc.
Goals (issue 25): shm >= 0.5x the raw copy; collective >= 2x grpc. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_throughput import start_server

from rpp_lightning.clients.generation import GenerationClient
from rpp_lightning.generation.transformers_backend import TransformersBackend
from rpp_lightning.tiny import save_tiny_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", nargs="+", default=["grpc", "shm", "collective"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and there")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_causal_lm(Path(tmp) / "sync-model", hidden_size=640, num_layers=4)
        state = TransformersBackend(str(model), device="cpu").model.state_dict()
        state = {k: v.clone() for k, v in state.items()}
        megabytes = sum(t.nbytes for t in state.values()) / 1e6
        target = {k: torch.empty_like(v) for k, v in state.items()}
        raw = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            for name, tensor in state.items():
                target[name].copy_(tensor)
            raw.append(megabytes / (time.perf_counter() - start))
        figures["raw_copy_mb_per_s"] = max(raw)
        for transport in args.transports:
            proc, address = start_server(model, "cpu", 8)
            try:
                with GenerationClient([address], weight_transport=transport) as client:
                    client.wait_until_ready()
                    rates = []
                    for version in range(1, args.repeats + 2):
                        start = time.perf_counter()
                        client.push_weights(state, version=version)
                        if version > 1:  # the first push maps, joins and warms up
                            rates.append(megabytes / (time.perf_counter() - start))
                    used = client.transport_of(address)
                    if used != transport:
                        raise RuntimeError(f"asked for {transport}, pushed by {used}")
            finally:
                proc.terminate()
                proc.wait(30)
            figures[f"{transport}_mb_per_s"] = max(rates)
    raw_mbps = figures["raw_copy_mb_per_s"]
    print(f"weight push: {megabytes:.1f} MB, {len(state)} tensors, loopback, "
          f"{args.threads} thread(s), best of {args.repeats}")  # fmt: skip
    print(f"  raw in-process copy: {raw_mbps:9.1f} MB/s")
    for transport in args.transports:
        rate = figures[f"{transport}_mb_per_s"]
        figures[f"{transport}_vs_raw"] = rate / raw_mbps
        line = f"  {transport:19s}: {rate:9.1f} MB/s  {rate / raw_mbps:6.3f}x raw"
        if "grpc_mb_per_s" in figures and transport != "grpc":
            figures[f"{transport}_vs_grpc"] = rate / figures["grpc_mb_per_s"]
            line += f"  {figures[f'{transport}_vs_grpc']:6.2f}x grpc"
        print(line)
    figures["push_mb"] = megabytes
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
