"""The toy world: a synthetic high-resolution task a CPU can learn (world), the supervised warm-up that
builds the shipped base (warmup, base/), and the paper's ablation rerun on it (ablation)."""
