"""The measurement-driven allocator: the groups of tensors that share a type and their bytes per
ladder type (groups), the sensitivity runs' files and table (sensitivity), and the exact
multiple-choice knapsack that picks a type per group for a size budget (solver). It plans with
quantsweep.planner and reads its settings from quantsweep.settings (AllocateSettings, Budget)."""
