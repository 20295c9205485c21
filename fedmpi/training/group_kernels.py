"""Per-client kernels for training several clients at once under ``torch.func.vmap``
(multi_client.py), so that each client's values equal the one-by-one loop's bit for bit.

Under a plain ``vmap`` three ops would reduce in another order than the per-client loop: a linear
layer becomes ``bmm`` followed by a separate bias add (``addmm`` adds the bias inside the GEMM), a
convolution becomes a grouped convolution, and the cross-entropy's batch mean is reduced by another
kernel. So those three run as custom autograd Functions whose batched rule loops over the clients
and calls, per client, the ATen kernel the one-by-one loop calls, on the same shape and strides,
forward and backward (the backward formulas are autograd's own for ``addmm``/``mm``/
``convolution``/``log_softmax``/``nll_loss``). ``PerClientKernels`` routes the model's
``F.linear`` and ``F.conv2d`` calls to them inside the vmapped forward and raises ``NotGroupable``
on a form of those calls it does not cover; ``GroupCrossEntropy`` is the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _stacked(t: torch.Tensor | None, dim, size: int):
    if t is None:
        return None
    return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


class _GroupLinear(torch.autograd.Function):
    """``F.linear`` for G clients: x [G, B, in], W [G, out, in], b [G, out] or None. Per client
    exactly what the one-by-one loop runs: ``addmm(b, x, W.t())`` (``mm`` without bias) forward,
    autograd's ``mm_mat1_backward``/``mm_mat2_backward`` and the bias ``sum(0)`` backward."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        ctx.has_bias = b is not None
        out = x.new_empty(x.shape[0], x.shape[1], W.shape[1])
        if b is None:
            for xg, wg, og in zip(x.unbind(0), W.unbind(0), out.unbind(0)):
                torch.mm(xg, wg.t(), out=og)
        else:
            for xg, wg, bg, og in zip(x.unbind(0), W.unbind(0), b.unbind(0), out.unbind(0)):
                torch.addmm(bg, xg, wg.t(), out=og)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, W = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grads = grad.unbind(0)
        gx = gw = gb = None
        if need_x:
            gx = torch.empty_like(x)
            for g, wg, out in zip(grads, W.unbind(0), gx.unbind(0)):
                torch.mm(g, wg, out=out)                        # grad.mm(mat2.t()), mat2 = W.t()
        if need_w:
            # mat2 = W.t() is column-major, so autograd takes grad.t().mm(mat1).t(); the TBackward
            # of W.t() transposes it back: W's gradient is grad.t().mm(x)
            gw = torch.empty_like(W)
            for g, xg, out in zip(grads, x.unbind(0), gw.unbind(0)):
                torch.mm(g.t(), xg, out=out)
        if need_b and ctx.has_bias:
            gb = W.new_empty(W.shape[0], W.shape[1])
            for g, out in zip(grads, gb.unbind(0)):
                torch.sum(g, 0, out=out)                        # sum_to(grad, bias.shape)
        return gx, gw, gb


class _VmapLinear(torch.autograd.Function):
    """Per-client view of ``_GroupLinear``: what the model's ``F.linear`` call becomes under vmap."""

    @staticmethod
    def forward(x, W, b):
        return F.linear(x, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):   # never reached: the batched rule records _GroupLinear instead
        raise RuntimeError("multi-client linear: per-client backward called outside vmap")

    @staticmethod
    def vmap(info, in_dims, x, W, b):
        n = info.batch_size
        return _GroupLinear.apply(_stacked(x, in_dims[0], n), _stacked(W, in_dims[1], n),
                                  _stacked(b, in_dims[2], n)), 0


class _GroupConv2d(torch.autograd.Function):
    """``F.conv2d`` for G clients: x [G, B, C, H, W], W [G, O, C/groups, k, k], b [G, O] or None,
    per client ``aten.convolution`` forward and autograd's ``convolution_backward``."""

    @staticmethod
    def forward(ctx, x, W, b, stride, padding, dilation, groups):
        ctx.save_for_backward(x, W)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        return torch.stack([F.conv2d(x[g], W[g], None if b is None else b[g], stride, padding, dilation, groups)
                            for g in range(x.shape[0])])

    @staticmethod
    def backward(ctx, grad):
        x, W = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, need_b and ctx.has_bias]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(W) if need_w else None
        gb = W.new_empty(W.shape[0], W.shape[1]) if mask[2] else None
        bias_sizes = [W.shape[1]] if ctx.has_bias else None
        for g in range(x.shape[0]):
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad[g].contiguous(), x[g], W[g], bias_sizes, list(stride), list(padding), list(dilation),
                False, [0, 0], groups, mask)
            if need_x:
                gx[g] = dx
            if need_w:
                gw[g] = dw
            if gb is not None:
                gb[g] = db
        return gx, gw, gb, None, None, None, None


class _VmapConv2d(torch.autograd.Function):
    @staticmethod
    def forward(x, W, b, stride, padding, dilation, groups):
        return F.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("multi-client conv2d: per-client backward called outside vmap")

    @staticmethod
    def vmap(info, in_dims, x, W, b, stride, padding, dilation, groups):
        n = info.batch_size
        return _GroupConv2d.apply(_stacked(x, in_dims[0], n), _stacked(W, in_dims[1], n),
                                  _stacked(b, in_dims[2], n), stride, padding, dilation, groups), 0


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class NotGroupable(Exception):
    """A layer call the per-client kernels do not cover: the group trains one by one instead."""


class PerClientKernels(TorchFunctionMode):
    """Inside the vmapped forward: route ``F.linear`` (2-D input) and ``F.conv2d`` (4-D input,
    numeric padding) to the per-client Functions above; everything else runs as called. Another
    form of these calls would batch with other reductions, so it stops the grouped training."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() != 2:
                raise NotGroupable(f"a linear layer on {x.dim()}-D per-sample input")
            return _VmapLinear.apply(x, weight, bias)
        if func is F.conv2d:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            if a["input"].dim() != 4 or isinstance(a["padding"], str):
                raise NotGroupable("a convolution with unbatched input or padding by name")
            return _VmapConv2d.apply(a["input"], a["weight"], a["bias"], _pair(a["stride"]),
                                     _pair(a["padding"]), _pair(a["dilation"]), a["groups"])
        return func(*args, **kwargs)


class GroupCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy per client: logits [G, B, C], y [G, B] → [G]. Per client the kernels of
    ``F.cross_entropy``: ``_log_softmax`` then ``nll_loss_forward`` (mean), and backward
    ``nll_loss_backward`` then ``_log_softmax_backward_data``."""

    @staticmethod
    def forward(ctx, logits, y):
        logp = torch.empty_like(logits)
        loss = logits.new_empty(logits.shape[0])
        total = logits.new_empty(logits.shape[0])
        for g in range(logits.shape[0]):
            torch._log_softmax(logits[g], 1, False, out=logp[g])
            loss[g], total[g] = torch.ops.aten.nll_loss_forward(logp[g], y[g], None, 1, -100)
        ctx.save_for_backward(logp, y, total)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logp, y, total = ctx.saved_tensors
        out = torch.empty_like(logp)
        for g in range(logp.shape[0]):
            d = torch.ops.aten.nll_loss_backward(grad[g], logp[g], y[g], None, 1, -100, total[g])
            out[g] = torch.ops.aten._log_softmax_backward_data(d, logp[g], 1, logp.dtype)
        return out, None
