"""Mixture of Experts (DeepSeek V2/V3): router, grouped expert computation, shared experts.

Routing (`select_experts`) follows DeepSeek's configs:
    scores     = softmax(logits) or sigmoid(logits)                      scoring_func
    greedy                 top-k of the scores
    group_limited_greedy   keep the topk_group groups with the best single score, then top-k
    noaux_tc               choose with scores + e_score_correction_bias: keep the topk_group groups
                           with the best sum of their two best, then top-k; weights are the plain scores
    weights /= their sum (norm_topk_prob), then *= routed_scaling_factor

Expert weights are stacked, [E, ...], with gate|up fused: `w13` [E, 2I, H], `w2` [E, H, I]. The
layer holds experts `expert_range` (all by default); an expert-parallel split gives each rank a
slice of that range, loads only its experts, and sums the partial outputs across ranks.

Tokens are grouped by expert (sorted by expert id) and only experts that received tokens run, one
pair of matmuls each over their own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zili.config import ModelConfig
from zili.layers.activation import SiluAndMul
from zili.layers.parallel import TensorParallel, active, column_linear, row_linear


def select_experts(router_logits: torch.Tensor, config: ModelConfig,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] float32 -> (weights [T, k] float32, expert ids [T, k] int64)."""
    k, E = config.num_experts_per_tok, config.n_routed_experts
    if config.scoring_func == "softmax":
        scores = router_logits.softmax(dim=-1)
    else:
        scores = router_logits.sigmoid()
    if config.topk_method == "greedy":
        weights, ids = torch.topk(scores, k, dim=-1, sorted=False)
    elif config.topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, config.n_group, E // config.n_group).amax(dim=-1)
        masked = scores.masked_fill(~_group_mask(group_scores, config.topk_group, E), 0.0)
        weights, ids = torch.topk(masked, k, dim=-1, sorted=False)
    else:  # noaux_tc
        choice = scores if correction_bias is None else scores + correction_bias.float()
        per_group = E // config.n_group
        group_scores = choice.view(-1, config.n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(group_scores, config.topk_group, E), float("-inf"))
        ids = torch.topk(choice, k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor, ids


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """[T, n_group] scores -> [T, E] bool, true for experts in the topk_group best groups."""
    T, n_group = group_scores.shape
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1], True)
    return keep[:, :, None].expand(T, n_group, num_experts // n_group).reshape(T, num_experts)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate|up fused; the dense layers' MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel | None = None,
                 reduce: bool = True) -> None:
        """With `tp`, gate|up rows and down columns are split across ranks; `reduce=False` leaves the
        partial output for the caller to sum."""
        super().__init__()
        self.gate_up_proj = column_linear(hidden_size, [intermediate_size, intermediate_size], tp)
        self.down_proj = row_linear(intermediate_size, hidden_size, tp, reduce=reduce)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # Checkpoints keep it in float32 (it shifts sigmoid scores by tiny amounts); so do we.
        self.e_score_correction_bias = (nn.Parameter(torch.empty(config.n_routed_experts, dtype=torch.float32))
                                        if config.topk_method == "noaux_tc" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, ids [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        return select_experts(logits, self.config, self.e_score_correction_bias)


class FusedExperts(nn.Module):
    """The routed experts of one layer, stacked."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 expert_range: range | None = None) -> None:
        super().__init__()
        self.expert_range = expert_range if expert_range is not None else range(num_experts)
        n, inter = len(self.expert_range), intermediate_size
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(n, 2 * inter, hidden_size))  # gate rows, then up rows
        self.w2 = nn.Parameter(torch.empty(n, hidden_size, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, ids [T, k] -> sum_k weights * expert_ids(x) [T, H]."""
        T, k = ids.shape
        n = len(self.expert_range)
        local = ids.flatten() - self.expert_range.start
        local = torch.where((local >= 0) & (local < n), local, n)  # experts held elsewhere: bin n, last
        order = local.argsort(stable=True)  # the (token, slot) pairs grouped by expert
        counts = torch.bincount(local, minlength=n + 1)[:n].tolist()
        token_of = order // k
        sorted_x = x[token_of]
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            h = F.linear(sorted_x[start:end], self.w13[e])
            y = F.linear(F.silu(h[:, :self.intermediate_size]) * h[:, self.intermediate_size:], self.w2[e])
            w = weights.flatten()[order[start:end]]
            out.index_add_(0, token_of[start:end], y.float() * w[:, None])
            start = end
        return out.to(x.dtype)

    def load_expert(self, expert: int, hf_leaf: str, tensor: torch.Tensor) -> bool:
        """Copy one expert's gate_proj / up_proj / down_proj weight; False if the expert is not held here."""
        if expert not in self.expert_range:
            return False
        e, inter = expert - self.expert_range.start, self.intermediate_size
        target = {"gate_proj": self.w13[e, :inter], "up_proj": self.w13[e, inter:], "down_proj": self.w2[e]}[hf_leaf]
        if tensor.shape != target.shape:
            raise ValueError(f"expected shape {list(target.shape)}, got {list(tensor.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        return True


class DeepseekMoE(nn.Module):
    """Routed experts plus always-on shared experts.

    With tensor parallelism every rank routes (the router is replicated), holds a contiguous slice
    of the experts and a column/row split of the shared experts, and one all-reduce sums both."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp if active(tp) else None
        self.gate = Router(config)
        E = config.n_routed_experts
        held = None
        if self.tp is not None:
            split = self.tp.split(E)
            held = range(split.start, split.stop)
        self.experts = FusedExperts(E, config.hidden_size, config.moe_intermediate_size, expert_range=held)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = GatedMLP(config.hidden_size, shared, tp, reduce=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out if self.tp is None else self.tp.all_reduce(out)
