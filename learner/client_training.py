"""Training one client's adapter the way Tinker does (cluster/tinker/ serves the API): the
client sends forward_backward calls, whose gradients add up in the adapter's .grad, then an
optim_step applies them with the AdamW settings it names and starts the next sum.

An optim_step with no gradient since the last one leaves the weights and Adam moments as they
are (torch's AdamW skips a parameter without a gradient, its weight decay too) and still counts
as a version: one optim_step, one version, so the client's step count and the policy's agree.
"""

from __future__ import annotations

import math

import torch

from ..common.client_records import AdamStep, ClientLoss, ForwardBackwardResult, TokenDatum
from .client_losses import TARGETS, check_inputs, loss_config, loss_spec
from .core import LearnerCore
from .model import TokenBatch


def check_datums(datums: list[TokenDatum], loss: ClientLoss, vocab_size: int) -> None:
    """A ValueError naming the first datum that does not fit: no tokens, an input the loss
    lacks or does not read, an input that is not one value per token, a token outside the
    vocabulary."""
    if not datums:
        raise ValueError("forward_backward needs at least one datum")
    for index, datum in enumerate(datums):
        where, length = f"datum {index}", len(datum.tokens)
        if length == 0:
            raise ValueError(f"{where} has no tokens")
        check_inputs(loss, datum.inputs, where)
        for key, values in datum.inputs.items():
            if values.shape != (length,):
                raise ValueError(f"{where}: input {key!r} has shape {tuple(values.shape)}; "
                                 f"expected ({length},), one value per token")
        for what, ids in (("tokens", torch.tensor(datum.tokens)), (TARGETS, datum.inputs[TARGETS])):
            if ids.is_floating_point() or ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"{where}: {what} must be token ids in [0, {vocab_size}); "
                                 f"got {ids.dtype} values in [{ids.min()}, {ids.max()}]")


def datum_batch(datums: list[TokenDatum], pad_id: int, device: torch.device) -> TokenBatch:
    """The datums right-padded into one batch whose 'response' is every position: position t
    reads tokens[: t + 1] and its target is target_tokens[t]."""
    rows, width = len(datums), max(len(d.tokens) for d in datums)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    targets = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for b, datum in enumerate(datums):
        length = len(datum.tokens)
        input_ids[b, :length] = torch.tensor(datum.tokens)
        targets[b, :length] = datum.inputs[TARGETS]
        attention[b, :length] = 1
    positions = torch.arange(width).expand(rows, width)
    return TokenBatch(input_ids, attention, positions, targets, attention.float()).to(device)


def forward_backward(core: LearnerCore, datums: list[TokenDatum], loss: ClientLoss,
                     forward_only: bool) -> ForwardBackwardResult:
    """The loss summed over the datums' tokens under the client's adapter; unless
    `forward_only`, its gradient added to the adapter's (UpdateDiverged, nothing added, where
    the loss is not finite)."""
    net = core.net
    check_datums(datums, loss, net.model.config.vocab_size)
    per_token, config = loss_spec(loss).per_token, loss_config(loss)
    batch = datum_batch(datums, core.pad_id, net.device)
    with torch.set_grad_enabled(not forward_only):
        with core.autocast():
            logp = core.logprobs(batch)  # [B, width], float32
        total = sum(
            per_token(row[: len(datum.tokens)], on_device(datum.inputs, net.device), config).sum()
            for row, datum in zip(logp, datums, strict=True))
    if not forward_only:
        core.check_finite("loss", total.detach())
        total.backward()
    return ForwardBackwardResult(
        logprobs=[row[: len(d.tokens)].detach().cpu() for row, d in zip(logp, datums, strict=True)],
        metrics={"loss:sum": float(total.detach())},
    )


def on_device(inputs: dict, device: torch.device) -> dict:
    """A datum's loss inputs on `device`: token ids as int64, the rest float32."""
    return {key: values.to(device, torch.long if key == TARGETS else torch.float32)
            for key, values in inputs.items()}


def optim_step(core: LearnerCore, step: AdamStep) -> dict[str, float]:
    """Apply the gradients summed since the last step with `step`'s AdamW settings (clipped to
    its grad_clip_norm, 0: not clipped), then clear them; UpdateDiverged, the weights and Adam
    moments untouched, where their norm is not finite. Returns the norm before clipping and
    the learning rate."""
    optimizer = core.policy_opt
    for group in optimizer.param_groups:
        group.update(lr=step.learning_rate, betas=(step.beta1, step.beta2), eps=step.eps,
                     weight_decay=step.weight_decay)
    try:
        grad_norm = torch.nn.utils.clip_grad_norm_(core.policy_params,
                                                   step.grad_clip_norm or math.inf)
        core.check_finite("grad norm", grad_norm)
        optimizer.step()
    finally:  # applied or refused, the summed gradients are spent
        optimizer.zero_grad(set_to_none=True)
    core.advance()
    return {"grad_norm": float(grad_norm), "learning_rate": step.learning_rate}
