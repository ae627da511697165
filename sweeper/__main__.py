"""`python -m sweeper` (and `torchrun -m sweeper`): the `sweeper` command line."""
from .cli import main

if __name__ == "__main__":
    main()
