"""Real sparse kernels for masked Linear and Conv2d layers (CPU: torch sparse CSR through MKL, and
for Linear layers fedmpi's own AVX-512 products where ``simd.usable`` says they run).

A masked layer computes with ``weight ⊙ mask``; the dense kernel spends the same time whatever the
mask. Here the layer's active weights become a CSR matrix and the products touch only them:

- Linear ``y = x Wᵀ + b``: ``yᵀ = W_csr · xᵀ``; input gradient ``gxᵀ = (Wᵀ)_csr · gyᵀ`` (MKL, on the
  values permuted into Wᵀ's order) or ``Wᵀ · gyᵀ`` straight from W's CSR (``simd.csr_t_mm``).
- Conv2d (groups 1): im2col (``F.unfold``) turns the input into columns ``X`` (C·kh·kw × B·L),
  ``Y = W_csr · X`` (W viewed as O × C·kh·kw); input gradient ``(Wᵀ)_csr · gY`` folded back with
  ``F.fold`` (col2im).

The layer's weight has two forms, one per gradient mode:

- ``"dense"``: the weight stays a dense ``nn.Parameter`` of the module (the optimizer, masks,
  hooks, export see nothing new). Each call gathers the active values from it (O(nnz) reads,
  though at density 0.1 nearly every cache line of the weight is touched) into a CSR matrix whose
  index structure (``SparseStructure``) is built once per mask; the gradient covers every
  position, ``gW = gyᵀ x`` (Linear) or ``gY Xᵀ`` (conv), one dense GEMM — what a masked dense
  layer gives, so step hooks that read gradients of inactive weights (PruneFL's importance,
  FedDST's regrowth) see the same numbers. The GEMM costs about a third of the dense layer's
  step, which bounds the gain.
- ``"active"``: the layer trains its active values only, as a compact vector in CSR order (what a
  sparse-training deployment stores): no gather from and no scatter into a dense weight, and the
  gradient is the dense-dense product at the active positions only: a sampled product (SDDMM;
  ``simd.sddmm`` for Linear layers where it runs) or, where a cost model expects it faster than
  torch's, row blocks of the dense product gathered there. ``SparseKernels``
  holds these vectors as ``nn.Parameter``s for the duration of local training
  (``compact_parameters``: the optimizer steps them instead of the dense weights) and writes them
  back into the dense weights afterwards (``write_back``). Weights after training equal those of
  the masked dense layer up to float rounding: inactive weights stay 0 either way, and
  elementwise optimizers (SGD with momentum and weight decay, Adam) never mix positions. Hooks
  that need inactive gradients must use ``"dense"``.

Results equal the masked dense layer up to float rounding: the same products summed in another
order. Which layers run them, and swapping them in for a module's ``forward``: ``swap.py``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import simd

WEIGHT_GRAD_MODES = ("dense", "active")
# The weight gradient at the active positions, ``(a @ b)`` sampled (a: rows × k, b: k × cols), has
# two paths; a cost model picks the cheaper from the shapes and the density alone (so every rank
# picks alike), its constants fitted on the 2-core Intel Xeon development machine (one thread,
# fc1 of the FEMNIST CNN at batch 20, 32 and 64 and its convolutions: bench/sampled_paths.py):
# - sampled_addmm: one dot product of length k per active position, after torch copies b
#   transposed (k × cols values);
# - row blocks of the dense product, each small enough to stay in cache, gathered at the active
#   positions.
# Line fits to bench/sampled_paths.py on the idle machine (ns): sampled_addmm 3.25 + 0.028·k per
# active position and 1.6 per value of b; the blocks 0.038 + 0.0088·k per position of the matrix
# (the products, written to cache) and 0.85 per active position (the gather). The fits miss where
# AVX-512 favours a dot length (fc1 at batch 32, density 0.1: the blocks are picked, sampled_addmm
# measured 0.5 ms faster).
SAMPLED_NS_PER_VALUE, SAMPLED_NS_PER_K, COPY_NS = 3.25, 0.028, 1.6
BLOCK_NS_PER_VALUE, GEMM_NS_PER_MAC, GATHER_NS = 0.038, 0.0088, 0.85
BLOCK_VALUES = 1 << 18     # a row block's product: 1 MiB of float32, inside a core's L2

# torch warns once per process that sparse CSR support is "beta"; the operations used here (CSR
# construction, sparse.mm, sampled_addmm on CPU) are the stable, MKL-backed ones. Spend that one
# warning here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), torch.tensor([]), (1, 1))


def supports(module: nn.Module) -> bool:
    """Whether ``module`` has a sparse kernel here: Linear, and Conv2d with groups 1 and
    zero padding mode."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


class SparseStructure:
    """Index structure of one mask, built once and reused while the mask does not change.

    The weight is viewed as a matrix ``rows × cols`` (O × in_features, or O × C·kh·kw). ``flat``
    holds the active positions in row-major order (CSR order); ``crow``/``col`` index W's CSR,
    ``crow_t``/``col_t`` index Wᵀ's CSR and ``perm_t`` takes W's CSR values to Wᵀ's order.
    """

    def __init__(self, mask: torch.Tensor):
        mask = mask.detach().to(torch.bool)
        self.mask = mask
        self.shape = tuple(mask.shape)
        rows = mask.shape[0]
        cols = mask.numel() // rows if rows else 0
        self.rows, self.cols = rows, cols
        m2 = mask.reshape(rows, cols)
        self.flat = m2.reshape(-1).nonzero().reshape(-1)                   # int64, sorted
        self.nnz = int(self.flat.numel())
        r = torch.div(self.flat, cols, rounding_mode="floor") if cols else self.flat
        c = self.flat - r * cols
        counts = torch.bincount(r, minlength=rows)
        index = torch.int32 if max(rows, cols, self.nnz) < 2**31 - 1 else torch.int64
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index)
        self.col = c.to(index)
        # Wᵀ: sort the active positions by (column, row); stable sort of the columns keeps rows sorted
        self.perm_t = torch.sort(c, stable=True).indices.to(index)
        counts_t = torch.bincount(c, minlength=cols)
        self.crow_t = torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)]).to(index)
        self.col_t = r[self.perm_t.to(torch.int64)].to(index)
        self.flat_index = self.flat.to(index)
        self._pattern: torch.Tensor | None = None   # the mask as CSR, for sampled products
        self._blocks: list | None = None             # row blocks for the product-and-gather path
        self._buffers: dict[str, torch.Tensor] = {}  # scratch reused between calls (_scratch)

    @property
    def density(self) -> float:
        return self.nnz / max(self.rows * self.cols, 1)

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The active values of ``weight`` in CSR order (a copy)."""
        return weight.detach().reshape(-1).index_select(0, self.flat_index)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, (self.rows, self.cols),
                                       check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """Wᵀ as CSR, its values permuted into a buffer kept for the next call: the matrix lives
        only for one product, and a fresh buffer of nnz values costs page faults every step."""
        permuted = self._scratch("permuted", values, self.nnz)
        torch.index_select(values.detach(), 0, self.perm_t, out=permuted)
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, permuted, (self.cols, self.rows),
                                       check_invariants=False)

    def _scratch(self, name: str, like: torch.Tensor, size: int) -> torch.Tensor:
        """A buffer of ``size`` values of ``like``'s dtype and device, reused between calls (never
        handed out beyond the call that fills it)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = like.new_empty(size)
        return buffer[:size]

    def sampled(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Values of ``a @ b`` (rows × k @ k × cols) at the active positions, CSR order, by the
        path the cost model expects to be faster (``gathers``)."""
        if self.nnz == 0:
            return a.new_zeros(0)
        if self.gathers(a.shape[1]):
            return self._product_gathered(a, b)
        return self._sampled_addmm(a, b)

    def _sampled_addmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # built once per structure, not once per step: with beta = 0 only its indices matter
        if self._pattern is None or self._pattern.dtype != a.dtype or self._pattern.device != a.device:
            self._pattern = self.csr(a.new_zeros(self.nnz))
        return torch.sparse.sampled_addmm(self._pattern, a, b, beta=0.0).values()

    def gathers(self, k: int) -> bool:
        """Whether the sampled product of inner length ``k`` takes the row-block path: its dense
        products cost per matrix position, sampled_addmm per active position (see the constants)."""
        sampled = self.nnz * (SAMPLED_NS_PER_VALUE + SAMPLED_NS_PER_K * k) + COPY_NS * k * self.cols
        gathered = self.rows * self.cols * (BLOCK_NS_PER_VALUE + k * GEMM_NS_PER_MAC) + self.nnz * GATHER_NS
        return gathered < sampled

    def _product_gathered(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._blocks is None:    # (first row, end row, first value, end value, positions in the block)
            step = max(1, BLOCK_VALUES // max(self.cols, 1))
            crow = self.crow.tolist()
            self._blocks = []
            for r0 in range(0, self.rows, step):
                r1 = min(r0 + step, self.rows)
                start, stop = crow[r0], crow[r1]
                # int32 positions: index_select gathers about 10 % faster than with int64 here
                positions = (self.flat[start:stop] - r0 * self.cols).to(torch.int32)
                self._blocks.append((r0, r1, start, stop, positions))
        out = a.new_empty(self.nnz)
        block = self._scratch("block", a, self._blocks[0][1] * self.cols)
        for r0, r1, start, stop, positions in self._blocks:
            product = torch.mm(a[r0:r1], b, out=block[:(r1 - r0) * self.cols].view(r1 - r0, self.cols))
            torch.index_select(product.view(-1), 0, positions, out=out[start:stop])
        return out


def _check(structure: SparseStructure, source: torch.Tensor, weight_grad: str) -> None:
    if weight_grad not in WEIGHT_GRAD_MODES:
        raise ValueError(f"weight_grad must be one of {WEIGHT_GRAD_MODES}, got {weight_grad!r}")
    if weight_grad == "active":
        if tuple(source.shape) != (structure.nnz,):
            raise ValueError(f"weight_grad 'active' takes the {structure.nnz} active values "
                             f"(SparseStructure.values), got a tensor of shape {tuple(source.shape)}")
    elif tuple(source.shape) != structure.shape:
        raise ValueError(f"weight shape {tuple(source.shape)} != mask shape {structure.shape}")


def _active_values(source: torch.Tensor, structure: SparseStructure, weight_grad: str) -> torch.Tensor:
    """The CSR values: the compact vector itself ("active"), or gathered from the dense weight."""
    return source if weight_grad == "active" else structure.values(source)


# ------------------------------------------------------------------------------------ linear
class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, source, bias, structure: SparseStructure, weight_grad: str):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        values = _active_values(source, structure, weight_grad)
        ctx.simd = simd.usable(structure, x2.shape[0], x2.dtype, x2.device)
        if ctx.simd:     # xᵀ padded: the input of the forward and of the sampled weight gradient
            xt = simd.padded(x2)
            y = simd.csr_mm(structure, values, xt)[:, :x2.shape[0]].t()
        else:
            xt = x2.t().contiguous()
            y = torch.sparse.mm(structure.csr(values), xt).t()          # (B, out)
        if bias is not None:
            y = y + bias
        else:
            y = y.contiguous()
        ctx.structure, ctx.weight_grad = structure, weight_grad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, values, xt if ctx.simd else None)
        ctx.lead = lead
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, values, xt = ctx.saved_tensors
        structure = ctx.structure
        gy2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_w = grad_b = None
        active = ctx.needs_input_grad[1] and ctx.weight_grad == "active"
        # gyᵀ copied once, for both products that take it contiguous
        if ctx.needs_input_grad[0] or active:
            gy_t = simd.padded(gy2) if ctx.simd else gy2.t().contiguous()
        if ctx.needs_input_grad[0]:
            gx = (simd.csr_t_mm(structure, values, gy_t)[:, :x2.shape[0]] if ctx.simd
                  else torch.sparse.mm(structure.csr_t(values), gy_t)).t()
            grad_x = gx.reshape(*ctx.lead, x2.shape[-1])
        if ctx.needs_input_grad[1]:
            if active:
                grad_w = simd.sddmm(structure, gy_t, xt) if ctx.simd else structure.sampled(gy_t, x2)
            else:
                grad_w = gy2.t().mm(x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy2.sum(0)
        return grad_x, grad_w, grad_b, None, None


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  structure: SparseStructure, weight_grad: str = "dense") -> torch.Tensor:
    """``F.linear(x, weight ⊙ mask, bias)`` with a sparse kernel (see the module doc). With
    ``weight_grad="active"``, ``weight`` is the compact vector of active values
    (``structure.values(dense weight)``) and its gradient is the active positions' gradient."""
    _check(structure, weight, weight_grad)
    return _SparseLinear.apply(x, weight, bias, structure, weight_grad)


# ------------------------------------------------------------------------------------ conv2d
def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _SparseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, source, bias, structure: SparseStructure, weight_grad: str,
                stride, padding, dilation):
        batch, _, height, width = x.shape
        out_channels, _, kh, kw = structure.shape
        out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # B, K, L
        columns = cols.transpose(0, 1).reshape(cols.shape[1], -1)                          # K, B·L
        values = _active_values(source, structure, weight_grad)
        y = torch.sparse.mm(structure.csr(values), columns)                                  # O, B·L
        y = y.reshape(out_channels, batch, out_h, out_w).transpose(0, 1)
        if bias is not None:
            y = y + bias.reshape(1, -1, 1, 1)
        y = y.contiguous()
        ctx.structure, ctx.weight_grad = structure, weight_grad
        ctx.has_bias = bias is not None
        ctx.geometry = ((height, width), (kh, kw), stride, padding, dilation)
        ctx.save_for_backward(columns, values)
        return y

    @staticmethod
    def backward(ctx, gy):
        columns, values = ctx.saved_tensors
        structure = ctx.structure
        (height, width), kernel, stride, padding, dilation = ctx.geometry
        batch, out_channels = gy.shape[0], gy.shape[1]
        gy2 = gy.transpose(0, 1).reshape(out_channels, -1)                                  # O, B·L
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gcols = torch.sparse.mm(structure.csr_t(values), gy2)                            # K, B·L
            gcols = gcols.reshape(gcols.shape[0], batch, -1).transpose(0, 1)                 # B, K, L
            grad_x = F.fold(gcols, (height, width), kernel, dilation=dilation, padding=padding,
                            stride=stride)
        if ctx.needs_input_grad[1]:
            grad_w = (gy2.mm(columns.t()).reshape(structure.shape) if ctx.weight_grad == "dense"
                      else structure.sampled(gy2, columns.t()))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy2.sum(1)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  structure: SparseStructure, weight_grad: str = "dense", *, stride=1, padding=0,
                  dilation=1) -> torch.Tensor:
    """``F.conv2d(x, weight ⊙ mask, bias, stride, padding, dilation)`` (groups 1, zero padding)
    with im2col and a sparse kernel (see the module doc; ``weight_grad="active"``: ``weight`` is
    the compact vector of active values, as for ``sparse_linear``)."""
    _check(structure, weight, weight_grad)
    if x.dim() != 4:
        raise ValueError(f"sparse_conv2d needs a 4-D input (batch, channels, height, width), got {x.dim()}-D")
    return _SparseConv2d.apply(x, weight, bias, structure, weight_grad, _pair(stride), _pair(padding),
                               _pair(dilation))


def sparse_forward(module: nn.Module, structure: SparseStructure, weight_grad: str = "dense",
                   values: torch.Tensor | None = None):
    """A replacement for ``module.forward`` that runs the sparse kernel: on ``module.weight``
    ("dense"), or on ``values``, the compact active values that stand in for it ("active")."""
    if (weight_grad == "active") != (values is not None):
        raise ValueError("weight_grad 'active' runs on the compact values, and only it takes them")
    source = (lambda: values) if values is not None else (lambda: module.weight)
    if isinstance(module, nn.Linear):
        return lambda x: sparse_linear(x, source(), module.bias, structure, weight_grad)
    if supports(module):
        return lambda x: sparse_conv2d(x, source(), module.bias, structure, weight_grad,
                                       stride=module.stride, padding=module.padding,
                                       dilation=module.dilation)
    raise TypeError(f"no sparse kernel for {type(module).__name__} (Linear, Conv2d with groups 1)")
