"""Deployment: kits and provisioning, the study PKI, starting and supervising Flower's processes
(the coordinator's SuperLink, a site's SuperNode), `fedcare run` and `fedcare status`, and the
coordinator's report. Sits above export (the report exports the model) and below simulations."""
