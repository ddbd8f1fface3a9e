"""How the coordinator reads a failed site reply: a refusal by its structured fields, anything else by its text."""

from __future__ import annotations

from flwr.app import Error

from fedcare.protocol import REFUSAL_CODE, Refusal, RefusalKind
from server.secure_aggregation import _failure


def test_a_refusal_is_read_from_its_fields_not_its_text():
    refusal = Refusal(RefusalKind.BUDGET, "ε = 3.2 > 3", shared="privacy budget: this round would exceed the policy")
    kind, line = _failure(Exception(Error(code=REFUSAL_CODE, reason=refusal.reason())))
    assert kind is RefusalKind.BUDGET
    assert line == "refused (budget): privacy budget: this round would exceed the policy"
    # the same words under another error code are not a refusal: no decision is taken on text
    kind, _ = _failure(Exception(Error(code=2, reason=refusal.reason())))
    assert kind is None


def test_a_crash_shows_the_exception_s_last_line():
    reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() ...\n" \
             "  File \"x.py\", line 3, in f\nValueError: the site's file vanished'>"
    assert _failure(Exception(Error(code=2, reason=reason))) == (None, "ValueError: the site's file vanished")


def test_an_unreadable_refusal_is_reported_as_a_protocol_refusal():
    kind, line = _failure(Exception(Error(code=REFUSAL_CODE, reason="not json")))
    assert kind is RefusalKind.PROTOCOL and "unreadable refusal" in line
