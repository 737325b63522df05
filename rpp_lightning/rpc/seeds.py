"""How seeds are mixed: shared by the generation client (a request's seed base) and the server
(each row's own stream), so the two never state it twice. Standard library only.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A standard 64-bit mixer (Steele et al.): nearby inputs give unrelated outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(request_seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample: `sample_index` of prompt `prompt_index` of a seeded request.

    Prompt i of a request seeded s is sampled exactly like prompt 0 of a request seeded s + i. A
    caller that splits one request into pieces starting at prompt k sends seed s + k with each
    piece and gets the tokens the whole request would have given, whichever replica serves it and
    however the server batches it. Fits in 63 bits (torch and vLLM take signed 64-bit seeds).
    """
    prompt_stream = _splitmix64((request_seed + prompt_index) & _MASK64)
    return _splitmix64(prompt_stream ^ sample_index) >> 1


def mix_seed(seed: int) -> int:
    """A well-spread 63-bit seed from any integer (the client's seed base)."""
    return _splitmix64(seed & _MASK64) >> 1
