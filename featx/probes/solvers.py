"""Batched linear classifiers in torch: many problems (every C, every cross-validation fold and the
final fit) solved together, so that each Hessian-vector product is one matmul over all of them.

Every problem p trains on the rows `masks[p]` of one shared matrix `x` (n, d) with its own `C[p]`.
The weight vectors of all problems (and classes) are stacked as the rows of one (m, d+1) matrix W,
the last column being the intercept, so `W @ x_aug^T` and `G @ x_aug` serve every problem at once.
The solver is a truncated Newton method: each direction comes from conjugate gradients
preconditioned with the Hessian's diagonal (Jacobi), using only Hessian-vector products, stopped by
the quadratic-model decrease ratio; the step length is an exact line search along the direction,
which costs no matmul (the scores along the direction come out of the conjugate-gradient products).
Every problem has its own step length and stops on its own when ||grad|| <= tol * ||grad at w=0||;
finished problems, and finished conjugate-gradient systems, leave the matmuls.

The squared hinge is piecewise quadratic: at large C, where the training rows are (nearly)
separable, as in kernel form with fewer rows than dimensions, Newton steps from w=0 keep crossing
the kinks and converge slowly. So problems sharing a mask are solved in order of growing C, each
started from the solution at the previous C, with helper values of C inserted from an easy C
(1 / mean squared row norm) so that C grows at most tenfold per stage; each stage is one batch over
all masks. Logistic regression is smooth and is solved in a single batch from w=0.

Matmuls run in x's dtype (float32 unless x is float64); objectives, norms and the line search's
sums are accumulated in float64, and scores are recomputed from the weights at every Newton step.
Everything runs on the device of `x` (on CUDA, leave TF32 matmuls off for float32 input: their
precision is below what tol=1e-6 needs). Working memory, besides `x` itself: about a dozen (m, n) and
a dozen (m, d+1) matrices of x's dtype with m = P * n_classes, plus a block of squared rows of x;
`working_bytes` gives an upper estimate (for float32 input; double it for float64).

The rows may be spread over processes (ranks under torchrun): each holds its part of x, y and the
masks, and `total` sums a tensor over the processes (an all-reduce). Every sum over rows (gradients,
Hessian products and diagonal, losses, the line search's derivatives) goes through it, so every
process sees the same sums, takes the same steps and ends with the same weights; what is per row
(scores, curvatures) stays in each process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Array = np.ndarray | torch.Tensor
Total = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over the processes holding the rows


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The `total` of rows held by one process: the tensor itself."""
    return tensor

_CG_MAX_ITER = 250
_C_RATIO = 10.0  # largest growth of C from one warm-started stage to the next
_HELPER_TOL = 1e-3  # tolerance of the helper stages of a C path
_CG_QTOL = 0.1  # conjugate gradients stop when step * last decrease <= this * total decrease
_LINE_MAX_ITER = 30
_LINE_TOL = 1e-3  # |phi'(a)| <= _LINE_TOL * |phi'(0)| ends the line search
_SQUARE_BLOCK_ELEMENTS = 1 << 20  # x is squared in blocks of about this many values


@dataclass
class LinearFit:
    """Fitted weights of P problems with K classes each."""

    coef: torch.Tensor  # (P, K, d) weights per problem and class
    intercept: torch.Tensor  # (P, K)
    objective: torch.Tensor  # (P,) final primal objective of each problem (float64)
    converged: torch.Tensor  # (P,) bool
    iterations: int  # Newton iterations done (summed over the stages of a C path)


def working_bytes(n: int, d: int, P: int, *, n_classes: int) -> int:
    """Upper estimate of the solvers' working memory in bytes for float32 input, x itself excluded.

    Counts 20 (m, n) and 20 (m, d+1) float32 matrices with m = P * n_classes (the live tensors and
    temporaries at the peak, with room for the allocator), two blocks of squared rows of x, masks
    and labels. On the CPU the live peak measured 60-80% of it; the allocator may keep freed blocks
    (resident memory peaked up to 1.2x the estimate), and BLAS and thread buffers (about 20 MB) are extra.
    """
    m = P * n_classes
    dense = 20 * m * n + 20 * m * (d + 1)
    block = min(n * d, max(_SQUARE_BLOCK_ELEMENTS, d))
    return 4 * (dense + 2 * block) + P * n + 16 * n


def _unit_sum(v: torch.Tensor, group: int) -> torch.Tensor:
    """Per-unit sums of per-row values (a unit is `group` consecutive rows)."""
    return v if group == 1 else v.view(-1, group).sum(1)


def _per_row(v: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-unit values spread over the unit's rows, as a column (rows, 1)."""
    v = v if group == 1 else v.repeat_interleave(group)
    return v.to(dtype)[:, None]


def _rows_of(units: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return units
    return (units[:, None] * group + torch.arange(group, device=units.device)).reshape(-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1, dtype=torch.float64)


def _forward(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores of stacked weight rows v (m, d+1) on every row of x: (m, n)."""
    return torch.addmm(v[:, -1:], v[:, :-1], x.T)


def _backward(x: torch.Tensor, g: torch.Tensor, total: Total) -> torch.Tensor:
    """g @ [x, 1] for pointwise values g (m, n): (m, d+1)."""
    return total(torch.cat([g @ x, g.sum(1, keepdim=True)], 1))


def _square_backward(x: torch.Tensor, g: torch.Tensor, total: Total) -> torch.Tensor:
    """g @ [x, 1]**2 (the Hessian diagonal's data term), squaring x in row blocks."""
    n, d = x.shape
    step = max(1, _SQUARE_BLOCK_ELEMENTS // max(d, 1))
    acc = g.new_zeros((g.shape[0], d))
    for s in range(0, n, step):
        block = x[s:s + step]
        acc.addmm_(g[:, s:s + step], block * block)
    return total(torch.cat([acc, g.sum(1, keepdim=True)], 1))


class _Hinge:
    """One-vs-rest squared hinge: one row per (problem, class), each its own unit.

    A loss model gives, for a set of units: `context` (the labels and C * mask of their rows),
    `evaluate` (loss per unit, pointwise gradient, curvature for Hessian products, weights of the
    Hessian diagonal), `hess` (the pointwise Hessian applied to scores), `line` (first and second
    derivatives of the loss along directions at given steps) and `take`/`take_curv` (keep a subset).
    """

    group = 1

    def __init__(self, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, *, n_classes: int,
                 dtype: torch.dtype, binary: bool) -> None:
        self.y, self.masks, self.C, self.dtype = y, masks, C, dtype
        self.K = 1 if binary else n_classes
        self.binary = binary
        self.n_units = masks.shape[0] * self.K

    def context(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        problem = rows // self.K
        cls = torch.ones_like(rows) if self.binary else rows % self.K
        t = (self.y[None, :] == cls[:, None]).to(self.dtype) * 2 - 1
        cm = self.masks[problem].to(self.dtype) * self.C[problem].to(self.dtype)[:, None]
        return t, cm

    @staticmethod
    def take(ctx: tuple, idx: torch.Tensor) -> tuple:
        return tuple(a[idx] for a in ctx)

    @staticmethod
    def take_curv(curv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return curv[idx]

    @staticmethod
    def evaluate(ctx: tuple, z: torch.Tensor) -> tuple:
        t, cm = ctx
        gap = (1 - t * z).clamp_min_(0)
        loss = (cm * gap * gap).sum(1, dtype=torch.float64)
        curv = 2 * cm * (gap > 0)
        grad = -t * gap * curv  # 2 C (z - t) where the hinge is active
        return loss, grad, curv, curv

    @staticmethod
    def hess(curv: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
        return curv * xv

    @staticmethod
    def line(ctx: tuple, z: torch.Tensor, zs: torch.Tensor, *, a: torch.Tensor) -> tuple:
        t, cm = ctx
        za = torch.addcmul(z, zs, a.to(z.dtype)[:, None])
        on = cm * ((t * za) < 1)
        d1 = (on * (za - t) * zs).sum(1, dtype=torch.float64) * 2
        d2 = (on * zs * zs).sum(1, dtype=torch.float64) * 2
        return d1, d2


class _Binomial(_Hinge):
    """Two-class logistic loss with one weight vector per problem (class 1 positive)."""

    def __init__(self, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, *, dtype: torch.dtype) -> None:
        super().__init__(y, masks, C, n_classes=2, dtype=dtype, binary=True)

    @staticmethod
    def evaluate(ctx: tuple, z: torch.Tensor) -> tuple:
        t, cm = ctx
        tz = t * z
        loss = (cm.double() * torch.nn.functional.softplus(-tz.double())).sum(1)
        grad = -t * cm * torch.sigmoid(-tz)
        s = torch.sigmoid(z)
        curv = cm * s * (1 - s)
        return loss, grad, curv, curv

    @staticmethod
    def line(ctx: tuple, z: torch.Tensor, zs: torch.Tensor, *, a: torch.Tensor) -> tuple:
        t, cm = ctx
        za = torch.addcmul(z, zs, a.to(z.dtype)[:, None])
        d1 = (-t * cm * torch.sigmoid(-t * za) * zs).sum(1, dtype=torch.float64)
        s = torch.sigmoid(za)
        d2 = (cm * s * (1 - s) * zs * zs).sum(1, dtype=torch.float64)
        return d1, d2


class _Multinomial:
    """Multinomial logistic loss; the K rows of a problem form one unit."""

    def __init__(self, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, *, n_classes: int,
                 dtype: torch.dtype) -> None:
        self.masks, self.C, self.dtype = masks, C, dtype
        self.group = n_classes
        self.onehot = torch.nn.functional.one_hot(y, n_classes).T.to(dtype)  # (K, n)
        self.n_units = masks.shape[0]

    def context(self, units: torch.Tensor) -> torch.Tensor:
        return (self.masks[units].to(self.dtype) * self.C[units].to(self.dtype)[:, None])[:, None]

    @staticmethod
    def take(ctx: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return ctx[idx]

    @staticmethod
    def take_curv(curv: tuple, idx: torch.Tensor) -> tuple:
        return curv[0][idx], curv[1][idx]

    def evaluate(self, cm: torch.Tensor, z: torch.Tensor) -> tuple:
        z3 = z.view(cm.shape[0], self.group, -1)
        z64 = z3.double()
        loss = torch.logsumexp(z64, 1) - (z64 * self.onehot).sum(1)
        loss = (cm[:, 0].double() * loss).sum(1)
        p = torch.softmax(z3, 1)
        grad = (cm * (p - self.onehot)).view(z.shape)
        diag = (cm * p * (1 - p)).view(z.shape)
        return loss, grad, (p, cm), diag

    @staticmethod
    def hess(curv: tuple, xv: torch.Tensor) -> torch.Tensor:
        p, cm = curv
        q = p * xv.view(p.shape)
        return (cm * (q - p * q.sum(1, keepdim=True))).view(xv.shape)

    def line(self, cm: torch.Tensor, z: torch.Tensor, zs: torch.Tensor, *, a: torch.Tensor) -> tuple:
        zs3 = zs.view(cm.shape[0], self.group, -1)
        za = torch.addcmul(z.view(zs3.shape), zs3, a.to(z.dtype)[:, None, None])
        p = torch.softmax(za, 1)
        d1 = (cm * (p - self.onehot) * zs3).sum((1, 2), dtype=torch.float64)
        pz = (p * zs3).sum(1)
        d2 = (cm[:, 0] * ((p * zs3 * zs3).sum(1) - pz * pz)).sum(1, dtype=torch.float64)
        return d1, d2


def _pcg(x: torch.Tensor, model, curv, *, reg: torch.Tensor, grad: torch.Tensor,
         precond: torch.Tensor, total: Total) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated preconditioned CG for H s = -grad of every unit; returns s and its scores x_aug s.

    A unit stops once the last step's decrease of the quadratic model, times the step count, is at
    most _CG_QTOL of the total decrease so far; stopped units leave the products.
    """
    group, dtype = model.group, grad.dtype
    s_out = torch.zeros_like(grad)
    zs_out = grad.new_zeros((grad.shape[0], x.shape[0]))
    live = torch.arange(grad.shape[0] // group, device=grad.device)
    r = -grad
    zt = r / precond
    p = zt.clone()
    rz = _unit_sum(_dot(r, zt), group)
    quad = torch.zeros_like(rz)
    s, zs = torch.zeros_like(grad), torch.zeros_like(zs_out)
    for step in range(1, _CG_MAX_ITER + 1):
        xp = _forward(x, p)
        hp = _backward(x, model.hess(curv, xp), total).addcmul_(reg, p)
        php = _unit_sum(_dot(p, hp), group)
        alpha = torch.where(php > 0, rz / php.clamp_min(1e-300), torch.zeros_like(php))
        a = _per_row(alpha, group, dtype)
        s.addcmul_(a, p)
        zs.addcmul_(a, xp)
        r.addcmul_(a, hp, value=-1)
        gain = 0.5 * alpha * rz
        quad -= gain
        keep = (step * gain > _CG_QTOL * quad.abs()) & (php > 0)
        if step == _CG_MAX_ITER or not bool(keep.all()):
            stop = torch.nonzero(~keep).squeeze(1)
            out_rows, rows = _rows_of(live[stop], group), _rows_of(stop, group)
            s_out[out_rows] = s[rows]
            zs_out[out_rows] = zs[rows]
            if step == _CG_MAX_ITER or not bool(keep.any()):
                break
            idx = torch.nonzero(keep).squeeze(1)
            rows = _rows_of(idx, group)
            live, rz, quad = live[idx], rz[idx], quad[idx]
            s, zs, r, p, precond = s[rows], zs[rows], r[rows], p[rows], precond[rows]
            curv = model.take_curv(curv, idx)
        zt = r / precond
        rz_new = _unit_sum(_dot(r, zt), group)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = zt.addcmul_(_per_row(beta, group, dtype), p)
        rz = rz_new
    return s_out, zs_out


def _line_search(model, ctx, z: torch.Tensor, *, zs: torch.Tensor, ws: torch.Tensor, ss: torch.Tensor,
                 d0: torch.Tensor, total: Total) -> torch.Tensor:
    """Per-unit step lengths minimising the objective along the directions (safeguarded 1-D Newton).

    phi'(a) = ws + a ss + loss'(a); a unit stops at |phi'(a)| <= _LINE_TOL |phi'(0)|. The step
    returned is one where phi' < 0 (so phi has decreased) or the final near-stationary one;
    0 where neither was found.
    """
    lo = torch.zeros_like(d0)
    hi = torch.full_like(d0, float("inf"))
    a = torch.ones_like(d0)
    best = torch.zeros_like(d0)
    done = d0 >= 0
    target = _LINE_TOL * d0.abs()
    for _ in range(_LINE_MAX_ITER):
        d1, d2 = total(torch.stack(model.line(ctx, z, zs, a=a)))
        d1 = d1 + ws + a * ss
        d2 = d2 + ss
        below = d1 < 0
        lo = torch.where(below, a, lo)
        hi = torch.where(below, hi, a)
        ok = (d1.abs() <= target) & ~done
        best = torch.where(ok | (below & ~done), a, best)
        done |= ok
        if bool(done.all()):
            break
        step = a - d1 / d2.clamp_min(1e-300)
        bisect = torch.where(torch.isinf(hi), 2 * lo.clamp_min(1.0), (lo + hi) / 2)
        a = torch.where(done, a, torch.where((step > lo) & (step < hi), step, bisect))
    return best


def _newton(x: torch.Tensor, model, reg: torch.Tensor, *, tol: torch.Tensor, max_iter: int,
            weights: torch.Tensor, cold: bool, total: Total) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Truncated Newton for every unit of `model` from `weights` (m, d+1), updated in place.

    A unit stops when ||grad|| <= tol * ||grad at w=0||, when max_iter steps are done, or when the line
    search finds no descent (the float precision is exhausted; it is then not converged). Scores are
    recomputed from the weights at every step, so rounding does not accumulate over the steps.
    Returns per-unit objective and convergence, and the number of Newton steps taken.
    """
    group, n_units, device = model.group, model.n_units, x.device
    objective = torch.zeros(n_units, dtype=torch.float64, device=device)
    converged = torch.zeros(n_units, dtype=torch.bool, device=device)
    units = torch.arange(n_units, device=device)
    ctx = model.context(units)
    if cold:
        g0 = None
    else:
        zero = weights.new_zeros((weights.shape[0], x.shape[0]))
        grad0 = _backward(x, model.evaluate(ctx, zero)[1], total)
        g0 = _unit_sum(_dot(grad0, grad0), group).sqrt()
    iterations = 0
    for it in range(max_iter + 1):
        rows = _rows_of(units, group)
        w = weights[rows]
        z = w.new_zeros((w.shape[0], x.shape[0])) if cold and it == 0 else _forward(x, w)
        if it:
            ctx = model.context(units)
        loss, pointwise, curv, diag = model.evaluate(ctx, z)
        loss = total(loss)
        grad = _backward(x, pointwise, total).addcmul_(reg, w)
        gnorm = _unit_sum(_dot(grad, grad), group).sqrt()
        value = loss + 0.5 * _unit_sum(_dot(reg * w, w), group)
        if g0 is None:
            g0 = gnorm.clone()
        finished = gnorm <= tol[units] * g0[units]
        converged[units[finished]] = True
        objective[units] = value
        if it == max_iter or bool(finished.all()):
            break
        if bool(finished.any()):
            idx = torch.nonzero(~finished).squeeze(1)
            sub = _rows_of(idx, group)
            units, rows, w, z, grad, diag = units[idx], rows[sub], w[sub], z[sub], grad[sub], diag[sub]
            ctx, curv = model.take(ctx, idx), model.take_curv(curv, idx)
        iterations = it + 1
        precond = _square_backward(x, diag, total).add_(reg).clamp_min_(1e-12)
        s, zs = _pcg(x, model, curv, reg=reg, grad=grad, precond=precond, total=total)
        ws = _unit_sum(_dot(reg * w, s), group)
        ss = _unit_sum(_dot(reg * s, s), group)
        d0 = _unit_sum(_dot(grad, s), group)
        step = _line_search(model, ctx, z, zs=zs, ws=ws, ss=ss, d0=d0, total=total)
        sr = _per_row(step, group, x.dtype)
        weights[rows] = w.addcmul_(sr, s)
        moving = step > 0
        if not bool(moving.all()):  # no descent direction left at this precision
            units = units[moving]
            if len(units) == 0:
                break
    return objective, converged, iterations


def _ladder(wanted: list[float], start: float) -> list[tuple[float, bool]]:
    """C values to solve in turn, each warm-started from the previous: the requested values (True) and
    helper values (False) from `start` up, so that C grows by at most _C_RATIO per stage."""
    out: list[tuple[float, bool]] = []
    prev = None
    if start < wanted[0]:
        out.append((start, False))
        prev = start
    for c in wanted:
        if prev is not None:
            steps = math.ceil(math.log(c / prev) / math.log(_C_RATIO) - 1e-9)
            out.extend((prev * (c / prev) ** (j / steps), False) for j in range(1, steps))
        out.append((c, True))
        prev = c
    return out


def _solve(x: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, *, tol: float, max_iter: int,
           build, reg: torch.Tensor, rows_per_problem: int, units_per_problem: int,
           path: bool, total: Total) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Solve every (mask, C) problem; returns stacked weights (P * rows_per_problem, d+1), per-unit
    objective and convergence, and the Newton steps taken.

    Without `path`, all problems form one batch started at w = 0. With `path`, the problems sharing a
    mask are solved in order of growing C, each started from the solution at the previous C, with
    helper values of C inserted (from an easy C up, at most _C_RATIO apart); stage r solves the r-th
    C of every mask's path in one batch.
    """
    P, device, dtype = masks.shape[0], x.device, x.dtype
    width = x.shape[1] + 1
    if not path:
        weights = torch.zeros((P * rows_per_problem, width), dtype=dtype, device=device)
        tol_units = torch.full((P * units_per_problem,), tol, dtype=torch.float64, device=device)
        objective, converged, iterations = _newton(x, build(masks, C), reg, tol=tol_units,
                                                   max_iter=max_iter, weights=weights,
                                                   cold=True, total=total)
        return weights, objective, converged, iterations
    inverse = _same_masks(masks, total)
    first = sorted(set(inverse))
    distinct = masks[torch.tensor(first, dtype=torch.long, device=device)]
    inverse, c_list = [first.index(g) for g in inverse], C.tolist()
    mean_scale = total(distinct.double() @ _row_scale(x)) / total(distinct.sum(1).double()).clamp_min(1)
    plans = []
    for g, scale in enumerate(mean_scale.tolist()):
        wanted = sorted({c_list[p] for p in range(P) if inverse[p] == g})
        plans.append(_ladder(wanted, min(wanted[0], 1.0 / scale) if scale > 0 else wanted[0]))
    warm = torch.zeros((len(distinct) * rows_per_problem, width), dtype=dtype, device=device)
    weights = torch.zeros((P * rows_per_problem, width), dtype=dtype, device=device)
    objective = torch.zeros(P * units_per_problem, dtype=torch.float64, device=device)
    converged = torch.zeros(P * units_per_problem, dtype=torch.bool, device=device)
    iterations = 0
    for stage in range(max(len(plan) for plan in plans)):
        groups = [g for g in range(len(distinct)) if len(plans[g]) > stage]
        values = [plans[g][stage][0] for g in groups]
        wanted = [plans[g][stage][1] for g in groups]
        gidx = torch.tensor(groups, device=device)
        model = build(distinct[gidx], torch.tensor(values, dtype=torch.float64, device=device))
        tol_units = torch.tensor([tol if want else max(tol, _HELPER_TOL) for want in wanted],
                                 dtype=torch.float64, device=device).repeat_interleave(units_per_problem)
        rows = _rows_of(gidx, rows_per_problem)
        w = warm[rows]
        obj, conv, its = _newton(x, model, reg, tol=tol_units, max_iter=max_iter, weights=w,
                                 cold=stage == 0, total=total)
        warm[rows] = w
        iterations += its
        for i, g in enumerate(groups):
            if not wanted[i]:
                continue
            r_in, u_in = slice(i * rows_per_problem, (i + 1) * rows_per_problem), slice(
                i * units_per_problem, (i + 1) * units_per_problem)
            for p in range(P):
                if inverse[p] == g and c_list[p] == values[i]:
                    weights[p * rows_per_problem:(p + 1) * rows_per_problem] = w[r_in]
                    objective[p * units_per_problem:(p + 1) * units_per_problem] = obj[u_in]
                    converged[p * units_per_problem:(p + 1) * units_per_problem] = conv[u_in]
    return weights, objective, converged, iterations


def _same_masks(masks: torch.Tensor, total: Total) -> list[int]:
    """For every problem, the first problem with the same mask over every process's rows (the
    problems of equal masks differ in no row on any process)."""
    on = masks.float()  # sums of 0s and 1s: zero, in any precision, only where every term is zero
    differ = total(on @ (1 - on).T + (1 - on) @ on.T)  # rows where masks p and q differ, summed
    return [row.index(0.0) for row in differ.tolist()]


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of every row with its constant feature, in float64, computed in row blocks."""
    step = max(1, _SQUARE_BLOCK_ELEMENTS // max(x.shape[1], 1))
    parts = [(x[s:s + step] * x[s:s + step]).sum(1, dtype=torch.float64) for s in range(0, x.shape[0], step)]
    return torch.cat(parts) + 1 if parts else x.new_zeros(0, dtype=torch.float64)


def _check(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, *, C, n_classes: int) -> tuple:
    """Inputs as tensors on x's device (x float32 or float64, y int64, masks bool, C float64)."""
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {tuple(x.shape)}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    device = x.device
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    x = x.contiguous()
    y = torch.as_tensor(y, device=device).long()
    masks = torch.as_tensor(masks, device=device).bool()
    if masks.ndim == 1:
        masks = masks[None]
    C = torch.as_tensor(C, dtype=torch.float64, device=device).reshape(-1)
    n = x.shape[0]
    if y.shape != (n,) or masks.shape[1] != n or C.shape[0] != masks.shape[0]:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"masks {tuple(masks.shape)}, C {tuple(C.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    if bool((C <= 0).any()):
        raise ValueError("every C must be positive")
    return x, y, masks, C


@torch.no_grad()
def fit_squared_hinge(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, *, C: torch.Tensor,
                      n_classes: int, tol: float = 1e-6, max_iter: int = 100, total: Total = whole,
                      ) -> LinearFit:
    """One-vs-rest L2-regularised squared-hinge SVMs, as LinearSVC(loss="squared_hinge", C=C).

    For class k, with t_i = +1 where y_i == k and -1 elsewhere, over the rows of the problem's mask:
    minimise 0.5 * (||w_k||^2 + b_k^2) + C * sum_i max(0, 1 - t_i (w_k . x_i + b_k))^2 (liblinear's
    objective: the intercept is a feature of value 1 and is regularised). `objective` is the sum of
    these over the classes. With two classes, as LinearSVC, one problem is solved (class 1 against
    class 0) and returned as coef [-w, w], intercept [-b, b]; `objective` is that one problem's.
    The problems sharing a mask are solved along a path of growing C (see the module docstring);
    `max_iter` bounds the Newton steps of each stage, `iterations` sums them over the stages.
    With rows spread over processes, x, y and masks are this process's rows and `total` sums over
    the processes (see the module docstring).
    """
    x, y, masks, C = _check(x, y, masks, C=C, n_classes=n_classes)
    P = masks.shape[0]
    binary = n_classes == 2
    K = 1 if binary else n_classes
    reg = torch.ones((1, x.shape[1] + 1), dtype=x.dtype, device=x.device)
    weights, objective, converged, iterations = _solve(
        x, masks, C, tol=tol, max_iter=max_iter,
        build=lambda m, c: _Hinge(y, m, c, n_classes=n_classes, dtype=x.dtype, binary=binary),
        reg=reg, rows_per_problem=K, units_per_problem=K, path=True, total=total)
    if binary:
        w = weights.reshape(P, 1, -1)
        w = torch.cat([-w, w], 1)
    else:
        w = weights.reshape(P, n_classes, -1)
        objective = objective.view(P, n_classes).sum(1)
        converged = converged.view(P, n_classes).all(1)
    return LinearFit(w[..., :-1].contiguous(), w[..., -1].contiguous(), objective, converged, iterations)


@torch.no_grad()
def fit_logistic(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, *, C: torch.Tensor,
                 n_classes: int, tol: float = 1e-6, max_iter: int = 100, total: Total = whole,
                 ) -> LinearFit:
    """L2-regularised logistic regression, as LogisticRegression(C=C) (lbfgs) with an intercept.

    More than two classes: the multinomial loss, minimise C * sum_i -log softmax(W x_i + b)_{y_i}
    + 0.5 * ||W||^2 over the rows of the problem's mask; the intercept is not penalised. Two classes,
    as scikit-learn: the binomial loss C * sum_i log(1 + exp(-t_i (w . x_i + b))) + 0.5 * ||w||^2 with
    t_i = +1 for class 1, returned as coef [-w/2, w/2], intercept [-b/2, b/2] (so softmax of the
    decision gives the class probabilities). scikit-learn's lbfgs minimises the same objective
    divided by C * n_p (a mean loss plus ||W||^2 / (2 C n_p)); `objective` is on the scale above.
    Multinomial intercepts are defined up to a common shift and are returned centred. Rows spread
    over processes: as fit_squared_hinge.
    """
    x, y, masks, C = _check(x, y, masks, C=C, n_classes=n_classes)
    P = masks.shape[0]
    reg = torch.ones((1, x.shape[1] + 1), dtype=x.dtype, device=x.device)
    reg[0, -1] = 0
    if n_classes == 2:
        weights, objective, converged, iterations = _solve(
            x, masks, C, tol=tol, max_iter=max_iter, build=lambda m, c: _Binomial(y, m, c, dtype=x.dtype),
            reg=reg, rows_per_problem=1, units_per_problem=1, path=False, total=total)
        w = weights.reshape(P, 1, -1) / 2
        w = torch.cat([-w, w], 1)
    else:
        weights, objective, converged, iterations = _solve(
            x, masks, C, tol=tol, max_iter=max_iter,
            build=lambda m, c: _Multinomial(y, m, c, n_classes=n_classes, dtype=x.dtype),
            reg=reg, rows_per_problem=n_classes, units_per_problem=1, path=False, total=total)
        w = weights.reshape(P, n_classes, -1)
        w[..., -1] -= w[..., -1].mean(1, keepdim=True)
    return LinearFit(w[..., :-1].contiguous(), w[..., -1].contiguous(), objective, converged, iterations)


def decision(fit: LinearFit, x: torch.Tensor) -> torch.Tensor:
    """Scores (P, n, K) of every problem on rows x (n, d): x @ coef^T + intercept."""
    P, K, d = fit.coef.shape
    x = torch.as_tensor(x).to(device=fit.coef.device, dtype=fit.coef.dtype)
    scores = x @ fit.coef.reshape(P * K, d).T
    return scores.view(-1, P, K).permute(1, 0, 2) + fit.intercept[:, None, :]


def _labels(y: Array) -> np.ndarray:
    return np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)


def _as_float64(*arrays: Array) -> list[np.ndarray]:
    return [np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
            for a in arrays]


def primal_objective_svm(x: Array, y: Array, coef: Array, *, intercept: Array, C: float,
                         n_classes: int) -> float:
    """Squared-hinge objective of one problem (fit_squared_hinge's definition) in float64.

    With two classes the last row of coef (class 1 against class 0) is scored, so both LinearSVC's
    single row and the two rows of fit_squared_hinge are accepted.
    """
    x, coef, intercept = _as_float64(x, coef, intercept)
    y = _labels(y)
    coef, intercept = coef.reshape(-1, x.shape[1]), intercept.reshape(-1)
    if n_classes == 2:
        pairs = [(coef[-1], intercept[-1], 1)]
    else:
        pairs = [(coef[k], intercept[k], k) for k in range(n_classes)]
    total = 0.0
    for w, b, k in pairs:
        t = np.where(y == k, 1.0, -1.0)
        gap = np.maximum(0.0, 1.0 - t * (x @ w + b))
        total += 0.5 * (w @ w + b * b) + float(C) * (gap @ gap)
    return float(total)


def primal_objective_logistic(x: Array, y: Array, coef: Array, *, intercept: Array, C: float,
                              n_classes: int) -> float:
    """Logistic objective of one problem (fit_logistic's definition) in float64.

    With two classes a single row w (LogisticRegression's coef_) or two rows (w = row 1 - row 0) is
    accepted and the binomial objective is returned.
    """
    x, coef, intercept = _as_float64(x, coef, intercept)
    y = _labels(y)
    coef, intercept = coef.reshape(-1, x.shape[1]), intercept.reshape(-1)
    if n_classes == 2:
        w, b = (coef[0], intercept[0]) if len(coef) == 1 else (coef[1] - coef[0], intercept[1] - intercept[0])
        margin = np.where(y == 1, 1.0, -1.0) * (x @ w + b)
        return float(float(C) * np.logaddexp(0.0, -margin).sum() + 0.5 * (w @ w))
    z = x @ coef.T + intercept
    zmax = z.max(1, keepdims=True)
    lse = (zmax[:, 0] + np.log(np.exp(z - zmax).sum(1)))
    loss = (lse - z[np.arange(len(y)), y]).sum()
    return float(float(C) * loss + 0.5 * (coef * coef).sum())
