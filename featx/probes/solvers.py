"""Batched linear classifiers in torch: many problems (every C, every cross-validation fold and the
final fit) solved together, so that each Hessian-vector product is one matmul over all of them.

Every problem p trains on the rows `masks[p]` of one shared matrix `x` (n, d) with its own `C[p]`.
The weights of all problems are stacked as columns of one (d+1, m) matrix (the last row is the
intercept), so `x @ W` and `x^T @ G` serve every problem at once. The solver is a truncated Newton
method: each Newton direction comes from conjugate gradients preconditioned with the diagonal of the
Hessian, using only Hessian-vector products, and the step length is an exact line search along the
direction (cheap: the scores along the direction are kept from the conjugate-gradient products, so a
trial step costs no matmul). Every problem has its own step length and stops on its own when
`||grad|| <= tol * ||grad at w=0||`; finished problems, and finished conjugate-gradient systems,
drop out of the matmuls. Matmuls run in the input's floating dtype (float32 unless x is float64);
objectives and norms are summed in float64. Everything runs on the device of `x`.

Working memory, besides `x` itself: with m = P * n_classes columns (P for two-class logistic), about
ten (n, m) and a dozen (d+1, m) matrices of x's dtype, plus a block of squared rows of x when the
Hessian diagonal is formed; `working_bytes` gives an upper estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_CG_FORCING = 0.1  # relative residual at which conjugate gradients stop
_CG_MAX_ITER = 250
_CG_RULE = "quad"
_CG_QTOL = 0.1
_LINE_MAX_ITER = 30
_LINE_TOL = 1e-3  # |phi'(a)| <= _LINE_TOL * |phi'(0)| ends the line search
_SQUARE_BLOCK_ELEMENTS = 1 << 24


@dataclass
class LinearFit:
    """Fitted weights of P problems with K classes each."""

    coef: torch.Tensor  # (P, K, d) weights per problem and class
    intercept: torch.Tensor  # (P, K)
    objective: torch.Tensor  # (P,) final primal objective of each problem (float64)
    converged: torch.Tensor  # (P,) bool
    iterations: int  # Newton iterations done


def working_bytes(n: int, d: int, P: int, n_classes: int) -> int:
    """Upper estimate of the solver's working memory in bytes for float32 input (double for float64)."""
    m = P * n_classes
    rows = d + 1
    dense = 12 * n * m + 16 * rows * m  # (n, m) and (d+1, m) float32 matrices
    square_block = min(n, max(1, _SQUARE_BLOCK_ELEMENTS // max(d, 1))) * d
    small = P * n + 8 * n + 64 * m  # masks, labels, per-column scalars (float64)
    return 4 * (dense + square_block) + small


def _unit_sum(v: torch.Tensor, group: int) -> torch.Tensor:
    """Per-unit sums of per-column values (units are `group` consecutive columns)."""
    return v if group == 1 else v.view(-1, group).sum(1)


def _col_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(0, dtype=torch.float64)


def _cols_of(units: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return units
    return (units[:, None] * group + torch.arange(group, device=units.device)).reshape(-1)


def _forward(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores x @ v[:-1] + v[-1] for stacked columns v (d+1, m)."""
    return torch.addmm(v[-1:], x, v[:-1])


def _backward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x_aug^T @ g for pointwise values g (n, m): (d+1, m)."""
    return torch.cat([x.T @ g, g.sum(0, keepdim=True)], 0)


def _square_backward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(x_aug * x_aug)^T @ g, squaring x in row blocks."""
    n, d = x.shape
    step = max(1, _SQUARE_BLOCK_ELEMENTS // max(d, 1))
    out = torch.zeros((d + 1, g.shape[1]), dtype=g.dtype, device=g.device)
    for s in range(0, n, step):
        block = x[s:s + step]
        out[:-1].addmm_((block * block).T, g[s:s + step])
    out[-1] = g.sum(0)
    return out


class _Hinge:
    """One-vs-rest squared hinge; one column per (problem, class), each its own unit."""

    group = 1

    def __init__(self, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, n_classes: int,
                 dtype: torch.dtype, binary: bool) -> None:
        self.y, self.masks, self.C, self.dtype = y, masks, C, dtype
        self.K = 1 if binary else n_classes
        self.binary = binary
        self.n_units = masks.shape[0] * self.K

    def context(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        problem = cols // self.K
        cls = 1 if self.binary else cols % self.K
        t = ((self.y[:, None] == cls).to(self.dtype) * 2 - 1).expand(-1, len(cols))
        cm = self.masks.T[:, problem].to(self.dtype) * self.C[problem].to(self.dtype)
        return t, cm

    @staticmethod
    def take(ctx: tuple, cols: torch.Tensor) -> tuple:
        return tuple(a[:, cols] for a in ctx)

    @staticmethod
    def evaluate(ctx: tuple, z: torch.Tensor):
        t, cm = ctx
        gap = (1 - t * z).clamp_min_(0)
        loss = (cm * gap * gap).sum(0, dtype=torch.float64)
        curv = 2 * cm * (gap > 0)
        grad = -t * gap * curv  # 2 C (z - t) on rows with a positive hinge
        return loss, grad, curv, curv

    @staticmethod
    def take_curv(curv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return curv[:, cols]

    @staticmethod
    def hess(curv: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
        return curv * xv

    @staticmethod
    def line(ctx: tuple, z: torch.Tensor, zs: torch.Tensor, a: torch.Tensor):
        t, cm = ctx
        za = torch.addcmul(z, zs, a.to(z.dtype))
        on = cm * ((t * za) < 1)
        d1 = (on * (za - t) * zs).sum(0, dtype=torch.float64) * 2
        d2 = (on * zs * zs).sum(0, dtype=torch.float64) * 2
        return d1, d2


class _Binomial:
    """Two-class logistic loss with one weight vector per problem (class 1 positive)."""

    group = 1

    def __init__(self, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, dtype: torch.dtype) -> None:
        self.y, self.masks, self.C, self.dtype = y, masks, C, dtype
        self.n_units = masks.shape[0]

    def context(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = (self.y[:, None] == 1).to(self.dtype) * 2 - 1
        cm = self.masks.T[:, cols].to(self.dtype) * self.C[cols].to(self.dtype)
        return t.expand(-1, len(cols)), cm

    take = staticmethod(_Hinge.take)
    take_curv = staticmethod(_Hinge.take_curv)
    hess = staticmethod(_Hinge.hess)

    @staticmethod
    def evaluate(ctx: tuple, z: torch.Tensor):
        t, cm = ctx
        tz = t * z
        loss = (cm.double() * torch.nn.functional.softplus(-tz.double())).sum(0)
        grad = -t * cm * torch.sigmoid(-tz)
        s = torch.sigmoid(z)
        curv = cm * s * (1 - s)
        return loss, grad, curv, curv

    @staticmethod
    def line(ctx: tuple, z: torch.Tensor, zs: torch.Tensor, a: torch.Tensor):
        t, cm = ctx
        za = torch.addcmul(z, zs, a.to(z.dtype))
        d1 = (-t * cm * torch.sigmoid(-t * za) * zs).sum(0, dtype=torch.float64)
        s = torch.sigmoid(za)
        d2 = (cm * s * (1 - s) * zs * zs).sum(0, dtype=torch.float64)
        return d1, d2


class _Multinomial:
    """Multinomial logistic loss; the K columns of a problem form one unit."""

    def __init__(self, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor, n_classes: int,
                 dtype: torch.dtype) -> None:
        self.masks, self.C, self.dtype = masks, C, dtype
        self.group = n_classes
        self.onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype)
        self.n_units = masks.shape[0]

    def context(self, units: torch.Tensor) -> torch.Tensor:
        return (self.masks.T[:, units].to(self.dtype) * self.C[units].to(self.dtype))[:, :, None]

    @staticmethod
    def take(ctx: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return ctx[:, units]

    def evaluate(self, cm: torch.Tensor, z: torch.Tensor):
        n, u = cm.shape[:2]
        z3 = z.view(n, u, self.group)
        lse = torch.logsumexp(z3.double(), -1)
        loss = (cm[..., 0].double() * (lse - (z3.double() * self.onehot[:, None]).sum(-1))).sum(0)
        p = torch.softmax(z3, -1)
        grad = (cm * (p - self.onehot[:, None])).view(n, -1)
        diag = (cm * p * (1 - p)).view(n, -1)
        return loss, grad, (p, cm), diag

    @staticmethod
    def take_curv(curv: tuple, units: torch.Tensor) -> tuple:
        return curv[0][:, units], curv[1][:, units]

    @staticmethod
    def hess(curv: tuple, xv: torch.Tensor) -> torch.Tensor:
        p, cm = curv
        q = p * xv.view(p.shape)
        return (cm * (q - p * q.sum(-1, keepdim=True))).view(xv.shape)

    def line(self, cm: torch.Tensor, z: torch.Tensor, zs: torch.Tensor, a: torch.Tensor):
        n, u = cm.shape[:2]
        zs3 = zs.view(n, u, self.group)
        za = torch.addcmul(z.view(n, u, self.group), zs3, a.to(z.dtype)[:, None])
        p = torch.softmax(za, -1)
        d1 = (cm * (p - self.onehot[:, None]) * zs3).sum((0, 2), dtype=torch.float64)
        pz = (p * zs3).sum(-1)
        d2 = (cm[..., 0] * ((p * zs3 * zs3).sum(-1) - pz * pz)).sum(0, dtype=torch.float64)
        return d1, d2


def _pcg(x: torch.Tensor, model, curv, reg: torch.Tensor, grad: torch.Tensor, precond: torch.Tensor,
         gnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate Newton directions H s = -grad for every unit, with the scores x_aug @ s."""
    group = model.group
    n = x.shape[0]
    s = torch.zeros_like(grad)
    zs = grad.new_zeros((n, grad.shape[1]))
    r = -grad
    z = r / precond
    p = z.clone()
    rz = _unit_sum(_col_dot(r, z), group)
    limit = _CG_FORCING * gnorm
    quad = torch.zeros_like(gnorm)
    step_no = 0
    units = torch.arange(len(gnorm), device=grad.device)
    live_units, live_cols = units, units if group == 1 else _cols_of(units, group)
    for _ in range(_CG_MAX_ITER):
        full = len(live_units) == len(units)
        pl = p if full else p[:, live_cols]
        xp = _forward(x, pl)
        cl = curv if full else model.take_curv(curv, live_units)
        hp = reg * pl + _backward(x, model.hess(cl, xp))
        php = _unit_sum(_col_dot(pl, hp), group)
        rzl = rz[live_units]
        alpha = torch.where(php > 0, rzl / php.clamp_min(1e-300), torch.zeros_like(php))
        ac = alpha if group == 1 else alpha.repeat_interleave(group)
        ac = ac.to(grad.dtype)
        if full:
            s.add_(ac * pl)
            zs.add_(ac * xp)
            r.sub_(ac * hp)
            rl = r
        else:
            s[:, live_cols] += ac * pl
            zs[:, live_cols] += ac * xp
            r[:, live_cols] -= ac * hp
            rl = r[:, live_cols]
        step_no += 1
        if _CG_RULE == "residual":
            rnorm = _unit_sum(_col_dot(rl, rl), group).sqrt()
            keep = (rnorm > limit[live_units]) & (php > 0)
        else:
            dq = 0.5 * alpha * rzl
            ql = quad[live_units] - dq
            quad[live_units] = ql
            keep = (step_no * dq > _CG_QTOL * ql.abs()) & (php > 0)
        if not bool(keep.any()):
            break
        ml = precond if full else precond[:, live_cols]
        zl = rl / ml
        rz_new = _unit_sum(_col_dot(rl, zl), group)
        beta = (rz_new / rzl.clamp_min(1e-300)).to(grad.dtype)
        bc = beta if group == 1 else beta.repeat_interleave(group)
        pl_new = zl + bc * pl
        if full:
            p = pl_new
        else:
            p[:, live_cols] = pl_new
        rz[live_units] = rz_new
        if not bool(keep.all()):
            live_units = live_units[keep]
            live_cols = live_units if group == 1 else _cols_of(live_units, group)
    return s, zs


def _line_search(model, ctx, z: torch.Tensor, zs: torch.Tensor, ws: torch.Tensor, ss: torch.Tensor,
                 d0: torch.Tensor) -> torch.Tensor:
    """Step lengths minimising the objective along each unit's direction (safeguarded Newton)."""
    group = model.group
    lo = torch.zeros_like(d0)
    hi = torch.full_like(d0, float("inf"))
    a = torch.ones_like(d0)
    best = torch.zeros_like(d0)
    done = torch.zeros_like(d0, dtype=torch.bool)
    target = _LINE_TOL * d0.abs()
    for _ in range(_LINE_MAX_ITER):
        d1, d2 = model.line(ctx, z, zs, a)
        d1 = d1 + ws + a * ss
        d2 = d2 + ss
        below = d1 < 0
        lo = torch.where(below, a, lo)
        hi = torch.where(below, hi, a)
        ok = (d1.abs() <= target) & ~done
        best = torch.where(ok | (~done & below), a, best)
        done |= ok
        if bool(done.all()):
            break
        step = a - d1 / d2.clamp_min(1e-300)
        bisect = torch.where(torch.isinf(hi), 2 * lo.clamp_min(1.0), (lo + hi) / 2)
        step = torch.where((step > lo) & (step < hi), step, bisect)
        a = torch.where(done, a, step)
    return best


def _newton(x: torch.Tensor, model, reg: torch.Tensor, tol: float, max_iter: int):
    """Truncated Newton over all units; returns stacked weights (d+1, m) and per-unit results."""
    n, d = x.shape
    group = model.group
    n_units = model.n_units
    device = x.device
    weights = torch.zeros((d + 1, n_units * group), dtype=x.dtype, device=device)
    scores = torch.zeros((n, n_units * group), dtype=x.dtype, device=device)
    objective = torch.zeros(n_units, dtype=torch.float64, device=device)
    converged = torch.zeros(n_units, dtype=torch.bool, device=device)
    g0 = torch.zeros(n_units, dtype=torch.float64, device=device)
    units = torch.arange(n_units, device=device)
    iterations = 0
    for it in range(max_iter + 1):
        cols = _cols_of(units, group)
        full = len(units) == n_units
        w = weights if full else weights[:, cols]
        z = scores if full else scores[:, cols]
        ctx = model.context(units)
        loss, gpt, curv, diag = model.evaluate(ctx, z)
        grad = reg * w + _backward(x, gpt)
        gnorm = _unit_sum(_col_dot(grad, grad), group).sqrt()
        objective[units] = loss + 0.5 * _unit_sum(_col_dot(reg * w, w), group)
        if it == 0:
            g0 = gnorm.clone()
        finished = gnorm <= tol * g0[units]
        converged[units[finished]] = True
        if it == max_iter or bool(finished.all()):
            break
        iterations = it + 1
        if bool(finished.any()):
            keep = ~finished
            units = units[keep]
            sub = keep if group == 1 else keep.repeat_interleave(group)
            cols, w, z, grad, gnorm = cols[sub], w[:, sub], z[:, sub], grad[:, sub], gnorm[keep]
            gkeep = torch.nonzero(keep).squeeze(1)
            ctx = model.take(ctx, gkeep)
            curv = model.take_curv(curv, gkeep)
            diag = diag[:, sub]
        precond = (reg + _square_backward(x, diag)).clamp_min(1e-12)
        s, zs = _pcg(x, model, curv, reg, grad, precond, gnorm)
        ws = _unit_sum(_col_dot(reg * w, s), group)
        ss = _unit_sum(_col_dot(reg * s, s), group)
        d0 = _unit_sum(_col_dot(grad, s), group)
        step = _line_search(model, ctx, z, zs, ws, ss, d0)
        sc = (step if group == 1 else step.repeat_interleave(group)).to(x.dtype)
        weights[:, cols] = torch.addcmul(w, s, sc)
        scores[:, cols] = torch.addcmul(z, zs, sc)
    return weights, objective, converged, iterations


def _check(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, C, n_classes: int):
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
def fit_squared_hinge(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor,
                      n_classes: int, tol: float = 1e-6, max_iter: int = 100) -> LinearFit:
    """One-vs-rest L2-regularised squared-hinge SVMs, as LinearSVC(loss="squared_hinge", C=C).

    For class k, with t_i = +1 where y_i == k and -1 elsewhere, over the rows of the problem's mask:
    minimise 0.5 * (||w_k||^2 + b_k^2) + C * sum_i max(0, 1 - t_i (w_k . x_i + b_k))^2 (liblinear's
    objective: the intercept is a feature of value 1 and is regularised). `objective` is the sum of
    these over the classes. With two classes, as LinearSVC, one problem is solved (class 1 against
    class 0) and returned as coef [-w, w], intercept [-b, b]; `objective` is that one problem's.
    """
    x, y, masks, C = _check(x, y, masks, C, n_classes)
    P = masks.shape[0]
    binary = n_classes == 2
    model = _Hinge(y, masks, C, n_classes, x.dtype, binary)
    reg = torch.ones((x.shape[1] + 1, 1), dtype=x.dtype, device=x.device)
    weights, objective, converged, iterations = _newton(x, model, reg, tol, max_iter)
    if binary:
        w = weights.T.reshape(P, 1, -1)
        w = torch.cat([-w, w], 1)
    else:
        w = weights.T.reshape(P, n_classes, -1)
        objective = objective.view(P, n_classes).sum(1)
        converged = converged.view(P, n_classes).all(1)
    return LinearFit(w[..., :-1].contiguous(), w[..., -1].contiguous(), objective, converged, iterations)


@torch.no_grad()
def fit_logistic(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, C: torch.Tensor,
                 n_classes: int, tol: float = 1e-6, max_iter: int = 100) -> LinearFit:
    """L2-regularised logistic regression, as LogisticRegression(C=C) (lbfgs) with an intercept.

    More than two classes: the multinomial loss, minimise C * sum_i -log softmax(W x_i + b)_{y_i}
    + 0.5 * ||W||^2 over the rows of the problem's mask; the intercept is not penalised. Two classes,
    as scikit-learn: the binomial loss C * sum_i log(1 + exp(-t_i (w . x_i + b))) + 0.5 * ||w||^2 with
    t_i = +1 for class 1, returned as coef [-w/2, w/2], intercept [-b/2, b/2] (so softmax of the
    decision gives the class probabilities). scikit-learn's lbfgs minimises the same objective
    divided by C * n_p (a mean loss plus ||W||^2 / (2 C n_p)); `objective` is on the scale above.
    Multinomial intercepts are defined up to a common shift and are returned centred.
    """
    x, y, masks, C = _check(x, y, masks, C, n_classes)
    P = masks.shape[0]
    reg = torch.ones((x.shape[1] + 1, 1), dtype=x.dtype, device=x.device)
    reg[-1] = 0
    if n_classes == 2:
        model = _Binomial(y, masks, C, x.dtype)
        weights, objective, converged, iterations = _newton(x, model, reg, tol, max_iter)
        w = weights.T.reshape(P, 1, -1) / 2
        w = torch.cat([-w, w], 1)
    else:
        model = _Multinomial(y, masks, C, n_classes, x.dtype)
        weights, objective, converged, iterations = _newton(x, model, reg, tol, max_iter)
        w = weights.T.reshape(P, n_classes, -1)
        w[..., -1] -= w[..., -1].mean(1, keepdim=True)
    return LinearFit(w[..., :-1].contiguous(), w[..., -1].contiguous(), objective, converged, iterations)


def decision(fit: LinearFit, x: torch.Tensor) -> torch.Tensor:
    """Scores (P, n, K) of every problem on rows x (n, d): x @ coef^T + intercept."""
    P, K, d = fit.coef.shape
    x = torch.as_tensor(x).to(device=fit.coef.device, dtype=fit.coef.dtype)
    scores = x @ fit.coef.reshape(P * K, d).T
    return scores.view(-1, P, K).permute(1, 0, 2) + fit.intercept[:, None, :]


def _as_float64(*arrays) -> list[np.ndarray]:
    out = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        out.append(np.asarray(a, dtype=np.float64))
    return out


def primal_objective_svm(x, y, coef, intercept, C, n_classes) -> float:
    """Squared-hinge objective of one problem (fit_squared_hinge's definition) in float64.

    With two classes the last row of coef (class 1 against class 0) is scored, so both LinearSVC's
    single row and the two rows of fit_squared_hinge are accepted.
    """
    x, coef, intercept = _as_float64(x, coef, intercept)
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)
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


def primal_objective_logistic(x, y, coef, intercept, C, n_classes) -> float:
    """Logistic objective of one problem (fit_logistic's definition) in float64.

    With two classes a single row w (LogisticRegression's coef_) or two rows (w = row 1 - row 0) is
    accepted and the binomial objective is returned.
    """
    x, coef, intercept = _as_float64(x, coef, intercept)
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)
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
