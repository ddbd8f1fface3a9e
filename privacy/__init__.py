"""Privacy the site enforces: the study's DP-SGD schedule and the site's accountant across rounds,
the site's own policy, and the masked-only guard that keeps every update inside SecAgg+."""
