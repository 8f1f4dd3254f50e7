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
from collections import Counter

import torch

from ..common.client_records import AdamStep, ClientLoss, ForwardBackwardResult, TokenDatum
from ..common.records import UpdateDiverged
from .client_losses import TARGETS, check_inputs, loss_config, loss_spec
from .core import LearnerCore
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


def forward_backward(calls: list[tuple[LearnerCore, list[TokenDatum], ClientLoss, bool]],
                     max_tokens_per_pass: int | None = None
                     ) -> list[ForwardBackwardResult | Exception]:
    """Several clients' forward_backward (or forward, `forward_only`) calls, each `(the
    client's core, its datums, its loss, forward_only)`: the training calls in routed passes
    of at most `max_tokens_per_pass` tokens (`client_passes`: one pass when they fit), their
    gradients each added to its own adapter's; the forward-only calls the same way without
    gradients. A call whose datums do not fit gets its ValueError, one whose loss is not
    finite its UpdateDiverged (nothing added to its gradient); the others are unaffected."""
    results: list[ForwardBackwardResult | Exception | None] = [None] * len(calls)
    groups: dict[bool, list[int]] = {False: [], True: []}
    for index, (core, datums, loss, forward_only) in enumerate(calls):
        try:
            check_datums(datums, loss, core.net.model.config.vocab_size)
            check_pass_size(core, datums, max_tokens_per_pass)
            loss_config(loss)
        except ValueError as exc:
            results[index] = exc
            continue
        groups[forward_only].append(index)
    for forward_only, indices in groups.items():
        if indices:
            with torch.set_grad_enabled(not forward_only):
                run_calls([calls[i] for i in indices], indices, results, max_tokens_per_pass)
    return results


def check_pass_size(core: LearnerCore, datums: list[TokenDatum], max_tokens: int | None) -> None:
    """A datum longer than a pass holds cannot be split: a ValueError naming the client and
    the limit."""
    if max_tokens is None:
        return
    for index, datum in enumerate(datums):
        if len(datum.tokens) > max_tokens:
            raise ValueError(
                f"client {core.name}: datum {index} has {len(datum.tokens)} tokens, more than "
                f"a learner pass holds (learner.max_tokens_per_pass={max_tokens}); send "
                "shorter datums or start the server with a larger learner.max_tokens_per_pass")


def client_passes(calls: list, max_tokens: int | None) -> list[list[tuple[int, slice]]]:
    """The datums of `calls` as passes of at most `max_tokens` tokens (padded rows x the
    longest), each pass a list of (call index, slice of its datums), in order: a call that
    does not fit one pass is cut into consecutive slices (its loss is a sum over tokens, so
    its gradient is the same); None: every call in one pass."""
    if max_tokens is None:
        return [[(i, slice(0, len(datums))) for i, (_, datums, _, _) in enumerate(calls)]]
    passes: list[list[tuple[int, slice]]] = [[]]
    rows, width = 0, 0  # the current pass's
    for i, (_, datums, _, _) in enumerate(calls):
        start = 0
        for end, datum in enumerate(datums):
            wider = max(width, len(datum.tokens))
            if (rows + 1) * wider > max_tokens:  # the pass so far is full
                if end > start:
                    passes[-1].append((i, slice(start, end)))
                passes.append([])
                start, rows, wider = end, 0, len(datum.tokens)
            rows, width = rows + 1, wider
        passes[-1].append((i, slice(start, len(datums))))
    return [p for p in passes if p]


def run_calls(calls: list, indices: list[int], results: list, max_tokens: int | None) -> None:
    """`calls` (all training or all forward-only) in `client_passes`; their results at
    `indices` of `results`; each pass's summed training losses back-propagated once. A call
    whose loss is not finite in any of its passes has its gradient put back as it was."""
    logprobs: dict[int, list] = {i: [] for i in range(len(calls))}
    losses = dict.fromkeys(range(len(calls)), 0.0)
    failed: dict[int, UpdateDiverged] = {}
    passes = client_passes(calls, max_tokens)
    spans = Counter(i for here in passes for i, _ in here)
    # A call in one pass gets only zeros from another's backward: its gradient tensors as
    # they are suffice; one cut into several passes needs a copy of its earlier sum.
    before = {i: [p.grad if p.grad is None or spans[i] == 1 else p.grad.clone()
                  for p in core.policy_params]
              for i, (core, _, _, forward_only) in enumerate(calls) if not forward_only}
    for here in passes:
        backward = []
        for i, part, (logp,) in zip([i for i, _ in here], [s for _, s in here],
                                    one_pass([(calls[i], s) for i, s in here]), strict=True):
            core, datums, loss, forward_only = calls[i]
            per_token, config = loss_spec(loss).per_token, loss_config(loss)
            net = core.net
            total = sum(per_token(row[: len(datum.tokens)], on_device(datum.inputs, net.device),
                                  config).sum()
                        for row, datum in zip(logp, datums[part], strict=True))
            logprobs[i] += [row[: len(d.tokens)].detach().cpu()
                            for row, d in zip(logp, datums[part], strict=True)]
            losses[i] += float(total.detach())
            if forward_only or i in failed:
                continue
            try:
                core.check_finite("loss", total.detach())
                backward.append(total)
            except UpdateDiverged as exc:
                failed[i] = exc
        if backward:
            sum(backward).backward()
    for i in range(len(calls)):
        results[indices[i]] = failed.get(i) or ForwardBackwardResult(
            logprobs=logprobs[i], metrics={"loss:sum": losses[i]})
    for i in failed:  # the shared backward may have reached its adapter: put it back
        for param, grad in zip(calls[i][0].policy_params, before[i], strict=True):
            param.grad = grad


def one_pass(parts: list[tuple[tuple, slice]]) -> list[tuple]:
    """One routed pass over each (call, slice of its datums): the log-probs of each part."""
    first = parts[0][0][0]
    net = first.net
    batches = [(datum_batch(datums[part], first.pad_id, net.device), core.adapter)
               for (core, datums, _, _), part in parts]
    with first.autocast():
        return joint_forward(net, batches, LM, first.pad_id)


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
