"""Differential-privacy accounting for a site: the study's DP-SGD schedule, noise choice and the
site's accountant state carried across rounds (and, later, the site policy, ledger and guard)."""
