"""Simulation entry points and synthetic hospital cohorts: run a whole study on one machine with
the very ServerApp and ClientApp that hospitals run. Imported only by commands, tests and benchmarks."""
