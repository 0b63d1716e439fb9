"""``python -m perturb …``: the ``perturb`` command line, for when the script is not on PATH.

Also the module torchrun runs: ``torchrun --nproc-per-node K -m perturb predict …``.
"""

from perturb.cli import main

if __name__ == "__main__":
    main()
