"""Planning the task order from the experts' geometry (METHOD.md §7): ``cpt plan``.

- :mod:`cpt.planning.order` — the pure search (exact DP over subsets for T ≤ 8, greedy above);
- :mod:`cpt.planning.plan` — experts (through the expert cache), step conflicts over the model's
  target tensors, the printed plan and the reordered recipe.
"""

from cpt.planning.order import EXACT_MAX_TASKS, OrderPlan, exact_order, greedy_order, order_cost, plan_order

__all__ = ["EXACT_MAX_TASKS", "OrderPlan", "exact_order", "greedy_order", "order_cost", "plan_order"]
