"""Masked-only guard: a client mod that runs ahead of `secaggplus_mod`.

A legacy Flower client answers whatever the coordinator asks, including `get_parameters`
and a plain `fit` outside secure aggregation, which would hand the coordinator this site's
model in plaintext, and a plaintext evaluation that would reveal its size and scores. The
guard lets through only training messages that are a SecAgg+ stage, whose setup meets the
site's policy (cohort size and reconstruction threshold); evaluation travels inside the
masked vector (`fedcare.contribution`). It refuses any reply that would carry arrays back,
and a masked-vector reply whose plaintext fields say anything about the site (metrics, or a
number of examples other than the round's constant). A refusal is an exception, so the
coordinator receives an error reply whose reason says why, and nothing else.

The guard is also where every refusal of this site becomes its reply: a `fedcare.protocol.Refusal`
raised here or by the client below becomes an error with `REFUSAL_CODE` and the refusal's kind,
message and the site's name as structured fields (logged at the site too); the coordinator never
parses text. A user-facing error of the site's own inputs (`FedcareError`: an unreadable data file,
an invalid study copy) is a refusal too (kind `data` / `study`), one line naming the file and reason.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from fedcare.errors import FedcareError, StudyConfigError
from fedcare.protocol import REFUSAL_CODE, Refusal, RefusalKind
from fedcare.site import site_name, site_paths
from privacy.policy import PolicyError, policy_for_site

SECAGG_STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
logger = logging.getLogger(__name__)


class GuardRefusal(Refusal):
    """This site refuses the request: it would expose its update outside SecAgg+ (kind GUARD), or the
    SecAgg+ round is weaker than its policy allows (kind POLICY)."""

    def __init__(self, message: str, kind: RefusalKind = RefusalKind.GUARD, *, shared: str | None = None) -> None:
        super().__init__(kind, message, shared=shared)


def _carries_arrays(reply: Message) -> bool:
    return not reply.has_error() and any(len(record) for record in reply.content.array_records.values())


def masked_only_guard(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """The guard (see the module docstring); a refusal becomes the structured error reply."""
    try:
        try:
            return _guarded(msg, ctxt, call_next)
        except Refusal:
            raise
        except StudyConfigError as err:  # the site's copy of the study cannot be used: one line, not a traceback
            raise Refusal(RefusalKind.STUDY, err.line) from None
        except PolicyError as err:
            raise Refusal(RefusalKind.POLICY, err.line) from None
        except FedcareError as err:  # the site's data (or another input it owns) cannot take part
            # The reason names the site's files, lines and counts: it stays in the site's log (below); the
            # coordinator reads only that the data cannot be used (no per-site size or value, invariant 3).
            raise Refusal(RefusalKind.DATA, err.line,
                          shared=f"the site's data cannot be used for this study ({type(err).__name__}); "
                                 "the file and reason are in the site's own log") from None
    except Refusal as refusal:
        refusal.site = refusal.site or site_name(dict(ctxt.node_config), dict(ctxt.run_config))
        logger.warning("site refused a '%s' message (%s): %s", msg.metadata.message_type, refusal.kind.value, refusal)
        return Message(Error(code=REFUSAL_CODE, reason=refusal.reason()), reply_to=msg)


def _guarded(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    mtype = msg.metadata.message_type
    if mtype == MessageType.TRAIN:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if stage not in SECAGG_STAGES:
            raise GuardRefusal("training request outside SecAgg+ refused: this site sends updates only masked")
        if stage == Stage.SETUP:
            policy = policy_for_site(site_paths(dict(ctxt.node_config), dict(ctxt.run_config)).policy)
            cohort, threshold = int(configs[Key.SAMPLE_NUMBER]), int(configs[Key.THRESHOLD])
            if cohort < policy.min_cohort:
                raise GuardRefusal(f"SecAgg+ cohort of {cohort} sites is below this site's policy min_cohort = {policy.min_cohort}",
                                   RefusalKind.POLICY)
            if threshold < policy.min_threshold:
                raise GuardRefusal(
                    f"SecAgg+ reconstruction threshold {threshold} is below this site's policy min_threshold = {policy.min_threshold}",
                    RefusalKind.POLICY,
                )
    else:
        raise GuardRefusal(f"'{mtype}' request refused: this site answers only SecAgg+ training rounds")
    reply = call_next(msg, ctxt)
    if _carries_arrays(reply):
        raise GuardRefusal(f"reply to '{mtype}' would carry arrays back; refused")
    if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
        _check_plaintext_fields(reply, ctxt)
    return reply


def _check_plaintext_fields(reply: Message, ctxt: Context) -> None:
    """Next to the masked vector, only constants may travel: no metrics, the round's fixed weight."""
    metrics = reply.content.config_records.get("fitres.metrics")
    if metrics is not None and len(metrics):
        raise GuardRefusal(f"reply would carry plaintext metrics ({', '.join(sorted(metrics))}); refused")
    counts = reply.content.metric_records.get("fitres.num_examples")
    reported = counts.get("num_examples") if counts is not None else None
    expected = int(ctxt.state.config_records[RECORD_KEY_STATE]["max_weight"])
    if reported != expected:
        raise GuardRefusal(f"reply would reveal a number of examples ({reported}) instead of the constant {expected}; refused",
                           shared=f"reply would reveal a number of examples instead of the constant {expected}; refused")
