"""`python -m netslim ...` (also what torchrun runs: `torchrun ... -m netslim train ...`)."""
from .cli import main

if __name__ == "__main__":
    main()
