"""The site's SuperExec with warm ClientApps: Flower's `flower-superexec`, launching each ClientApp
task by forking a process that has the heavy libraries loaded already.

Flower 1.42's subprocess executor starts a fresh `flwr-clientapp` interpreter for every message
(a SecAgg+ round sends four), and each pays Python's start-up, Flower's import and, for training,
torch's and Opacus' (~4 s on this machine kind). Here the SuperExec process imports those
third-party libraries once (`PRELOAD`; never the App's own packages, which every task loads from
the run's approved FAB as before), and `SubprocessExecutor.launch` is replaced: it forks, and the
child runs Flower's own `flwr-clientapp` entry point with the very arguments the executor would have
passed, then exits. Nothing is shared between tasks but read-only, copy-on-write library code; each
child is reaped by a thread. Cost: the SuperExec's resident memory holds torch (~300 MB).

Started in place of `flower-superexec` by `deploy/supernode.py`; pinned to flwr 1.42.0 like it.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

PRELOAD = ("numpy", "torch", "opacus", "opacus.accountants", "flwr.clientapp", "flwr.supernode.cli.flwr_clientapp")


def preload() -> None:
    for module in PRELOAD:
        importlib.import_module(module)


def _run_clientapp_in_child(args: list[str]) -> None:
    """In the forked child: Flower's `flwr-clientapp` with `args`; never returns."""
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        sys.argv = ["flwr-clientapp", *args[1:]]
        flwr_clientapp()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports and exits; the SuperExec goes on
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install_forking_launch() -> None:
    """Make the subprocess executor fork a warm child per ClientApp task instead of a new interpreter."""
    import subprocess

    from flwr.supercore.superexec.executor import subprocess_executor

    original_popen = subprocess.Popen

    class _ForkingPopen:
        """What `SubprocessExecutor.launch` calls: a fork for `flwr-clientapp`, Popen for anything else."""

        def __init__(self, args: list[str], **kwargs: object) -> None:
            if not args or os.path.basename(str(args[0])) != "flwr-clientapp" or kwargs:
                self._proc = original_popen(args, **kwargs)
                return
            pid = os.fork()
            if pid == 0:
                _run_clientapp_in_child(list(args))
            threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()

    class _Subprocess:
        Popen = _ForkingPopen

        def __getattr__(self, name: str) -> object:
            return getattr(subprocess, name)

    subprocess_executor.subprocess = _Subprocess()


def main() -> None:
    from deploy.supernode import FlowerVersionError, check_flower_version

    try:
        check_flower_version()
    except FlowerVersionError as err:
        sys.exit(f"fedcare: error: {err}")
    preload()
    install_forking_launch()
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *sys.argv[1:]]
    flower_superexec()


if __name__ == "__main__":
    main()
