"""Masked-only guard: a client mod that runs ahead of `secaggplus_mod`.

A legacy Flower client answers whatever the coordinator asks, including `get_parameters`
and a plain `fit` outside secure aggregation, which would hand the coordinator this site's
model in plaintext. The guard lets through only
  - training messages that are a SecAgg+ stage, whose setup meets the site's policy
    (cohort size and reconstruction threshold), and
  - evaluation messages,
and refuses any reply that would carry arrays back. A refusal is an exception, so the
coordinator receives an error reply whose reason says why, and nothing else.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from privacy.policy import policy_for_node

SECAGG_STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)


class GuardRefusal(RuntimeError):
    """This site refuses the request: it would expose its update outside SecAgg+."""


def _carries_arrays(reply: Message) -> bool:
    return not reply.has_error() and any(len(record) for record in reply.content.array_records.values())


def masked_only_guard(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    mtype = msg.metadata.message_type
    if mtype == MessageType.TRAIN:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if stage not in SECAGG_STAGES:
            raise GuardRefusal("training request outside SecAgg+ refused: this site sends updates only masked")
        if stage == Stage.SETUP:
            policy = policy_for_node(dict(ctxt.node_config))
            cohort, threshold = int(configs[Key.SAMPLE_NUMBER]), int(configs[Key.THRESHOLD])
            if cohort < policy.min_cohort:
                raise GuardRefusal(f"SecAgg+ cohort of {cohort} sites is below this site's policy min_cohort = {policy.min_cohort}")
            if threshold < policy.min_threshold:
                raise GuardRefusal(
                    f"SecAgg+ reconstruction threshold {threshold} is below this site's policy min_threshold = {policy.min_threshold}"
                )
    elif mtype != MessageType.EVALUATE:
        raise GuardRefusal(f"'{mtype}' request refused: this site answers only SecAgg+ training and evaluation")
    reply = call_next(msg, ctxt)
    if _carries_arrays(reply):
        raise GuardRefusal(f"reply to '{mtype}' would carry arrays back; refused")
    return reply
