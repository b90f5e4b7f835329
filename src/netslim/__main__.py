"""`python -m netslim ...` (also what torchrun runs: `torchrun ... -m netslim train ...`)."""
import os
import sys

from .cli import main


def _run() -> int:
    try:
        return main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun: leave without interpreter teardown. Every file is written and the
        # process group is destroyed by now, but gloo's worker threads can still hold tensors
        # whose release during finalisation aborts the process ("terminate called without an
        # active exception", SIGABRT) now and then, turning a finished run into a failed one.
        code = _run()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    main()
