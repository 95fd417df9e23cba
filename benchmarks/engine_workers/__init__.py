"""Scripts run inside each engine's own environment by `benchmarks.engines` (they import neither ranktune nor torch
from the project): each reads a JSON request, runs its engine and writes next-token logits and greedy tokens."""
