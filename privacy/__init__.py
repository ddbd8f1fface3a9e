"""Privacy the site enforces: the study's DP-SGD schedule and the site's accountant across rounds,
the site's own policy, the masked-only guard that keeps every update inside SecAgg+, and the
primitives fedcare puts inside Flower's SecAgg+ at both ends (Shamir, X25519 keys, masks)."""
