"""Math verifier behind a real gRPC server: verdicts, info, timeouts, deadlines, fidelity.

The fidelity test compares the server's verdicts on 200+ varied cases with direct
`math_verify.verify(parse(reference), parse(response))` calls.
"""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import pytest
from math_verify import parse, verify
from reward_test_verifiers import request, reward_stub, serving

from reward_servers.math_verifier import MathVerifier, extract_answer, extract_boxed
from rpp_lightning.clients.rewards import RewardClient, RewardQuery
from rpp_lightning.config import RewardSource

# Real pathological input: sympy evaluates the factorial of 10^8, which takes minutes.
PATHOLOGICAL = r"\boxed{(10^{8})!}"


@pytest.fixture(scope="module")
def math_server():
    """One 2-worker math server shared by the tests that only score ordinary samples."""
    with (
        serving(MathVerifier(workers=2, timeout_s=5.0)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield reward_stub(channel)


def scores(stub, *samples, timeout=30.0):
    return list(stub.Score(request(*samples), timeout=timeout).scores)


def test_extraction_boxed_nested_and_fallbacks():
    assert (
        extract_boxed(r"a \boxed{1} then \boxed{\frac{\sqrt{2}}{2}} end") == r"\frac{\sqrt{2}}{2}"
    )
    assert extract_boxed(r"\boxed{\frac{1}{2}") is None  # never closed
    assert extract_answer("So the answer is $\\frac{3}{4}$. Done") == (r"\frac{3}{4}", "answer_is")
    assert extract_answer("we get 1,234 apples and 3.5 pears") == ("3.5", "last_number")
    assert extract_answer("we get 7", fallbacks=("boxed",)) is None
    assert extract_answer("nothing here") is None
    with pytest.raises(ValueError, match="unknown extraction method"):
        extract_answer("x", fallbacks=("guess",))


@pytest.mark.timeout(60)
def test_verdicts_and_info(math_server):
    got = scores(
        math_server,
        ("boxed", r"Thus \boxed{\frac{1}{2}}.", "0.5"),
        ("answer_is", "The answer is 3.5.", r"\frac{7}{2}"),
        ("last", "First 2, then 12", "12"),
        ("wrong", r"\boxed{5}", "4"),
        ("none", "I give up", "4"),
        ("junk", r"\boxed{\frac{}{}}", "4"),
    )
    by_id = {s.id: s for s in got}
    assert [s.id for s in got] == ["boxed", "answer_is", "last", "wrong", "none", "junk"]
    assert by_id["boxed"].reward == 1.0
    assert dict(by_id["boxed"].info) == {
        "correct": "true",
        "extracted_answer": r"\frac{1}{2}",
        "method": "boxed",
    }
    assert by_id["wrong"].info["correct"] == "false"
    assert (by_id["answer_is"].reward, by_id["answer_is"].info["method"]) == (1.0, "answer_is")
    assert (by_id["last"].reward, by_id["last"].info["extracted_answer"]) == (1.0, "12")
    assert (by_id["wrong"].reward, by_id["wrong"].info["error"]) == (0.0, "wrong_answer")
    assert (by_id["none"].reward, by_id["none"].info["error"]) == (0.0, "no_answer_found")
    assert (by_id["junk"].reward, by_id["junk"].info["error"]) == (0.0, "parse_error")


@pytest.mark.timeout(60)
def test_trainer_reward_client_reads_rewards_and_verdicts():
    with serving(MathVerifier(workers=2)) as server:
        client = RewardClient([RewardSource(name="math", addresses=[server.address])])
        try:
            batch = client.score(
                [
                    RewardQuery("p", r"so \boxed{0.75}", r"\frac{3}{4}"),
                    RewardQuery("p", r"so \boxed{0.7}", r"\frac{3}{4}"),
                ]
            )
        finally:
            client.close()
    assert batch.total == [1.0, 0.0]
    assert batch.correct == [True, False]
    assert batch.infos[1]["math.error"] == "wrong_answer"


@pytest.mark.timeout(60)
def test_configurable_rewards_and_fallbacks():
    verifier = MathVerifier(
        correct_reward=2.0, wrong_reward=-1.0, format_reward=0.5, fallbacks=("boxed",), workers=1
    )
    with serving(verifier) as server, grpc.insecure_channel(server.address) as channel:
        got = scores(
            reward_stub(channel),
            ("a", r"\boxed{4}", "4"),
            ("b", r"\boxed{5}", "4"),
            ("c", "the answer is 4", "4"),  # boxed only: not found
        )
    assert [s.reward for s in got] == [2.5, -0.5, -1.0]
    assert got[2].info["error"] == "no_answer_found"


@pytest.mark.timeout(60)
def test_missing_reference_is_invalid_argument(math_server):
    with pytest.raises(grpc.RpcError) as err:
        scores(math_server, ("has", r"\boxed{1}", "1"), ("lacks", r"\boxed{1}", ""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requires a reference" in err.value.details() and "'lacks'" in err.value.details()
    assert scores(math_server, ("ok", r"\boxed{1}", "1"))[0].reward == 1.0  # still serving


@pytest.mark.timeout(60)
def test_soft_timeout_scores_zero_and_keeps_serving():
    with (
        serving(MathVerifier(workers=2, timeout_s=1.0)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = reward_stub(channel)
        start = time.monotonic()
        got = scores(stub, ("slow", PATHOLOGICAL, "1"), ("fast", r"\boxed{2}", "2"))
        assert time.monotonic() - start < 4.0
        assert (got[0].reward, got[0].info["error"]) == (0.0, "timeout")
        assert got[0].info["extracted_answer"] == "(10^{8})!"
        assert got[1].reward == 1.0
        assert scores(stub, ("next", r"\boxed{3}", "3"))[0].reward == 1.0


@pytest.mark.timeout(60)
def test_hard_timeout_kills_and_replaces_a_stuck_worker():
    # soft_timeout=False: only the parent's kill can stop the sample, as for a C-level hang.
    verifier = MathVerifier(workers=1, timeout_s=0.5, hard_grace_s=0.5, soft_timeout=False)
    first_pid = verifier.pool.slots[0].process.pid
    with serving(verifier) as server, grpc.insecure_channel(server.address) as channel:
        stub = reward_stub(channel)
        got = scores(stub, ("stuck", PATHOLOGICAL, "1"), ("after", r"\boxed{2}", "2"))
        assert (got[0].reward, got[0].info["error"]) == (0.0, "timeout")
        assert got[1].reward == 1.0  # scored by the replacement worker
        assert verifier.pool.slots[0].process.pid != first_pid


@pytest.mark.timeout(60)
def test_client_deadline_is_honoured():
    with (
        serving(MathVerifier(workers=1, timeout_s=1.5)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = reward_stub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            scores(stub, *[(f"s{i}", PATHOLOGICAL, "1") for i in range(4)], timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 3  # not the 6 s of the four samples
        # The dropped samples are not run: the worker is free again after the one in flight.
        assert scores(stub, ("next", r"\boxed{3}", "3"), timeout=10)[0].reward == 1.0


def test_math_verify_signal_timeouts_need_the_main_thread():
    # Why the verifier uses worker processes: math-verify's own timeout (signal.alarm) raises in
    # any thread but the main one, which is where gRPC runs servicers.
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_try_parse_in_thread()))
    thread.start()
    thread.join()
    assert errors == ["ValueError"]


def _try_parse_in_thread() -> str:
    try:
        parse("$1/2$", parsing_timeout=5, raise_on_error=True)
    except ValueError:
        return "ValueError"
    return "no error"


@pytest.mark.timeout(60)
def test_several_clients_at_once(math_server):
    results: dict[int, list[float]] = {}

    def client(k: int) -> None:
        samples = [(f"{k}-{n}", rf"\boxed{{{n + k}}}", str(n + (n % 2))) for n in range(20)]
        results[k] = [s.reward for s in scores(math_server, *samples)]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(4):
        assert results[k] == [float(n + k == n + (n % 2)) for n in range(20)]


def fidelity_cases():
    """(reference, response) pairs: fractions, decimals, LaTeX, sets, intervals, wrong, junk."""
    cases = []
    fracs = [(1, 2), (3, 4), (2, 3), (5, 8), (7, 3), (-1, 4), (9, 10), (11, 6)]
    for a, b in fracs:
        ref = rf"\frac{{{a}}}{{{b}}}"
        cases += [
            (ref, rf"So the result is \boxed{{{a}/{b}}}."),
            (ref, rf"Thus $\boxed{{\dfrac{{{2 * a}}}{{{2 * b}}}}}$"),
            (ref, rf"\boxed{{{a / b:.6f}}}"),
            (ref, rf"\boxed{{{a / b:.2f}}}"),
            (ref, rf"\boxed{{\frac{{{a + 1}}}{{{b}}}}}"),
        ]
    for value in ["0.25", "1.5", "-3.75", "100", "0.001", "2.50", "12.125", "-0.5"]:
        x = float(value)
        cases += [
            (value, rf"\boxed{{{value}}}"),
            (value, rf"The answer is \boxed{{{x * 1:g}}}"),
            (value, rf"\boxed{{{x + 1:g}}}"),
            (value, rf"\boxed{{{x:.1f}}}"),
        ]
    latex = [
        (r"\frac{\sqrt{2}}{2}", [r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", r"\sqrt{3}/2", r"0.7071"]),
        (r"2\pi", [r"2\pi", r"\pi \cdot 2", r"\pi", r"6.2832"]),
        (r"(x+1)^2", [r"x^2+2x+1", r"(x+1)(x+1)", r"x^2+1", r"(1+x)^{2}"]),
        (r"\sqrt{8}", [r"2\sqrt{2}", r"\sqrt{8}", r"4", r"2.828427"]),
        (r"e^{2}", [r"e^2", r"\exp(2)", r"2e", r"7.389056"]),
        (r"\frac{\pi}{3}", [r"60^\circ", r"\pi/3", r"\frac{\pi}{6}", r"1.047198"]),
        (r"x=3", [r"x=3", r"3", r"x=4", r"x = 3"]),
        (r"3^{10}", [r"59049", r"3^{10}", r"59048", r"9^5"]),
    ]
    for ref, answers in latex:
        for answer in answers:
            cases += [(ref, rf"Therefore the final answer is $\boxed{{{answer}}}$.")]
    sets = [
        (r"\{1,2,3\}", [r"\{3,2,1\}", r"\{1,2\}", r"\{1, 2, 3\}", r"1,2,3", r"\{1,2,3,4\}"]),
        (r"\{-1, 5\}", [r"\{5,-1\}", r"-1, 5", r"\{1,5\}", r"\{-1\}"]),
        (r"\{\frac{1}{2}, 2\}", [r"\{0.5, 2\}", r"\{2, \frac{1}{2}\}", r"\{\frac12, 3\}"]),
    ]
    intervals = [
        (r"(0,1]", [r"(0,1]", r"(0, 1]", r"[0,1]", r"(0,1)", r"\left(0, 1\right]"]),
        (r"[2,5)", [r"[2,5)", r"[2, 5)", r"(2,5)", r"[2,5]"]),
        (r"(-\infty, 3)", [r"(-\infty,3)", r"(-\infty, 3]", r"(3, \infty)"]),
        (r"[0,\infty)", [r"[0,\infty)", r"[0, \infty)", r"(0,\infty)"]),
        (r"(1,2)\cup(3,4)", [r"(1,2)\cup(3,4)", r"(3,4)\cup(1,2)", r"(1,4)"]),
    ]
    for ref, answers in sets + intervals:
        cases += [(ref, rf"The solution set is $\boxed{{{answer}}}$") for answer in answers]
    for n in range(0, 75, 3):
        cases += [
            (str(n), rf"We compute step by step and get \boxed{{{n}}}"),
            (str(n), rf"\boxed{{{n + 2}}}"),
        ]
    junk = [
        r"\boxed{\frac{}{}}",
        r"\boxed{hello world}",
        "I cannot solve this problem.",
        r"\boxed{",
        r"\boxed{}",
        r"\boxed{\sqrt{}}",
        "The answer is unclear.",
        r"\boxed{x^}",
        r"$$ $$",
        r"\boxed{\text{no idea}}",
    ]
    cases += [(ref, text) for ref, text in itertools.product(["7", r"\frac{1}{3}"], junk)]
    return cases


@pytest.mark.timeout(120)
def test_fidelity_with_direct_math_verify(math_server):
    cases = fidelity_cases()
    assert len(cases) >= 200
    samples = [(f"c{i}", response, reference) for i, (reference, response) in enumerate(cases)]
    served = [s.reward == 1.0 for s in scores(math_server, *samples, timeout=120)]
    direct = [verify(parse(f"${reference}$"), parse(response)) for reference, response in cases]
    mismatches = [
        (cases[i], served[i], direct[i]) for i in range(len(cases)) if served[i] != direct[i]
    ]
    assert not mismatches
    # Not a vacuous comparison: both verdicts occur in quantity.
    assert 80 < sum(direct) < len(cases) - 60
