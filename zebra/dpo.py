"""Direct Preference Optimization (Rafailov et al. 2023), the sigmoid loss TRL's DPOTrainer uses by
default, as plain functions. No Ray.

A batch holds 2m rows: the m chosen sequences (prompt + chosen completion), then the m rejected ones,
each with a completion mask (1 on completion tokens). The policy is trained; the frozen reference
(the model DPO starts from) only scores.

    logps = completion_logps(logits, input_ids, completion_mask)   # [2m] summed log-probs
    loss = dpo_loss(policy_logps, reference_logps, beta)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def completion_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """[rows] float32 (or wider): the summed log-probability of each row's completion tokens.

    logits [rows, seq, vocab] (position t predicts token t+1), input_ids and completion_mask [rows, seq].
    """
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:]
    token_logps = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
    return (token_logps * completion_mask[:, 1:].to(token_logps.dtype)).sum(-1)


def dpo_loss(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """Mean over pairs of -log sigmoid(beta * [(pi - ref)(chosen) - (pi - ref)(rejected)]).

    policy_logps, reference_logps [2m]: completion_logps of the chosen rows, then of the rejected rows.
    """
    chosen, rejected = (policy_logps - reference_logps).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def preference_metrics(policy: Tensor, reference: Tensor, beta: float) -> dict[str, float]:
    """From [n, 2] summed log-probs (chosen, rejected) of the policy and the reference:
    pref_accuracy   fraction of pairs where the policy gives the chosen completion the higher log-prob
    logp_margin     mean log pi(chosen) - log pi(rejected)
    reward_margin   mean DPO implicit reward margin beta * [(pi - ref)(chosen) - (pi - ref)(rejected)]
    reward_accuracy fraction of pairs with a positive reward margin (0 when the policy is the reference)"""
    margin = policy[:, 0] - policy[:, 1]
    reward = beta * ((policy - reference)[:, 0] - (policy - reference)[:, 1])
    return {"pref_accuracy": (margin > 0).double().mean().item(), "logp_margin": margin.mean().item(),
            "reward_margin": reward.mean().item(), "reward_accuracy": (reward > 0).double().mean().item()}
