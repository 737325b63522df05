"""The floor under the trainer's per-call overhead: one small gRPC call to an idle server.

    python benchmarks/rpc_latency.py

Starts a generation server on a tiny random model (loopback, a child process like the embedded
default) and times `GetInfo`, the smallest call there is, back to back and after the caller has
slept 5, 20 and 50 ms, the way a training iteration leaves its servers idle between calls. On a
VM whose idle vCPUs halt, waking the server costs more than the call itself: that cost is paid
by every generate, score and weight push call of an iteration. Last line: one JSON object.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from rpp_lightning.clients.generation import GenerationClient
from rpp_lightning.clients.local_servers import ChildServer, generation_server_argv

GAPS_MS = (0, 5, 20, 50)
CALLS = 60


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpp_lightning.tiny import tiny_llama_config

    with tempfile.TemporaryDirectory() as model_dir:
        AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained("assets/char_tokenizer").save_pretrained(model_dir)
        server = ChildServer(generation_server_argv(model_dir, []), name="generation-server")
        try:
            client = GenerationClient([server.address], timeout_s=60)
            client.wait_until_ready()
            medians = {}
            for gap_ms in GAPS_MS:
                times = []
                for _ in range(CALLS):
                    time.sleep(gap_ms / 1000)
                    start = time.perf_counter()
                    client.server_info()  # GetInfo, through the trainer's client
                    times.append(time.perf_counter() - start)
                medians[gap_ms] = statistics.median(times[5:])  # the first calls warm up
                print(f"GetInfo after {gap_ms:2d} ms idle: median {medians[gap_ms] * 1000:.3f} ms")
            client.close()
        finally:
            server.stop()
    ratio = medians[20] / medians[0]
    print(f"a call to a server idle for 20 ms takes {ratio:.2f}× a back-to-back call")
    print(
        json.dumps(
            {f"getinfo_after_{gap}ms_idle_s": value for gap, value in medians.items()}
            | {"idle20_vs_back_to_back": ratio}
        )
    )


if __name__ == "__main__":
    main()
