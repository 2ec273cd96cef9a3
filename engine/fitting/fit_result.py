"""What every head trainer returns (:class:`Fitted`) and the pieces they share: a net's state dict
and one optimiser loop. Its own module so that the per-kind trainers (``trainers``,
``detection_training``) import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Fitted:
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    metrics: dict[str, Any]
    outputs: list[dict[str, Any]]
    inputs: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)


def state_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous().clone() for k, v in net.state_dict().items()}


def optimise(
    net: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    wd: float = 1e-2,
    log: Callable[[str], None] | None = None,
    name: str = "",
) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    net.train()
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"{name} step {step}/{steps} loss {loss.item():.4f}")
    net.eval()
