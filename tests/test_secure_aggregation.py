"""How the coordinator reads a failed site reply: a refusal by its structured fields, anything else by its text."""

from __future__ import annotations

from flwr.app import Error

from fedcare.protocol import REFUSAL_CODE, Refusal, RefusalKind
from server.secure_aggregation import FailedReply, _failure, failure_lines


def test_a_refusal_is_read_from_its_fields_not_its_text():
    refusal = Refusal(RefusalKind.BUDGET, "ε = 3.2 > 3", shared="privacy budget: this round would exceed the policy")
    reply = _failure(Exception(Error(code=REFUSAL_CODE, reason=refusal.reason())))
    assert reply.kind is RefusalKind.BUDGET and reply.permanent
    assert reply.what == "refused (budget): privacy budget: this round would exceed the policy"
    assert "3.2" not in refusal.reason()  # only the shared message travels
    # the same words under another error code are not a refusal: no decision is taken on text
    assert _failure(Exception(Error(code=2, reason=refusal.reason()))).kind is None


def test_a_crash_shows_the_exception_s_last_line():
    reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() ...\n" \
             "  File \"x.py\", line 3, in f\nValueError: the site's file vanished'>"
    assert _failure(Exception(Error(code=2, reason=reason))) == FailedReply(None, "ValueError: the site's file vanished")


def test_an_unreadable_refusal_is_reported_as_a_protocol_refusal():
    reply = _failure(Exception(Error(code=REFUSAL_CODE, reason="not json")))
    assert reply.kind is RefusalKind.PROTOCOL and "unreadable refusal" in reply.what and not reply.permanent


def test_identical_refusals_are_one_line_naming_the_sites():
    def refused(site, message="the study's δ = 0.0001 exceeds this site's policy max_delta = 1e-05"):
        return _failure(Exception(Error(code=REFUSAL_CODE, reason=Refusal(RefusalKind.POLICY, message, site=site).reason())))

    lines = failure_lines([refused("rural"), refused("community"), refused("university", "other reason"),
                           _failure(Exception(Error(code=2, reason="ValueError: boom")))])
    assert lines == [
        "sites community, rural refused (policy): the study's δ = 0.0001 exceeds this site's policy max_delta = 1e-05",
        "site university refused (policy): other reason",
        "a site failed: ValueError: boom",
    ]
