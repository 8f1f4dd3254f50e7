"""Training clients' adapters the way Tinker does (cluster/tinker/ serves the API): a client
sends forward_backward calls, whose gradients add up in its adapter's .grad, then an
optim_step applies them with the AdamW settings it names and starts the next sum. The calls of
several clients that arrive in one cycle run as one pass (`forward_backward`), as in Tinker's
clock cycle.

An optim_step with no gradient since the last one leaves the weights and Adam moments as they
are (torch's AdamW skips a parameter without a gradient, its weight decay too) and still counts
as a version: one optim_step, one version, so the client's step count and the policy's agree.
"""

from __future__ import annotations

import math

import torch

from ..common.client_records import AdamStep, ClientLoss, ForwardBackwardResult, TokenDatum
from .client_losses import TARGETS, check_inputs, loss_config, loss_spec
from .core import LearnerCore, UpdateDiverged
from .joint import LM, joint_forward
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


def forward_backward(calls: list[tuple[LearnerCore, list[TokenDatum], ClientLoss, bool]]
                     ) -> list[ForwardBackwardResult | Exception]:
    """Several clients' forward_backward (or forward, `forward_only`) calls, each `(the
    client's core, its datums, its loss, forward_only)`: the training calls in one routed pass
    and one backward, their gradients each added to its own adapter's; the forward-only calls
    in one pass without gradients. A call whose datums do not fit gets its ValueError, one
    whose loss is not finite its UpdateDiverged (nothing added to its gradient); the others are
    unaffected."""
    results: list[ForwardBackwardResult | Exception | None] = [None] * len(calls)
    groups: dict[bool, list[int]] = {False: [], True: []}
    for index, (core, datums, loss, forward_only) in enumerate(calls):
        try:
            check_datums(datums, loss, core.net.model.config.vocab_size)
            loss_config(loss)
        except ValueError as exc:
            results[index] = exc
            continue
        groups[forward_only].append(index)
    for forward_only, indices in groups.items():
        if indices:
            with torch.set_grad_enabled(not forward_only):
                one_pass([calls[i] for i in indices], indices, results)
    return results


def one_pass(calls: list, indices: list[int], results: list) -> None:
    """`calls` (all training or all forward-only) in one routed pass; their results at
    `indices` of `results`; the training ones' summed losses back-propagated once."""
    first = calls[0][0]
    net = first.net
    batches = [datum_batch(datums, first.pad_id, net.device) for _, datums, _, _ in calls]
    with first.autocast():
        outputs = joint_forward(net, [(batch, core.adapter) for batch, (core, *_)
                                      in zip(batches, calls, strict=True)], LM, first.pad_id)
    backward, diverged = [], []
    for index, (core, datums, loss, forward_only), (logp,) in zip(indices, calls, outputs,
                                                                   strict=True):
        per_token, config = loss_spec(loss).per_token, loss_config(loss)
        total = sum(per_token(row[: len(datum.tokens)], on_device(datum.inputs, net.device),
                              config).sum()
                    for row, datum in zip(logp, datums, strict=True))
        results[index] = ForwardBackwardResult(
            logprobs=[row[: len(d.tokens)].detach().cpu()
                      for row, d in zip(logp, datums, strict=True)],
            metrics={"loss:sum": float(total.detach())})
        if forward_only:
            continue
        try:
            core.check_finite("loss", total.detach())
            backward.append(total)
        except UpdateDiverged as exc:
            results[index] = exc
            # the shared backward reaches its adapter with zeros: where it had no gradient,
            # it must still have none (an optim_step without one leaves the adapter as it is)
            diverged += [p for p in core.policy_params if p.grad is None]
    if backward:
        sum(backward).backward()
    for param in diverged:
        param.grad = None


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
