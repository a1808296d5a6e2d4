"""Per-key online combination of forecasters: never much worse than the best of them.

Every key runs three forecasters side by side: the recurrent network, persistence (the
key's last values) and an exponentially weighted moving average of its values; a fourth,
seasonal-naive (the key's values one period ago), where ``engine.season_events`` says
what a period is (until a key has seen a whole period, it forecasts persistence). Each
event, every forecaster's previous forecast is scored in the key's own standard
deviations, and each of the key's values is forecast by the mixture

    prediction_f = sum_k w_kf f_kf,   w_kf ∝ exp(-eta * (L_kf - L_f) / (L_f + floor))

where ``L_kf`` is forecaster k's squared error on value f, discounted over the key's
recent events, and ``L_f`` the best forecaster's on that value (Hedge / exponentiated
weights, as OneNet combines its branches per variable). Dividing by the best forecaster's
own loss makes the rule scale-free: what moves weight is how many times worse a
forecaster has been lately, whether the value is smooth or noisy. A bad network therefore
costs a key a few events before persistence leads, and a good one takes the lead as soon
as it earns it.

The weights are per value, not per key, because the values of one key are different
series: a network that learned a key's smooth loads may still read a rare jump in another
of its values as a spike to revert, and persistence should lead on that value without
taking the lead on the others. (On ETTh2's seven columns, seed 0, one weight per key gave
0.369 MSE and one per column 0.356; on a one-value key the two are the same rule.)

>>> import torch
>>> loss = torch.zeros(2, len(EXPERTS), 1)
>>> truth = torch.tensor([[1.0], [1.0]])
>>> forecasts = torch.tensor([[[1.0], [0.0], [0.0]], [[0.0], [1.0], [0.0]]])  # [B, K, F]
>>> for _ in range(20):
...     learn(loss, forecasts, truth, torch.ones(2, 1), torch.tensor([True, True]))
>>> leaders(loss).tolist()  # key 0: the network was right; key 1: persistence was
[0, 1]
>>> mix(loss, forecasts).round(decimals=3).tolist()
[[1.0], [1.0]]
"""

from __future__ import annotations

import torch

EXPERTS = ("network", "persistence", "ewma")
# With ``engine.season_events`` set, a fourth: the key's value one period ago.
SEASONAL = "seasonal"


def experts(seasonal: bool) -> tuple[str, ...]:
    """The forecasters a key's row holds, in their order there.

    >>> experts(True)
    ('network', 'persistence', 'ewma', 'seasonal')
    """
    return (*EXPERTS, SEASONAL) if seasonal else EXPERTS


# Squared errors are clipped at this many std units squared: one wild event must not
# decide the weights for the next hundred.
LOSS_CLIP = 25.0
# Discount per event of a key: the weights follow the last ~1 / (1 - DISCOUNT) = 32 events,
# long enough to average out noise, short enough to follow a change of regime.
DISCOUNT = 1.0 - 1.0 / 32
# Weight ratio exp(-ETA * r) to the leader for a forecaster whose recent loss is (1 + r)
# times the best: 10% worse keeps 0.61 of the leader's weight, twice as bad 0.007.
ETA = 5.0
# The loss floor (std units squared) below which differences are noise: keeps the relative
# loss finite on a key that every forecaster predicts perfectly.
LOSS_FLOOR = 1e-3
# Smoothing of the EWMA forecaster: its forecast is the average of the last few values.
EWMA_ALPHA = 0.5


def learn(
    loss: torch.Tensor,
    forecasts: torch.Tensor,
    truth: torch.Tensor,
    std: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """Fold each forecaster's error on ``truth`` into the keys' discounted losses, in place.

    loss and forecasts [B, K, F]; truth and std [B, F]; only rows in ``mask`` learn.
    """
    err = (forecasts - truth.unsqueeze(1)) / std.unsqueeze(1)
    step = (err * err).clamp(max=LOSS_CLIP)
    if bool(mask.all()):  # the usual case: every key had forecasts to score
        loss.mul_(DISCOUNT).add_(step)
    else:
        loss.copy_(torch.where(mask.view(-1, 1, 1), DISCOUNT * loss + step, loss))


def weights(loss: torch.Tensor) -> torch.Tensor:
    """Each key's mixture weights [B, K, F] from its discounted losses [B, K, F]: for
    each value, they sum to 1 over the forecasters."""
    best = loss.min(1, keepdim=True).values
    return torch.softmax(-ETA * (loss - best) / (best + LOSS_FLOOR), dim=1)


def mix(loss: torch.Tensor, forecasts: torch.Tensor) -> torch.Tensor:
    """The combined forecast [B, F] of forecasts [B, K, F]."""
    return (weights(loss) * forecasts).sum(1)


def leaders(loss: torch.Tensor) -> torch.Tensor:
    """Index into :data:`EXPERTS` of each key's leading forecaster [B]: the one with the
    least loss over all of the key's values (each value's loss is in its own std units)."""
    return loss.sum(2).argmin(1)
