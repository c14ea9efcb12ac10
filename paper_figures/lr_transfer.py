"""`python -m paper_figures.lr_transfer RUNS_DIR`: the script of :mod:`sdebatch.figures.lr_transfer` (where the code lives)."""
from sdebatch.figures.lr_transfer import main

if __name__ == "__main__":
    main()
